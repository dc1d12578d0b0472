"""The embedded evaluation text (docs/evaluation.md protocol) and text-file loading."""

from __future__ import annotations

import hashlib
from pathlib import Path

from jaxopt_llm.errors import ParameterError


def pydoc_text() -> str:
    """CPython's pydoc_data.topics values joined by blank lines, in sorted-key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_text_file(path: str | Path) -> str:
    """Read a UTF-8 text file, with errors that name the file and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise ParameterError("path", str(path), "file does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ParameterError("path", str(path), f"file is not UTF-8 text ({err})") from None
    if not text.strip():
        raise ParameterError("path", str(path), "file is empty; give a file with text")
    return text
