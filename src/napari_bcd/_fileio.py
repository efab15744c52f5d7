"""Atomic writes: never leave a half-written file where the user's file was."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .errors import BcdError

__all__ = ["atomic_path", "atomic_write", "check_writable", "file_digest", "printable"]

# mkstemp creates 0600 files; give outputs the permissions a plain open() would.
_UMASK = os.umask(0)
os.umask(_UMASK)
_MODE = 0o666 & ~_UMASK


def printable(name: str) -> str:
    """A file name for text files and people: bytes that were not valid UTF-8 (kept by Python as lone
    surrogates) become U+FFFD, so writing the name into a CSV, JSON or GeoJSON never fails."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def check_writable(path: str | os.PathLike[str], overwrite: bool) -> Path:
    """Refuse to replace an existing output unless asked to."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise BcdError(f"{p} already exists; choose another name or pass overwrite=True (--overwrite).")
    return p


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (for writers that want a file name);
    it replaces ``path`` when the block succeeds and is removed when it fails."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix or ".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _MODE)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path`` and rename it over ``path`` on success.

    On any error the temporary file is removed and ``path`` is left untouched.
    """
    with atomic_path(path) as tmp, open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


def file_digest(path: str | os.PathLike[str], algorithm: str = "sha256", into: Any = None) -> str:
    """Hex digest of a file, read in 1 MiB chunks; ``into`` is a hash object to continue (resumed downloads)."""
    h = into if into is not None else hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
