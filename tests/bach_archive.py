"""A small BACH archive in the official layout, and a local Zenodo that serves it.

The archive holds what ``ICIAR2018_BACH_Challenge.zip`` holds where it
matters: ``ICIAR2018_BACH_Challenge/Photos/<class>/<prefix><nnn>.tif`` (100
per class, real H&E crops, TIFF), ``microscopy_ground_truth.csv``, and a
``WSI/`` part that must not be extracted; plus a member whose name climbs out
of the folder (``../``), which must be refused.  The server answers the
records API (size, ``md5:`` checksum, content link) and serves the file with
HTTP range requests; it can cut a transfer short or flip a byte.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from conftest import DATA, load_rgb

PREFIX = {"Benign": "b", "InSitu": "is", "Invasive": "iv", "Normal": "n"}
SOURCES = {
    "Normal": ["histolab-almost-white-2.png", "histolab-no-tissue.png"],
    "Benign": ["histolab-medium-nuclei-score-level1.png"],
    "InSitu": ["stardist-histo-500x300.jpg"],
    "Invasive": ["tiatoolbox-target-1000.png", "histolab-tissue-level0-4302-10273-4814-10785.png"],
}


def make_bach_zip(path: Path, per_class: int = 100, size: tuple[int, int] = (48, 64), seed: int = 0) -> Path:
    """Write a BACH-layout zip of real H&E crops (``size`` is h, w: the photos' 3:4)."""
    import tifffile

    rng = np.random.default_rng(seed)
    images = {c: [load_rgb(DATA / f) for f in files] for c, files in SOURCES.items()}
    root = "ICIAR2018_BACH_Challenge/"
    rows = []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(root + "WSI/A01.svs", b"not extracted")
        zf.writestr(root + "WSI/A01.xml", b"<Annotations/>")
        zf.writestr("../evil.txt", b"must never be written")
        zf.writestr(root + "Photos/Benign/../../../evil2.tif", b"must never be written")
        for cls in ("Benign", "InSitu", "Invasive", "Normal"):
            for k in range(1, per_class + 1):
                src = images[cls][k % len(images[cls])]
                y = int(rng.integers(0, src.shape[0] - size[0]))
                x = int(rng.integers(0, src.shape[1] - size[1]))
                buf = io.BytesIO()
                tifffile.imwrite(buf, src[y : y + size[0], x : x + size[1]], photometric="rgb")
                name = f"{PREFIX[cls]}{k:03d}.tif"
                zf.writestr(f"{root}Photos/{cls}/{name}", buf.getvalue())
                rows.append(f"{name},{cls}")
        zf.writestr(root + "Photos/microscopy_ground_truth.csv", "\n".join(rows) + "\n")
    return path


@dataclass
class FakeZenodo:
    """A records API and file server on 127.0.0.1 (see the module docstring)."""

    payload: bytes
    record: str = "3632035"
    filename: str = "ICIAR2018_BACH_Challenge.zip"
    cut_after: int | None = None  # next file response stops after this many bytes
    flip_byte: int | None = None  # serve the file with this byte changed
    requests: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:  # http.server calls it by this name
                fake.requests.append({"path": self.path, "range": self.headers.get("Range")})
                if self.path.rstrip("/") == f"/api/records/{fake.record}":
                    body = json.dumps({"id": fake.record, "files": [{
                        "key": fake.filename, "size": len(fake.payload),
                        "checksum": "md5:" + hashlib.md5(fake.payload).hexdigest(),
                        "links": {"self": f"{fake.base}/api/records/{fake.record}/files/{fake.filename}/content"},
                    }]}).encode()
                    self._send(200, body, "application/json")
                    return
                if self.path.endswith(f"/files/{fake.filename}/content"):
                    data = bytearray(fake.payload)
                    if fake.flip_byte is not None:
                        data[fake.flip_byte] ^= 0xFF
                    start = 0
                    rng = self.headers.get("Range")
                    if rng and rng.startswith("bytes="):
                        start = int(rng[6:].split("-")[0])
                    part = bytes(data[start:])
                    self.send_response(206 if start else 200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(len(part)))
                    if start:
                        self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                    self.end_headers()
                    if fake.cut_after is not None:
                        cut, fake.cut_after = fake.cut_after, None
                        self.wfile.write(part[:cut])
                        self.wfile.flush()
                        self.close_connection = True
                        return
                    self.wfile.write(part)
                    return
                self._send(404, b"not found", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.api = f"{self.base}/api/records/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def file_requests(self) -> list[dict]:
        return [r for r in self.requests if r["path"].endswith("/content")]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
