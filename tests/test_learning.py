"""Learning from a few images at least as well as the best simple method (issue 37): the probe's regularisation
chosen on groups, groups found where the data carries them (and never invented), the simpler model shipped when
the evidence is image-level only, and the doubt said when the groups are few."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import drain, four_kinds_dataset
from napari_bcd.train.regularise import PROBE_CS, fit_logistic, inner_folds, tune_c
from napari_bcd.train.split import group_folds

SMALL = {"backbone": "timm:resnet18", "backbone_weights": None, "input_px": (64, 64), "field_um": (100.0, 100.0)}


def _patients(n_patients: int, per_patient: int, dims: int, rng, make) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images of two classes from patients: each patient adds its own offset to all its images' features."""
    xs, ys, gs = [], [], []
    for p in range(n_patients):
        y = p % 2
        offset = rng.normal(0, 1.0, dims)
        for _ in range(per_patient):
            xs.append(make(y, offset, rng))
            ys.append(y)
            gs.append(f"P{p}")
    return np.array(xs), np.array(ys), gs


def _accuracy_by_c(x, y, groups, x_new, y_new) -> tuple[float, dict[float, float]]:
    folds = group_folds(y, groups, ("a", "b"), 5, 0)
    tuning = tune_c(x, y, folds, 2, grouped=True)
    new = {c: float((fit_logistic(x, y, c, 2).logits(x_new).argmax(1) == y_new).mean()) for c in PROBE_CS}
    return tuning.chosen, new


def test_grouped_cv_chooses_strong_regularisation_where_it_wins() -> None:
    """Few patients; a weak class signal spread over 60 features, and 200 features that are each patient's own
    (near-constant within a patient, as a slide's stain and scan are): a loose fit separates the training patients
    by their own features, the mean difference (strong regularisation) keeps to what the classes share."""
    rng = np.random.default_rng(3)

    def data(n_patients: int):
        xs, ys, gs = [], [], []
        for p in range(n_patients):
            own = rng.normal(0, 3.0, 200)
            for _ in range(3):
                shared = rng.normal(0, 1, 60) + (0.3 if p % 2 else -0.3)
                xs.append(np.concatenate([shared, own + rng.normal(0, 0.05, 200)]))
                ys.append(p % 2)
                gs.append(f"P{p}")
        return np.array(xs), np.array(ys), gs

    x, y, g = data(16)
    x_new, y_new, _ = data(80)
    chosen, new = _accuracy_by_c(x, y, g, x_new, y_new)
    assert chosen <= 1e-2, chosen  # strong regularisation chosen on groups
    assert new[chosen] >= max(new.values()) - 0.02 and new[chosen] >= new[max(PROBE_CS)] + 0.04, new


def test_grouped_cv_chooses_weak_regularisation_where_it_wins() -> None:
    """The class shows only in the difference of two features that share a large noise (every patient's): the
    mean difference sees noise; only a loose fit finds the difference."""
    rng = np.random.default_rng(1)

    def make(y, offset, rng):
        shared = rng.normal(0, 5.0) + offset[0] * 5.0
        s = 0.6 if y else -0.6
        return np.array([shared + s, shared, *rng.normal(0, 1.0, 6)])

    x, y, g = _patients(20, 6, 8, rng, make)
    x_new, y_new, _ = _patients(40, 6, 8, rng, make)
    chosen, new = _accuracy_by_c(x, y, g, x_new, y_new)
    assert chosen >= 0.3, chosen  # weak regularisation chosen on groups
    assert new[chosen] >= max(new.values()) - 0.03 and new[chosen] > new[min(PROBE_CS)] + 0.1


def test_image_level_cv_takes_the_middle_of_the_noise_towards_regularisation() -> None:
    """Without groups: of the C values whose held-out (tempered) cross-entropy is within one standard error of the
    lowest, the middle one, never less regularised than the lowest; with groups, the lowest."""
    rng = np.random.default_rng(2)
    y = np.repeat([0, 1], 20)
    x = rng.normal(0, 1, (40, 50)) + y[:, None] * 0.35
    folds = inner_folds(y, None, ("a", "b"), 5, 0)
    by_image = tune_c(x, y, folds, 2, grouped=False)
    on_groups = tune_c(x, y, folds, 2, grouped=True)
    best = int(np.argmin(np.round(by_image.loss, 9)))
    bar = by_image.loss[best] + by_image.loss_standard_error[best]
    within = [c for c, v in zip(by_image.grid, by_image.loss, strict=True) if v <= bar + 1e-12]
    assert by_image.chosen == min(within[(len(within) - 1) // 2], by_image.grid[best])
    assert by_image.chosen <= on_groups.chosen and len(within) >= 3 and by_image.chosen > min(within)
    assert on_groups.chosen == by_image.grid[best]  # with groups, simply the lowest held-out loss
    assert "one standard error" in by_image.rule and "groups" in on_groups.rule
    assert by_image.to_dict()["chosen_c"] == by_image.chosen and len(by_image.to_dict()["accuracy"]) == len(PROBE_CS)


def test_groups_are_found_in_file_names_and_never_invented(tmp_path: Path) -> None:
    from PIL import Image

    from napari_bcd.train import read_iciar

    def folder(root: Path, names: dict[str, list[str]]) -> Path:
        for cls, files in names.items():
            (root / cls).mkdir(parents=True)
            for f in files:
                Image.fromarray(np.full((40, 40, 3), 180, np.uint8)).save(root / cls / f)
        return root

    tcga = read_iciar(folder(tmp_path / "tcga", {
        "Normal": ["TCGA-A2-A0CM-11A-01-TS1_3.png", "TCGA-BH-A0B3-11A-01_1.png"],
        "Invasive": ["TCGA-A2-A0CM-01Z-00-DX1_7.png", "TCGA-E2-A14X-01Z-00-DX1_2.png"]}))
    assert tcga.groups == ("TCGA-A2-A0CM", "TCGA-E2-A14X", "TCGA-A2-A0CM", "TCGA-BH-A0B3")
    assert tcga.group_kind == "patient" and "TCGA barcodes" in tcga.group_source and tcga.n_groups == 3
    breakhis = read_iciar(folder(tmp_path / "bh", {
        "Benign": ["SOB_B_A-14-22549AB-40-001.png", "SOB_B_F-14-9133-100-012.png"],
        "Invasive": ["SOB_M_DC-14-2523-40-010.png", "SOB_M_DC-14-2523-200-003.png"]}))
    assert breakhis.n_groups == 3 and breakhis.group_kind == "patient"
    ours = read_iciar(folder(tmp_path / "ours", {  # napari-bcd's patch names, without their provenance.csv
        "Normal": ["slideA_y100_x200_256x256.png", "slideB_y0_x0_256x256.png"],
        "Invasive": ["slideA_y900_x200_256x256.png", "slideC_y10_x20_256x256.png"]}))
    assert ours.groups == ("slideA", "slideC", "slideA", "slideB") and ours.group_kind == "slide"
    plain = read_iciar(folder(tmp_path / "plain", {"Normal": ["a.png", "b.png"], "Invasive": ["c.png", "d.png"]}))
    assert plain.groups is None  # nothing in the names: no groups, never one per image
    one = read_iciar(folder(tmp_path / "one", {"Normal": ["TCGA-A2-A0CM-1.png"], "Invasive": ["TCGA-A2-A0CM-2.png"]}))
    assert one.groups is None  # one patient is no grouping
    mixed = read_iciar(folder(tmp_path / "mixed", {"Normal": ["TCGA-A2-A0CM-1.png", "x.png"],
                                                   "Invasive": ["TCGA-BH-A0B3-2.png"]}))
    assert mixed.groups is None  # a convention names every image, or none is used


def test_a_folder_per_patient_and_a_manifest_column_are_groups(tmp_path: Path) -> None:
    from PIL import Image

    from napari_bcd.train import read_iciar

    for cls in ("Normal", "Tumour"):
        for p in ("P1", "P2", "P3"):
            (tmp_path / "nested" / cls / p).mkdir(parents=True)
            Image.fromarray(np.full((40, 40, 3), 150, np.uint8)).save(tmp_path / "nested" / cls / p / f"{cls}.png")
    nested = read_iciar(tmp_path / "nested")
    assert nested.classes == ("Normal", "Tumour") and nested.n_groups == 3 and "folder per group" in nested.group_source
    flat = tmp_path / "flat"
    flat.mkdir()
    rows = ["filename,label,patient"]
    for i in range(6):
        Image.fromarray(np.full((40, 40, 3), 100 + i, np.uint8)).save(flat / f"img{i}.png")
        rows.append(f"img{i}.png,{'Stroma' if i % 2 else 'Tumour'},case{i // 2}")
    (flat / "microscopy_ground_truth.csv").write_text("\n".join(rows) + "\n")
    manifest = read_iciar(flat)
    assert manifest.classes == ("Stroma", "Tumour") and manifest.group_kind == "patient" and manifest.n_groups == 3
    # the header spelt as other tools spell it: read as a header (not as an image called "Image ID")
    (flat / "microscopy_ground_truth.csv").write_text("\n".join(["Image ID,Label,Case ID", *rows[1:]]) + "\n")
    spelt = read_iciar(flat)
    assert spelt.group_kind == "patient" and spelt.n_groups == 3 and not spelt.problems


def test_a_manifest_beside_the_images_names_their_patients_or_none(tmp_path: Path) -> None:
    """Any CSV or TSV beside the images whose header names a file and a patient / case / slide column, and that
    names every image, gives the groups (what the run says); one that names some images only, or one image twice
    with two patients, gives none, and the run says why. ``--groups`` takes such a manifest too."""
    from PIL import Image

    from napari_bcd.errors import DatasetError
    from napari_bcd.train import read_iciar
    from napari_bcd.train.groups import group_dataset

    root = tmp_path / "photos"
    names = {"Normal": ["n0.png", "n1.png", "n2.png", "n3.png"], "Invasive": ["t0.png", "t1.png", "t2.png", "t3.png"]}
    for cls, files in names.items():
        (root / cls).mkdir(parents=True)
        for f in files:
            Image.fromarray(np.full((40, 40, 3), 170, np.uint8)).save(root / cls / f)
    (root / "measurements.csv").write_text("Image,Name,Class,Area\nn0.png,a,Tumor,3\n")  # no group column: not one
    # image ids without their extension, a slide column and a patient column: the patient wins (the wider group)
    rows = [f"{f[:-4]},S{i},case-{f[1]}" for i, f in enumerate(names["Normal"] + names["Invasive"])]
    (root / "metadata.csv").write_text("image_id,slide_id,patient_id\n" + "\n".join(rows) + "\n")
    ds = read_iciar(root)
    assert ds.group_kind == "patient" and ds.n_groups == 4 and ds.group_source == "metadata.csv (column 'patient_id')"
    assert dict(zip((p.name for p in ds.paths), ds.groups, strict=True))["t1.png"] == "case-1"
    # a GDC sample sheet (tab-separated): File Name and Case ID, the File ID a UUID that names nothing here
    sheet = tmp_path / "gdc_sample_sheet.2026-12-07.tsv"
    header = "File ID\tFile Name\tData Category\tData Type\tProject ID\tCase ID\tSample ID\tSample Type"
    body = [f"uuid-{i}\t{f}\tBiospecimen\tSlide Image\tTCGA-BRCA\tTCGA-A2-A0{i % 3}M\tTCGA-A2-A0{i % 3}M-01A\t"
            "Primary Tumor" for i, f in enumerate(names["Normal"] + names["Invasive"])]
    sheet.write_text(header + "\n" + "\n".join(body) + "\n")
    by_sheet = group_dataset(read_iciar(root), groups_csv=sheet)
    assert by_sheet.group_kind == "patient" and by_sheet.n_groups == 3 and "gdc_sample_sheet" in by_sheet.group_source
    # a manifest naming half the images is not used, and the run says so: never half a grouping, never invented
    (root / "metadata.csv").write_text("image_id,patient_id\n" + "\n".join(r.split(",", 2)[0] + ",x" + r[-1]
                                                                         for r in rows[:5]) + "\n")
    half = read_iciar(root)
    assert half.groups is None and any("only 5 of 8 images" in p and "metadata.csv" in p for p in half.problems)
    (root / "metadata.csv").write_text("file,patient\nn0.png,A\nn0.png,B\n" + "\n".join(
        f"{f},P{i % 2}" for i, f in enumerate(names["Normal"][1:] + names["Invasive"])) + "\n")
    twice = read_iciar(root)
    assert twice.groups is None and any("two patient values" in p for p in twice.problems)
    # bad files: one beside the images that is not text is passed over; one given by the user says what is wrong
    (root / "metadata.csv").write_bytes(b"image_id,patient_id\n\x00\x89PNG\xff\xfe")
    assert read_iciar(root).groups is None
    for content, match in ((b"\x00\x01binary", "not a text CSV"), (b"", "lists no image"),
                           (b"file,patient\nn0.png,\n", "expected a file and its group")):
        (tmp_path / "bad.csv").write_bytes(content)
        with pytest.raises(DatasetError, match=match):
            group_dataset(read_iciar(root), groups_csv=tmp_path / "bad.csv")
    with pytest.raises(DatasetError, match="Cannot read the groups file"):
        group_dataset(read_iciar(root), groups_csv=tmp_path / "absent.csv")



def test_images_of_the_same_name_in_two_class_folders_are_told_apart_by_their_folder(tmp_path: Path) -> None:
    """Class folders numbered from 001 each (what many exports write): ``Tumour/001.png`` and ``Stroma/001.png``
    are two patients.  A manifest or ``--groups`` naming each with its folder (also under a further folder, or with
    Windows separators) gives each its own group; a bare ``001.png`` that two images share is never a guess: a
    manifest's groups are not used (said), ``--groups`` is refused with what to write; a pattern on the names still
    applies, the same name giving the same group."""
    from PIL import Image

    from napari_bcd.errors import DatasetError
    from napari_bcd.train import read_iciar
    from napari_bcd.train.groups import group_dataset, image_ids

    root = tmp_path / "regions"
    for cls in ("Tumour", "Stroma"):
        (root / cls).mkdir(parents=True)
        for k in range(4):
            Image.fromarray(np.full((40, 40, 3), 150 + k, np.uint8)).save(root / cls / f"P{k % 2}_{k:03d}.png")
    ids = image_ids(read_iciar(root))
    assert "Stroma/P0_000.png" in ids and "Tumour/P0_000.png" in ids  # the same name twice
    patient = {i: f"{i.split('/')[0][0]}{int(i[-5]) % 2}" for i in ids}  # S0, S1, T0, T1: four patients
    (root / "metadata.csv").write_text("file,patient\n" + "\n".join(f"{i},{g}" for i, g in patient.items()) + "\n")
    ds = read_iciar(root)
    assert ds.n_groups == 4 and dict(zip(image_ids(ds), ds.groups, strict=True)) == patient
    groups = tmp_path / "groups.csv"
    groups.write_text("\n".join(f"D:\\scans\\regions\\{i.replace('/', chr(92))},{g}" for i, g in patient.items()))
    by_file = group_dataset(read_iciar(root), groups_csv=groups)
    assert dict(zip(image_ids(by_file), by_file.groups, strict=True)) == patient
    bare = "\n".join(f"{i.split('/')[1]},{g}" for i, g in patient.items())
    (root / "metadata.csv").write_text("file,patient\n" + bare + "\n")
    ds = read_iciar(root)
    assert ds.groups is None and any("the name of" in p and "Name each with its folder" in p for p in ds.problems)
    (root / "metadata.csv").unlink()
    groups.write_text(bare)
    with pytest.raises(DatasetError, match=r"two groups .*name each with its folder"):
        group_dataset(read_iciar(root), groups_csv=groups)
    groups.write_text("\n".join(f"{i.split('/')[1]},{g}" for i, g in patient.items() if i.startswith("Tumour")))
    with pytest.raises(DatasetError, match=r"P0_000.png, which is the name of 2 images .*name each with its folder"):
        group_dataset(read_iciar(root), groups_csv=groups)
    by_pattern = group_dataset(read_iciar(root), pattern=r"^(P\d)_")
    assert by_pattern.n_groups == 2 and set(by_pattern.groups) == {"P0", "P1"}
    # a split file (--split FILE) the same way: by path, a shared bare name refused with what to write
    from napari_bcd.train.split import split_dataset

    ds = read_iciar(root)
    (tmp_path / "val.txt").write_text("Tumour/P0_000.png\nStroma\\P1_001.png\n")
    split = split_dataset(ds, split=tmp_path / "val.txt")
    assert sorted(image_ids(ds)[i] for i in split.val) == ["Stroma/P1_001.png", "Tumour/P0_000.png"]
    (tmp_path / "val.txt").write_text("P0_000.png\n")
    with pytest.raises(DatasetError, match="several images are called .*name each with its folder"):
        split_dataset(ds, split=tmp_path / "val.txt")
    (tmp_path / "val.txt").write_text("Tumour/P9_000.png\n")
    with pytest.raises(DatasetError, match="not in the dataset, e.g. Tumour/P9_000.png"):
        split_dataset(ds, split=tmp_path / "val.txt")
    # a list written on another machine, its folders not the dataset's: a name no other image has still names it
    from napari_bcd.train.groups import listed_images

    ids = ["Benign/b001.tif", "Normal/n001.tif", "Benign/001.png", "Normal/001.png"]
    assert listed_images(["/scans/photos/b001.tif", "n001"], ids) == ([0, 1], [], [])
    assert listed_images(["x/Benign/001.png"], ids) == ([2], [], [])
    assert listed_images(["001.png"], ids) == ([], [], ["Benign/001.png", "Normal/001.png"])
    assert listed_images(["Other/001.png", "gone.png"], ids) == ([], ["gone.png"], ["Benign/001.png", "Normal/001.png"])

def test_without_patients_the_probe_ships_and_says_why(tmp_path: Path) -> None:
    from napari_bcd.model import LinearHead, load_checkpoint
    from napari_bcd.train import iter_finetune, read_iciar

    ds = read_iciar(four_kinds_dataset(tmp_path / "ds", n=6))
    assert ds.groups is None
    _, result = drain(iter_finetune(ds, out=tmp_path / "m.safetensors", **SMALL))
    assert result.shipped == "probe" and result.candidates == 1 and result.validation.optimistic
    assert isinstance(load_checkpoint(result.checkpoint).head, LinearHead)
    assert "cannot be trusted to choose" in result.why and "one standard error" in result.tuning.rule
    assert result.tuning.chosen in PROBE_CS and "CAUTION" in result.verdict()
    record = load_checkpoint(result.checkpoint).card.training["selection"]
    assert record["probe_tuning"]["grid"] == list(PROBE_CS) and record["why"] == result.why


def test_with_few_patients_the_report_says_it_can_promise_nothing(tmp_path: Path) -> None:
    from napari_bcd.train import iter_finetune, read_iciar
    from napari_bcd.train.groups import with_groups

    ds = read_iciar(four_kinds_dataset(tmp_path / "ds", n=6))
    # three "patients", each with two images of every class (normal000 and normal003 are patient 0...)
    ds = with_groups(ds, {p.name: f"P{int(p.stem[-1]) % 3}" for p in ds.paths}, kind="patient", source="test")
    _, result = drain(iter_finetune(ds, out=tmp_path / "m.safetensors", **SMALL))
    v = result.validation
    assert v.grouped and v.n_groups == 3 and v.too_few and v.groups_per_class == dict.fromkeys(ds.classes, 3)
    text = result.verdict()
    assert "Only 3 patients: TOO FEW TO PROMISE ANYTHING" in text and "Expected accuracy" not in text
    assert "Across the" in text and "from" in text  # the spread across the folds, as the size of the doubt
    # one patient per class: that class cannot be validated on a patient the model has not seen; never "0.0 %"
    one = with_groups(ds, {p.name: p.parent.name for p in ds.paths}, kind="patient", source="test")
    _, single = drain(iter_finetune(one, out=tmp_path / "s.safetensors", overwrite=True, **SMALL))
    words = single.verdict()
    assert single.validation.too_few and "from one patient only" in words and "Expected accuracy" not in words
    assert words.startswith("No estimate for new patients") and "%" not in words.split(".")[0]


@pytest.mark.slow
def test_the_paper_network_ships_the_tuned_probe_as_a_linear_head(tmp_path: Path) -> None:
    """The real ResNet152V2 (random weights, 64 px inputs to keep it quick): trained without patients, the tuned
    probe is saved as a linear head and reloads to the same probabilities."""
    import torch

    from napari_bcd.model import load_checkpoint
    from napari_bcd.train import iter_finetune, read_iciar
    from napari_bcd.windows import resize_area

    ds = read_iciar(four_kinds_dataset(tmp_path / "ds", n=3, px=64))
    _, result = drain(iter_finetune(ds, out=tmp_path / "r.safetensors", backbone="resnet152v2",
                                    backbone_weights=None, input_px=(64, 64), field_um=(100.0, 100.0),
                                    feature_precision="fp32"))
    model = load_checkpoint(result.checkpoint)
    assert result.shipped == "probe" and model.card.head["type"] == "linear"
    assert sum(p.numel() for p in model.head.parameters()) == 2048 * 4 + 4
    x = np.stack([resize_area(ds.load(i), (64, 64)) for i in range(len(ds))])
    with torch.no_grad():
        feats = model.backbone(model.normalise(torch.from_numpy(x))).mean(dim=(2, 3)).double().numpy()
        got = torch.softmax(model.forward_uint8(torch.from_numpy(x)), 1).double().numpy()
    want = result.logistic.logits(feats)
    want = np.exp(want - want.max(1, keepdims=True))
    assert np.abs(got - want / want.sum(1, keepdims=True)).max() < 1e-4


def test_probe_training_rows_take_several_augmented_copies_of_each_image() -> None:
    """An image's augmented copies (one, or ``V`` such as the 8 flips/rotations) train as rows of its class, in the
    images' order, and only the images asked for."""
    from napari_bcd.train.regularise import training_rows

    x = np.arange(4 * 2, dtype=float).reshape(4, 2)
    y = np.array([0, 1, 0, 1])
    views = 100 + np.arange(4 * 3 * 2, dtype=float).reshape(4, 3, 2)  # 3 copies of each of 4 images
    xt, yt = training_rows(x, y, np.array([2, 1]), views)
    assert xt.tolist() == [x[2].tolist(), x[1].tolist(), *views[2].tolist(), *views[1].tolist()]
    assert yt.tolist() == [0, 1, 0, 0, 0, 1, 1, 1]
    xt, yt = training_rows(x, y, np.array([3]), views[:, 0])  # one copy each, as the stain-jittered view
    assert xt.tolist() == [x[3].tolist(), views[3, 0].tolist()] and yt.tolist() == [1, 1]
