"""The package's shape: imports run one way between sub-packages, ``pip install .`` ships every module,
and the public API in ``jaxgpt/__init__.py`` resolves."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import jaxgpt

ROOT = Path(__file__).resolve().parents[1]
# Low to high: a module may import from its own sub-package and those before it (README, "Layout").
ORDER = (
    "core", "tokenizer", "model", "sampling", "chat", "data", "convert", "checkpoints", "eval", "train", "plan",
    "rl", "serve",
)  # fmt: skip


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every jaxgpt import in ``tree``, relative ones resolved; ``from jaxgpt
    import x`` names ``jaxgpt.x``, so that the sub-package it reaches is visible."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = module.split(".")[: len(module.split(".")) + is_package - node.level] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            if target == "jaxgpt":
                found += [(node.lineno, f"jaxgpt.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, target))
    return [(line, name) for line, name in found if name == "jaxgpt" or name.startswith("jaxgpt.")]


def layering_errors(root: Path = ROOT) -> list[str]:
    """Every import that runs from a sub-package to one after it in ORDER, or to a package not in ORDER."""
    errors = []
    for path in sorted((root / "jaxgpt").rglob("*.py")):
        if path.name == "__main__.py" or path.parent == root / "jaxgpt":  # entry points and the public API
            continue
        module = _module_name(path, root)
        own = module.split(".")[1]
        where = path.relative_to(root)
        if own not in ORDER:
            errors.append(f"{where}: package jaxgpt.{own} is not in the layering order")
            continue
        for line, name in _imported(ast.parse(path.read_text(), str(path)), module, path.name == "__init__.py"):
            target = name.split(".")[1] if "." in name else "jaxgpt"
            if target not in ORDER:
                errors.append(f"{where}:{line}: imports {name}, which is not a sub-package in the order")
            elif ORDER.index(target) > ORDER.index(own):
                errors.append(f"{where}:{line}: {own} imports {name}, from {target} above it")
    return errors


def test_imports_run_one_way_between_sub_packages():
    assert layering_errors() == []


def test_the_layering_check_catches_a_wrong_way_import(tmp_path):
    """The check itself can fail: a model module importing training code, a relative import of the public API."""
    fake = tmp_path / "jaxgpt"
    (fake / "model").mkdir(parents=True)
    (fake / "model" / "bad.py").write_text(
        "from jaxgpt.train.loop import train\nfrom .. import plot\n\ndef f():\n    import jaxgpt.serve.app\n"
    )
    (fake / "web").mkdir()
    (fake / "web" / "app.py").write_text("import os\n")
    assert layering_errors(tmp_path) == [
        "jaxgpt/model/bad.py:1: model imports jaxgpt.train.loop, from train above it",
        "jaxgpt/model/bad.py:2: imports jaxgpt.plot, which is not a sub-package in the order",
        "jaxgpt/model/bad.py:5: model imports jaxgpt.serve.app, from serve above it",
        "jaxgpt/web/app.py: package jaxgpt.web is not in the layering order",
    ]


def _source_modules() -> list[str]:
    return sorted(_module_name(path) for path in (ROOT / "jaxgpt").rglob("*.py"))


IMPORT_ALL = """
import importlib, pkgutil, sys
import jaxgpt
expected = set(sys.argv[1:])
installed = {m.name for m in pkgutil.walk_packages(jaxgpt.__path__, "jaxgpt.")} | {"jaxgpt"}
assert expected <= installed, f"not installed: {sorted(expected - installed)}"
for name in sorted(installed):
    module = importlib.import_module(name)
    assert module.__file__.startswith(sys.prefix), (name, module.__file__)  # the venv's copy, not the checkout
print(len(installed), "modules")
"""


def test_pip_install_ships_and_imports_every_module(tmp_path):
    """``pip install .`` of a copy of the checkout into a fresh venv; every module imports from outside the repo."""
    copy = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    assert tracked.returncode == 0, tracked.stderr
    for name in tracked.stdout.splitlines():
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", str(copy)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    imported = subprocess.run(
        [python, "-c", IMPORT_ALL, *_source_modules()], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr[-3000:]


@pytest.mark.parametrize("name", jaxgpt.__all__)
def test_public_api_names_resolve(name):
    assert getattr(jaxgpt, name) is not None
