"""The embedded evaluation text (docs/evaluation.md protocol) and text-file loading."""

from __future__ import annotations

import hashlib
from pathlib import Path

from jaxopt_llm.errors import ParameterError


def pydoc_text() -> str:
    """CPython's pydoc_data.topics values joined by blank lines, in sorted-key order.

    The evaluation text of docs/evaluation.md: its first 65,536 tokens are scored, what
    follows is used for calibration and training.

    Returns:
        The text (the same on every machine with the same CPython version).

    Example:
        >>> pydoc_text()[:22]
        'The "assert" statement'
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def text_sha256(text: str) -> str:
    """The sha256 hex digest of `text` as UTF-8 (reported with every perplexity).

    Args:
        text: any string.

    Returns:
        64 hex characters.

    Example:
        >>> text_sha256("")[:12]
        'e3b0c44298fc'
    """
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_text_file(path: str | Path) -> str:
    """Read a UTF-8 text file, with errors that name the file and what was expected.

    Args:
        path: the file.

    Returns:
        Its text.

    Raises:
        ParameterError: the file does not exist, is not UTF-8 or holds only whitespace.

    Example:
        >>> read_text_file("notes.txt")  # doctest: +SKIP
        'the text of notes.txt'
    """
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
