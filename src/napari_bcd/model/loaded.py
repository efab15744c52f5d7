"""A model loaded once and its Predictor kept: the one cache the CLI's cohorts, the Classify dock and the demo share.

A checkpoint is loaded again only when its file changed (path, size and
modification time: a retrained model written to the same path is seen), and
its :class:`~napari_bcd.model.Predictor` made again only when the device,
precision or compilation asked for changed (a compiled model compiles once).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["LoadedModel", "ModelCache", "checkpoint_key", "shared_cache"]


@dataclass
class LoadedModel:
    """A checkpoint in memory: the network, its card, the weights' hash and a Predictor running it."""

    path: Path | None
    model: Any
    predictor: Any

    @property
    def card(self) -> Any:
        return self.model.card

    @property
    def sha(self) -> str:
        """The weights' hash as read from the file (the card's, for a model built here)."""
        return getattr(self.model, "weights_sha256", "") or self.model.card.weights_sha256


def checkpoint_key(path: str | Path | None) -> tuple:
    """What identifies a checkpoint on disk: its resolved weights path, size and modification time."""
    from ..config import default_model_path
    from .card import checkpoint_paths

    chosen = Path(path) if path else default_model_path()
    if chosen is None:
        return ()
    weights = checkpoint_paths(chosen)[0]
    try:
        st = weights.stat()
    except OSError:
        return (str(weights),)
    return (str(weights.resolve()), st.st_size, st.st_mtime_ns)


class ModelCache:
    """The last model loaded, and its Predictor for the last device / precision / compile asked for."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._loaded: LoadedModel | None = None
        self._predictor_key: tuple | None = None

    def get(self, path: str | Path | None, *, device: str = "auto", precision: str = "auto",
            compile: bool = False) -> LoadedModel:
        """The model at ``path`` (None: the default model), loaded unless it is loaded already.

        Raises
        ------
        ModelNotAvailableError, CheckpointError
            No default model; a checkpoint that cannot load.
        """
        from .checkpoint import load_model
        from .inference import Predictor

        key = checkpoint_key(path)
        with self._lock:
            if self._loaded is None or self._key != key or not key:
                model = load_model(path)
                self._loaded, self._key, self._predictor_key = LoadedModel(
                    Path(path) if path else None, model, None), key, None
            pkey = (device, precision, bool(compile))
            if self._predictor_key != pkey:
                self._loaded.predictor = Predictor(self._loaded.model, device=device, precision=precision,
                                                   compile=compile)
                self._predictor_key = pkey
            return self._loaded

    def is_current(self, path: str | Path | None) -> bool:
        """Whether ``path`` is the loaded model, unchanged on disk."""
        return self._loaded is not None and self._key == checkpoint_key(path) and bool(self._key)

    def forget(self) -> None:
        with self._lock:
            self._loaded = self._key = self._predictor_key = None


_SHARED = ModelCache()


def shared_cache() -> ModelCache:
    """The process's cache (a Dask worker keeps its model between slides)."""
    return _SHARED
