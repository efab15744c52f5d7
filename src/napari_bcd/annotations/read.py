"""Reading annotation files: QuPath GeoJSON, Aperio ImageScope XML, ASAP XML.

The format is recognised from the content, not the extension.  Everything
that is not kept — detections, points, lines, labels that are not classes —
is counted in the :class:`ReadReport`, never dropped silently.  XML is parsed
with defusedxml: entity declarations are refused.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import AnnotationError
from .model import Annotation, ReadReport

__all__ = ["FILE_PATTERNS", "FORMAT_NAMES", "AnnotationFormat", "AnnotationList", "read_annotations"]

log = logging.getLogger(__name__)



class AnnotationList(list):
    """A list of :class:`Annotation` with the :class:`ReadReport` of the file it came from."""

    report: ReadReport

    def __init__(self, items: Iterable[Annotation] = (), report: ReadReport | None = None) -> None:
        super().__init__(items)
        self.report = report or ReadReport()


def read_annotations(
    path: str | os.PathLike[str], label_map: Mapping[str, str | int] | None = None
) -> AnnotationList:
    """Read polygons and their labels from an annotation file.

    Parameters
    ----------
    path
        QuPath GeoJSON (0.2-0.5), Aperio ImageScope XML (as in the BACH slides)
        or ASAP XML.
    label_map
        Your own label names to classes, e.g. ``{"Tumor": "Invasive"}``; any other label is a class of its own
        (:func:`~napari_bcd.classes.canonical_class`).

    Returns
    -------
    AnnotationList
        The annotations (level-0 pixels, ``(y, x)``); ``.report`` says which
        classes were found, and what was skipped, repaired, or named no class.

    Raises
    ------
    AnnotationError
        When the file is missing, malformed, unsafe, or holds no polygon.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise AnnotationError(f"{p} does not exist. Check the path.") from None
    except IsADirectoryError:
        raise AnnotationError(f"{p} is a folder. Give an annotation file ({FORMAT_NAMES}).") from None
    except OSError as err:
        why = "a symbolic link that leads nowhere (or in a loop)" if p.is_symlink() else (err.strerror or str(err))
        raise AnnotationError(f"{p} cannot be read: {why}.") from err
    raw = _as_utf8(raw, p)
    head = raw.lstrip()[:1]
    if raw.startswith(b"\xef\xbb\xbf"):
        head = raw[3:].lstrip()[:1]
    report = ReadReport()
    try:
        items = _read_any(raw, head, p, report, label_map)
    except AnnotationError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError, RecursionError) as err:
        # Whatever a malformed file trips over inside the readers: one message naming the file.
        raise AnnotationError(f"{p.name} is malformed ({type(err).__name__}: {str(err)[:200]}). Export it again from "
                              "the program that made it.") from err
    except Exception as err:  # shapely's GEOSException and friends on impossible geometry
        if type(err).__module__.startswith("shapely"):
            raise AnnotationError(f"{p.name} holds geometry that cannot be used ({err}).") from err
        raise
    for a in items:
        if a.class_name is None:
            report.unknown_labels[a.label] = report.unknown_labels.get(a.label, 0) + 1
        else:
            report.classes[a.class_name] = report.classes.get(a.class_name, 0) + 1
    report.read = len(items)
    if not items:
        skipped = f" (skipped: {', '.join(f'{n} {w}' for w, n in report.skipped.items())})" if report.skipped else ""
        raise AnnotationError(f"{p.name} holds no polygon annotations{skipped}. Draw or export regions as polygons.")
    log.info("%s: %s", p.name, report)
    return AnnotationList(items, report)


def _as_utf8(raw: bytes, p: Path) -> bytes:
    """UTF-16 files (Windows tools write them) re-encoded as UTF-8; other bytes as they are."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return raw.decode("utf-16").encode("utf-8")
        except UnicodeDecodeError as err:
            raise AnnotationError(f"{p.name} starts like UTF-16 text but does not decode as it ({err}).") from err
    return raw


@dataclass(frozen=True)
class AnnotationFormat:
    """One annotation format: how it is recognised and read (the one row to add a format to).

    ``syntax`` is "json" or "xml"; an XML format is recognised by its root element (``root``).
    """

    name: str
    syntax: str
    root: str
    suffixes: tuple[str, ...]
    read: Callable[..., list[Annotation]]


def _formats() -> tuple[AnnotationFormat, ...]:
    from .asap import read_asap
    from .imagescope import read_imagescope
    from .qupath import read_geojson

    return (AnnotationFormat("QuPath GeoJSON", "json", "", (".geojson", ".json"), read_geojson),
            AnnotationFormat("Aperio ImageScope XML", "xml", "Annotations", (".xml",), read_imagescope),
            AnnotationFormat("ASAP XML", "xml", "ASAP_Annotations", (".xml",), read_asap))


#: The formats read, for messages and file dialogs.
FORMAT_NAMES = "QuPath GeoJSON, Aperio ImageScope XML or ASAP XML"
FILE_PATTERNS = "*.geojson *.json *.xml"


def _read_any(raw: bytes, head: bytes, p: Path, report: ReadReport, label_map) -> list[Annotation]:
    formats = _formats()
    if head in (b"{", b"["):
        fmt = next(f for f in formats if f.syntax == "json")
        report.format = fmt.name
        return fmt.read(raw, p, report, label_map)
    if head == b"<":
        root = _parse_xml(raw, p)
        for fmt in formats:
            if fmt.syntax == "xml" and root.tag == fmt.root:
                report.format = fmt.name
                return fmt.read(root, p, report, label_map)
        raise AnnotationError(f"{p.name} is XML with root <{root.tag}>, which is none of the formats napari-bcd "
                              f"reads ({FORMAT_NAMES}).")
    raise AnnotationError(f"{p.name} is not an annotation file napari-bcd reads ({FORMAT_NAMES}).")


def _parse_xml(raw: bytes, p: Path):
    import defusedxml.ElementTree as ET
    from defusedxml import DefusedXmlException

    try:
        return ET.fromstring(raw)
    except DefusedXmlException as err:
        raise AnnotationError(
            f"{p.name} declares XML entities or a DTD, which napari-bcd refuses for safety ({type(err).__name__}). "
            "Remove the <!DOCTYPE ...> / <!ENTITY ...> lines."
        ) from err
    except ET.ParseError as err:
        raise AnnotationError(f"{p.name} is not well-formed XML ({err}).") from err
