"""Reading and converting the Predictor's inputs: every kind gives uint8 RGB [3, H, W] with the
documented conversions, and every bad input a one-line DataError naming it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fdet.data.coco import DataError
from fdet.inference.inputs import image_files, input_name, is_video, load_image


@pytest.fixture
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (13, 21, 3), dtype=np.uint8)


def expected(hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(hwc)).permute(2, 0, 1)


def test_every_kind_of_rgb_input_reads_the_same(rgb: np.ndarray, tmp_path: Path) -> None:
    Image.fromarray(rgb).save(tmp_path / "a.png")
    chw = torch.from_numpy(rgb).permute(2, 0, 1)
    kinds = {
        "path": tmp_path / "a.png",
        "str": str(tmp_path / "a.png"),
        "pil": Image.fromarray(rgb),
        "numpy": rgb,
        "tensor": chw,
        "float tensor 0-255": chw.float(),
        "palette": Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE),
    }
    for what, item in kinds.items():
        image = load_image(item)
        assert image.dtype == torch.uint8 and image.shape == (3, 13, 21), what
        if what == "palette":  # quantized: its own palette's colours, read back as RGB
            assert torch.equal(image, expected(np.asarray(item.convert("RGB")))), what
        else:
            assert torch.equal(image, expected(rgb)), what


def test_gray_is_repeated_over_three_channels(rgb: np.ndarray, tmp_path: Path) -> None:
    gray = rgb[..., 0]
    want = expected(np.repeat(gray[..., None], 3, axis=2))
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    for item in (
        gray,
        gray[..., None],
        Image.fromarray(gray, mode="L"),
        tmp_path / "g.png",
        torch.from_numpy(gray)[None],
    ):
        assert torch.equal(load_image(item), want)


def test_alpha_is_dropped(rgb: np.ndarray, tmp_path: Path) -> None:
    alpha = np.random.default_rng(1).integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    rgba = np.concatenate([rgb, alpha[..., None]], axis=2)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    for item in (
        rgba,
        Image.fromarray(rgba, mode="RGBA"),
        tmp_path / "a.png",
        torch.from_numpy(rgba).permute(2, 0, 1),
    ):
        assert torch.equal(load_image(item), expected(rgb))


def test_sixteen_bits_keep_the_high_byte(tmp_path: Path) -> None:
    values = np.array([[0, 255, 256, 257 * 7, 65535, 40000]], dtype=np.uint16)
    high = np.array([[0, 0, 1, 7, 255, 156]], dtype=np.uint8)  # v >> 8, by hand
    want = expected(np.repeat(high[..., None], 3, axis=2))
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as stored:
        assert stored.mode.startswith("I;16")  # stored with 16 bits a sample
    for item in (values, tmp_path / "deep.png", Image.fromarray(values)):
        assert torch.equal(load_image(item), want), type(item)
    rgb16 = np.repeat(values[..., None], 3, axis=2)
    assert torch.equal(load_image(rgb16), want)


def test_float_tensors_take_0_to_255() -> None:
    x = torch.tensor([[[0.0, 1.4, 1.6, 254.5, 255.0]]]).expand(3, 1, 5)
    assert load_image(x)[0, 0].tolist() == [0, 1, 2, 254, 255]  # rounded (254.5: to even)
    with pytest.raises(DataError, match=r"input 3: float pixel values lie in \[0, 1\]"):
        load_image(torch.rand(3, 4, 4), name="input 3")
    with pytest.raises(DataError, match=r"must lie in \[0, 255\]; got -1 to 2"):
        load_image(torch.tensor([-1.0, 2.0]).view(1, 1, 2))
    with pytest.raises(DataError, match="NaN"):
        load_image(torch.full((3, 2, 2), float("nan")))
    ones = torch.ones(3, 2, 2)  # integral values in [0, 1]: a very dark 0-255 image, taken
    assert torch.equal(load_image(ones), torch.ones(3, 2, 2, dtype=torch.uint8))


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (np.zeros((0, 5, 3), np.uint8), r"a zero-size image \(0x5 pixels\)"),
        (torch.zeros(3, 4, 0, dtype=torch.uint8), r"a zero-size image \(4x0 pixels\)"),
        (np.zeros((4, 4, 2), np.uint8), "2 channels"),
        (np.zeros((4, 4, 3), np.float32), "numpy array of float32"),
        (torch.zeros(1, 3, 4, 4), r"shape \(1, 3, 4, 4\)"),
        (torch.zeros(3, 4, 4, dtype=torch.int32), "torch.int32"),
        (Image.new("F", (4, 4)), "floating-point pixels"),
        (12, "not an image: got a int"),
    ],
)
def test_bad_images_in_memory(item: object, message: str) -> None:
    with pytest.raises(DataError, match=f"^my image: .*{message}"):
        load_image(item, name="my image")  # type: ignore[arg-type]


def _png(tmp_path: Path) -> bytes:
    Image.fromarray(np.full((32, 32, 3), 100, np.uint8)).save(tmp_path / "ok.png")
    return (tmp_path / "ok.png").read_bytes()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("notes.png", b"just some text\n", "not a readable image"),
        ("cut.png", "half", "not a readable image"),
        ("empty.png", b"", "an empty file (0 bytes)"),
    ],
)
def test_bad_files(tmp_path: Path, name: str, content: bytes | str, message: str) -> None:
    data = _png(tmp_path)
    path = tmp_path / name
    path.write_bytes(data[: len(data) // 2] if content == "half" else content)  # type: ignore[arg-type]
    with pytest.raises(DataError) as info:
        load_image(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(DataError, match="a folder, not an image file"):
        load_image(tmp_path)


def test_folders_list_their_images_sorted_not_recursively(tmp_path: Path) -> None:
    for name in ("b.PNG", "a.jpg", "c.txt", "d.webp"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.png").write_bytes(b"x")
    assert [p.name for p in image_files(tmp_path)] == ["a.jpg", "b.PNG", "d.webp"]
    assert is_video("clip.MP4") and is_video(Path("x.webm")) and not is_video("x.png")
    assert input_name(tmp_path / "a.jpg", 3) == os.fspath(tmp_path / "a.jpg")
    assert input_name(np.zeros(1), 3) == "input 3"


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="running as root, which reads any folder whatever its permissions",
)
def test_unreadable_folder(tmp_path: Path) -> None:
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0)
    try:
        with pytest.raises(DataError, match=r"locked: cannot read the folder \(permission"):
            image_files(folder)
    finally:
        folder.chmod(0o755)


def test_a_folder_the_system_refuses_to_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a folder without read permission gives, also where the tests run as root (who
    reads any folder): listing it raises PermissionError."""
    import fdet.inference.inputs as inputs

    def refuse(path: object) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(inputs.os, "scandir", refuse)
    with pytest.raises(
        DataError, match=r"^.*locked: cannot read the folder \(permission denied\)$"
    ):
        image_files(tmp_path / "locked")
