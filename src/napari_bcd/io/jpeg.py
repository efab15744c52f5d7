"""A TIFF's JPEG tiles as standalone streams, for decoders other than tifffile's (a GPU's)."""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["complete_jpeg"]


def _jpeg_segments(data: bytes) -> Iterator[tuple[int, int, int]]:
    """``(marker, start, length)`` of each marker segment of a JPEG stream up to its first SOS."""
    j = 2 if data[:2] == b"\xff\xd8" else 0
    while j + 4 <= len(data) and data[j] == 0xFF:
        marker = data[j + 1]
        if marker in (0xD8, 0xD9) or 0xD0 <= marker <= 0xD7:  # no length
            j += 2
            continue
        length = int.from_bytes(data[j + 2 : j + 4], "big")
        yield marker, j, length
        if marker == 0xDA:
            return
        j += 2 + length


def complete_jpeg(data: bytes, tables: bytes | None = None, *, rgb: bool = False) -> bytes:
    """A TIFF JPEG tile as a standalone JPEG stream: the JPEGTables spliced in, RGB-JPEG made explicit.

    A TIFF tile is often an abbreviated stream whose Huffman and quantisation
    tables sit in the page's JPEGTables tag; they go in after the tile's SOI.
    With ``rgb`` (TIFF photometric RGB) and no JFIF marker, the samples are
    RGB, not YCbCr (Aperio), which only the TIFF tag says: the three
    components are renamed ``R``, ``G``, ``B`` (82, 71, 66), the way JPEG
    decoders (libjpeg-turbo, and so torchvision's) recognise RGB.
    """
    out = bytearray(data)
    if tables and len(tables) > 4 and tables[:2] == b"\xff\xd8" and tables[-2:] == b"\xff\xd9":
        out = bytearray(tables[:-2]) + out[2:]
    if rgb:
        segments = list(_jpeg_segments(bytes(out)))
        jfif = any(m == 0xE0 and out[st + 4 : st + 9] == b"JFIF\x00" for m, st, _ in segments)
        if not jfif:
            for marker, start, _ in segments:
                if marker in (0xC0, 0xC1, 0xC2):  # SOF: precision, h, w, n, then (id, sampling, table) each
                    n = out[start + 9]
                    if n == 3:
                        for k in range(3):
                            out[start + 10 + 3 * k] = (82, 71, 66)[k]
                elif marker == 0xDA:  # SOS: n, then (id, tables) each
                    n = out[start + 4]
                    if n == 3:
                        for k in range(3):
                            out[start + 5 + 2 * k] = (82, 71, 66)[k]
    return bytes(out)
