"""Per-user directories, and what ``settings.json`` there remembers: the default model, this machine's speeds,
and the checkpoint files already verified (so an unchanged one is not hashed again at every start).

Environment variables (all optional):

``NAPARI_BCD_MODEL``
    Checkpoint used when no model is named; wins over the remembered one.
``NAPARI_BCD_CACHE_DIR``
    Where downloaded/converted ImageNet weights live.
``NAPARI_BCD_CONFIG_DIR``
    Where ``settings.json`` is stored.
``NAPARI_BCD_DATA_DIR``
    Where datasets (the BACH photos) are downloaded.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ._fileio import atomic_write

__all__ = [
    "cache_dir",
    "config_dir",
    "data_dir",
    "default_model_path",
    "measured_rate",
    "remember_rate",
    "remember_weights",
    "set_default_model",
    "verified_weights",
]

log = logging.getLogger(__name__)
_APP = "napari-bcd"
#: Checkpoint weight files remembered as verified (:func:`remember_weights`); the oldest are forgotten first.
_VERIFIED_KEPT = 32
#: A weights file modified less than this many seconds before it was verified is hashed again next time.
_RACY_S = 2.0


def cache_dir() -> Path:
    """Directory for cached weights (``NAPARI_BCD_CACHE_DIR`` or the platform cache)."""
    env = os.environ.get("NAPARI_BCD_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir(_APP))


def config_dir() -> Path:
    """Directory for user settings (``NAPARI_BCD_CONFIG_DIR`` or the platform config)."""
    env = os.environ.get("NAPARI_BCD_CONFIG_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir(_APP))


def data_dir() -> Path:
    """Directory for downloaded datasets (``NAPARI_BCD_DATA_DIR`` or the platform data directory)."""
    env = os.environ.get("NAPARI_BCD_DATA_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir(_APP))


def _settings_file() -> Path:
    return config_dir() / "settings.json"


def default_model_path() -> Path | None:
    """The checkpoint to use when none is named, or None.

    ``NAPARI_BCD_MODEL`` wins; otherwise the checkpoint last trained or chosen.
    A remembered path that no longer exists is ignored (with a log message).
    """
    env = os.environ.get("NAPARI_BCD_MODEL")
    if env:
        return Path(env).expanduser()
    path = _read_settings().get("default_model")
    if not path:
        return None
    if not isinstance(path, str):
        log.warning("%s: default_model is %r, not a path; ignoring it.", _settings_file(), path)
        return None
    p = Path(path)
    if not p.exists():
        log.warning("The remembered default model %s no longer exists; ignoring it.", p)
        return None
    return p


def _read_settings() -> dict:
    """The settings, or {} when the file is missing, unreadable or not a JSON object (logged, never raised)."""
    f = _settings_file()
    try:
        settings = json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, UnicodeDecodeError) as err:
        log.warning("%s cannot be read (%s); starting from empty settings.", f, err)
        return {}
    if not isinstance(settings, dict):
        log.warning("%s is not a JSON object; starting from empty settings.", f)
        return {}
    return settings


def set_default_model(path: str | os.PathLike[str] | None) -> None:
    """Remember ``path`` as the default model (None forgets it)."""
    f = _settings_file()
    settings = _read_settings()
    settings["default_model"] = str(Path(path).resolve()) if path else None
    with atomic_write(f, "w") as fh:
        json.dump(settings, fh, indent=2)


def measured_rate(key: str) -> float | None:
    """Windows per second last measured on this machine for ``key`` (backbone@device), or None."""
    rates = _read_settings().get("windows_per_s")
    value = rates.get(key) if isinstance(rates, dict) else None
    return float(value) if isinstance(value, int | float) and value > 0 else None


def remember_rate(key: str, windows_per_s: float) -> None:
    """Keep a run's speed, so the next estimate of "about how long" is this machine's own."""
    settings = _read_settings()
    rates = settings.get("windows_per_s") if isinstance(settings.get("windows_per_s"), dict) else {}
    rates[key] = round(float(windows_per_s), 3)
    settings["windows_per_s"] = rates
    try:
        with atomic_write(_settings_file(), "w") as fh:
            json.dump(settings, fh, indent=2)
    except OSError as err:  # a read-only home: the estimate just stays generic
        log.info("Could not remember the speed: %s", err)


def _file_identity(path: Path) -> list[int] | None:
    """What changes when a file's content is replaced or rewritten: size, modification time (ns), inode, device
    and inode change time (ns).  The change time cannot be set back: a file written in place whose modification
    time was restored afterwards (``touch -r``, ``cp -p``, ``utime``) still shows a new one."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, st.st_ctime_ns]


def verified_weights(path: str | os.PathLike[str]) -> str | None:
    """The weights hash of a checkpoint file verified before (finite, hashed) and unchanged since, or None.

    Unchanged means the same size, modification time, inode, device and inode change time, the way git's index
    trusts a file it has hashed; anything else (rewritten, replaced, copied, touched, its time restored) is hashed
    again.  As in git, a file
    modified less than :data:`_RACY_S` before it was verified is not remembered: a file system stamps times
    at its clock's tick, and a rewrite within the same tick would keep the time.
    """
    p = Path(path).resolve()
    entry = (_read_settings().get("verified_weights") or {})
    entry = entry.get(str(p)) if isinstance(entry, dict) else None
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        return None
    return entry["sha256"] if entry.get("file") == _file_identity(p) else None


def remember_weights(path: str | os.PathLike[str], sha256: str) -> None:
    """Keep a checkpoint file's verified weights hash, so the next load of the unchanged file skips hashing it."""
    import time

    p = Path(path).resolve()
    identity = _file_identity(p)
    if identity is None or time.time_ns() - identity[1] < _RACY_S * 1e9:
        return
    settings = _read_settings()
    known = settings.get("verified_weights") if isinstance(settings.get("verified_weights"), dict) else {}
    known.pop(str(p), None)
    known[str(p)] = {"file": identity, "sha256": sha256}
    settings["verified_weights"] = dict(list(known.items())[-_VERIFIED_KEPT:])
    try:
        with atomic_write(_settings_file(), "w") as fh:
            json.dump(settings, fh, indent=2)
    except OSError as err:  # a read-only home: the file is hashed again next time
        log.info("Could not remember the verified weights: %s", err)
