"""Class ids, names, aliases and colours: the one source of truth.

Ids follow DESIGN.md: 0 is background / not classified, 1-4 are the ICIAR 2018
(BACH) classes in the order of the challenge's folder names.  A slide-level call
picks the most severe class present: Invasive > InSitu > Benign > Normal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import BcdError

__all__ = [
    "BACKGROUND",
    "CLASS_COLORS",
    "CLASS_IDS",
    "CLASS_NAMES",
    "DISPLAY_NAMES",
    "ICIAR_CLASSES",
    "SEVERITY",
    "ClassStyle",
    "IciarClass",
    "class_id",
    "class_styles",
]

BACKGROUND = 0


@dataclass(frozen=True)
class IciarClass:
    """One of the ICIAR 2018 (BACH) classes: the one row to add a class to.

    Attributes
    ----------
    id
        Its label value (1-based; 0 is background).
    name
        The ICIAR folder name, and the class name in model cards.
    display
        For people.
    color
        RGB 0-255.  Green -> yellow -> orange -> red follows severity, and stays
        distinguishable on pink/purple H&E; background is transparent in napari.
    severity
        Rank for a slide-level call: 0 is the most severe.
    aliases
        Other spellings (lower case) that name it: the BACH ImageScope XML
        files spell the labels several ways; QuPath users often type the
        display names.
    """

    id: int
    name: str
    display: str
    color: tuple[int, int, int]
    severity: int
    aliases: tuple[str, ...] = ()


#: The classes, in model output order (index 0 of the model is id 1).
ICIAR_CLASSES: tuple[IciarClass, ...] = (
    IciarClass(1, "Normal", "Normal", (46, 160, 67), 3, ("normal tissue",)),
    IciarClass(2, "Benign", "Benign", (240, 200, 40), 2, ("benign lesion",)),
    IciarClass(3, "InSitu", "In situ carcinoma", (245, 130, 30), 1,
               ("in situ", "in-situ", "in_situ", "carcinoma in situ")),
    IciarClass(4, "Invasive", "Invasive carcinoma", (214, 39, 40), 0, ("carcinoma invasive",)),
)

# Views of the table, for the many places that need one column.
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in ICIAR_CLASSES)
CLASS_IDS: dict[str, int] = {c.name: c.id for c in ICIAR_CLASSES}
DISPLAY_NAMES: dict[int, str] = {BACKGROUND: "Background", **{c.id: c.display for c in ICIAR_CLASSES}}
CLASS_COLORS: dict[int, tuple[int, int, int]] = {c.id: c.color for c in ICIAR_CLASSES}
#: Most severe first.
SEVERITY: tuple[int, ...] = tuple(c.id for c in sorted(ICIAR_CLASSES, key=lambda c: c.severity))
_ALIASES: dict[str, int] = {a: c.id for c in ICIAR_CLASSES for a in (c.name.lower(), c.display.lower(), *c.aliases)}


def class_id(label: str | int, mapping: Mapping[str, str | int] | None = None) -> int | None:
    """Return the class id (1-4) of a label, or None when it is not one of ours.

    Parameters
    ----------
    label
        A class name or alias (case-insensitive, surrounding blanks ignored), or
        an id 1-4.
    mapping
        Optional user mapping from their own label text (e.g. ``"Tumor"``) to a
        class name or id; it is consulted first, case-insensitively.

    Returns
    -------
    int or None
    """
    if isinstance(label, int) and not isinstance(label, bool):
        return label if label in DISPLAY_NAMES and label != BACKGROUND else None
    text = " ".join(str(label).strip().lower().split())
    if mapping:
        lowered = {" ".join(str(k).strip().lower().split()): v for k, v in mapping.items()}
        if text in lowered:
            target = lowered[text]
            resolved = class_id(target)
            if resolved is None:
                raise BcdError(
                    f"The label mapping sends {label!r} to {target!r}, which is not a class. "
                    f"Use one of {', '.join(CLASS_NAMES)}."
                )
            return resolved
    return _ALIASES.get(text)


#: Colours for classes a model has that are not ICIAR classes (distinct from the four above).
_OTHER_COLORS: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (148, 103, 189), (23, 190, 207), (140, 86, 75), (227, 119, 194), (127, 127, 127),
    (188, 189, 34), (57, 59, 121),
)


@dataclass(frozen=True)
class ClassStyle:
    """How one of a model's classes is shown: label value, name, display name, colour, severity.

    Attributes
    ----------
    label
        The value in label maps: the model's output index + 1.
    name
        The class name in the model card.
    display_name
        For people ("In situ carcinoma" for "InSitu"; the name itself otherwise).
    color
        RGB 0-255: the ICIAR colour for an ICIAR class (or alias), another colour otherwise.
    iciar_id
        1-4 when the name is an ICIAR class or alias, else None.
    severity
        Rank for the slide-level call (0 = most severe); None for non-ICIAR classes.
    """

    label: int
    name: str
    display_name: str
    color: tuple[int, int, int]
    iciar_id: int | None
    severity: int | None


def class_styles(names: Sequence[str]) -> list[ClassStyle]:
    """The style of each of a model's classes, in output order.

    Colours, display names and the slide call follow the *model's* classes, so
    a checkpoint with other classes (three classes, or "Tumour") never shows
    its third class in the In-situ colour.
    """
    out: list[ClassStyle] = []
    other = 0
    for i, name in enumerate(names):
        cid = class_id(str(name))
        if cid is not None:
            out.append(ClassStyle(i + 1, str(name), DISPLAY_NAMES[cid], CLASS_COLORS[cid], cid, SEVERITY.index(cid)))
        else:
            out.append(ClassStyle(i + 1, str(name), str(name), _OTHER_COLORS[other % len(_OTHER_COLORS)], None, None))
            other += 1
    return out
