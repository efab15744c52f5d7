"""Classes come from the data (issue 36): a folder's classes train a model with those classes, and its maps,
summary, legend, exports and review follow them, whatever their number and names, with no change to the class
vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE_SLIDE, drain, kinds_dataset
from napari_bcd.classes import VOCABULARY, canonical_class, class_styles, order_classes

#: Five classes the vocabulary does not know, each a real tissue source.
FIVE = {"Adipose": ["histolab-almost-white-2.png", "histolab-no-tissue.png"],
        "Stroma": ["histolab-medium-nuclei-score-level1.png"],
        "Lymphocytes": ["stardist-histo-500x300.jpg"],
        "Tumour": ["tiatoolbox-target-1000.png"],
        "Necrosis": ["histolab-tissue-level0-4302-10273-4814-10785.png"]}
TWO = {"Invasive carcinoma": ["tiatoolbox-target-1000.png"], "Normal": ["histolab-almost-white-2.png"]}


def test_the_vocabulary_names_and_orders_but_never_lists() -> None:
    assert canonical_class("carcinoma in situ") == "InSitu" and canonical_class("  Tumour ") == "Tumour"
    assert canonical_class("Ignore*") is None and canonical_class("Region*") is None and canonical_class("") is None
    # known classes first in the vocabulary's order, the others sorted: the BACH folders keep the BACH order
    assert order_classes(["Tumour", "Invasive", "Adipose", "Normal"]) == ("Normal", "Invasive", "Adipose", "Tumour")
    styles = class_styles(order_classes(FIVE))
    assert len({s.color for s in styles}) == 5 and all(s.severity is None for s in styles)
    assert len(VOCABULARY) == 4  # nothing below added a row


@pytest.mark.parametrize("kinds", [TWO, FIVE], ids=["two", "five"])
def test_any_class_set_trains_classifies_and_exports(tmp_path: Path, kinds: dict) -> None:
    from napari_bcd import classify, open_slide
    from napari_bcd.cli import main
    from napari_bcd.layers import label_colors
    from napari_bcd.model import load_checkpoint
    from napari_bcd.train import iter_finetune, read_iciar

    ds = read_iciar(kinds_dataset(tmp_path / "ds", kinds, n=8))
    names = tuple(canonical_class(k) for k in kinds)
    assert set(ds.classes) == set(names) and len(ds.classes) == len(kinds)
    _, result = drain(iter_finetune(ds, out=tmp_path / "m.safetensors", backbone="timm:resnet18",
                                    backbone_weights=None, input_px=(64, 64), field_um=(200.0, 200.0), folds=3))
    model = load_checkpoint(result.checkpoint)
    assert model.card.classes == ds.classes and model.head.out.out_features == len(kinds)
    assert result.report is not None and result.report.classes == list(ds.classes)
    # classify the slide from the command line: every output speaks of the model's own classes
    assert main(["classify", str(SAMPLE_SLIDE), "--model", str(result.checkpoint), "--out", str(tmp_path / "out"),
                 "--precision", "fp32"]) == 0
    summary = json.loads((tmp_path / "out" / "CMU-1-Small-Region.summary.json").read_text())
    assert [c["name"] for c in summary["classes"]] == list(ds.classes)
    doc = json.loads((tmp_path / "out" / "CMU-1-Small-Region.geojson").read_text())
    shown = {st.display_name for st in class_styles(ds.classes)}
    assert {f["properties"]["classification"]["name"] for f in doc["features"]} <= shown
    with open_slide(SAMPLE_SLIDE) as slide:
        cm = classify(slide, model, precision="fp32")
    colors = label_colors(cm.classes)
    assert len({colors[k] for k in range(1, len(kinds) + 1)}) == len(kinds)  # one colour per class, none shared
    assert int(cm.labels.max()) <= len(kinds) + 1  # the classes, and uncertain one past them
    # review: a cell repainted to the last class is learnt from, into a model with the same classes
    from napari_bcd.review import corrections_from_labels, iter_retrain

    edited = cm.labels.copy()
    r, c = np.argwhere(cm.labels > 0)[0]
    last = len(kinds)
    edited[r, c] = last if cm.labels[r, c] != last else 1
    corrections = corrections_from_labels(cm, edited)
    assert [x.new for x in corrections.cells] == [cm.classes[int(edited[r, c]) - 1]]
    with open_slide(SAMPLE_SLIDE) as slide:
        _, res = drain(iter_retrain(result.checkpoint, corrections, slide, class_map=cm, steps=30))
    assert load_checkpoint(res.checkpoint).card.classes == ds.classes


def test_the_report_names_every_class_in_full() -> None:
    """Classes come from the data, so their names can be long and share a beginning: the confusion matrix cut them
    to 8 letters ("Epidermi"), and "Carcinoma in situ" and "Carcinoma, invasive" both headed columns "Carcinom"."""
    from napari_bcd.train.evaluate import report_from_predictions

    classes = ["Carcinoma in situ", "Carcinoma, invasive", "Epidermis"]
    text = report_from_predictions([0, 1, 2, 2], [0, 1, 2, 1], classes).to_text()
    matrix = text.split("confusion matrix (rows: true, columns: predicted)\n")[1].splitlines()
    assert all(c in matrix[0] for c in classes) and "Carcinom " not in matrix[0]
    assert len({len(line) for line in matrix}) == 1  # the columns line up under their names
    assert matrix[3].split()[-3:] == ["0", "1", "1"]  # Epidermis: one called invasive, one right
