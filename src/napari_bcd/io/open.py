"""Opening a slide: the backend is chosen from what the file is (its magic bytes, its suffix, a folder's layout)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import BcdError, SlideError
from ..geometry import pixel_size
from .formats import OPENSLIDE_ONLY, PLAIN_SUFFIXES, is_our_output
from .slide import Slide

__all__ = ["open_slide"]

log = logging.getLogger(__name__)


def open_slide(
    path: str | os.PathLike[str],
    *,
    mpp: float | tuple[float, float] | None = None,
    cache_mb: int = 16,
    backend: str = "auto",
) -> Slide:
    """Open a slide or image for lazy reading.

    Parameters
    ----------
    path
        An Aperio SVS, NDPI, OME-TIFF, tiled or plain TIFF, PNG or JPEG file.
    mpp
        µm per pixel of level 0; overrides (or supplies) the file's own value.
    cache_mb
        Size of the decoded-tile cache.  Windows are read in raster order, so
        what they share is the tile column between neighbours: a few MB.
    backend
        ``"auto"``: tifffile's fast path for TIFF-based slides, OpenSlide for
        what only it reads (MRXS, SCN, BIF, VMS, DICOM; a folder of DICOM
        instances) and for a TIFF the fast path cannot read; ``"tifffile"`` or
        ``"openslide"`` to choose.

    Raises
    ------
    SlideError
        When the file is missing, not an image, truncated, or not 8-bit RGB.
    """
    p = Path(path)
    if not p.exists():
        if p.is_symlink():
            raise SlideError(f"{p} is a symbolic link that leads nowhere (or loops). Point it at the slide file.")
        raise SlideError(f"{p} does not exist. Check the path.")
    if backend not in ("auto", "tifffile", "openslide"):
        raise SlideError(f"Unknown slide backend {backend!r}; use auto, tifffile or openslide.")
    from .openslide_slides import open_openslide, try_openslide

    if p.is_dir():
        from .ngff import is_ngff, open_ngff

        dicoms = sorted(q for q in p.iterdir() if q.suffix.lower() == ".dcm")
        if is_ngff(p):
            slide = open_ngff(p)
        elif dicoms:  # OpenSlide finds a DICOM WSI's other instances from any one of them
            from .dicom import choose_dicom

            slide = open_openslide(choose_dicom(dicoms), "DICOM WSI")
            slide.path = p
        else:
            raise SlideError(f"{p} is a folder; give the slide file itself (e.g. .svs, .ndpi, .tif), a folder of "
                             "DICOM WSI instances, or an OME-Zarr image.")
    elif p.stat().st_size == 0:
        raise SlideError(f"{p.name} is empty (0 bytes). Copy the slide again.")
    elif backend == "openslide":
        slide = open_openslide(p, OPENSLIDE_ONLY.get(p.suffix.lower(), p.suffix.lstrip(".").upper() or "slide"))
    elif p.suffix.lower() in OPENSLIDE_ONLY:
        slide = open_openslide(p, OPENSLIDE_ONLY[p.suffix.lower()])
    else:
        with open(p, "rb") as fh:
            magic = fh.read(4)
        if magic[:2] in (b"II", b"MM"):
            if is_our_output(p):
                raise SlideError(f"{p.name} is a map napari-bcd wrote (labels or probabilities), not a slide: "
                                 "classify the slide it was made from.")
            try:
                from .tiff import open_tiff

                slide = open_tiff(p, cache_mb)
            except SlideError as err:
                # The fast path cannot read it (a compression or layout tifffile lacks): OpenSlide may.
                if backend == "tifffile":
                    raise
                slide = try_openslide(p, err)
        elif p.suffix.lower() in PLAIN_SUFFIXES or magic[:4] in (b"\x89PNG",) or magic[:2] == b"\xff\xd8":
            from .plain import open_plain

            slide = open_plain(p)
        else:
            raise SlideError(
                f"{p.name} is not a slide or image napari-bcd can read (SVS, NDPI, OME-TIFF, TIFF, MRXS, SCN, BIF, "
                "VMS, DICOM, PNG, JPEG). If it is another format (iSyntax, CZI), convert it to OME-TIFF first."
            )
    if mpp is not None:
        try:
            given = pixel_size(mpp)
        except BcdError as err:
            raise SlideError(str(err)) from None
        if slide.mpp is not None:
            ratio = given[1] / slide.mpp[1]
            if not 0.5 <= ratio <= 2:
                log.warning("%s: the pixel size given (%.4g µm/px) is %.1fx the file's own (%.4g µm/px); windows will "
                            "be %.1fx too %s. Leave --mpp out unless the file is wrong.", p.name, given[1], ratio,
                            slide.mpp[1], max(ratio, 1 / ratio), "small" if ratio > 1 else "large")
        slide.mpp = given
    if slide.mpp is None:
        log.warning("%s has no pixel size (mpp) metadata; state it with mpp=... (--mpp).", p.name)
    return slide
