"""Inference helpers: device choice, uint8 batches, autocast settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_bcd.classes import BACH_CLASSES
from napari_bcd.errors import BcdError
from napari_bcd.model import Predictor, build_classifier, choose_device


def test_device_choice() -> None:
    auto = choose_device()
    if torch.cuda.is_available():
        assert auto.type == "cuda"
    elif not torch.backends.mps.is_available():
        assert auto.type == "cpu"
    assert choose_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(BcdError, match="no CUDA GPU"):
            choose_device("cuda")
    with pytest.raises(BcdError, match="not a device"):
        choose_device("gpu please")


def test_predictor_gives_probabilities_for_uint8_batches() -> None:
    model = build_classifier("timm:resnet18", classes=BACH_CLASSES, backbone_weights=None, input_px=(64, 64))
    pred = Predictor(model, device="cpu", precision="fp32")  # exact; auto's bf16 is in test_precision.py
    assert pred.precision == "fp32"
    assert pred.default_batch_size == 16 and pred.begin_run(batch_size=4) == 4 and pred.default_batch_size == 4
    batch = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    probs = pred(batch)
    assert probs.shape == (5, 4) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    with torch.inference_mode():
        expected = torch.softmax(model.forward_uint8(torch.from_numpy(batch)), 1).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    with pytest.raises(BcdError, match="uint8 batch"):
        pred(batch.astype(np.float32))
    with pytest.raises(BcdError, match="precision"):
        Predictor(model, device="cpu", precision="int4")
