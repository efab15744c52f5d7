"""What counts as a slide: file suffixes and folder layouts, in one table (the reader, cohorts and napari's manifest
agree with it; a test holds napari.yaml to it)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["LABELS_SUFFIX", "OPENSLIDE_ONLY", "OUTPUT_SUFFIXES", "PLAIN_SUFFIXES", "PROBABILITIES_SUFFIX",
           "SLIDE_SUFFIXES", "TIFF_SUFFIXES", "is_our_output", "is_slide_folder", "slides_in"]

#: TIFF-based slides tifffile reads (Aperio, Hamamatsu NDPI, OME-TIFF, generic pyramids, BigTIFF).
TIFF_SUFFIXES = (".svs", ".ndpi", ".tif", ".tiff", ".btf", ".tf2", ".tf8")
#: Formats only OpenSlide reads here: suffix -> what it is.
OPENSLIDE_ONLY = {
    ".mrxs": "3DHISTECH MRXS", ".scn": "Leica SCN", ".bif": "Ventana BIF", ".vms": "Hamamatsu VMS",
    ".vmu": "Hamamatsu VMU", ".dcm": "DICOM WSI",
}
#: Plain images, decoded whole.
PLAIN_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
#: What a folder of slides is searched for (DICOM instances make their folder one slide instead).
SLIDE_SUFFIXES = (*TIFF_SUFFIXES, *(s for s in OPENSLIDE_ONLY if s != ".dcm"))
#: napari-bcd's own TIFF outputs (:data:`napari_bcd.export.OUTPUTS` names them so): never slides.
LABELS_SUFFIX = ".labels.tif"
PROBABILITIES_SUFFIX = ".probabilities.tif"
OUTPUT_SUFFIXES = (LABELS_SUFFIX, PROBABILITIES_SUFFIX)


def is_our_output(path: Path) -> bool:
    """Whether a TIFF is one napari-bcd wrote (a label map or probabilities): by its name, or by the description
    napari-bcd writes into it, so a renamed one is known too."""
    if path.name.lower().endswith(OUTPUT_SUFFIXES):
        return True
    if path.suffix.lower() not in TIFF_SUFFIXES or not path.is_file():
        return False
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            desc = tif.pages[0].description or ""
    except Exception:  # noqa: BLE001 - not a TIFF tifffile reads: whoever opens it says why
        return False
    return desc.lstrip().startswith("{") and '"napari_bcd": true' in desc


def is_slide_folder(folder: Path) -> bool:
    """A folder that is one slide: an OME-Zarr image, or the instances of a DICOM WSI."""
    from .ngff import is_ngff

    if not folder.is_dir():
        return False
    return is_ngff(folder) or any(f.suffix.lower() == ".dcm" for f in folder.iterdir() if f.is_file())


def slides_in(folder: Path, recursive: bool = False) -> list[Path]:
    """The slides in a folder (files by suffix; OME-Zarr and DICOM folders), sorted; the folder itself if it is one."""
    if is_slide_folder(folder):
        return [folder]
    pattern = folder.rglob("*") if recursive else folder.iterdir()
    found = []
    for p in sorted(pattern):
        slide_file = (p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES and not p.name.startswith(".")
                      and not p.name.lower().endswith(OUTPUT_SUFFIXES))  # a classify output beside its slides
        slide_folder = p.is_dir() and (recursive or p.suffix.lower() == ".zarr") and is_slide_folder(p)
        if slide_file or slide_folder:
            found.append(p)
    return found
