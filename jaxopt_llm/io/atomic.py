"""Replacing a directory so that its path always names one complete version.

Artifacts and checkpoints are written to a hidden sibling `.NAME.tmp-PID-TOKEN`, fsynced,
then swapped into place. Where the kernel has an exchange rename (Linux `renameat2` with
`RENAME_EXCHANGE`, 3.15+), the new and the old version trade places in one atomic step and
the old one (now under the temporary name) is deleted; a crash at any moment leaves either
the old or the new version at the path. Elsewhere the old version is first renamed to
`.NAME.old-PID-TOKEN`; a crash between the two renames leaves the path empty, and the next
`clean_stale` (run before every save and load) puts the old version back.

`clean_stale` removes only what it can prove is this project's and abandoned: siblings
named `.NAME.tmp-PID-TOKEN` / `.NAME.old-PID-TOKEN` (TOKEN: 8 hex digits) whose process
PID no longer runs on this machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_LIBC = None


def _renameat2():
    """libc's renameat2, or None (not Linux, or a libc without it)."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        except OSError:
            _LIBC = False
    return getattr(_LIBC, "renameat2", None) if _LIBC else None


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (each then names the other's contents).

    Args:
        a: one path.
        b: the other.

    Returns:
        True when swapped; False when this system has no exchange rename (nothing done).

    Raises:
        OSError: the system has one but the swap failed (e.g. different file systems).

    Example:
        >>> exchange(Path("x.tmp"), Path("x"))  # doctest: +SKIP
        True
    """
    function = _renameat2()
    if function is None:
        return False
    result = function(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (38, 22, 95):  # ENOSYS, EINVAL, EOPNOTSUPP: not available here
        return False
    raise OSError(errno, os.strerror(errno), str(b))


def sibling(target: Path, kind: str) -> Path:
    """A fresh hidden sibling of `target` for `kind` "tmp" or "old", owned by this process.

    Args:
        target: the directory being written.
        kind: "tmp" (the version being written) or "old" (the version being replaced).

    Returns:
        `.NAME.KIND-PID-TOKEN` next to target.

    Example:
        >>> sibling(Path("out/model"), "tmp").name.startswith(".model.tmp-")
        True
    """
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def clean_stale(target: Path) -> list[Path]:
    """Remove this project's abandoned temporaries next to `target`; restore an abandoned
    old version when the path itself is missing (a crash between two renames).

    Args:
        target: an artifact or checkpoint directory (it need not exist).

    Returns:
        The paths removed or restored.

    Example:
        >>> clean_stale(Path("smol-w8"))  # doctest: +SKIP
        []
    """
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old)-(\d+)-[0-9a-f]{{8}}$")
    abandoned = []
    for entry in parent.iterdir():
        found = pattern.match(entry.name)
        if found and entry.is_dir() and not entry.is_symlink() \
                and not _pid_alive(int(found.group(2))):
            abandoned.append((found.group(1), entry))
    touched = []
    olds = sorted((e for kind, e in abandoned if kind == "old"),
                  key=lambda e: e.stat().st_mtime, reverse=True)
    if olds and not target.exists():
        os.rename(olds[0], target)  # the last complete version comes back
        touched.append(olds[0])
        olds = olds[1:]
    for entry in [e for kind, e in abandoned if kind == "tmp"] + olds:
        shutil.rmtree(entry, ignore_errors=True)
        touched.append(entry)
    return touched


def fsync_tree(directory: Path) -> None:
    """Flush every file below `directory`, then the directory itself, to disk.

    Args:
        directory: a directory just written (before it is renamed into place).

    Example:
        >>> fsync_tree(tmp)  # doctest: +SKIP
    """
    for file in directory.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    """Flush a directory's entries (a rename into it) to disk.

    Args:
        directory: the directory.

    Example:
        >>> fsync_dir(Path("."))  # doctest: +SKIP
    """
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(new: Path, target: Path) -> None:
    """Put the complete directory `new` at `target`, replacing what is there.

    Args:
        new: a complete directory (a `sibling(target, "tmp")`), fsynced.
        target: the destination (absent, or a directory to replace).

    Example:
        >>> replace_dir(tmp, Path("smol-w8"))  # doctest: +SKIP
    """
    if not target.exists():
        os.rename(new, target)
        return
    if exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # `new` now holds the old version
        return
    old = sibling(target, "old")
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """A fresh hidden sibling of `target` to fill; when the block ends without an error it
    is fsynced and put at `target` (replacing what is there), else removed.

    Args:
        target: the destination directory (absent, or one the caller may replace).

    Yields:
        The staging directory.

    Example:
        >>> with staged_dir(Path("export")) as tmp:  # doctest: +SKIP
        ...     (tmp / "model.onnx").write_bytes(data)
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling(target, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        replace_dir(tmp, target)
        fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


EXPORT_MARKER = "jaxopt_llm_export.json"  # names a directory as a previous export


def is_previous_export(directory: Path, fmt: str) -> bool:
    """Whether `directory` holds an export of format `fmt` (its marker file says so): what
    an exporter may replace whole.

    Args:
        directory: the directory.
        fmt: the format name the marker must carry ("onnx", "tflite", …).

    Returns:
        True for a readable marker naming `fmt`.

    Example:
        >>> is_previous_export(Path("/nonexistent"), "onnx")
        False
    """
    try:
        return json.loads((directory / EXPORT_MARKER).read_text()).get("format") == fmt
    except (OSError, ValueError, AttributeError):
        return False


__all__ = ["EXPORT_MARKER", "clean_stale", "exchange", "fsync_dir", "fsync_tree",
           "is_previous_export", "replace_dir", "sibling", "staged_dir"]
