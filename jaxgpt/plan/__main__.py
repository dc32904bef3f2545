"""``python -m jaxgpt.plan``: compile the train step for a target and print its plan."""

from jaxgpt.core.cli import run
from jaxgpt.plan.report import main

if __name__ == "__main__":
    run(main)
