"""The BACH photos without the network: a local Zenodo, resumed transfers, checksums, the patient split."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from bach_archive import FakeZenodo, make_bach_zip
from conftest import drain
from napari_bcd.cli import main
from napari_bcd.errors import DatasetError, DownloadError, LicenceNotAcceptedError
from napari_bcd.train import read_iciar, split_dataset
from napari_bcd.train.bach import BACH_FILE, ExtractProgress, iter_fetch_bach
from napari_bcd.train.split import BACH_PATIENT_VAL_RANGES


@pytest.fixture(scope="session")
def bach_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bach_zip(tmp_path_factory.mktemp("bach") / BACH_FILE)


@pytest.fixture
def zenodo(bach_zip: Path):
    server = FakeZenodo(bach_zip.read_bytes())
    yield server
    server.close()


def _photos_only(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_fetch_resumes_an_interrupted_transfer_and_extracts_only_the_photos(tmp_path: Path, zenodo: FakeZenodo) -> None:
    zenodo.cut_after = len(zenodo.payload) // 3
    with pytest.raises(DownloadError, match="Run the same command again to resume"):
        drain(iter_fetch_bach(tmp_path, accept_licence=True, api=zenodo.api))
    part = tmp_path / (BACH_FILE + ".part")
    assert part.stat().st_size == len(zenodo.payload) // 3
    items, result = drain(iter_fetch_bach(tmp_path, accept_licence=True, api=zenodo.api))
    # The second try asked only for the rest.
    assert zenodo.file_requests()[-1]["range"] == f"bytes={len(zenodo.payload) // 3}-"
    assert items[0].resumed_from == len(zenodo.payload) // 3
    assert result.md5 == hashlib.md5(zenodo.payload).hexdigest()
    assert result.counts == {"Benign": 100, "InSitu": 100, "Invasive": 100, "Normal": 100} and not result.notes
    assert isinstance(items[-1], ExtractProgress) and items[-1].done == items[-1].total == 401
    files = _photos_only(tmp_path)
    assert len([f for f in files if f.endswith(".tif")]) == 400
    assert not any("WSI" in f or "evil" in f for f in files) and not (tmp_path.parent / "evil.txt").exists()
    assert not part.exists() and not (tmp_path / BACH_FILE).exists()  # the 10 GB archive does not linger
    ds = read_iciar(tmp_path)
    assert len(ds) == 400 and not ds.problems
    # A second run finds the photos and downloads nothing.
    n = len(zenodo.requests)
    _, again = drain(iter_fetch_bach(tmp_path, accept_licence=True, api=zenodo.api))
    assert len(zenodo.requests) == n and "already" in again.notes[0]


def test_a_corrupted_byte_is_refused_by_the_checksum(tmp_path: Path, zenodo: FakeZenodo) -> None:
    zenodo.flip_byte = len(zenodo.payload) // 2
    with pytest.raises(DownloadError, match=r"md5 .* not .*corrupt and was deleted"):
        drain(iter_fetch_bach(tmp_path, accept_licence=True, api=zenodo.api))
    assert not any(tmp_path.rglob("*.tif")) and not (tmp_path / (BACH_FILE + ".part")).exists()
    zenodo.flip_byte = None  # the next try downloads anew and succeeds
    _, result = drain(iter_fetch_bach(tmp_path, accept_licence=True, api=zenodo.api))
    assert sum(result.counts.values()) == 400


def test_no_download_without_accepting_the_licence(tmp_path: Path, zenodo: FakeZenodo, capsys) -> None:
    with pytest.raises(LicenceNotAcceptedError, match=r"CC BY-NC-ND 4\.0.*Aresta.*--accept-licence"):
        drain(iter_fetch_bach(tmp_path, api=zenodo.api))
    # The command line asks at a terminal; without one (a script) it refuses and says how.
    assert main(["data", "fetch", "bach", "--dir", str(tmp_path), "--api", zenodo.api]) == 2
    assert "--accept-licence" in capsys.readouterr().err
    assert zenodo.file_requests() == [] and not any(tmp_path.iterdir())


def test_from_a_zip_on_disk(tmp_path: Path, bach_zip: Path, zenodo: FakeZenodo, capsys) -> None:
    # Checked against the md5 Zenodo publishes; nothing downloaded; the user's zip is kept.
    assert main(["data", "fetch", "bach", "--from", str(bach_zip), "--dir", str(tmp_path / "a"),
                 "--api", zenodo.api]) == 0
    assert "BACH photos ready" in capsys.readouterr().out and zenodo.file_requests() == [] and bach_zip.is_file()
    assert len(read_iciar(tmp_path / "a")) == 400
    # A wrong md5 is refused before anything is extracted.
    assert main(["data", "fetch", "bach", "--from", str(bach_zip), "--dir", str(tmp_path / "b"), "--md5",
                 "0" * 32]) == 2
    assert "not the published" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_a_damaged_member_is_found_while_extracting(tmp_path: Path, bach_zip: Path) -> None:
    data = bytearray(bach_zip.read_bytes())
    i = data.find(b"is050.tif")  # a local header's name, followed by the member's compressed bytes
    data[i + 200] ^= 0xFF
    (tmp_path / "bad.zip").write_bytes(bytes(data))
    with pytest.raises((DownloadError, DatasetError), match="damaged|check out|zip"):
        drain(iter_fetch_bach(tmp_path / "out", from_zip=tmp_path / "bad.zip", md5=hashlib.md5(data).hexdigest()))
    assert not any((tmp_path / "out").rglob("*.tif"))


def test_broken_compressed_data_is_said_in_a_sentence(tmp_path: Path, bach_zip: Path, capsys) -> None:
    """Deflate data broken mid-member raised zlib.error, a traceback; now it is a damaged archive, exit 2."""
    import zlib

    data = bytearray(bach_zip.read_bytes())
    for offset in range(len(data) // 2, len(data) - 200, 997):  # the first flipped byte that breaks deflate itself
        probe = bytearray(data)
        probe[offset] ^= 0xFF
        try:
            import io
            import zipfile

            with zipfile.ZipFile(io.BytesIO(bytes(probe))) as zf:
                for m in zf.infolist():
                    zf.read(m)
        except zlib.error:
            break
        except Exception:  # noqa: BLE001 - another kind of damage: try the next byte
            continue
    else:
        pytest.fail("the fixture archive changed: no flipped byte breaks its deflate data any more")
    (tmp_path / "bad.zip").write_bytes(bytes(probe))
    assert main(["data", "fetch", "bach", "--from", str(tmp_path / "bad.zip"), "--dir", str(tmp_path / "out"),
                 "--accept-licence"]) == 2
    err = capsys.readouterr().err
    assert "is damaged" in err and "Download the archive again" in err and "Traceback" not in err
    assert not any((tmp_path / "out").rglob("*.tif"))


def test_patient_aware_split_is_evas(tmp_path: Path, bach_zip: Path) -> None:
    drain(iter_fetch_bach(tmp_path, from_zip=bach_zip, md5=hashlib.md5(bach_zip.read_bytes()).hexdigest()))
    ds = read_iciar(tmp_path)
    split = split_dataset(ds, split="bach-patient")
    assert (len(split.train), len(split.val)) == (268, 132)
    val_names = {ds.paths[i].name for i in split.val}
    # Sorted by class folder (Benign, InSitu, Invasive, Normal) then name: index 41 is b042, 139 is is040.
    assert {"b042.tif", "b059.tif", "b061.tif", "b090.tif", "is040.tif", "is069.tif", "iv041.tif", "iv058.tif",
            "iv061.tif", "iv073.tif", "n046.tif", "n068.tif"} <= val_names
    assert not {"b041.tif", "b060.tif", "b091.tif", "is039.tif", "is070.tif", "iv040.tif", "iv059.tif", "iv060.tif",
                "iv074.tif", "n045.tif", "n069.tif"} & val_names
    assert sum(b - a for a, b in BACH_PATIENT_VAL_RANGES) == 132
    with pytest.raises(DatasetError, match="400 BACH photos"):
        split_dataset(read_iciar(_subset(ds, tmp_path / "small")), split="bach-patient")


def _subset(ds, root: Path) -> Path:
    import shutil

    for p in ds.paths[:: 40]:
        (root / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / p.parent.name / p.name)
    return root


def test_fetch_refuses_what_would_lose_or_misread_files(tmp_path: Path, bach_zip: Path, capsys) -> None:
    # files of the user's under Photos/ with no completion marker: left alone, before any work
    root = tmp_path / "mine"
    photos = root / "ICIAR2018_BACH_Challenge" / "Photos"
    (photos / "Benign").mkdir(parents=True)
    (photos / "Benign" / "b001.tif").write_bytes(b"my photo")
    with pytest.raises(DatasetError, match="did not finish writing"):
        drain(iter_fetch_bach(root, from_zip=bach_zip, md5=hashlib.md5(bach_zip.read_bytes()).hexdigest()))
    assert (photos / "Benign" / "b001.tif").read_bytes() == b"my photo"
    # --from a folder, --dir a file, --md5 that is not one: named for what they are
    assert main(["data", "fetch", "bach", "--from", str(tmp_path), "--dir", str(tmp_path / "x")]) == 2
    assert "is a folder" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert main(["data", "fetch", "bach", "--from", str(bach_zip), "--dir", str(tmp_path / "afile")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["data", "fetch", "bach", "--from", str(bach_zip), "--dir", str(tmp_path / "y"), "--md5", "zz"]) == 2
    assert "is not an md5" in capsys.readouterr().err


def test_an_archive_of_unknown_compression_or_encrypted_is_named(tmp_path: Path, bach_zip: Path) -> None:
    import zipfile

    data = bytearray(bach_zip.read_bytes())
    with zipfile.ZipFile(bach_zip) as zf:
        info = next(m for m in zf.infolist() if m.filename.endswith("Photos/Benign/b001.tif"))
    # the compression method in the member's local header (offset 8) and central directory entry (offset 10)
    data[info.header_offset + 8 : info.header_offset + 10] = (99).to_bytes(2, "little")
    cd = data.find(b"PK\x01\x02")
    while cd >= 0 and data[cd + 46 : cd + 46 + len(info.filename)] != info.filename.encode():
        cd = data.find(b"PK\x01\x02", cd + 4)
    data[cd + 10 : cd + 12] = (99).to_bytes(2, "little")
    odd = tmp_path / "odd.zip"
    odd.write_bytes(bytes(data))
    with pytest.raises((DatasetError, DownloadError), match="compression"):
        drain(iter_fetch_bach(tmp_path / "o", from_zip=odd, md5=hashlib.md5(data).hexdigest()))
    assert not (tmp_path / "o" / "ICIAR2018_BACH_Challenge" / "Photos.partial").exists()
    data = bytearray(bach_zip.read_bytes())
    data[info.header_offset + 6] |= 0x1  # the encryption flag, local header and central directory
    data[cd + 8] |= 0x1
    locked = tmp_path / "locked.zip"
    locked.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="encrypted"):
        drain(iter_fetch_bach(tmp_path / "l", from_zip=locked, md5=hashlib.md5(data).hexdigest()))
