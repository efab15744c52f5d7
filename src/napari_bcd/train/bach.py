"""The BACH (ICIAR 2018) microscopy photos: download from Zenodo, verify, extract.

The official archive is Zenodo record 3632035, ``ICIAR2018_BACH_Challenge.zip``
(about 10.4 GB), under CC BY-NC-ND 4.0.  Only ``Photos/`` (400 TIFFs, 100 per
class, and ``microscopy_ground_truth.csv``) is extracted; the whole-slide part
of the archive is skipped.  The download resumes where it stopped and is
checked against the size and md5 that Zenodo's records API publishes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zipfile
import zlib
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .._download import DownloadProgress, fetch_json, file_md5, iter_download
from .._fileio import atomic_write
from ..errors import DatasetError, DownloadError, LicenceNotAcceptedError

__all__ = [
    "BACH_CITATION",
    "BACH_FILE",
    "BACH_LICENCE",
    "BACH_RECORD",
    "ExtractProgress",
    "FetchResult",
    "RemoteFile",
    "bach_photos_dir",
    "iter_fetch_bach",
    "zenodo_file",
]

log = logging.getLogger(__name__)

BACH_RECORD = "3632035"
BACH_FILE = "ICIAR2018_BACH_Challenge.zip"
ZENODO_API = "https://zenodo.org/api/records/"
BACH_LICENCE = "CC BY-NC-ND 4.0 (https://creativecommons.org/licenses/by-nc-nd/4.0/legalcode)"
BACH_CITATION = (
    "Aresta G., Araújo T., Kwok S., et al. BACH: Grand challenge on breast cancer histology images. "
    "Medical Image Analysis 56 (2019) 122-139. https://doi.org/10.1016/j.media.2019.05.010"
)
BACH_SIZE_TEXT = "about 10.4 GB"
_ROOT = "ICIAR2018_BACH_Challenge"
_CLASSES = ("Benign", "InSitu", "Invasive", "Normal")
_MARKER = ".napari-bcd-complete.json"


@dataclass(frozen=True)
class RemoteFile:
    """A file of a Zenodo record: where to get it and what it must be."""

    url: str
    size: int | None
    md5: str | None


@dataclass(frozen=True)
class ExtractProgress:
    done: int
    total: int
    desc: str = "extract"
    unit: str = "file"


@dataclass
class FetchResult:
    """Where the photos are and what was checked."""

    photos: Path
    counts: dict[str, int]
    md5: str | None
    notes: list[str] = field(default_factory=list)


def bach_photos_dir(root: str | os.PathLike[str]) -> Path:
    """Where :func:`iter_fetch_bach` puts the photos under ``root``."""
    return Path(root) / _ROOT / "Photos"


def zenodo_file(record: str = BACH_RECORD, filename: str = BACH_FILE, api: str = ZENODO_API,
                timeout: float = 30.0) -> RemoteFile:
    """Look a file up in a Zenodo record (records API): its download address, size and md5."""
    url = api.rstrip("/") + "/" + record
    doc = fetch_json(url, timeout=timeout)
    files = doc.get("files", [])
    if isinstance(files, dict):  # /files endpoint form
        files = files.get("entries", [])
    for f in files:
        if f.get("key") == filename or f.get("filename") == filename:
            checksum = str(f.get("checksum", ""))
            md5 = checksum.split(":", 1)[1] if checksum.startswith("md5:") else None
            links = f.get("links", {})
            link = links.get("content") or links.get("self") or links.get("download")
            if not link:
                break
            return RemoteFile(link, int(f["size"]) if f.get("size") is not None else None, md5)
    raise DownloadError(f"Zenodo record {record} ({url}) lists no file {filename}. Download it by hand from "
                        f"https://zenodo.org/records/{record} and use --from FILE.zip.")


def iter_fetch_bach(
    root: str | os.PathLike[str],
    *,
    accept_licence: bool = False,
    from_zip: str | os.PathLike[str] | None = None,
    api: str = ZENODO_API,
    md5: str | None = None,
    keep_zip: bool = False,
) -> Generator[DownloadProgress | ExtractProgress, None, FetchResult]:
    """Get the BACH photos into ``root/ICIAR2018_BACH_Challenge/Photos``.

    Parameters
    ----------
    root
        Folder to put them in (created).
    accept_licence
        The licence (CC BY-NC-ND 4.0) must be accepted before downloading;
        a zip already on disk (``from_zip``) needs no download.
    from_zip
        Use this copy of ``ICIAR2018_BACH_Challenge.zip`` instead of
        downloading.  Its md5 is checked against ``md5`` or, when Zenodo can
        be reached, the published one.
    api
        Zenodo's records API (a mirror or a test server).
    keep_zip
        Keep the downloaded archive after extracting (never deletes ``from_zip``).

    Raises
    ------
    LicenceNotAcceptedError, DownloadError, DatasetError
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DatasetError(f"{root} is a file; give a folder to put the BACH photos in (--dir).")
    if md5 is not None and not re.fullmatch(r"[0-9a-fA-F]{32}", md5.strip()):
        raise DatasetError(f"--md5 {md5!r} is not an md5 (32 hexadecimal digits).")
    photos = bach_photos_dir(root)
    if (photos / _MARKER).is_file():
        info = json.loads((photos / _MARKER).read_text(encoding="utf-8"))
        return FetchResult(photos, info.get("counts", {}), info.get("md5"), [f"The photos are already in {photos}."])
    if photos.exists() and any(photos.iterdir()):
        raise DatasetError(f"{photos} already holds files that napari-bcd did not finish writing (no {_MARKER}): "
                           "they are left alone. Move them away (or give another --dir), then fetch again; if they "
                           "are the BACH photos already, train from that folder directly.")
    notes: list[str] = []
    if from_zip is not None:
        zpath = Path(from_zip)
        if zpath.is_dir():
            raise DatasetError(f"{zpath} is a folder; give the archive {BACH_FILE} itself (a folder of photos "
                               "needs no fetching: train from it directly).")
        if not zpath.is_file():
            raise DatasetError(f"{zpath} does not exist. Give the path of {BACH_FILE}.")
        expected = md5
        if expected is None:
            try:
                expected = zenodo_file(api=api, timeout=10).md5
            except DownloadError as err:
                notes.append(f"The archive's md5 was not checked (Zenodo unreachable: {err}); every extracted "
                             "file's CRC was.")
        got = None
        if expected is not None:
            got = file_md5(zpath)
            if got != expected.strip().lower():
                raise DownloadError(f"{zpath} has md5 {got}, not the published {expected}: it is incomplete or "
                                    "another file. Download it again.")
    else:
        if not accept_licence:
            raise LicenceNotAcceptedError(
                f"The BACH data ({BACH_SIZE_TEXT}) are licensed {BACH_LICENCE}: non-commercial use, no derivatives, "
                f"with attribution. Cite: {BACH_CITATION} Accept the licence to download (--accept-licence)."
            )
        remote = zenodo_file(api=api)
        zpath = root / BACH_FILE
        if zpath.is_file() and remote.md5 and file_md5(zpath) == remote.md5:
            got = remote.md5
        else:
            zpath = yield from iter_download(remote.url, zpath, size=remote.size, md5=remote.md5)
            got = remote.md5
        if remote.md5 is None:
            notes.append("Zenodo published no md5 for the archive; every extracted file's CRC was checked.")
    counts = yield from _extract_photos(zpath, photos)
    if counts != dict.fromkeys(_CLASSES, 100):
        notes.append("The official archive has 100 photos per class; this one has "
                     + ", ".join(f"{k} {v}" for k, v in counts.items()) + ".")
    with atomic_write(photos / _MARKER, "w") as fh:
        json.dump({"counts": counts, "md5": got, "source": str(zpath)}, fh)
    if from_zip is None and not keep_zip:
        zpath.unlink(missing_ok=True)
    return FetchResult(photos, counts, got, notes)


def _photos_member(name: str) -> str | None:
    """The path under ``Photos/`` of a zip member, or None for anything else (or anything unsafe)."""
    p = PurePosixPath(name)
    parts = p.parts
    if "Photos" not in parts or p.is_absolute() or ".." in parts or name.endswith("/"):
        return None
    rel = parts[parts.index("Photos") + 1 :]
    if not rel:
        return None
    if len(rel) == 1 and rel[0].lower().endswith(".csv"):
        return rel[0]
    if len(rel) == 2 and rel[0] in _CLASSES and rel[1].lower().endswith((".tif", ".tiff")):
        return "/".join(rel)
    return None


def _extract_photos(zpath: Path, photos: Path) -> Generator[ExtractProgress, None, dict[str, int]]:
    """Extract ``Photos/`` into a temporary folder, check it, then move it into place."""
    import tifffile

    from .iciar import GROUND_TRUTH, read_iciar

    tmp = photos.with_name(photos.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        zf = zipfile.ZipFile(zpath)
    except (zipfile.BadZipFile, OSError) as err:
        raise DownloadError(f"{zpath} is not a readable zip archive ({err}). Download it again.") from err
    with zf:
        members = [(m, rel) for m in zf.infolist() if (rel := _photos_member(m.filename))]
        if not any(rel.endswith((".tif", ".tiff")) for _, rel in members):
            raise DatasetError(f"{zpath} has no Photos/<class>/*.tif: it is not the BACH archive.")
        if any(m.flag_bits & 0x1 for m, _ in members):
            raise DatasetError(f"{zpath} is encrypted (password-protected): it is not the archive Zenodo publishes. "
                               "Download it again.")
        yield ExtractProgress(0, len(members))
        try:
            for k, (m, rel) in enumerate(members):
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with zf.open(m) as src, open(target, "wb") as dst:  # zipfile checks each member's CRC
                        shutil.copyfileobj(src, dst, 1 << 20)
                except NotImplementedError as err:  # a compression method zipfile does not know
                    raise DatasetError(f"{m.filename} in {zpath} uses a compression this Python cannot read "
                                       f"({err}); the archive Zenodo publishes does not. Download it again.") from err
                except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError) as err:  # zlib: deflate data broken
                    raise DownloadError(f"{m.filename} in {zpath} is damaged ({err}). Download the archive "
                                        "again.") from err
                yield ExtractProgress(k + 1, len(members))
        except BaseException:  # a damaged member, a full disk, an interruption: no 2 GB Photos.partial left behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    # What was extracted: every photo a TIFF, every class there, the ground truth agreeing with the folders.
    ds = read_iciar(tmp)
    bad = []
    for p in ds.paths:
        try:
            with tifffile.TiffFile(p) as tf:
                tf.pages[0].shape  # noqa: B018 - reading the header is the check
        except Exception as err:  # noqa: BLE001 - any unreadable file is reported
            bad.append(f"{p.name} ({err})")
    counts = {c: int(sum(1 for p in ds.paths if p.parent.name == c)) for c in _CLASSES}
    problems = list(ds.problems) + [f"{b} is not a readable TIFF" for b in bad]
    if not (tmp / GROUND_TRUTH).is_file():
        problems.append(f"{GROUND_TRUTH} is missing")
    if any(v == 0 for v in counts.values()):
        problems.append("a class folder is empty: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if problems:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DatasetError(f"The photos extracted from {zpath} do not check out: {'; '.join(problems[:5])}. "
                           "Download the archive again.")
    if photos.exists() and not any(photos.iterdir()):
        photos.rmdir()  # an empty folder only: files of the user's are refused before anything is fetched
    os.replace(tmp, photos)
    log.info("Extracted %d BACH photos to %s", len(ds), photos)
    return counts
