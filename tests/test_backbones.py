"""Other backbones: any timm model with the same head, local weights, preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_bcd.classes import BACH_CLASSES
from napari_bcd.errors import BcdError
from napari_bcd.model import Preprocessing, build_classifier


def test_timm_cnn_backbone_gets_the_table2_head() -> None:
    model = build_classifier("timm:resnet18", classes=BACH_CLASSES, backbone_weights=None, input_px=(128, 128)).eval()
    assert model.card.head["in_channels"] == 512
    assert model.card.head["feature_hw"] == [4, 4]
    assert model.head.out.in_features == 2 * 2 * 32
    # Preprocessing comes from timm's pretrained config by default.
    assert model.card.preprocessing == Preprocessing.imagenet()
    with torch.no_grad():
        assert tuple(model.forward_uint8(torch.zeros(3, 128, 128, 3, dtype=torch.uint8)).shape) == (3, 4)


def test_timm_vit_tokens_fold_into_a_map() -> None:
    model = build_classifier("timm:vit_tiny_patch16_224", classes=BACH_CLASSES, backbone_weights=None,
                             input_px=(224, 224)).eval()
    assert model.card.head["feature_hw"] == [14, 14]
    with torch.no_grad():
        assert tuple(model.forward_uint8(torch.zeros(2, 224, 224, 3, dtype=torch.uint8)).shape) == (2, 4)


def test_preprocessing_can_be_set_and_is_recorded() -> None:
    model = build_classifier("timm:resnet18", classes=BACH_CLASSES, backbone_weights=None, input_px=(64, 64),
                             preprocessing=Preprocessing("tf"))
    assert model.card.preprocessing.mode == "tf"
    x = torch.full((1, 2, 2, 3), 255, dtype=torch.uint8)
    assert torch.allclose(model.normalise(x), torch.ones(1, 3, 2, 2))
    unit = build_classifier("timm:resnet18", classes=BACH_CLASSES, backbone_weights=None, input_px=(64, 64),
                            preprocessing=Preprocessing("unit"))
    assert torch.allclose(unit.normalise(x), torch.ones(1, 3, 2, 2))
    assert Preprocessing.parse("meanstd", "0.5,0.5,0.5", "0.25,0.25,0.25").scale_shift()[1] == [-2.0] * 3
    with pytest.raises(BcdError, match="--mean"):
        Preprocessing.parse("meanstd")
    with pytest.raises(BcdError, match="Unknown preprocessing"):
        Preprocessing("bgr")


@pytest.mark.parametrize("fmt", ["safetensors", "statedict"])
def test_local_backbone_weights_load(tmp_path, fmt: str) -> None:
    import timm
    from safetensors.torch import save_file

    src = timm.create_model("resnet18", pretrained=False)
    torch.nn.init.normal_(src.conv1.weight)
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pth")
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(state, path) if fmt == "safetensors" else torch.save(state, path)
    model = build_classifier("timm:resnet18", classes=BACH_CLASSES, backbone_weights=path, input_px=(64, 64))
    assert torch.equal(model.backbone.model.conv1.weight, src.conv1.weight)
    assert model.card.backbone_weights == f"file:{path.name}"


class _Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickled_code_is_never_run(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": _Evil()}, path)
    with pytest.raises(BcdError, match="pickled code are refused"):
        build_classifier("timm:resnet18", classes=BACH_CLASSES, backbone_weights=path, input_px=(64, 64))
    assert "pickled code ran" not in capsys.readouterr().out


def test_weights_of_another_architecture_are_refused(tmp_path) -> None:
    import timm
    from safetensors.torch import save_file

    save_file(timm.create_model("resnet34", pretrained=False).state_dict(), tmp_path / "r34.safetensors")
    # resnet34's extra blocks are ignored, but resnet18 weights into resnet34 miss layers.
    save_file(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "r18.safetensors")
    with pytest.raises(BcdError, match="weights missing"):
        build_classifier("timm:resnet34", classes=BACH_CLASSES, backbone_weights=tmp_path / "r18.safetensors",
                         input_px=(64, 64))


def test_unknown_backbones_are_clear_errors() -> None:
    with pytest.raises(BcdError, match="timm has no model"):
        build_classifier("timm:no_such_net", classes=BACH_CLASSES, backbone_weights=None)
    with pytest.raises(BcdError, match="Unknown backbone"):
        build_classifier("vgg16", classes=BACH_CLASSES, backbone_weights=None)


def test_uint8_path_matches_manual_preprocessing() -> None:
    model = build_classifier("timm:resnet18", classes=BACH_CLASSES, backbone_weights=None, input_px=(64, 64)).eval()
    img = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    mean = torch.tensor(model.card.preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.card.preprocessing.std).view(1, 3, 1, 1)
    manual = (torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        assert torch.allclose(model.forward_uint8(torch.from_numpy(img)), model(manual), atol=1e-5)
