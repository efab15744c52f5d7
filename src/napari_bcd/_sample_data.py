"""The bundled sample slide (npe2 sample-data contribution)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["SAMPLE_SLIDE"]

#: CMU-1-Small-Region.svs: a real Aperio slide, CC0 (see data/SOURCES.md).
SAMPLE_SLIDE = Path(__file__).parent / "data" / "CMU-1-Small-Region.svs"
