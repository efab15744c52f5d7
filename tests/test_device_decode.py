"""JPEG tiles decoded on the model's device (issue 12): the same pixels as the CPU reader, or not used at all.

On this machine the device is the CPU, so torchvision's decoder there (libjpeg-turbo) stands in for nvJPEG:
the streams, the row assembly, the engine's path and the fall-back are the ones a GPU runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE_SLIDE, write_pyramid

torch = pytest.importorskip("torch")
decode_jpeg = pytest.importorskip("torchvision.io").decode_jpeg


def _decode(stream: bytes) -> np.ndarray:
    return decode_jpeg(torch.frombuffer(bytearray(stream), dtype=torch.uint8)).permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def ycbcr_pyramid(tmp_path_factory: pytest.TempPathFactory, cmu_rgb: np.ndarray) -> Path:
    """A 3-level pyramid of YCbCr 4:2:0 JPEG tiles (tifffile's default), 1500 x 1700 px of the CMU slide."""
    return write_pyramid(tmp_path_factory.mktemp("ycc") / "ycc.tif", cmu_rgb[:1500, :1700], levels=3)


def test_aperio_rgb_jpeg_tiles_become_streams_any_decoder_reads_right() -> None:
    from napari_bcd.io import open_slide

    with open_slide(SAMPLE_SLIDE) as slide:
        assert slide.jpeg_tiles(0) == "rgb"  # Photometric RGB, JPEGTables, no JFIF: Aperio's RGB-JPEG
        th, tw = slide.tile_shape(0)
        H, W = slide.dimensions
        for ty, tx in [(0, 0), (4, 3), (H // th, W // tw)]:  # the last: the bottom-right edge tile
            got = _decode(slide.jpeg_tile(0, ty, tx))
            h, w = min(th, H - ty * th), min(tw, W - tx * tw)
            ref = slide.read_region(0, ty * th, tx * tw, h, w, cache=False)
            np.testing.assert_array_equal(got[:h, :w], ref)
        # Without the RGB marking a standard decoder takes the samples for YCbCr: the colours are wrong.
        from napari_bcd.io.jpeg import complete_jpeg

        seg = slide._segments[0]
        plain = complete_jpeg(seg._read_bytes(4 * seg.grid[1] + 3), seg.jpegtables, rgb=False)
        ref = slide.read_region(0, 4 * th, 3 * tw, th, tw, cache=False)
        assert np.abs(_decode(plain).astype(int) - ref.astype(int)).mean() > 20


@pytest.mark.parametrize("backend", ["torchcodec", "torchvision"])
def test_device_rows_equal_the_cpu_rows_at_every_level(ycbcr_pyramid: Path, backend: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from napari_bcd.io import open_slide
    from napari_bcd.io.device_decode import DeviceRows

    if backend == "torchcodec":
        pytest.importorskip("torchcodec.decoders")
    with open_slide(ycbcr_pyramid) as slide, ThreadPoolExecutor(2) as pool:
        for level in range(slide.level_count):
            assert slide.jpeg_tiles(level) == "ycbcr"
            rows = DeviceRows(slide, level, "cpu", backend=backend)
            assert rows.backend == backend
            th, _ = slide.tile_shape(level)
            n_rows = -(-slide.level_info[level].shape[0] // th)
            for ty in range(n_rows + 1):  # one row past the image: all glass
                for cols in (None, [0, 2]):
                    got = rows(level, ty, cols, pool).numpy()
                    ref = slide.read_tile_row(level, ty, cols, pool)
                    assert got.shape == ref.shape and got.dtype == np.uint8
                    diff = np.abs(got.astype(int) - ref.astype(int))
                    assert diff.mean() < 0.5 and diff.max() <= 3  # two builds of libjpeg-turbo
                    if ty == n_rows - 1:  # rows below the image's edge are glass, as on the CPU path
                        below = slide.level_info[level].shape[0] - ty * th
                        assert (got[below:] == 255).all()


def test_the_engine_on_device_decoded_tiles_gives_the_cpu_map(tiny_model) -> None:
    from napari_bcd.engine import classify
    from napari_bcd.io import open_slide
    from napari_bcd.io.device_decode import jpeg_decoder
    from napari_bcd.model import Predictor

    predictor = Predictor(tiny_model, device="cpu")
    with open_slide(SAMPLE_SLIDE) as slide:
        cpu = classify(slide, predictor, stride=0.5, decode="cpu", quality=True)
        dev = classify(slide, predictor, stride=0.5, decode="device", quality=True)  # tensor batches
        auto = classify(slide, predictor, stride=0.5)  # a CPU model: auto decodes on the CPU
    assert cpu.info["decode"] == "cpu" and auto.info["decode"] == "cpu"
    assert dev.info["decode"].startswith(f"{jpeg_decoder()[0]} on cpu (RGB-JPEG, mean difference 0.00")
    np.testing.assert_array_equal(dev.labels, cpu.labels)
    np.testing.assert_allclose(dev.probs, cpu.probs, atol=1e-6)
    assert np.isfinite(cpu.quality).any()
    np.testing.assert_array_equal(dev.quality, cpu.quality)
    assert dev.info["decoded_tiles"] == dev.info["tiles_touched"] == cpu.info["decoded_tiles"]


def test_a_decoder_that_gets_the_colours_wrong_is_not_used(tiny_model, monkeypatch) -> None:
    """nvJPEG reads Aperio's RGB-JPEG as YCbCr: the sample check must catch such a decoder, and say so."""
    from napari_bcd.engine import classify
    from napari_bcd.io import Slide, open_slide
    from napari_bcd.io.jpeg import complete_jpeg
    from napari_bcd.model import Predictor

    def ignores_rgb(self, level, ty, tx):  # what a decoder that ignores the RGB marking sees
        seg = self._segments[level]
        return complete_jpeg(seg._read_bytes(ty * seg.grid[1] + tx), seg.jpegtables, rgb=False)

    predictor = Predictor(tiny_model, device="cpu")
    with open_slide(SAMPLE_SLIDE) as slide:
        cpu = classify(slide, predictor, decode="cpu")
        monkeypatch.setattr(Slide, "jpeg_tile", ignores_rgb)
        dev = classify(slide, predictor, decode="device")
    note = dev.info["decode"]
    # both ways tried: converted, and the components as stored; both wrong here (libjpeg converts either way)
    assert note.startswith("cpu: the device decoder does not give the CPU decode's pixels on this slide's "
                           "RGB-JPEG tiles (RGB: differs by ")
    assert "; UNCHANGED: differs by " in note and note.endswith("decoding on the CPU")
    np.testing.assert_array_equal(dev.probs, cpu.probs)  # decoded on the CPU after all


def test_what_is_not_jpeg_decodes_on_the_cpu_with_a_reason(tmp_path: Path, cmu_rgb: np.ndarray, tiny_model) -> None:
    from napari_bcd.engine import classify
    from napari_bcd.errors import BcdError, SlideError
    from napari_bcd.io import Slide, open_slide
    from napari_bcd.io.device_decode import DeviceRows
    from napari_bcd.model import Predictor

    zlib = write_pyramid(tmp_path / "zlib.tif", cmu_rgb, levels=2, compression="zlib")
    predictor = Predictor(tiny_model, device="cpu")
    with open_slide(zlib) as slide:
        assert slide.jpeg_tiles(0) is None
        with pytest.raises(SlideError, match="not stored as JPEG tiles"):
            slide.jpeg_tile(0, 0, 0)
    off_level = r"no tile \(13, 0\); the level has 13 x 10"
    with open_slide(SAMPLE_SLIDE) as slide, pytest.raises(SlideError, match=off_level):
        slide.jpeg_tile(0, 13, 0)
    with open_slide(zlib) as slide:
        with pytest.raises(SlideError, match="decode it on the CPU"):
            DeviceRows(slide, 0, "cpu")
        cmap = classify(slide, predictor, decode="device")
    assert cmap.n_windows > 0 and cmap.info["decode"] == "cpu: the tiles are not baseline JPEG"
    memory = Slide.from_array(cmu_rgb[:800, :800], mpp=0.499)
    assert memory.jpeg_tiles(0) is None
    with open_slide(SAMPLE_SLIDE) as slide, pytest.raises(BcdError, match="Unknown decode mode 'gpu'"):
        classify(slide, predictor, decode="gpu")


def test_cli_decode_option(tmp_path: Path, tiny_checkpoint: Path, capsys) -> None:
    import json

    from napari_bcd.cli import main

    out = tmp_path / "out"
    assert main(["classify", str(SAMPLE_SLIDE), "--model", str(tiny_checkpoint), "--out", str(out),
                 "--decode", "device"]) == 0
    info = json.loads((out / "CMU-1-Small-Region.summary.json").read_text())["info"]
    assert info["decode"].split(" (")[0] in ("torchcodec on cpu", "torchvision on cpu")
    with pytest.raises(SystemExit) as exc:
        main(["classify", str(SAMPLE_SLIDE), "--model", str(tiny_checkpoint), "--out", str(out), "--decode", "gpu"])
    assert exc.value.code == 2 and "invalid choice: 'gpu'" in capsys.readouterr().err
    # asked for but not possible: said on stderr, and in the cohort table
    import tifffile

    zlib = write_pyramid(tmp_path / "zlib.tif", tifffile.imread(SAMPLE_SLIDE), levels=2, compression="zlib")
    copy = tmp_path / "cmu.svs"
    copy.write_bytes(SAMPLE_SLIDE.read_bytes())
    out2 = tmp_path / "out2"
    assert main(["classify", str(zlib), str(copy), "--model", str(tiny_checkpoint), "--out", str(out2),
                 "--decode", "device"]) == 0
    err = capsys.readouterr().err
    assert "zlib.tif: tiles decoded on the CPU: the tiles are not baseline JPEG" in err
    assert "cmu.svs: tiles decoded on the CPU" not in err
    table = (out2 / "cohort.csv").read_text()
    assert "decode" in table.splitlines()[0] and "the tiles are not baseline JPEG" in table


def test_bad_decoder_arguments_end_in_messages() -> None:
    from napari_bcd.errors import SlideError
    from napari_bcd.io import open_slide
    from napari_bcd.io.device_decode import DeviceRows, device_rows, jpeg_decoder

    with pytest.raises(SlideError, match="Unknown JPEG decoder 'nvjpeg'; use auto, torchcodec or torchvision"):
        jpeg_decoder("nvjpeg")
    with open_slide(SAMPLE_SLIDE) as slide:
        with pytest.raises(SlideError, match="Unknown decode mode 'gpu'; use one of auto, cpu, device"):
            device_rows(slide, 0, "cpu", "gpu")
        rows = DeviceRows(slide, 0, "cpu")
        with pytest.raises(SlideError, match="This reader decodes level 0, not 1"):
            rows(1, 0)
        with pytest.raises(SlideError, match="no tile"):
            rows.decode([(-1, 0)])
        assert (rows(0, 99).numpy() == 255).all()  # a row past the image: glass, as on the CPU path
        # no sample tile to compare: never trusted
        reader, choice = device_rows(slide, 0, "cpu", "device", sample=[])
        assert reader is None and choice.fell_back and "no sample tile to compare" in choice.text
