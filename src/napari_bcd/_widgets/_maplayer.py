"""A class map on a napari Labels layer, kept in step with its :class:`~napari_bcd.app.MapStore`.

The store lives in the layer's metadata (``metadata["napari_bcd"]["store"]``):
it is how the docks find the map, its history and each other.  A
:class:`_Binding` per layer redraws the layer when the store changes (a
retrain, an *Apply*, an *Undo*, a new run) and hands the store the cells a
pathologist repaints, counted once the brush rests (debounced, and only
under the stroke), so painting never waits on the docks.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from ..app.mapstate import MapState, MapStore
from ..errors import BcdError

if TYPE_CHECKING:
    import napari
    from napari.layers import Labels

    from ..engine import ClassMap

log = logging.getLogger(__name__)

__all__ = ["PAINT_DELAY_MS", "flush_paint", "map_layers", "show_map", "store_of"]

#: How long the brush must rest before the repainted cells are counted.
PAINT_DELAY_MS = 300


def _meta(layer: Any) -> dict:
    return (getattr(layer, "metadata", None) or {}).get("napari_bcd") or {}


def store_of(layer: Any) -> MapStore | None:
    """The store of a class-map layer napari-bcd made (None for any other layer)."""
    store = _meta(layer).get("store")
    return store if isinstance(store, MapStore) else None


def map_layers(viewer: napari.viewer.Viewer) -> list[Labels]:
    return [layer for layer in viewer.layers if store_of(layer) is not None]


def flush_paint(layer: Any) -> None:
    """Count what was painted on ``layer`` now (before a retrain reads the corrections)."""
    binding = _meta(layer).get("binding")
    if binding is not None:
        binding.flush()


def _layer_kwargs(state: MapState, probabilities: bool = False) -> list[tuple[np.ndarray, dict, str]]:
    from ..layers import classmap_layers

    return classmap_layers(state.shown, state.image, state.translate, probabilities=probabilities)


def show_map(viewer: napari.viewer.Viewer, class_map: ClassMap, image_name: str,
             translate: tuple[float, float] = (0.0, 0.0), *, probabilities: bool = False) -> tuple[Labels, MapStore]:
    """Show a classification: its Labels layer (and probability layers), updated in place on a re-run.

    A re-run on the same image replaces the state of the layer's store (its
    history cleared: *Undo* never goes back to another run).
    """
    from napari.utils.colormaps import DirectLabelColormap

    from ..layers import label_colors

    state = MapState(class_map, image_name, tuple(float(t) for t in translate))
    name = f"{image_name} classes"
    existing = viewer.layers[name] if name in viewer.layers else None  # noqa: SIM401 (a LayerList has no get)
    layers = _layer_kwargs(state, probabilities)
    for data, kwargs, _kind in layers[1:]:  # probability layers: plain images
        if kwargs["name"] in viewer.layers:
            old = viewer.layers[kwargs["name"]]
            old.data, old.scale, old.translate = data, kwargs["scale"], kwargs["translate"]
        else:
            viewer.add_image(data, **kwargs)
    _show_qc(viewer, class_map, image_name, translate)
    store = store_of(existing)
    if store is not None:
        store.history.clear()
        existing.colormap = DirectLabelColormap(color_dict=label_colors(class_map.classes))
        store.replace(state, "new", undoable=False)  # the binding redraws the layer
        return existing, store
    data, kwargs, _ = layers[0]
    store = MapStore(state)
    kwargs["metadata"]["napari_bcd"]["store"] = store
    if existing is not None:  # a layer of that name napari-bcd did not make: ours goes beside it
        kwargs["name"] = f"{name} (napari-bcd)"
    layer = viewer.add_labels(data, colormap=DirectLabelColormap(color_dict=label_colors(class_map.classes)),
                              **kwargs)
    kwargs["metadata"]["napari_bcd"]["binding"] = _Binding(layer, store)
    return layer, store


def _show_qc(viewer: napari.viewer.Viewer, class_map: ClassMap, image_name: str,
             translate: tuple[float, float]) -> None:
    """The quality-control layer of a run (what was left out, coloured by reason), replaced on a re-run and
    removed when the new run left nothing out."""
    from napari.utils.colormaps import DirectLabelColormap

    from ..layers import qc_colors, qc_layer

    name = f"{image_name} quality control"
    made = qc_layer(class_map, image_name, tuple(float(t) for t in translate))
    existing = viewer.layers[name] if name in viewer.layers else None  # noqa: SIM401
    if existing is not None and "qc_legend" not in _meta(existing):
        return  # a layer of that name napari-bcd did not make: left alone
    if made is None:
        if existing is not None:
            viewer.layers.remove(existing)
        return
    data, kwargs, _ = made
    if existing is not None:
        existing.data, existing.scale, existing.translate = data, kwargs["scale"], kwargs["translate"]
        return
    viewer.add_labels(data, colormap=DirectLabelColormap(color_dict=qc_colors()), **kwargs)


class _Binding:
    """Keeps one Labels layer and its store in step (both ways)."""

    def __init__(self, layer: Labels, store: MapStore) -> None:
        from qtpy.QtCore import QTimer

        self.layer, self.store = layer, store
        self._drawing = False
        self._box: tuple[int, int, int, int] | None = None
        self._whole = False
        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.setInterval(PAINT_DELAY_MS)
        self._timer.timeout.connect(self.flush)
        store.listen(self._on_store)
        layer.events.paint.connect(self._on_paint)
        layer.events.set_data.connect(self._on_set_data)

    def _on_store(self, state: MapState, reason: str) -> None:
        if reason == "paint":
            self._snap(state)
            return
        self._timer.stop()
        self._box, self._whole = None, False
        data, kwargs, _ = _layer_kwargs(state)[0]
        meta = {**kwargs["metadata"]["napari_bcd"], "store": self.store, "binding": self}
        self._drawing = True
        try:
            self.layer.metadata = {**self.layer.metadata, "napari_bcd": meta}
            self.layer.scale, self.layer.translate = kwargs["scale"], kwargs["translate"]
            self.layer.data = data
        finally:
            self._drawing = False

    def _snap(self, state: MapState) -> None:
        """Show repainted cells whole, as they are counted, learnt and exported (a stroke over a corner of a
        cell, too little to count, goes back): what the layer shows is the map."""
        data, _, _ = _layer_kwargs(state)[0]
        current = np.asarray(self.layer.data)
        if data.shape != current.shape:
            return
        rows = np.flatnonzero((data != current).any(axis=1))
        if not len(rows):
            return
        cols = np.flatnonzero((data[rows[0] : rows[-1] + 1] != current[rows[0] : rows[-1] + 1]).any(axis=0))
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        self._drawing = True
        try:
            self.layer.data[box] = data[box]
            self.layer.refresh()
        finally:
            self._drawing = False

    def _on_paint(self, event: Any) -> None:
        box = _stroke_box(getattr(event, "value", None))
        if box is None:
            self._whole = True
        elif self._box is None:
            self._box = box
        else:
            b = self._box
            self._box = (min(b[0], box[0]), max(b[1], box[1]), min(b[2], box[2]), max(b[3], box[3]))
        self._timer.start()

    def _on_set_data(self, event: Any = None) -> None:
        if not self._drawing:
            self._whole = True
            self._timer.start()

    def flush(self) -> None:
        """Count the cells painted since the last count (the whole map when a change's extent is unknown)."""
        self._timer.stop()
        box, whole = self._box, self._whole
        self._box, self._whole = None, False
        try:
            self.store.paint(np.asarray(self.layer.data), None if whole or box is None else box)
        except BcdError as err:  # a raster the map does not fit (resized by hand): painting stays possible
            log.warning("%s", err)


def _stroke_box(item: Any) -> tuple[int, int, int, int] | None:
    """The raster extent ``(y0, y1, x0, x1)`` of napari's paint history item, or None when it cannot tell."""
    if not item:
        return None
    box = None
    for atom in item:
        key = getattr(atom, "slice_key", None)
        if key is not None and len(key) >= 2:
            ys, xs = key[-2], key[-1]
            b = (int(ys.start or 0), int(ys.stop), int(xs.start or 0), int(xs.stop))
        else:
            try:
                idx = atom[0]
                b = (int(np.min(idx[-2])), int(np.max(idx[-2])) + 1, int(np.min(idx[-1])), int(np.max(idx[-1])) + 1)
            except (TypeError, ValueError, IndexError):
                return None
        box = b if box is None else (min(box[0], b[0]), max(box[1], b[1]), min(box[2], b[2]), max(box[3], b[3]))
    return box
