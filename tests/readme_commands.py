"""The shell commands of README.md's ```bash blocks, and the offline stand-ins that let them run as written.

A command is one logical line: lines ending in a backslash continue it, a here-document
(``<<'EOF'`` ... ``EOF``) belongs to the line that opens it, and a ``for``/``while``/``if``
runs to its ``done``/``fi``. Comment-only and blank lines are not commands.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

BASH_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.DOTALL | re.MULTILINE)
HEREDOC = re.compile(r"<<-?\s*'?\"?(\w+)'?\"?")
OPENS = re.compile(r"^\s*(for|while|until|if)\b")
CLOSES = re.compile(r"\b(done|fi)\b")


def bash_blocks(markdown: str) -> list[list[str]]:
    """The commands of each ```bash block, in the order of the file."""
    return [commands(block) for block in BASH_BLOCK.findall(markdown)]


def commands(block: str) -> list[str]:
    found, current, heredoc, depth = [], [], None, 0
    for line in block.splitlines():
        if heredoc is not None:
            current.append(line)
            heredoc = None if line.strip() == heredoc else heredoc
        elif not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        else:
            current.append(line)
            if match := HEREDOC.search(line):
                heredoc = match[1]
            depth += len(OPENS.findall(line)) - len(CLOSES.findall(line))
        if heredoc is None and depth <= 0 and not line.endswith("\\"):
            found.append("\n".join(current))
            current, depth = [], 0
    assert not current, f"unterminated command in a bash block: {current}"
    return found


PIP_SHIM = '''#!{python}
"""pip without a network: `pip install` checks that what it is asked for is installed at its pinned version."""
import importlib.metadata, re, sys
from pathlib import Path

def wanted(spec, missing):
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\\[[^]]*\\])?(==([^\\s;]+))?\\s*", spec)
    if not match:
        sys.exit(f"pip (offline stand-in): cannot read the requirement {{spec!r}}")
    try:
        have = importlib.metadata.version(match[1])
    except importlib.metadata.PackageNotFoundError:
        have = None
    if have is None or (match[4] and have != match[4]):
        missing.append(f"{{spec}} (installed: {{have}})")

def requirements(path, missing):
    for line in Path(path).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            requirements(Path(path).parent / line[3:].strip(), missing)
        elif line:
            wanted(line, missing)

args, missing = [a for a in sys.argv[1:] if a not in ("-q", "--quiet")], []
if not args or args[0] != "install":
    sys.exit(f"pip (offline stand-in): only `pip install` is supported, got {{sys.argv[1:]}}")
rest = iter(args[1:])
for arg in rest:
    if arg == "-r":
        requirements(next(rest), missing)
    elif arg.startswith("-"):
        sys.exit(f"pip (offline stand-in): unsupported option {{arg}}")
    else:
        wanted(arg, missing)
if missing:
    sys.exit("pip (offline stand-in): not installed: " + ", ".join(missing))
'''


def write_shims(bin_dir: Path) -> Path:
    """``python``/``python3`` as this interpreter and an offline ``pip`` in ``bin_dir`` (put it first on PATH)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in ("python", "python3"):
        (bin_dir / name).symlink_to(sys.executable)
    pip = bin_dir / "pip"
    pip.write_text(PIP_SHIM.format(python=sys.executable))
    pip.chmod(0o755)
    return bin_dir


TRAIN = re.compile(r"python train\.py((?:(?!&&|\|\||[;&|\n]|\s#).)*)")  # to the next operator or comment


def shortened(command: str, max_steps: int) -> str:
    """``command`` with ``--max_steps max_steps`` added to each ``python train.py`` that sets no length."""

    def add(match: re.Match) -> str:
        words = shlex.split(match[1]) if match[1].strip() else []
        if any(w.split("=")[0] in ("--max_steps", "--epochs", "--help") for w in words):
            return match[0]
        stripped = match[0].rstrip()
        return f"{stripped} --max_steps {max_steps}{match[0][len(stripped) :]}"

    return TRAIN.sub(add, command.replace("\\\n", " "))  # bash drops a backslash-newline anyway
