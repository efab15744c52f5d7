"""Checkpoints: safetensors + JSON card, bit-identical round trip, mismatches refused."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_bcd.classes import BACH_CLASSES
from napari_bcd.errors import BackboneWeightsWarning, CheckpointError
from napari_bcd.model import ModelCard, build_classifier, load_checkpoint, save_checkpoint


def _small(classes=("Normal", "Benign", "InSitu", "Invasive")):
    torch.manual_seed(0)
    model = build_classifier("timm:resnet18", backbone_weights=None, input_px=(64, 64), classes=classes)
    for p in model.head.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def _batch(n: int = 3, px: int = 64) -> torch.Tensor:
    rng = np.random.default_rng(1)
    return torch.from_numpy(rng.integers(0, 256, (n, px, px, 3), dtype=np.uint8))


@pytest.fixture
def saved(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    model = _small()
    model.card = model.card.replace(name="unit-test", training={"epochs": 3}, metrics={"accuracy": 0.5})
    return model, save_checkpoint(model, path=tmp_path / "ckpt.safetensors")


def test_round_trip_is_bit_identical(saved) -> None:
    model, path = saved
    assert path.is_file() and path.with_suffix(".json").is_file()
    loaded = load_checkpoint(path)
    x = _batch()
    with torch.no_grad():
        assert torch.equal(model.forward_uint8(x), loaded.forward_uint8(x))
    card = loaded.card
    assert card.name == "unit-test" and card.metrics == {"accuracy": 0.5} and card.training == {"epochs": 3}
    assert card.backbone == "timm:resnet18" and card.input_px == (64, 64)
    assert len(card.weights_sha256) == 64 and card.package_version and card.created
    # The card is readable JSON with the fields DESIGN.md lists.
    doc = json.loads(path.with_suffix(".json").read_text())
    for key in ("classes", "backbone", "head", "input_px", "field_um", "mpp", "preprocessing", "training",
                "metrics", "package_version", "weights_sha256"):
        assert key in doc
    # Either file, or the stem, names the checkpoint.
    assert load_checkpoint(path.with_suffix(".json")).card == card
    assert load_checkpoint(path.with_suffix("")).card == card


@pytest.mark.slow
def test_round_trip_of_the_real_resnet152v2(tmp_path: Path, he_256: np.ndarray) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BackboneWeightsWarning)
        model = build_classifier("resnet152v2", classes=BACH_CLASSES).eval()
    path = save_checkpoint(model, path=tmp_path / "paper.safetensors")
    loaded = load_checkpoint(path)
    x = torch.from_numpy(he_256[None])
    with torch.no_grad():
        assert torch.equal(model.forward_uint8(x), loaded.forward_uint8(x))
    assert loaded.card.preprocessing.mode == "tf" and loaded.card.backbone == "resnet152v2"


def _edit_card(path: Path, **changes) -> None:
    card_path = path.with_suffix(".json")
    doc = json.loads(card_path.read_text())
    doc.update(changes)
    card_path.write_text(json.dumps(doc))


def test_a_json_card_that_does_not_match_gives_way_to_the_embedded_card(saved, caplog) -> None:
    # New weights beside an old JSON (a save interrupted between its two renames): the weights
    # file carries its own card, which matches it, so that card is used and the JSON named.
    model, path = saved
    _edit_card(path, weights_sha256="0" * 64, name="stale")
    loaded = load_checkpoint(path)
    assert loaded.card.name == model.card.name and "does not match" in caplog.text


def test_changed_hash_is_refused_without_an_embedded_card(saved) -> None:
    from safetensors.torch import load_file, save_file

    _, path = saved
    save_file(load_file(path), path)  # the same weights, no card in the header
    _edit_card(path, weights_sha256="0" * 64)
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(path)


def test_changed_weights_are_refused(saved) -> None:
    from safetensors.torch import load_file, save_file

    _, path = saved
    state = load_file(path)
    state["head.out.bias"] = state["head.out.bias"] + 1
    save_file(state, path)  # a checkpoint someone overwrote without its card
    with pytest.raises(CheckpointError, match="weights hash"):
        load_checkpoint(path)


def test_an_unchanged_checkpoint_is_verified_once(saved, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import time

    from safetensors.torch import load_file, save_file

    import napari_bcd.model.checkpoint as ckpt

    model, path = saved
    hashed = []
    real = ckpt.weights_sha256
    monkeypatch.setattr(ckpt, "weights_sha256", lambda state: hashed.append(1) or real(state))
    now = time.time_ns() + 10**9
    os.utime(path, ns=(now, now))  # just written: a rewrite within the file clock's tick could keep the time
    load_checkpoint(path)
    load_checkpoint(path)
    assert len(hashed) == 2  # so it was not trusted
    old = path.stat().st_mtime_ns - 3_600 * 10**9
    os.utime(path, ns=(old, old))
    first = load_checkpoint(path)
    again = load_checkpoint(path)
    assert len(hashed) == 3 and again.card == first.card == model.card  # the second load trusted the first
    x = _batch()
    torch.testing.assert_close(again.forward_uint8(x), model.forward_uint8(x))
    state = load_file(path)
    state["head.out.bias"] = state["head.out.bias"] + 1
    save_file(state, path, metadata={})  # overwritten in place: same size, same inode
    os.utime(path, ns=(old + 10**9, old + 10**9))
    with pytest.raises(CheckpointError, match="weights hash"):
        load_checkpoint(path)
    assert len(hashed) == 4


def test_nan_is_found_even_where_a_sum_overflows() -> None:
    from napari_bcd.model.checkpoint import _verify

    assert _verify({"w": torch.full((4,), 3e38)}, Path("big.safetensors"))  # finite: the sum is not
    for bad in (float("nan"), float("inf")):
        with pytest.raises(CheckpointError, match="NaN or infinite"):
            _verify({"ok": torch.ones(3), "w": torch.tensor([1.0, bad])}, Path("bad.safetensors"))


def test_card_of_another_backbone_is_refused(saved) -> None:
    _, path = saved
    _edit_card(path, backbone="timm:resnet34")
    with pytest.raises(CheckpointError, match="backbone"):
        load_checkpoint(path)


def test_card_with_other_classes_is_refused(saved) -> None:
    _, path = saved
    _edit_card(path, classes=["Normal", "Tumour"])
    with pytest.raises(CheckpointError, match="classes"):
        load_checkpoint(path)


def test_weights_that_do_not_fit_the_card_are_refused(tmp_path: Path) -> None:
    a = save_checkpoint(_small(), path=tmp_path / "a.safetensors")
    b = save_checkpoint(_small(classes=("Normal", "Tumour")), path=tmp_path / "b.safetensors")
    # b's weights renamed to a: the JSON card of a, the weights (and embedded card) of b. The weights
    # describe themselves: they load as b, never with a's classes.
    b.replace(a)
    assert load_checkpoint(a).classes == ("Normal", "Tumour")
    a.with_suffix(".json").write_text(b.with_suffix(".json").read_text().replace("Tumour", "Invasive"))
    with pytest.raises(CheckpointError):  # a JSON with the right hash but other classes is refused
        load_checkpoint(a)


@pytest.mark.parametrize(("change", "message"), [
    ({"input_px": [0, 0]}, "input_px must be two positive"),
    ({"field_um": [0, -5]}, "field_um must be two positive"),
    ({"classes": ["Normal"]}, "two or more distinct"),
    ({"input_px": "big"}, "malformed"),
    ({"preprocessing": "zscore"}, "preprocessing"),
])
def test_a_card_with_bad_values_names_the_file_and_the_value(saved, change, message) -> None:
    _, path = saved
    _edit_card(path, **change)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path)
    assert path.with_suffix(".json").name in str(info.value)


def test_a_card_may_name_its_preprocessing(saved) -> None:
    _, path = saved
    _edit_card(path, preprocessing="imagenet")  # hand-written shorthand
    from safetensors.torch import load_file, save_file

    save_file(load_file(path), path)  # no embedded card to disagree with
    _edit_card(path, weights_sha256="")
    assert load_checkpoint(path).card.preprocessing.mode == "meanstd"


@pytest.mark.parametrize("name", ["model.pt", "model.pth", "weights.ckpt", "model.h5"])
def test_other_formats_are_named(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"whatever")
    with pytest.raises(CheckpointError, match="pickle|Keras"):
        load_checkpoint(tmp_path / name)


def test_truncated_and_missing_files(saved, tmp_path: Path) -> None:
    _, path = saved
    with pytest.raises(CheckpointError, match="No checkpoint weights"):
        load_checkpoint(tmp_path / "nothing.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)
    (tmp_path / "junk.safetensors").write_text("hello")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "junk.safetensors")


def test_lost_card_falls_back_to_the_embedded_copy(saved, caplog: pytest.LogCaptureFixture) -> None:
    _model, path = saved
    path.with_suffix(".json").unlink()
    loaded = load_checkpoint(path)
    assert loaded.card.name == "unit-test"
    assert "missing" in caplog.text


def test_a_failed_save_leaves_the_old_checkpoint_intact(saved, monkeypatch: pytest.MonkeyPatch) -> None:
    _model, path = saved
    before = (path.read_bytes(), path.with_suffix(".json").read_bytes())

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(_small(classes=("A", "B")), path=path)
    assert (path.read_bytes(), path.with_suffix(".json").read_bytes()) == before
    # no temporary left; beside the checkpoint only the record of what napari-bcd wrote there
    assert sorted(p.name for p in path.parent.iterdir()) == [".napari-bcd-written.json", "ckpt.json",
                                                             "ckpt.safetensors"]


def test_no_overwrite_when_asked(saved) -> None:
    model, path = saved
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(model, path=path, overwrite=False)


def test_a_json_that_is_not_a_card(saved) -> None:
    _, path = saved
    path.with_suffix(".json").write_text('{"hello": 1}')
    with pytest.raises(CheckpointError, match="not a napari-bcd model card"):
        load_checkpoint(path)
    path.with_suffix(".json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path)


def test_card_geometry() -> None:
    card = ModelCard(classes=BACH_CLASSES)
    assert card.field_um == pytest.approx((645.12, 860.16))
    assert card.mpp == pytest.approx((2.52, 3.36))
    assert ModelCard.from_json(card.to_json()) == card


def test_the_training_record_is_typed_and_keeps_unknown_keys() -> None:
    from napari_bcd.model.card import ModelCard
    from napari_bcd.model.record import TrainingRecord

    raw = {"protocol": {"name": "auto"}, "split": {"kind": "stratified", "val_files": ["a.png"]},
           "data": {"root": "/data"}, "hyperparameters": {"augment": "8 dihedral"}, "curves": [{"train_acc": 0.5}],
           "validation": True, "someday": {"kept": 1}}
    card = ModelCard(classes=BACH_CLASSES, training=raw)
    rec = card.record
    assert isinstance(rec, TrainingRecord)
    assert rec.protocol_name == "auto" and rec.val_files == ["a.png"] and rec.data_root == "/data"
    assert rec.augmented and rec.last_train_accuracy == 0.5 and rec.parent is None
    assert rec.to_dict() == {**raw,
                             **TrainingRecord.from_dict(raw).to_dict()} and rec.to_dict()["someday"] == {"kept": 1}
    child = rec.with_retrain({"parent": {"name": "m", "path": "/m.safetensors"}})
    assert child.parent == {"name": "m", "path": "/m.safetensors"} and "retrain" not in rec.to_dict()
    assert ModelCard(classes=BACH_CLASSES).record == TrainingRecord()


def test_weights_changed_in_place_with_their_time_restored_are_hashed_again(saved) -> None:
    """Issue 40: NaN written into the head in place, the modification time put back as it was: the inode change
    time still moved, so the checkpoint is verified again and refused, never trusted from the record."""
    import json
    import os

    _, path = saved
    old = path.stat().st_mtime_ns - 3_600 * 10**9
    os.utime(path, ns=(old, old))
    load_checkpoint(path)  # verified and remembered
    meta = path.stat()
    raw = path.read_bytes()  # safetensors: an 8-byte header length, the JSON header, then the tensors' bytes
    n = int.from_bytes(raw[:8], "little")
    start, end = json.loads(raw[8 : 8 + n])["head.out.bias"]["data_offsets"]
    with open(path, "r+b") as fh:  # NaN over the bias, in place: same size, same inode
        fh.seek(8 + n + start)
        fh.write(np.full((end - start) // 4, np.nan, np.float32).tobytes())
    os.utime(path, ns=(meta.st_atime_ns, meta.st_mtime_ns))  # the modification time put back
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (meta.st_size, meta.st_mtime_ns, meta.st_ino)
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_checkpoint(path)
