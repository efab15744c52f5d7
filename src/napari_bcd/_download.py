"""Resumable downloads (HTTP range requests), checked by size and md5.

A download goes to ``NAME.part`` beside its destination.  If the transfer
breaks, running it again asks the server for the rest (``Range: bytes=N-``);
a server that ignores the range sends the whole file and the part file starts
over.  The md5 covers the bytes already on disk and the new ones, and the file
gets its final name only when size and md5 match.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import urllib.error
import urllib.request
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._fileio import file_digest
from .errors import DownloadError

__all__ = ["DownloadProgress", "fetch_json", "file_md5", "iter_download"]

_CHUNK = 1 << 20
_UA = {"User-Agent": "napari-bcd (+https://github.com/napari-bcd/napari-bcd)"}


@dataclass(frozen=True)
class DownloadProgress:
    """Bytes on disk so far (resumed bytes included) of ``total``."""

    done: int
    total: int
    resumed_from: int = 0
    desc: str = "download"
    unit: str = "B"


def file_md5(path: str | os.PathLike[str], h: Any = None) -> str:
    """md5 of a file (continuing ``h`` when given): what Zenodo and Keras publish."""
    return file_digest(path, "md5", into=h)


def fetch_json(url: str, timeout: float = 30.0) -> dict:
    """GET a JSON document, or a :class:`DownloadError` that says what failed."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={**_UA, "Accept": "application/json"}),
                                    timeout=timeout) as resp:
            return json.loads(resp.read().decode("utf-8"))
    except (urllib.error.URLError, http.client.HTTPException, OSError, TimeoutError, ValueError) as err:
        raise DownloadError(f"Could not read {url}: {getattr(err, 'reason', err)}.") from err


def iter_download(
    url: str,
    dest: str | os.PathLike[str],
    *,
    size: int | None = None,
    md5: str | None = None,
    timeout: float = 60.0,
) -> Generator[DownloadProgress, None, Path]:
    """Download ``url`` to ``dest``, resuming a ``dest.part`` left by an earlier try.

    Yields :class:`DownloadProgress` about once per MiB; returns ``dest``.

    Raises
    ------
    DownloadError
        When the transfer fails (the part file is kept, so running again
        resumes), or the finished file's size or md5 is wrong (the part file
        is deleted: it cannot be repaired by resuming).
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.is_file() else 0
    if size is not None and have > size:
        part.unlink()
        have = 0
    h = hashlib.md5(usedforsecurity=False)
    if have:
        file_md5(part, h)
    headers = dict(_UA)
    if have and (size is None or have < size):
        headers["Range"] = f"bytes={have}-"
    resumed = have
    if size is None or have < size:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
                status = getattr(resp, "status", 200)
                if have and status != 206:  # the server ignored the range: start again
                    h = hashlib.md5(usedforsecurity=False)
                    have = resumed = 0
                length = resp.headers.get("Content-Length")
                total = size if size is not None else (have + int(length) if length and length.isdigit() else 0)
                with open(part, "ab" if have else "wb") as out:
                    yield DownloadProgress(have, total, resumed)
                    for chunk in iter(lambda: resp.read(_CHUNK), b""):
                        out.write(chunk)
                        h.update(chunk)
                        have += len(chunk)
                        yield DownloadProgress(have, total, resumed)
        except (urllib.error.URLError, http.client.HTTPException, OSError, TimeoutError) as err:
            raise DownloadError(
                f"The download from {url} stopped at {have:,} bytes ({getattr(err, 'reason', err)}). "
                "Run the same command again to resume it."
            ) from err
    got = part.stat().st_size
    if size is not None and got != size:
        raise DownloadError(f"The download from {url} ended at {got:,} of {size:,} bytes. Run the same command again "
                            "to resume it.")
    if md5 is not None and h.hexdigest() != md5.lower():
        part.unlink(missing_ok=True)
        raise DownloadError(f"The downloaded file has md5 {h.hexdigest()}, not {md5}: it is corrupt and was deleted. "
                            "Run the command again to download it anew.")
    os.replace(part, dest)
    return dest
