"""Done-records and locks: what a finished slide's outputs vouch for, and the lock one run holds while it writes them.

A done-record (``<stem>.done.json``) is written last, after every output is in place: it lists each file's size and
SHA-256, the slide it came from (:func:`source_identity`) and the run that made it (:func:`run_keys`), so a rerun
skips a slide only when nothing that changes its map has changed (:func:`run_changes`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import BcdError

if TYPE_CHECKING:
    from .settings import ClassifySettings

__all__ = ["DONE_SUFFIX", "WRITING_SUFFIX", "outputs_complete", "run_changes", "run_keys", "same_source",
           "slide_lock", "source_identity", "vouched_outputs", "written_by_us"]

DONE_SUFFIX = ".done.json"
WRITING_SUFFIX = ".writing"


def source_identity(path: str | os.PathLike[str]) -> dict:
    """What identifies the slide a done-record vouches for: its resolved path and, for a file, its size,
    modification time and the SHA-256 of its first and last MiB (a slide replaced at the same path by one of the
    same size is another slide)."""
    p = Path(path)
    try:
        resolved = p.resolve()
        st = resolved.stat()
        if not resolved.is_file():
            return {"path": str(resolved), "bytes": None}
        return {"path": str(resolved), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
                "sample_sha256": _sample_hash(resolved, st.st_size)}
    except OSError:
        return {"path": str(p), "bytes": None}


def _sample_hash(path: Path, size: int, part: int = 1 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(fh.read(part))
        if size > part:
            fh.seek(max(part, size - part))
            h.update(fh.read(part))
    return h.hexdigest()


def same_source(record: dict, identity: dict) -> bool:
    """Whether a done-record's slide is this one: every identity it recorded still holds (records from before
    sources were recorded are taken as it)."""
    recorded = record.get("source")
    return not isinstance(recorded, dict) or all(identity.get(k) == v for k, v in recorded.items())


def written_by_us(out_dir: str | os.PathLike[str], stem: str) -> bool:
    """Whether ``stem``'s outputs in ``out_dir`` without a done-record are an interrupted napari-bcd write."""
    return (Path(out_dir) / f".{stem}{WRITING_SUFFIX}").exists()


def vouched_outputs(out_dir: str | os.PathLike[str], stem: str, paths: list[Path]) -> bool:
    """Whether every one of ``paths`` that exists is napari-bcd's own: listed in ``stem``'s done-record with the
    bytes it still has (SHA-256), and not a link.  Such a set a rerun may replace; anything else is the user's."""
    from ._fileio import file_digest

    present = [p for p in paths if os.path.lexists(p)]
    if not present:
        return True
    try:
        doc = json.loads((Path(out_dir) / f"{stem}{DONE_SUFFIX}").read_text(encoding="utf-8"))
        listed = {info["name"]: info["sha256"] for info in doc["files"].values()}
        return all(not p.is_symlink() and listed.get(p.name) == file_digest(p) for p in present)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def outputs_complete(out_dir: str | os.PathLike[str], stem: str) -> dict | None:
    """The done-record of a slide whose outputs are complete, or None.

    The record is written last, after every file is in place, and lists each
    file's size and SHA-256: outputs without a valid record are incomplete
    (an interrupted run) or not ours.
    """
    record = Path(out_dir) / f"{stem}{DONE_SUFFIX}"
    try:
        doc = json.loads(record.read_text(encoding="utf-8"))
        files = doc["files"]
        for info in files.values():
            if (Path(out_dir) / info["name"]).stat().st_size != info["bytes"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return doc


@contextlib.contextmanager
def slide_lock(out_dir: str | os.PathLike[str], stem: str) -> Iterator[None]:
    """Hold ``out_dir/.<stem>.lock`` while one run checks, computes and writes a slide's outputs.

    A second run for the same slide and folder stops at once instead of mixing
    its files with this one's.  A lock left by a process that no longer runs
    (on this machine) is taken over, and that run's temporary folders removed.

    Raises
    ------
    BcdError
        When another live run holds the lock.
    """
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    lock = d / f".{stem}.lock"
    me = f"{os.getpid()}@{socket.gethostname()}"
    # The lock appears with its owner already in it (written aside, then hard-linked into place, which fails
    # when the lock exists): a second run never reads an empty lock and mistakes it for a stale one.
    mine = d / f".{stem}.lock.{os.getpid()}"
    mine.write_text(me, encoding="utf-8")
    try:
        for _ in range(2):
            try:
                os.link(mine, lock)
            except FileExistsError:
                owner = lock.read_text(encoding="utf-8", errors="replace").strip() if lock.exists() else ""
                if _alive(owner):
                    raise BcdError(
                        f"Another napari-bcd run ({owner}) is writing {stem}'s outputs in {d}. Wait for it to "
                        "finish, or write to another --out folder."
                    ) from None
                lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            break
        else:  # pragma: no cover - lost a race twice
            raise BcdError(f"Could not lock {lock}; try again.")
    finally:
        mine.unlink(missing_ok=True)
    try:
        for stale in d.glob(f".{stem}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(owner: str) -> bool:
    """Whether the ``pid@host`` that wrote a lock still runs (other hosts are assumed alive)."""
    pid_text, _, host = owner.partition("@")
    if not pid_text.isdigit():
        return False
    if host and host != socket.gethostname():
        return True
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def run_keys(settings: ClassifySettings, card, slide_mpp: float | None) -> dict:
    """What a done-record keeps of the run to decide whether a rerun may skip the slide: every setting that can
    change the outputs (:meth:`~napari_bcd.settings.ClassifySettings.output_settings`), the slide's own pixel size,
    and the decision rule the labels follow (the card's when the run sets none: a rule saved into the model since
    changes the map though the weights did not)."""
    from .decision import DecisionRule

    rule = settings.decision if settings.decision is not None else DecisionRule.from_dict(card.decision)
    return {"settings": settings.output_settings(), "slide_mpp": slide_mpp, "decision": rule.to_dict()}


def run_changes(done: dict, keys: dict, sha: str) -> list[str]:
    """What differs between a done-record's run and this one, in words ([] when a rerun may skip)."""
    out = []
    if done.get("model_weights_sha256") != sha:
        out.append("another model")
    recorded = done.get("run")
    if not isinstance(recorded, dict):
        return [*out, "settings not recorded (an older version)"]
    settings, before = keys["settings"], recorded.get("settings") or {}
    out += [f"{k} {before.get(k)!r} -> {v!r}" for k, v in settings.items() if before.get(k) != v]
    out += [f"{k} {recorded.get(k)!r} -> {keys[k]!r}" for k in ("slide_mpp", "decision") if recorded.get(k) != keys[k]]
    return out
