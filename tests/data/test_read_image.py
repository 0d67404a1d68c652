"""`read_image`: every file becomes 8-bit RGB `[3, H, W]` as it is displayed, through
torchvision's decoders and through the PIL fallback alike."""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.io
from PIL import Image

from fdet.data.coco import CocoDataset, DataError, read_image

ORIENTATION = 0x0112  # the EXIF tag

# What a viewer shows for each EXIF orientation of a stored [H, W, C] array.
DISPLAYED: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),  # turned 90° clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


@pytest.fixture(params=["torchvision", "pil"])
def decoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test runs twice: as is (torchvision decodes what it can) and with torchvision's
    decoder failing, so that the PIL fallback reads every file."""
    if request.param == "pil":

        def refuse(*args: object, **kwargs: object) -> torch.Tensor:
            raise RuntimeError("decode_image: unsupported (test)")

        monkeypatch.setattr(torchvision.io, "decode_image", refuse)
    return request.param


def as_hwc(image: torch.Tensor) -> np.ndarray:
    assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3
    return image.permute(1, 2, 0).numpy()


def blocks(height: int, width: int) -> np.ndarray:
    """An RGB image of four flat quadrants in distinct colours (JPEG keeps them nearly exact,
    and any turn or mirror moves them)."""
    out = np.zeros((height, width, 3), np.uint8)
    h, w = height // 2, width // 2
    out[:h, :w] = (230, 30, 30)
    out[:h, w:] = (30, 200, 40)
    out[h:, :w] = (40, 40, 220)
    out[h:, w:] = (240, 240, 20)
    return out


def write_png_rgb16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit RGB PNG (which PIL cannot write), by the format's definition."""
    height, width, _ = pixels.shape

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)  # 16 bits, truecolour
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def test_16_bit_grayscale_png_keeps_the_high_byte(tmp_path: Path, decoder: str) -> None:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 65536, (5, 7)).astype(np.uint16)
    gray[0, :4] = (0, 257, 65535, 256 * 200 + 255)
    Image.fromarray(gray).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")
    image = as_hwc(read_image(tmp_path / "g16.png"))
    expected = (gray >> 8).astype(np.uint8)
    assert image.shape == (5, 7, 3)
    for c in range(3):
        np.testing.assert_array_equal(image[..., c], expected)
    assert image[0, :4, 0].tolist() == [0, 1, 255, 200]


def test_16_bit_rgb_png_keeps_the_high_byte(tmp_path: Path, decoder: str) -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 65536, (6, 4, 3)).astype(np.uint16)
    write_png_rgb16(tmp_path / "rgb16.png", rgb)
    np.testing.assert_array_equal(
        as_hwc(read_image(tmp_path / "rgb16.png")), (rgb >> 8).astype(np.uint8)
    )


def test_palette_png(tmp_path: Path, decoder: str) -> None:
    source = Image.fromarray(blocks(8, 10)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    source.save(tmp_path / "palette.png")
    assert Image.open(tmp_path / "palette.png").mode == "P"
    np.testing.assert_array_equal(as_hwc(read_image(tmp_path / "palette.png")), blocks(8, 10))


def test_cmyk_jpeg(tmp_path: Path, decoder: str) -> None:
    cmyk = Image.new("CMYK", (16, 16))
    quadrants = [(0, 0, 0, 0), (255, 0, 0, 0), (0, 128, 255, 64), (0, 0, 0, 255)]
    for k, colour in enumerate(quadrants):
        x, y = 8 * (k % 2), 8 * (k // 2)
        cmyk.paste(colour, (x, y, x + 8, y + 8))
    cmyk.save(tmp_path / "cmyk.jpg", quality=100)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    image = as_hwc(read_image(tmp_path / "cmyk.jpg")).astype(int)
    expected = [(255, 255, 255), (0, 255, 255), (191, 95, 0), (0, 0, 0)]  # R = (255-C)(255-K)/255
    for k, colour in enumerate(expected):
        x, y = 8 * (k % 2), 8 * (k // 2)
        assert np.abs(image[y + 2 : y + 6, x + 2 : x + 6] - colour).max() <= 3, k


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path: Path, decoder: str, orientation: int) -> None:
    stored = blocks(12, 20)
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[ORIENTATION] = orientation
    im.save(tmp_path / "turned.jpg", exif=exif, quality=100, subsampling=0)
    image = as_hwc(read_image(tmp_path / "turned.jpg")).astype(int)
    expected = DISPLAYED[orientation](stored).astype(int)
    assert image.shape == expected.shape  # 20 x 12 for orientations 5 to 8
    assert np.abs(image - expected).max() <= 12, "JPEG, at full quality, changes little"


def test_unreadable_pixels_are_a_clear_error(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(DataError, match=r"float\.tif: floating-point pixels .* no 8-bit RGB"):
        read_image(tmp_path / "float.tif")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(DataError, match=r"broken\.png: cannot decode image"):
        read_image(tmp_path / "broken.png")


def test_annotations_describe_the_image_as_displayed(tmp_path: Path) -> None:
    """A photo stored 20 wide and 12 high with orientation 6 is shown 12 wide and 20 high: its
    entry and boxes are in that frame; an entry with the stored size is an error that says so."""
    images = tmp_path / "images"
    images.mkdir()
    im = Image.fromarray(blocks(12, 20))
    exif = im.getexif()
    exif[ORIENTATION] = 6
    im.save(images / "photo.jpg", exif=exif, quality=95)

    def dataset(height: int, width: int) -> CocoDataset:
        ann = tmp_path / f"{height}x{width}.json"
        entry = {"id": 1, "file_name": "photo.jpg", "height": height, "width": width}
        box = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 16], "iscrowd": 0}
        data = {"images": [entry], "annotations": [box], "categories": [{"id": 1, "name": "a"}]}
        ann.write_text(json.dumps(data))
        return CocoDataset(images, ann)

    sample = dataset(20, 12)[0]
    assert sample.image.shape == (3, 20, 12) and sample.orig_size == (20, 12)
    assert sample.boxes.tolist() == [[1.0, 2.0, 11.0, 18.0]]  # not clipped: inside 12 x 20
    with pytest.raises(
        DataError, match=r"image is 20x12 \(h x w\) but its entry says 12x20; .*EXIF"
    ):
        dataset(12, 20)[0]
