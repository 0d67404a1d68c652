"""What the Predictor and ``fdet infer`` take as an image, read and converted to uint8 RGB
``[3, H, W]``; and the files a command-line input stands for (an image, a folder, a video).

Conversions, the same for files and for images in memory:

- grayscale is repeated over the three channels; palette, CMYK and YCbCr images become RGB;
- an alpha channel is dropped (the colour as stored, not composited on any background);
- 16 bits a sample become 8 by keeping the high byte (``v >> 8``: 65535 -> 255, ``257·k`` -> k);
- a float tensor holds pixel values in ``[0, 255]`` (the range the models take), rounded to the
  nearest integer; one whose values all lie in ``[0, 1]`` with some fractional is refused
  (scale it by 255 first), since it is almost surely a ``[0, 1]`` image.

Files are decoded with :func:`fdet.data.coco.read_image` (EXIF orientation applied, the first
frame of an animated image). Anything that cannot be read is a one-line
:class:`~fdet.data.coco.DataError` that starts with the input's name and says what is wrong.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import UInt8
from PIL import Image
from torch import Tensor

from fdet.data.coco import DataError, read_image

__all__ = [
    "IMAGE_SUFFIXES",
    "VIDEO_SUFFIXES",
    "ImageInput",
    "image_files",
    "input_name",
    "is_video",
    "load_image",
]

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
"""The file name endings taken for images when a folder is listed (any case)."""

VIDEO_SUFFIXES = (".avi", ".mkv", ".mov", ".mp4", ".webm")
"""The file name endings that make an input a video (any case)."""

ImageInput = str | os.PathLike[str] | Image.Image | np.ndarray | Tensor
"""One image: a file path, a PIL image, a numpy array ``[H, W]``, ``[H, W, 1|3|4]`` (uint8 or
uint16), or a tensor ``[1|3|4, H, W]`` (uint8, uint16, or float in ``[0, 255]``)."""

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def input_name(item: Any, index: int) -> str:
    """How errors and results name an input: its path, or ``input <index>`` for an image in
    memory."""
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    return f"input {index}"


def is_video(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a video file, by its ending (:data:`VIDEO_SUFFIXES`)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def image_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The image files directly in ``folder`` (not in its subfolders), by the endings of
    :data:`IMAGE_SUFFIXES`, sorted by name. An unreadable folder is a :class:`DataError`."""
    path = Path(folder)
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except PermissionError:
        raise DataError(f"{path}: cannot read the folder (permission denied)") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the folder ({e.strerror or e})") from None
    return [
        path / e.name
        for e in entries
        if Path(e.name).suffix.lower() in IMAGE_SUFFIXES and not e.is_dir()
    ]


def load_image(item: ImageInput, *, name: str | None = None) -> UInt8[Tensor, "3 H W"]:
    """``item`` as uint8 RGB ``[3, H, W]`` (a new tensor on the CPU), converted as the module
    says. ``name`` names it in errors (default: its path, or ``image``)."""
    if isinstance(item, (str, os.PathLike)):
        image = _read_file(Path(item))
        where = name or os.fspath(item)
    else:
        where = name or "image"
        if isinstance(item, Image.Image):
            image = _from_pil(item, where)
        elif isinstance(item, np.ndarray):
            image = _from_hwc(item, where)
        elif isinstance(item, Tensor):
            image = _from_chw(item, where)
        else:
            raise DataError(
                f"{where}: not an image: got a {type(item).__name__}; give a path, a PIL image, "
                "a numpy array [H, W, C] or a tensor [C, H, W]"
            )
    if image.shape[-2] == 0 or image.shape[-1] == 0:
        raise DataError(f"{where}: a zero-size image ({image.shape[-2]}x{image.shape[-1]} pixels)")
    return image


def _read_file(path: Path) -> Tensor:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: a folder, not an image file")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror or e})") from None
    if size == 0:
        raise DataError(f"{path}: an empty file (0 bytes), not an image")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path}: cannot read the file (permission denied)")
    try:
        image = read_image(path)
    except DataError as e:
        message = str(e)
        prefix = f"{path}: "
        detail = message[len(prefix) :] if message.startswith(prefix) else message
        raise DataError(f"{path}: not a readable image ({detail})") from None
    return image


def _from_pil(im: Image.Image, where: str) -> Tensor:
    mode = im.mode
    if mode in ("I", "F"):
        kind = "32-bit integer" if mode == "I" else "floating-point"
        raise DataError(f"{where}: {kind} pixels (PIL mode {mode}) have no 8-bit RGB reading")
    try:
        if mode in _SIXTEEN_BIT_MODES:
            return _from_hwc(np.asarray(im), where)
        rgb = np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise DataError(f"{where}: cannot convert the PIL image to RGB ({e})") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def _to_rgb(chw: Tensor, where: str, layout: str) -> Tensor:
    """``[C, H, W]`` (C = 1, 3 or 4) to ``[3, H, W]``: gray repeated, alpha dropped."""
    channels = chw.shape[0]
    if channels == 1:
        return chw.expand(3, -1, -1).contiguous()
    if channels in (3, 4):
        return chw[:3].contiguous()
    raise DataError(f"{where}: {channels} channels in {layout}; expected 1, 3 or 4")


def _from_hwc(array: np.ndarray, where: str) -> Tensor:
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise DataError(
            f"{where}: a numpy array of shape {array.shape}; expected [H, W] or [H, W, C]"
        )
    if array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise DataError(
            f"{where}: a numpy array of {array.dtype}; expected uint8 (or uint16) pixels"
        )
    chw = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    return _to_rgb(chw, where, f"an array {tuple(array.shape)} [H, W, C]").clone()


def _from_chw(tensor: Tensor, where: str) -> Tensor:
    t = tensor.detach().cpu()
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3:
        raise DataError(
            f"{where}: a tensor of shape {tuple(t.shape)}; expected [C, H, W] (C = 1, 3 or 4)"
        )
    if t.dtype == torch.uint8:
        pass
    elif t.dtype == torch.uint16:
        t = (t.to(torch.int32) >> 8).to(torch.uint8)
    elif t.is_floating_point():
        t = _float_pixels(t, where)
    else:
        raise DataError(
            f"{where}: a tensor of {t.dtype}; expected uint8, uint16 or float in [0, 255]"
        )
    return _to_rgb(t, where, f"a tensor {tuple(t.shape)} [C, H, W]").clone()


def _float_pixels(t: Tensor, where: str) -> Tensor:
    x = t.float()
    if x.numel():
        if not bool(torch.isfinite(x).all()):
            raise DataError(f"{where}: a float tensor with NaN or infinite values")
        low, high = float(x.min()), float(x.max())
        if low < 0 or high > 255:
            raise DataError(
                f"{where}: float pixel values must lie in [0, 255]; got {low:g} to {high:g}"
            )
        if high <= 1 and bool((x != x.round()).any()):
            raise DataError(
                f"{where}: float pixel values lie in [0, 1]; fdet takes floats in [0, 255] "
                "(multiply by 255)"
            )
    return x.round().to(torch.uint8)
