"""Getting the ImageNet weights: fetch (download code tested on local URLs), import, cache, offline."""

from __future__ import annotations

import hashlib
import warnings

import pytest
import torch

from conftest import KerasReference, rel_err
from napari_bcd.classes import BACH_CLASSES
from napari_bcd.errors import BackboneWeightsWarning, KerasWeightsError, WeightsDownloadError
from napari_bcd.model import build_classifier, cached_imagenet_weights, fetch_imagenet_weights, import_keras_weights


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_imported_weights_are_found_by_later_models(keras_reference: KerasReference) -> None:
    assert cached_imagenet_weights() is None
    cached = import_keras_weights(keras_reference.keras2_h5, expected_md5=None)
    assert cached == cached_imagenet_weights()
    assert cached.suffix == ".safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackboneWeightsWarning)  # no warning: the cache is found
        model = build_classifier("resnet152v2", classes=BACH_CLASSES).eval()
    assert model.card.backbone_weights == "imagenet-keras"
    x = torch.from_numpy(keras_reference.image[None].astype("float32") / 127.5 - 1).permute(0, 3, 1, 2)
    with torch.no_grad():
        feats = model.backbone(x).permute(0, 2, 3, 1).numpy()
    assert rel_err(feats, keras_reference.features) <= 1e-4


def test_import_checks_the_official_md5(keras_reference: KerasReference) -> None:
    with pytest.raises(WeightsDownloadError, match=r"not the official ed17cf2e.*--skip-md5"):
        import_keras_weights(keras_reference.keras3_h5)
    assert cached_imagenet_weights() is None


def test_import_of_a_missing_file_says_both_ways(tmp_path) -> None:
    with pytest.raises(KerasWeightsError, match=r"does not exist.*weights fetch.*weights import"):
        import_keras_weights(tmp_path / "nothing.h5")


@pytest.mark.slow
def test_fetch_downloads_checks_md5_and_converts(keras_reference: KerasReference) -> None:
    seen: list[tuple[int, int | None]] = []
    url = keras_reference.keras2_h5.as_uri()  # the real download code, on a local URL
    path = fetch_imagenet_weights(url, expected_md5=_md5(keras_reference.keras2_h5), progress=lambda d,
                                  t: seen.append((d, t)))
    assert path == cached_imagenet_weights()
    assert seen and seen[-1][0] == keras_reference.keras2_h5.stat().st_size


def test_fetch_refuses_a_download_with_the_wrong_md5(keras_reference: KerasReference) -> None:
    with pytest.raises(WeightsDownloadError, match="md5"):
        fetch_imagenet_weights(keras_reference.keras3_h5.as_uri())  # official md5 expected
    assert cached_imagenet_weights() is None


def test_offline_fetch_says_both_ways() -> None:
    # Port 9 (discard) on loopback refuses at once: an offline machine, without touching the network.
    with pytest.raises(WeightsDownloadError, match=r"Could not download.*weights fetch.*weights import"):
        fetch_imagenet_weights("http://127.0.0.1:9/resnet152v2.h5", timeout=5)
    assert cached_imagenet_weights() is None


def test_a_corrupt_cache_file_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from napari_bcd.config import cache_dir

    cache_dir().mkdir(parents=True, exist_ok=True)
    (cache_dir() / "resnet152v2_imagenet_keras.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(Exception, match=r"safetensors|header|weights") as info:
        build_classifier("resnet152v2", classes=BACH_CLASSES)
    from napari_bcd.errors import BcdError

    assert isinstance(info.value, BcdError)
