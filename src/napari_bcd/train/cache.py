"""The feature cache, visible: what is in it (by backbone), how big, and how often training found its features there.

Training computes each image's backbone features once per backbone weights, input size, normalisation and number
format (:mod:`.features`), so trying another head, regularisation or split on a foundation model costs seconds, not
the backbone again.  Each folder of the cache says what it holds (``about.json``); each training run adds one line
to ``runs.jsonl`` (entries found, computed, and refused as altered), which ``napari-bcd cache info`` reads.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CacheFolder", "CacheRun", "cache_info", "clear_cache", "describe_folder", "feature_cache_dir",
           "record_run"]

ABOUT = "about.json"
RUNS = "runs.jsonl"
#: How many runs ``runs.jsonl`` keeps (the oldest are dropped).
KEEP_RUNS = 200


def feature_cache_dir() -> Path:
    from ..config import cache_dir

    return cache_dir() / "features"


@dataclass(frozen=True)
class CacheFolder:
    """One backbone's features at one input size, normalisation and number format."""

    path: Path
    about: dict[str, Any]
    entries: int
    bytes: int


@dataclass(frozen=True)
class CacheRun:
    """One training run's use of the cache."""

    time: str
    folder: str
    backbone: str
    found: int
    computed: int
    refused: int

    @property
    def hit_rate(self) -> float:
        total = self.found + self.computed
        return self.found / total if total else 0.0


def describe_folder(folder: Path, about: dict[str, Any]) -> None:
    """Write what a cache folder holds, once (its name is a hash)."""
    target = folder / ABOUT
    if target.is_file():
        return
    from .._fileio import atomic_write

    try:
        with atomic_write(target, "w") as fh:
            json.dump(about, fh, indent=1)
    except OSError:  # a read-only cache still serves; it only cannot describe itself
        pass


def record_run(folder: Path, backbone: str, found: int, computed: int, refused: int) -> None:
    """Add one run's figures to ``runs.jsonl`` (kept to the last :data:`KEEP_RUNS`)."""
    from .._fileio import atomic_write

    log = folder.parent / RUNS
    line = json.dumps({"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                       "folder": folder.name, "backbone": backbone, "found": found, "computed": computed,
                       "refused": refused})
    try:
        old = log.read_text(encoding="utf-8").splitlines() if log.is_file() else []
        with atomic_write(log, "w") as fh:
            fh.write("\n".join([*old[-(KEEP_RUNS - 1):], line]) + "\n")
    except OSError:
        pass


def cache_info(root: Path | None = None) -> tuple[list[CacheFolder], list[CacheRun]]:
    """The cache's folders (largest first) and its recorded runs (oldest first)."""
    root = root or feature_cache_dir()
    folders = []
    if root.is_dir():
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            files = list(d.glob("*.safetensors"))
            try:
                about = json.loads((d / ABOUT).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                about = {}
            folders.append(CacheFolder(d, about if isinstance(about, dict) else {}, len(files),
                                       sum(f.stat().st_size for f in files)))
    runs = []
    log = root / RUNS
    if log.is_file():
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                runs.append(CacheRun(**json.loads(line)))
            except (ValueError, TypeError):
                continue
    return sorted(folders, key=lambda f: -f.bytes), runs


def format_info(folders: list[CacheFolder], runs: list[CacheRun], root: Path) -> str:
    """``cache info`` for a terminal."""
    total = sum(f.bytes for f in folders)
    lines = [f"feature cache: {root}", f"{len(folders)} folder(s), {sum(f.entries for f in folders)} image(s), "
             f"{total / 2**20:.1f} MiB"]
    for f in folders:
        a = f.about
        what = (f"{a.get('backbone', '?')} ({a.get('weights', '?')}), {a.get('input_px', '?')} px, "
                f"{a.get('precision', '?')}{', ' + a['variant'] if a.get('variant') else ''}") if a else "(undescribed)"
        lines.append(f"  {f.path.name}: {f.entries} image(s), {f.bytes / 2**20:.1f} MiB - {what}")
    if runs:
        found, computed = sum(r.found for r in runs), sum(r.computed for r in runs)
        lines.append(f"last {len(runs)} training run(s): {found} of {found + computed} images' features found "
                     f"in the cache ({found / max(found + computed, 1):.0%})")
        for r in runs[-5:]:
            lines.append(f"  {r.time} {r.backbone}: {r.found} found, {r.computed} computed"
                         f"{f', {r.refused} refused (altered)' if r.refused else ''} ({r.hit_rate:.0%})")
    else:
        lines.append("no training run recorded yet")
    return "\n".join(lines)


def clear_cache(root: Path | None = None) -> int:
    """Remove every cached feature (they are computed again when needed); returns the bytes freed."""
    root = root or feature_cache_dir()
    folders, _ = cache_info(root)
    freed = sum(f.bytes for f in folders)
    if root.is_dir():
        shutil.rmtree(root)
    return freed
