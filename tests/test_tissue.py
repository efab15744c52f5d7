"""Tissue detection on real H&E: none on glass and pen, the tissue on the CMU slide."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import DATA, SAMPLE_SLIDE, load_rgb
from napari_bcd.errors import BcdError
from napari_bcd.io import open_slide
from napari_bcd.tissue import TissueParams, detect_tissue


@pytest.mark.parametrize(
    "name", ["histolab-no-tissue.png", "histolab-no-tissue-red-pen.png", "histolab-almost-white-2.png"]
)
@pytest.mark.parametrize("mpp", [0.5, 1.0])  # the tiles' own scale: level 0/1 of 40x scans
def test_no_tissue_on_glass_and_pen(name: str, mpp: float) -> None:
    mask = detect_tissue(load_rgb(DATA / name), mpp=mpp)
    assert mask.dtype == bool and mask.shape == (512, 512)
    assert mask.sum() == 0


@pytest.mark.parametrize(
    "name", ["histolab-tissue-level0-4302-10273-4814-10785.png", "histolab-medium-nuclei-score-level1.png",
             "stardist-histo-500x300.jpg"]
)
def test_tissue_tiles_are_tissue(name: str) -> None:
    assert detect_tissue(load_rgb(DATA / name), mpp=1.0).mean() > 0.5


def test_finds_the_tissue_on_the_cmu_slide(cmu_rgb: np.ndarray) -> None:
    with open_slide(SAMPLE_SLIDE) as s:
        thumb, ds = s.thumbnail(2000)
        mask = detect_tissue(thumb, mpp=0.499 * ds[1])
    assert 0.25 < mask.mean() < 0.6
    # Tissue pixels are the stained ones: darker and more saturated than the rest.
    grey = thumb.mean(-1)
    assert grey[mask].mean() < grey[~mask].mean() - 40
    # The threshold is the user's knob: at saturation 0.9 nothing counts.
    assert detect_tissue(thumb, mpp=0.499 * ds[1], params=TissueParams(threshold=0.9)).sum() == 0
    lower = detect_tissue(thumb, mpp=0.499 * ds[1], params=TissueParams(threshold=0.05)).mean()
    assert lower >= mask.mean()


def test_bad_settings() -> None:
    with pytest.raises(BcdError, match="between 0 and 1"):
        TissueParams(threshold=5)
    with pytest.raises(BcdError, match="RGB"):
        detect_tissue(np.zeros((10, 10)))
