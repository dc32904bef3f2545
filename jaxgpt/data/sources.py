"""Where the text comes from, streamed as pieces that can be tokenised independently.

Two shapes of corpus, two train/val splits:

* One text file (``--input file.txt``, ``--dataset shakespeare``): nanoGPT's split.
  The first ``1 - val_fraction`` of the CHARACTERS are train, the rest val, and each
  split is ONE document with no end-of-text token, so tiny Shakespeare gives
  nanoGPT's 301,966 / 36,059 tokens.
* Many documents (a folder of ``.txt``/``.jsonl`` files, the hub datasets): each
  document is prefixed with ``<|endoftext|>`` (as llm.c and build-nanogpt do) and
  documents are dealt to val by their index: document ``i`` is val when
  ``floor(i * f)`` steps up, so exactly a fraction ``f`` of them, the first
  included, is val. Folder files are read in sorted path order, so the split is
  deterministic.

Long texts are cut into pieces of about ``CHUNK_CHARS`` characters, only where
GPT-2's pre-tokeniser splits anyway (see :func:`safe_cut`), so encoding the pieces
one by one gives exactly the tokens of encoding the whole text.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path

from jaxgpt.core.errors import UserError

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
# name -> (hub repository, configuration)
HUB_DATASETS: dict[str, tuple[str, str | None]] = {
    "openwebtext": ("Skylion007/openwebtext", None),
    "fineweb": ("HuggingFaceFW/fineweb", "sample-10BT"),
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT"),
}
TEXT_SUFFIXES = (".txt", ".jsonl")
CHUNK_CHARS = 1 << 18  # characters per piece: large enough to amortise IPC, small enough to balance workers
LOCAL_HINT = "for local files use --input PATH (a .txt file, or a folder of .txt/.jsonl files)"


@dataclasses.dataclass(frozen=True)
class Piece:
    """A stretch of one document's text, bound for one split."""

    text: str
    split: str  # "train" or "val"
    starts_document: bool  # prefix the tokens with <|endoftext|>


def safe_cut(text: str) -> int:
    """The last index where ``text`` may be cut without changing its GPT-2 tokens, or 0 if none.

    That is before a space or newline that follows a letter or digit: GPT-2's
    pre-tokeniser (whose tokens BPE never merges across) always splits there, and
    what it does on either side depends only on that side's characters.
    """
    for i in range(len(text) - 1, 0, -1):
        if text[i] in " \n" and text[i - 1].isalnum():
            return i
    return 0


def read_pieces(path: Path, chunk_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """Streams a UTF-8 text file as pieces cut at :func:`safe_cut` points (never the whole file at once)."""
    carry = ""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            while block := f.read(chunk_chars):
                text = carry + block
                cut = safe_cut(text)
                if cut == 0:  # no safe point yet: keep reading
                    carry = text
                    continue
                yield text[:cut]
                carry = text[cut:]
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err})") from err
    if carry:
        yield carry


def count_chars(path: Path, chunk_chars: int = CHUNK_CHARS) -> int:
    """Characters in a UTF-8 file, read in blocks."""
    total = 0
    try:
        with open(path, encoding="utf-8", newline="") as f:
            while block := f.read(chunk_chars):
                total += len(block)
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err})") from err
    return total


def single_text_pieces(path: Path, val_fraction: float, chunk_chars: int = CHUNK_CHARS) -> Iterator[Piece]:
    """nanoGPT's split of one file: the first ``1 - val_fraction`` of the characters are train."""
    boundary = int(count_chars(path, chunk_chars) * (1 - val_fraction))
    position = 0
    for text in read_pieces(path, chunk_chars):
        head = text[: max(0, boundary - position)]
        tail = text[len(head) :]
        if head:
            yield Piece(head, "train", starts_document=False)
        if tail:
            yield Piece(tail, "val", starts_document=False)
        position += len(text)


def is_val_document(index: int, val_fraction: float) -> bool:
    """Deals a fraction ``val_fraction`` of the documents to val, starting with document 0."""
    return math.floor(index * val_fraction) > math.floor((index - 1) * val_fraction)


def document_pieces(documents: Iterable[Iterable[str]], val_fraction: float) -> Iterator[Piece]:
    """Pieces of many documents, each starting with end-of-text and split by document index."""
    index = 0
    for document in documents:
        split = "val" if is_val_document(index, val_fraction) else "train"
        first = True
        for text in document:
            if text:
                yield Piece(text, split, starts_document=first)
                first = False
        index += 0 if first else 1  # empty documents are skipped and not counted


def path_pieces(path: Path, val_fraction: float) -> tuple[Iterator[Piece], bool]:
    """A local corpus (one text file, or a folder of documents) as pieces, and whether documents start with EOT."""
    if path.is_file():
        return single_text_pieces(path, val_fraction), False
    return document_pieces(folder_documents(path), val_fraction), True


def folder_files(folder: Path) -> list[Path]:
    """The .txt and .jsonl files below ``folder``, in a fixed (sorted) order."""
    files = sorted(p for p in folder.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"{folder} holds no .txt or .jsonl files; {LOCAL_HINT}")
    return files


def jsonl_texts(path: Path) -> Iterator[str]:
    """The ``text`` field of each line of a JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise UserError(f"{path}:{number}: expected a JSON object with a 'text' field ({err!r})") from err
            if not isinstance(text, str):
                raise UserError(f"{path}:{number}: the 'text' field is {type(text).__name__}, not a string")
            yield text


def folder_documents(folder: Path, chunk_chars: int = CHUNK_CHARS) -> Iterator[Iterable[str]]:
    """Documents of a folder: each .txt file is one, each line of a .jsonl file is one."""
    for path in folder_files(folder):
        if path.suffix == ".txt":
            yield read_pieces(path, chunk_chars)
        else:
            yield from ([text] for text in jsonl_texts(path))


HUB_FILE_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}  # suffix -> datasets' builder


def hub_files(data_files: str) -> tuple[str, list[str]]:
    """``datasets``' builder and the files of a local copy of a hub dataset: a file, a glob or a folder."""
    path = Path(data_files).expanduser()
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix in HUB_FILE_FORMATS and p.is_file())
    else:
        files = sorted(f for f in glob.glob(str(path)) if Path(f).is_file())
    if not files:
        raise UserError(f"--data_files {data_files}: no {'/'.join(HUB_FILE_FORMATS)} files there")
    formats = {HUB_FILE_FORMATS.get(Path(f).suffix) for f in files}
    if len(formats) != 1 or None in formats:
        raise UserError(f"--data_files {data_files}: expected files of one of {', '.join(HUB_FILE_FORMATS)}")
    return formats.pop(), files  # type: ignore[return-value]


def hub_rows(repo: str, config: str | None, split: str = "train", data_files: str | None = None) -> Iterator[dict]:
    """Streams the rows of a Hugging Face hub dataset (needs ``datasets`` and the network).

    ``data_files``: a local copy of the dataset's own files (its parquet or JSON, as on the hub), read
    through the same ``datasets`` streaming, so the rows are what the hub gives, without a network.
    """
    try:
        import datasets  # lazily: optional, and slow to import
    except ImportError as err:
        raise UserError(
            f"{repo} is streamed through the `datasets` library, which is not installed "
            f"(pip install datasets); {LOCAL_HINT}"
        ) from err
    try:
        if data_files is None:
            rows = iter(datasets.load_dataset(repo, name=config, split=split, streaming=True))
        else:
            builder, files = hub_files(data_files)
            rows = iter(datasets.load_dataset(builder, data_files={split: files}, split=split, streaming=True))
        first = next(rows, None)
    except UserError:
        raise
    except Exception as err:  # offline: requests/hub/datasets raise many different types
        if data_files is not None:
            raise UserError(f"could not read {repo}'s rows from --data_files {data_files} ({err})") from err
        raise UserError(f"could not stream {repo} from the Hugging Face hub ({err}); offline? {LOCAL_HINT}") from err
    if first is None:
        return
    yield first
    try:
        yield from rows
    except OSError as err:
        raise UserError(f"lost the connection while streaming {repo} ({err}); run again to restart") from err


def hub_documents(dataset: str, data_files: str | None = None) -> Iterator[Iterable[str]]:
    """Streams a Hugging Face hub dataset's ``text`` column, one document per row (``data_files``: see hub_rows)."""
    repo, config = HUB_DATASETS[dataset]
    for row in hub_rows(repo, config, data_files=data_files):
        yield [row["text"]]


def fetch(url: str, timeout: float = 30.0) -> bytes:
    """The body of ``url``, read whole: for downloads small enough to hold in memory."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def download_shakespeare(directory: Path) -> Path:
    """Downloads tiny Shakespeare into ``directory`` once (atomically) and returns its path."""
    path = directory / "tinyshakespeare.txt"
    if path.is_file():
        return path
    try:
        data = fetch(SHAKESPEARE_URL)
    except (urllib.error.URLError, OSError) as err:
        raise UserError(
            f"could not download tiny Shakespeare from {SHAKESPEARE_URL} ({err}); offline? "
            f"use --input ../shared/data/tinyshakespeare.txt"
        ) from err
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path
