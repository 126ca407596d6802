"""Offline text corpora for tokenizer and model training.

    load_corpus("python-docs")                  # the Python documentation topics (pydoc_data.topics)
    load_corpus("python-stdlib", max_chars=1e6)  # Python standard library source, deterministic order
    load_corpus([Path("a.txt"), Path("b.jsonl")]) # uploaded .txt / .md / .jsonl files
    load_corpus(text="pasted text")              # pasted text, validated the same way

Everything ships with Python or comes from the user: nothing is downloaded.
"""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path
from typing import Sequence

BUILTIN_CORPORA = {
    "python-docs": "Python documentation topics (pydoc_data.topics): English prose with code, about 0.47 MB",
    "python-stdlib": "Python standard library source (.py files, sorted by path): code and docstrings, many MB",
}
FILE_SUFFIXES = (".txt", ".md", ".jsonl")
# Fields of a .jsonl record taken as text, in this order of preference.
JSONL_TEXT_FIELDS = ("text", "content", "prompt", "completion", "response")


def list_corpora() -> list[str]:
    return list(BUILTIN_CORPORA)


def load_corpus(source: str | Path | Sequence[str | Path] | None = None, *, text: str | None = None,
                max_chars: int | None = None) -> str:
    """Return corpus text. `source` is a built-in name or a list of file paths; or pass pasted `text`.

    Raises ValueError naming the problem (unknown corpus, unsupported file type, bad UTF-8 or JSON, empty).
    """
    limit = int(max_chars) if max_chars else None
    if text is not None:
        out = text
    elif isinstance(source, str) and not isinstance(source, Path):
        if source not in BUILTIN_CORPORA:
            raise ValueError(f"unknown corpus {source!r}; built-in corpora: {', '.join(BUILTIN_CORPORA)}")
        out = _python_docs() if source == "python-docs" else _python_stdlib(limit)
    elif source is not None:
        paths = [source] if isinstance(source, Path) else list(source)
        if not paths:
            raise ValueError("no files given")
        out = "\n\n".join(read_text_file(Path(p)) for p in paths)
    else:
        raise ValueError("give a corpus name, files, or text")
    _check_text(out, "corpus")
    if limit is not None:
        out = out[:limit]
    if not out.strip():
        raise ValueError("corpus is empty")
    return out


def read_text_file(path: Path) -> str:
    """Text of one uploaded file: .txt and .md as they are, .jsonl as one document per record."""
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise ValueError(f"{path.name}: unsupported file type {suffix or '(none)'!r}; use {', '.join(FILE_SUFFIXES)}")
    try:
        raw = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path.name}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"{path.name}: cannot read ({e.strerror})") from None
    if suffix != ".jsonl":
        return raw
    docs = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path.name}: line {lineno} is not JSON ({e.msg})") from None
        docs.append(_record_text(record, f"{path.name}: line {lineno}"))
    return "\n\n".join(docs)


def _record_text(record, where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        if isinstance(record.get("messages"), list):  # a chat conversation: its message contents in order
            return "\n".join(str(m.get("content", "")) for m in record["messages"] if isinstance(m, dict))
        for key in JSONL_TEXT_FIELDS:
            if isinstance(record.get(key), str):
                return record[key]
    raise ValueError(f"{where}: no text field (expected a string or an object with one of "
                     f"{', '.join(JSONL_TEXT_FIELDS)} or messages)")


def _check_text(text: str, field: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{field} contains a lone surrogate at character {e.start}") from None


def _python_docs() -> str:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def _python_stdlib(max_chars: int | None) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        # skip test suites, third-party installs and generated/odd files: we want ordinary library code
        if rel[0] in ("test", "site-packages", "dist-packages", "idlelib", "lib2to3") or "tests" in rel:
            continue
        try:
            src = path.read_text("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(src)
        total += len(src)
        if max_chars is not None and total >= max_chars:
            break
    return "\n\n".join(parts)
