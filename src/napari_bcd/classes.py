"""The class vocabulary: names, display names, aliases, colours and severity of the classes napari-bcd knows.

The vocabulary is *only* a vocabulary.  What the classes of something are comes
from that thing: a dataset's from its folders (or manifest), a model's from its
card, a map's from the model that made it, an annotation file's from its
labels.  The table says how a known class is spelt, shown and ranked; a class it
does not know is still a class (its own name, a colour from a palette, no
severity).

Label values in maps: 0 is background / not classified, ``i + 1`` the model's
``i``-th class.  A slide-level call picks the most severe class present, for the
BACH classes Invasive > InSitu > Benign > Normal.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .errors import BcdError

__all__ = [
    "BACH_CLASSES",
    "BACKGROUND",
    "CLASS_COLORS",
    "CLASS_IDS",
    "CLASS_NAMES",
    "DISPLAY_NAMES",
    "ICIAR_CLASSES",
    "SEVERITY",
    "VOCABULARY",
    "ClassStyle",
    "IciarClass",
    "KnownClass",
    "canonical_class",
    "class_id",
    "class_key",
    "class_styles",
    "display_name",
    "match_class",
    "order_classes",
]

BACKGROUND = 0


@dataclass(frozen=True)
class KnownClass:
    """One class of the vocabulary: the one row to add a known class to.

    Attributes
    ----------
    id
        Its place in the vocabulary (1-based); a BACH model's label value too.
    name
        The canonical name (the ICIAR folder name for the BACH classes), used in model cards.
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


#: Kept for code that names the row type by its first use.
IciarClass = KnownClass

#: The known classes.  The BACH challenge's four, in its folder order (a BACH model's output order).
VOCABULARY: tuple[KnownClass, ...] = (
    KnownClass(1, "Normal", "Normal", (46, 160, 67), 3, ("normal tissue",)),
    KnownClass(2, "Benign", "Benign", (240, 200, 40), 2, ("benign lesion",)),
    KnownClass(3, "InSitu", "In situ carcinoma", (245, 130, 30), 1,
               ("in situ", "in-situ", "in_situ", "carcinoma in situ")),
    KnownClass(4, "Invasive", "Invasive carcinoma", (214, 39, 40), 0, ("carcinoma invasive",)),
)
ICIAR_CLASSES = VOCABULARY

#: The BACH (ICIAR 2018) dataset's classes, in its order: the paper's model and the BACH download use them.
#: Not a default for anything else: datasets, models and maps carry their own classes.
BACH_CLASSES: tuple[str, ...] = tuple(c.name for c in VOCABULARY[:4])
CLASS_NAMES = BACH_CLASSES

# Views of the table, for the places that need one column.
CLASS_IDS: dict[str, int] = {c.name: c.id for c in VOCABULARY}
DISPLAY_NAMES: dict[int, str] = {BACKGROUND: "Background", **{c.id: c.display for c in VOCABULARY}}
CLASS_COLORS: dict[int, tuple[int, int, int]] = {c.id: c.color for c in VOCABULARY}
#: Most severe first.
SEVERITY: tuple[int, ...] = tuple(c.id for c in sorted(VOCABULARY, key=lambda c: c.severity))
_BY_ID: dict[int, KnownClass] = {c.id: c for c in VOCABULARY}
_ALIASES: dict[str, int] = {a: c.id for c in VOCABULARY for a in (c.name.lower(), c.display.lower(), *c.aliases)}
#: Labels that name no class: QuPath's own "Region*" and "Ignore*", napari-bcd's holes, and plain "no class".
_NO_CLASS = re.compile(r"^(|unclassified|none|no class|hole|region\*?|ignore\*?)$")


def _fold(label: object) -> str:
    return " ".join(str(label).strip().split())


def class_id(label: str | int, mapping: Mapping[str, str | int] | None = None) -> int | None:
    """The vocabulary id of a label (a known class's name, display name or alias), or None for any other label.

    Parameters
    ----------
    label
        A class name or alias (case-insensitive, surrounding blanks ignored), or a vocabulary id.
    mapping
        Optional user mapping from their own label text (e.g. ``"Tumor"``) to a
        known class name or id; it is consulted first, case-insensitively.
    """
    if isinstance(label, int) and not isinstance(label, bool):
        return label if label in _BY_ID else None
    text = _fold(label).lower()
    if mapping:
        target = _mapped(text, mapping)
        if target is not None:
            resolved = class_id(target)
            if resolved is None:
                raise BcdError(f"The label mapping sends {label!r} to {target!r}, which is not a known class. "
                               f"Use one of {', '.join(c.name for c in VOCABULARY)}.")
            return resolved
    return _ALIASES.get(text)


def _mapped(text: str, mapping: Mapping[str, str | int]) -> str | int | None:
    lowered = {_fold(k).lower(): v for k, v in mapping.items()}
    return lowered.get(text)


def canonical_class(label: object, mapping: Mapping[str, str | int] | None = None) -> str | None:
    """The class a label names, or None when it names none.

    A known class or any of its aliases gives the vocabulary's name (``"Carcinoma in situ"`` -> ``"InSitu"``);
    any other label is a class of its own, its text with blanks folded (``"Tumor"``, ``"Stroma"``); an empty
    label, ``"unclassified"``, QuPath's ``"Region*"`` and ``"Ignore*"`` name none.  ``mapping`` (the user's
    ``{"Tumor": "Invasive"}``) is consulted first and may send a label to any class name.
    """
    if isinstance(label, int) and not isinstance(label, bool):
        return _BY_ID[label].name if label in _BY_ID else None
    text = _fold(label)
    if mapping:
        target = _mapped(text.lower(), mapping)
        if target is not None:
            resolved = canonical_class(target)
            if resolved is None:
                raise BcdError(f"The label mapping sends {label!r} to {target!r}, which names no class.")
            return resolved
    if _NO_CLASS.match(text.lower()):
        return None
    cid = _ALIASES.get(text.lower())
    return _BY_ID[cid].name if cid is not None else text


def display_name(name: str) -> str:
    """How a class is shown to people: the vocabulary's display name, or the name itself."""
    cid = class_id(name)
    return _BY_ID[cid].display if cid is not None else str(name)


def class_key(label: object) -> str:
    """What two spellings of one class share: ``class_key("In situ carcinoma") == class_key("InSitu")``, and
    ``class_key("tumor ") == class_key("Tumor")`` (to match a dataset's, a model's and an annotation's classes)."""
    name = canonical_class(label)
    return (name if name is not None else _fold(label)).casefold()


def match_class(label: object, classes: Sequence[str]) -> str | None:
    """The one of ``classes`` a label names (through the vocabulary, ignoring case), or None."""
    key = class_key(label)
    return next((c for c in classes if class_key(c) == key), None)


def order_classes(names: Iterable[str]) -> tuple[str, ...]:
    """Distinct class names in a stable order: known classes in vocabulary order first, then the others sorted.

    A dataset's classes are ordered this way, so the same folders always give a model the same output order
    (and the BACH folders the BACH order).
    """
    unique = {str(n) for n in names}
    known = sorted((n for n in unique if class_id(n) is not None), key=lambda n: (class_id(n), n))
    other = sorted((n for n in unique if class_id(n) is None), key=lambda n: (n.lower(), n))
    return (*known, *other)


#: Colours for classes the vocabulary does not know (distinct from the known ones).
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
        RGB 0-255: the vocabulary's colour for a known class (or alias), a palette colour otherwise.
    iciar_id
        The vocabulary id of a known class, else None.
    severity
        Rank for the slide-level call (0 = most severe); None for classes the vocabulary does not rank.
    """

    label: int
    name: str
    display_name: str
    color: tuple[int, int, int]
    iciar_id: int | None
    severity: int | None


def class_styles(names: Sequence[str]) -> list[ClassStyle]:
    """The style of each class of a list (a model's, a map's, a layer's), in its order.

    Colours, display names and the slide call follow *these* classes, so a
    checkpoint with other classes (three classes, or "Tumour") never shows
    its third class in the In-situ colour.  Classes the vocabulary does not
    know take the palette's colours in their order here.
    """
    out: list[ClassStyle] = []
    other = 0
    for i, name in enumerate(names):
        cid = class_id(str(name))
        if cid is not None:
            k = _BY_ID[cid]
            out.append(ClassStyle(i + 1, str(name), k.display, k.color, cid, k.severity))
        else:
            out.append(ClassStyle(i + 1, str(name), str(name), _OTHER_COLORS[other % len(_OTHER_COLORS)], None, None))
            other += 1
    return out
