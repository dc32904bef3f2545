"""Every shell command of README.md runs as written, in the README's order, on the model its Quick start makes.

The commands are read out of the ```bash blocks (see tests/readme_commands.py) and run with bash in a
copy of the repository, beside a link to ../shared, with a plain environment: one CPU device, no
TIKTOKEN_CACHE_DIR, the hub offline. Each block runs in one shell, so an ``export`` or a variable holds
for the rest of its block. Two stand-ins keep it offline and short: ``pip install`` checks that the
pinned requirements are installed instead of fetching them, and a ``python train.py`` that sets no
length of its own trains QUICK_STEPS steps instead of its preset's 500. Commands that need a network,
a GPU, a cluster or a long time are left out by SKIPPED, each with the reason; a pattern there that
matches no command any more is an error, so the table stays small and true.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.readme_commands import bash_blocks, shortened, write_shims

ROOT = Path(__file__).resolve().parents[1]
QUICK_STEPS = 20
BLOCK_TIMEOUT_S = 900

SKIPPED = {  # regular expression searched in a command -> why it is not run here
    r"python3? -m pytest tests\b": "long: the whole test suite (about 21 minutes on 2 cores), this test included",
    r"--src gpt2\b|--init_from gpt2\b|\bgpt2-hf\b": "network: GPT-2's weights from the hub (gpt2-hf: their download)",
    r"--dataset \w": "network: downloads or streams a dataset from the Hugging Face hub",
    r"https?://(127\.0\.0\.1|localhost)": "talks to the server started above, which runs until stopped",
    r"^curl .*https://|tensorboard-plugin-profile": "network: downloads",
    r"--wandb_project": "network: Weights & Biases needs a login",
    r"jaxgpt\.eval\.harness": "network: lm-eval downloads its tasks' datasets",
    r"^tensorboard |-m jaxgpt\.serve\b": "a server: runs until stopped",
    r"gpt2-124m|fineweb10B": "GPU and long: GPT-2 124M, on FineWeb whose shards need a network",
    r"\.venv-plan": "network: a venv with JAX's CUDA or TPU plugin wheels",
    r"^srun |--coordinator_address 10\.": "a cluster",
    r"bench\.bench_recipes": "long: 500-step recipe comparisons (20+ minutes)",
    r"my_corpus/": "a placeholder for the reader's own corpus folder",
    r"pairs\.jsonl|data/preference\b": "your own preference pairs (tests/test_dpo.py and bench/bench_rl.py make some)",
    r"--prompts train\.jsonl|train\.parquet": "your own prompts or GSM8K's files (tests/test_grpo.py makes some)",
    r"out/shakespeare-gpt2\b": "long: the 500-step shakespeare-gpt2 run (GPT-2's architecture, which HF export needs)",
}


def skip_reason(command: str) -> str | None:
    reasons = [why for pattern, why in SKIPPED.items() if re.search(pattern, command, re.MULTILINE)]
    return reasons[0] if reasons else None


def block_script(commands: list[str]) -> str:
    """The block as one bash script that announces each command before it runs and stops at a failure."""
    lines = ["set -eo pipefail"]
    for i, command in enumerate(commands):
        reason = skip_reason(command)
        lines.append(f"echo '>>> command {i}' >&2")
        lines.append(f": {shlex.quote('skipped: ' + reason)}" if reason else shortened(command, QUICK_STEPS))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory, shared_data) -> Path:
    """The repository's files (tracked and new, not ignored) in a git work tree beside a link to ../shared."""
    top = tmp_path_factory.mktemp("readme")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT, check=True,
        capture_output=True, text=True,
    ).stdout.split("\0")  # fmt: skip
    repo = top / "jaxgpt"
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    (top / "shared").symlink_to(shared_data.parent)
    for args in (["init", "-q"], ["add", "-A"]):  # git status then shows what the commands left behind
        subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)
    return repo


def plain_env(bin_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "TIKTOKEN_CACHE_DIR", "PYTHONPATH")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def test_the_skip_table_matches_readme_commands_and_blocks_parse():
    found = [c for block in bash_blocks((ROOT / "README.md").read_text()) for c in block]
    assert len(found) > 20, found
    stale = [p for p in SKIPPED if not any(re.search(p, c, re.MULTILINE) for c in found)]
    assert not stale, f"SKIPPED patterns that match no README command any more: {stale}"
    for commands in bash_blocks((ROOT / "README.md").read_text()):  # each block, as run, is valid bash
        checked = subprocess.run(["bash", "-n", "-c", block_script(commands)], capture_output=True, text=True)
        assert checked.returncode == 0, f"{checked.stderr}\n{commands}"


def test_every_readme_command_runs_as_written(repo_copy, tmp_path):
    env = plain_env(write_shims(tmp_path / "bin"))
    failures, ran = [], 0
    for number, commands in enumerate(bash_blocks((repo_copy / "README.md").read_text())):
        began = time.perf_counter()
        result = subprocess.run(
            ["bash", "-c", block_script(commands)], cwd=repo_copy, env=env, input="ROMEO:\n", text=True,
            capture_output=True, timeout=BLOCK_TIMEOUT_S,
        )  # fmt: skip
        ran += sum(skip_reason(c) is None for c in commands)
        seconds = time.perf_counter() - began
        print(f"block {number}: {len(commands)} commands, exit {result.returncode}, {seconds:.0f} s")
        if result.returncode != 0:
            last = re.findall(r">>> command (\d+)", result.stderr)
            command = commands[int(last[-1])] if last else "(before the first command)"
            failures.append(f"block {number}, exit {result.returncode}: {command}\n{result.stderr[-3000:]}")
    assert not failures, "\n\n".join(failures)
    assert ran >= 15, ran
    assert (repo_copy / "out" / "shakespeare" / "jaxgpt.json").is_file()  # the Quick start's model was made
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"], cwd=repo_copy, check=True, capture_output=True,
        text=True,
    ).stdout  # fmt: skip
    left = [line for line in status.splitlines() if not line.startswith("A  ")]  # "A  ": as copied, unchanged
    assert not left, "README commands left files outside out/ and data/, or changed tracked ones:\n" + "\n".join(left)
