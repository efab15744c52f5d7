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


# --- the pathology foundation models by name (issue 38) ------------------------------------------------------------

#: Published sizes (millions of backbone parameters) and feature widths: the rows build exactly these networks.
FOUNDATION_SIZES = {"h-optimus-0": (1134.8, 1536), "uni": (303.4, 1024), "uni2-h": (681.4, 1536),
                    "virchow2": (631.2, 1280), "phikon-v2": (303.4, 1024), "hibou-b": (85.7, 768),
                    "kaiko-vitb16": (85.8, 768)}


@pytest.mark.parametrize("name", list(FOUNDATION_SIZES))
def test_every_foundation_row_builds_its_exact_architecture(name: str) -> None:
    """Built offline with random weights on the meta device (no memory, no download): the parameter count and
    feature width their model cards publish, one window through backbone and head at the model's 224 px, and at
    the engine's 256 px where the position embedding is interpolated."""
    from napari_bcd.model.backbones import BACKBONES

    spec = BACKBONES[name]
    params, width = FOUNDATION_SIZES[name]
    with torch.device("meta"):
        model = build_classifier(name, classes=("a", "b"), backbone_weights=None, input_px=(224, 224),
                                 field_um=(112.0, 112.0))
        feats = model.backbone(torch.zeros(1, 3, 224, 224))
        assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 2)
    assert sum(p.numel() for p in model.backbone.parameters()) / 1e6 == pytest.approx(params, abs=0.1)
    assert feats.shape[:2] == (1, width) and model.card.backbone == name
    assert model.card.backbone_args == spec.timm_args and spec.mpp == 0.5 and spec.licence
    if spec.fixed_input:
        with pytest.raises(BcdError, match="224 x 224 px inputs only.*--input-px 224"):
            build_classifier(name, classes=("a", "b"), backbone_weights=None)
    else:  # position embedding interpolated: any multiple of the patch, e.g. the engine's 256 where it divides
        px = 256 if 256 % spec.patch == 0 else 18 * spec.patch
        with torch.device("meta"):
            wide = build_classifier(name, classes=("a", "b"), backbone_weights=None, input_px=(px, px))
            assert wide(torch.zeros(1, 3, px, px)).shape == (1, 2)
        if 256 % spec.patch:
            with pytest.raises(BcdError, match=f"multiples of its {spec.patch}-px patch"):
                build_classifier(name, classes=("a", "b"), backbone_weights=None)


def test_a_foundation_row_runs_a_real_window_and_its_card_rebuilds_it(tmp_path) -> None:
    """Hibou-B with random weights, for real: a window of real H&E in its own normalisation, saved and loaded."""
    from conftest import SAMPLE_SLIDE
    from napari_bcd import open_slide
    from napari_bcd.model import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = build_classifier("hibou-b", classes=("a", "b"), backbone_weights=None, input_px=(224, 224),
                             field_um=(112.0, 112.0))
    assert model.card.preprocessing.mean == (0.7068, 0.5755, 0.722)
    with open_slide(SAMPLE_SLIDE) as slide:
        window = np.asarray(slide.read_region(0, 1000, 900, 224, 224))[..., :3].copy()
    with torch.inference_mode():
        p = model.predict_proba(model.normalise(torch.from_numpy(window)[None])).numpy()
    assert p.shape == (1, 2) and np.isfinite(p).all()
    again = load_checkpoint(save_checkpoint(model, path=tmp_path / "h.safetensors"))
    with torch.inference_mode():
        q = again.predict_proba(again.normalise(torch.from_numpy(window)[None])).numpy()
    np.testing.assert_allclose(p, q, atol=1e-6)


def test_a_gated_row_without_a_token_is_refused_at_once_with_the_way_in(monkeypatch, tmp_path) -> None:
    import time

    from napari_bcd.model import backbones

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored token, an empty cache
    monkeypatch.setattr(backbones, "_reachable", lambda host, timeout: pytest.fail("no network before the token"))
    start = time.perf_counter()
    with pytest.raises(BcdError) as err:
        backbones.check_backbone_weights("uni", "imagenet")
    assert time.perf_counter() - start < 1.0
    text = str(err.value)
    assert "gated on Hugging Face" in text and "https://huggingface.co/MahmoodLab/UNI" in text and "HF_TOKEN" in text
    assert "CC-BY-NC-ND-4.0" in text
    with pytest.raises(BcdError, match="transformers layout.*--backbone-weights FILE"):
        backbones.check_backbone_weights("phikon-v2", "imagenet")
    backbones.check_backbone_weights("uni", None)  # random weights: always possible
    assert "NON-COMMERCIAL" in backbones.BACKBONES["uni"].notice()
    assert "commercial use allowed" in backbones.BACKBONES["h-optimus-0"].notice()


def test_train_says_the_licence_before_any_work(tmp_path, capsys) -> None:
    from napari_bcd.cli import main

    assert main(["train", str(tmp_path / "missing"), "--out", str(tmp_path / "m.safetensors"), "--backbone",
                 "virchow2"]) == 2
    err = capsys.readouterr().err
    assert err.index("virchow2: licence CC-BY-NC-ND-4.0 (NON-COMMERCIAL use only)") < err.index("missing")
