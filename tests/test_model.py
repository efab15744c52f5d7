"""The Keras-layout ResNet152V2, the Table II head, and Keras weights: exact parity with Keras."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from conftest import KerasReference, keras_table2_model, rel_err, save_keras_h5
from napari_bcd.classes import BACH_CLASSES
from napari_bcd.errors import BackboneWeightsWarning, KerasWeightsError
from napari_bcd.model import (
    KERAS_PARAM_COUNT,
    TABLE2_TRAINABLE,
    ResNet152V2,
    build_classifier,
    keras_param_count,
    load_keras_weights,
)


def _paper_model(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BackboneWeightsWarning)
        return build_classifier("resnet152v2", classes=BACH_CLASSES, backbone_weights=None, **kw)


def _tf_input(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image[None].astype("float32") / 127.5 - 1.0).permute(0, 3, 1, 2)


def test_parameter_counts_match_keras_and_table2() -> None:
    model = _paper_model()
    assert keras_param_count(model.backbone) == KERAS_PARAM_COUNT == 58_331_648
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == TABLE2_TRAINABLE == 143_620
    assert keras_param_count(model) == 58_475_268


def test_head_layer_shapes_follow_table2() -> None:
    head = _paper_model().head
    x = torch.zeros(1, 2048, 8, 8)
    shapes = {}
    for name in ("conv1", "conv2", "conv3", "dense1", "dense2", "out"):
        getattr(head, name).register_forward_hook(lambda m, i, o, n=name: shapes.__setitem__(n, tuple(o.shape)))
    head(x)
    assert shapes == {
        "conv1": (1, 64, 8, 8),
        "conv2": (1, 32, 4, 4),  # after MaxPool 2
        "conv3": (1, 64, 4, 4),
        "dense1": (1, 4, 4, 64),  # per position, channels last
        "dense2": (1, 4, 4, 32),
        "out": (1, 4),  # from Flatten 4*4*32 = 512
    }
    assert head.out.in_features == 512


def test_features_are_8x8x2048_for_256px(he_256: np.ndarray) -> None:
    net = ResNet152V2().eval()
    with torch.no_grad():
        y = net(_tf_input(he_256))
    assert tuple(y.shape) == (1, 2048, 8, 8)
    assert (y >= 0).all()  # the final post_bn + ReLU


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["keras3", "keras2"])
def test_backbone_matches_keras(keras_reference: KerasReference, layout: str) -> None:
    path = keras_reference.keras3_h5 if layout == "keras3" else keras_reference.keras2_h5
    net = ResNet152V2().eval()
    load_keras_weights(net, path)
    with torch.no_grad():
        ours = net(_tf_input(keras_reference.image)).permute(0, 2, 3, 1).numpy()
    assert ours.shape == keras_reference.features.shape == (1, 8, 8, 2048)
    assert rel_err(ours, keras_reference.features) <= 1e-4


@pytest.mark.slow
def test_whole_table2_model_matches_keras(keras_reference: KerasReference) -> None:
    model = _paper_model().eval()
    load_keras_weights(model, keras_reference.keras2_h5)
    with torch.no_grad():
        probs = model.predict_proba(_tf_input(keras_reference.image)).numpy()
        # The uint8 path normalises on the device and must agree.
        probs_u8 = torch.softmax(model.forward_uint8(torch.from_numpy(keras_reference.image[None])), 1).numpy()
    assert rel_err(probs, keras_reference.probs) <= 1e-4
    assert rel_err(probs_u8, keras_reference.probs) <= 1e-4
    assert not np.allclose(probs, 0.25, atol=1e-3)  # the head is not a no-op


@pytest.mark.slow
def test_keras_file_of_another_network_names_the_first_missing_layer(tmp_path) -> None:
    import keras

    other = keras.applications.ResNet50V2(weights=None, include_top=False, input_shape=(64, 64, 3))
    path = save_keras_h5(other, tmp_path / "resnet50v2.h5")
    with pytest.raises(KerasWeightsError, match=r"no layer 'conv3_block5_preact_bn'.*not a ResNet152V2"):
        load_keras_weights(ResNet152V2(), path)


def test_keras_file_with_wrong_shapes_names_the_layer(tmp_path) -> None:
    import keras

    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(32, 3, name="conv1_conv")(inp)
    path = save_keras_h5(keras.Model(inp, x), tmp_path / "small.h5")
    with pytest.raises(KerasWeightsError, match=r"'conv1_conv'.*shape \(3, 3, 3, 32\)"):
        load_keras_weights(ResNet152V2(), path)


def test_head_needs_six_layers_after_the_backbone(tmp_path, keras_reference: KerasReference) -> None:
    import keras

    base = keras.applications.ResNet152V2(weights=None, include_top=False, input_shape=(64, 64, 3))
    path = save_keras_h5(base, tmp_path / "backbone_only.h5")
    with pytest.raises(KerasWeightsError, match="0 weighted layers after the backbone"):
        load_keras_weights(_paper_model(), path)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"not hdf5 at all", "not an HDF5 file"), (None, "no 'layer_names'")],
)
def test_non_keras_files_are_refused(tmp_path, content: bytes | None, message: str) -> None:
    import h5py

    path = tmp_path / "w.h5"
    if content is None:
        with h5py.File(path, "w") as f:
            f.create_dataset("x", data=np.zeros(3))
    else:
        path.write_bytes(content)
    with pytest.raises(KerasWeightsError, match=message):
        load_keras_weights(ResNet152V2(), path)
    with pytest.raises(KerasWeightsError, match="does not exist"):
        load_keras_weights(ResNet152V2(), tmp_path / "missing.h5")


def test_paper_model_without_imagenet_weights_warns_loudly() -> None:
    with pytest.warns(BackboneWeightsWarning, match=r"WITHOUT its ImageNet weights.*weights fetch.*weights import"):
        model = build_classifier("resnet152v2", classes=BACH_CLASSES)
    assert model.card.backbone_weights == "random"


def test_keras_built_model_is_the_reference(keras_reference: KerasReference) -> None:
    """Guard the fixture itself: the Keras model has the paper's counts."""
    base, model = keras_table2_model(seed=5)
    assert base.count_params() == KERAS_PARAM_COUNT
    assert model.count_params() == 58_475_268
    assert sum(int(np.prod(w.shape)) for w in model.weights) - base.count_params() == TABLE2_TRAINABLE
