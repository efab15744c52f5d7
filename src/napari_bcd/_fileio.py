"""Atomic writes: never leave a half-written file where the user's file was."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from .errors import BcdError

__all__ = ["LEDGER", "OutputConflict", "atomic_path", "atomic_write", "check_output", "check_writable", "file_digest",
           "is_ours", "output_file", "output_path", "printable", "remember_written"]

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
def _staged(target: Path, commit: Callable[[str, Path], None]) -> Iterator[Path]:
    """A temporary file beside ``target`` for the block to write; ``commit(tmp, target)`` puts it in place when the
    block succeeds, and it is removed whatever fails."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix or ".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _MODE)
        commit(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (for writers that want a file name);
    it replaces ``path`` when the block succeeds and is removed when it fails."""
    with _staged(Path(path), os.replace) as tmp:
        yield tmp


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


# --- The output guard: napari-bcd replaces only what it wrote ---------------------------------------------------------
#: Beside a command's outputs: what napari-bcd wrote there (name -> size and SHA-256), so a later command knows a
#: file of the user's (never replaced without --overwrite) from one of its own that nobody changed since.
LEDGER = ".napari-bcd-written.json"
#: How a write may treat a file already at its path.
REPLACE = ("never", "ours", "any")


class OutputConflict(BcdError):
    """A target appeared, or changed hands, while the command ran."""


def _ledger(folder: Path) -> dict:
    try:
        doc = json.loads((folder / LEDGER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def is_ours(path: str | os.PathLike[str]) -> bool:
    """Whether napari-bcd wrote the file at ``path`` and nobody changed it since (size and SHA-256 as recorded);
    a link is never ours."""
    p = Path(path)
    entry = _ledger(p.parent).get(p.name)
    if not isinstance(entry, dict) or p.is_symlink() or not p.is_file():
        return False
    try:
        return p.stat().st_size == entry.get("bytes") and file_digest(p) == entry.get("sha256")
    except OSError:
        return False


@contextlib.contextmanager
def _ledger_lock(folder: Path, wait_s: float = 10.0) -> Iterator[None]:
    lock = folder / f"{LEDGER}.lock"
    start = time.monotonic()
    while True:
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            break
        except FileExistsError:
            try:
                stale = time.time() - lock.stat().st_mtime > wait_s
            except OSError:
                stale = False
            if stale or time.monotonic() - start > wait_s:
                lock.unlink(missing_ok=True)  # left by a run that died holding it
            time.sleep(0.01)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def remember_written(*paths: str | os.PathLike[str]) -> None:
    """Record that napari-bcd wrote these files as they now are (see :func:`is_ours`)."""
    by_folder: dict[Path, list[Path]] = {}
    for p in map(Path, paths):
        by_folder.setdefault(p.parent, []).append(p)
    for folder, files in by_folder.items():
        entries = {p.name: {"bytes": p.stat().st_size, "sha256": file_digest(p)} for p in files if p.is_file()}
        with contextlib.suppress(OSError), _ledger_lock(folder):  # a missing record only means asking next time
            doc = _ledger(folder)
            doc.update(entries)
            with atomic_write(folder / LEDGER, "w") as fh:
                json.dump(doc, fh, indent=1, sort_keys=True)


def check_output(path: str | os.PathLike[str], replace: str = "ours") -> Path:
    """Refuse, before any work, an output path this command must not write.

    ``replace``: ``"never"`` (any existing file is refused), ``"ours"`` (only a file napari-bcd wrote and nobody
    changed since may be replaced) or ``"any"`` (the user passed --overwrite).  A link is refused unless
    ``"any"``, and then the link itself is replaced, never the file it points to.
    """
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        raise BcdError(f"{p} is a folder; napari-bcd writes a file of that name there. Choose another --out.")
    if replace == "any" or not os.path.lexists(p):
        return p
    if p.is_symlink():
        raise BcdError(f"{p} is a link (to {os.readlink(p)}); napari-bcd never writes through links. Remove it, "
                       "choose another --out, or pass --overwrite to replace the link itself.")
    if replace == "ours" and is_ours(p):
        return p
    why = "napari-bcd did not write it, or it changed since" if replace == "ours" else "it is never replaced"
    raise BcdError(f"{p} already exists and {why}. Choose another --out or name, or pass --overwrite to replace it.")


@contextlib.contextmanager
def output_path(path: str | os.PathLike[str], replace: str = "ours") -> Iterator[Path]:
    """:func:`atomic_path` under the output guard: refused at the start as :func:`check_output` says, and again
    at the end against what appeared meanwhile (a second run into the same new name fails instead of both
    reporting the same file); the written file is remembered as ours."""
    if replace not in REPLACE:
        raise ValueError(f"replace must be one of {REPLACE}, not {replace!r}")
    target = check_output(path, replace)

    def commit(tmp: str, target: Path) -> None:
        if os.path.lexists(target):
            try:
                check_output(target, replace)
            except BcdError as err:
                raise OutputConflict(f"{target} was written by another run while this one ran; nothing of it was "
                                     f"replaced. {err}") from None
            os.replace(tmp, target)  # a link is replaced itself, never written through
            return
        try:
            os.link(tmp, target)  # fails when the name appeared meanwhile: never two runs into one file
        except FileExistsError:
            raise OutputConflict(f"{target} was written by another run while this one ran; nothing of it was "
                                 "replaced. Choose another name.") from None
        except OSError:  # a file system without hard links
            os.replace(tmp, target)
        else:
            os.unlink(tmp)

    with _staged(target, commit) as tmp:
        yield tmp
    remember_written(target)


@contextlib.contextmanager
def output_file(path: str | os.PathLike[str], mode: str = "w", replace: str = "ours") -> Iterator[IO]:
    """:func:`output_path` opened for writing (text in UTF-8 unless ``mode`` is binary)."""
    with output_path(path, replace) as tmp, open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())
