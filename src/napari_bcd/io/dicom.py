"""Which file of a folder of DICOM instances to open: one of its whole-slide-image series.

OpenSlide finds a DICOM WSI's other instances from any one of them, but a folder may also hold
instances that are not WSI (a structured report, a presentation state) or the instances of several
slides.  The headers (read with pydicom, pixels skipped) say which: the VL Whole Slide Microscopy
Image instances are grouped by series, the largest series is opened, and a folder holding several
is said to.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import SlideError

__all__ = ["WSI_SOP_CLASS", "choose_dicom"]

log = logging.getLogger(__name__)

#: VL Whole Slide Microscopy Image Storage.
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


def choose_dicom(files: list[Path]) -> Path:
    """A file of the folder's WSI series to open (of several series, the one with the largest image).

    Raises
    ------
    SlideError
        When no file is a whole-slide-image instance.
    """
    try:
        import pydicom
    except ImportError:  # without pydicom: the first file, as OpenSlide alone would do
        log.info("pydicom is not installed: opening %s as the folder's DICOM WSI", files[0].name)
        return files[0]
    series: dict[str, list[tuple[Path, int]]] = {}
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not a readable DICOM file: not an instance of the slide
            continue
        if str(ds.get("SOPClassUID", "")) != WSI_SOP_CLASS:
            continue
        pixels = int(ds.get("TotalPixelMatrixRows", 0) or 0) * int(ds.get("TotalPixelMatrixColumns", 0) or 0)
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((f, pixels))
    if not series:
        raise SlideError(f"{files[0].parent.name} holds {len(files)} .dcm file(s), none of them a whole-slide image "
                         "(VL Whole Slide Microscopy) instance.")
    ranked = sorted(series.items(), key=lambda kv: -max(p for _, p in kv[1]))
    uid, members = ranked[0]
    if len(ranked) > 1:
        log.warning("%s holds the instances of %d slides (DICOM series); opening the largest (%s, %d file(s)). Put "
                    "each slide's instances in a folder of its own to classify the others.",
                    files[0].parent.name, len(ranked), uid, len(members))
    return max(members, key=lambda m: m[1])[0]
