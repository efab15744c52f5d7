"""The bundled sample slide (npe2 sample-data contribution)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["SAMPLE_SLIDE", "make_sample_data"]

#: CMU-1-Small-Region.svs: a real Aperio slide, CC0 (see data/SOURCES.md).
SAMPLE_SLIDE = Path(__file__).parent / "data" / "CMU-1-Small-Region.svs"


def make_sample_data() -> list:
    """The sample slide as a lazy image layer with ``scale`` = 0.499 µm/px."""
    from ._reader import read_slide

    layers = read_slide(str(SAMPLE_SLIDE))
    layers[0][1]["metadata"]["napari_bcd"]["sample"] = True
    return layers
