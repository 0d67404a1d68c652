"""Video files through PyAV (``pip install 'fdet[video]'``): frames in, annotated frames out.

PyAV is imported when a video is first opened, so fdet works without it for images.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from jaxtyping import UInt8
from torch import Tensor

from fdet.data.coco import DataError

__all__ = ["VideoInfo", "VideoWriter", "read_frames", "video_info"]

_CODECS = ("libx264", "h264", "mpeg4")  # H.264 where the build has an encoder, else MPEG-4


def _av(path: str | os.PathLike[str]) -> Any:
    try:
        import av
    except ImportError:
        raise DataError(
            f"{path}: reading and writing videos needs PyAV: pip install 'fdet[video]'"
        ) from None
    return av


class VideoInfo:
    """What a video's first video stream says of itself: frames a second and, when the
    container records it, the frame count (0 when unknown)."""

    def __init__(self, fps: Fraction, frames: int) -> None:
        self.fps = fps
        self.frames = frames


def video_info(path: str | os.PathLike[str]) -> VideoInfo:
    """The frame rate and frame count of ``path``; a :class:`DataError` naming it when it is
    not a readable video."""
    av = _av(path)
    try:
        with av.open(os.fspath(path)) as container:
            stream = _video_stream(container, path)
            rate = stream.average_rate or stream.guessed_rate or Fraction(25)
            return VideoInfo(Fraction(rate), int(stream.frames or 0))
    except (av.error.FFmpegError, OSError) as e:
        raise DataError(f"{path}: not a readable video ({_reason(e)})") from None


def read_frames(path: str | os.PathLike[str]) -> Iterator[UInt8[Tensor, "3 H W"]]:
    """The frames of the first video stream of ``path``, decoded to uint8 RGB ``[3, H, W]``,
    in order. A file that cannot be opened or decoded is a :class:`DataError` naming it."""
    av = _av(path)
    try:
        container = av.open(os.fspath(path))
    except (av.error.FFmpegError, OSError) as e:
        raise DataError(f"{path}: not a readable video ({_reason(e)})") from None
    with container:
        stream = _video_stream(container, path)
        index = 0
        try:
            for frame in container.decode(stream):
                rgb = frame.to_ndarray(format="rgb24")  # [H, W, 3]
                yield torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
                index += 1
        except (av.error.FFmpegError, OSError) as e:
            raise DataError(f"{path}: frame {index} cannot be decoded ({_reason(e)})") from None


def _video_stream(container: Any, path: str | os.PathLike[str]) -> Any:
    if not container.streams.video:
        raise DataError(f"{path}: holds no video stream")
    return container.streams.video[0]


def _reason(error: BaseException) -> str:
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


class VideoWriter:
    """An MP4 file written a frame at a time (uint8 RGB ``[3, H, W]``, all of one size; odd
    sides are cropped by one pixel, which the encoder's 4:2:0 sampling needs)::

        with VideoWriter("out.mp4", fps=Fraction(30)) as writer:
            for frame in frames:
                writer.write(frame)
    """

    def __init__(self, path: str | os.PathLike[str], *, fps: Fraction | float) -> None:
        self.path = Path(path)
        self.fps = Fraction(fps).limit_denominator(1001)
        self._av = _av(path)
        self._container: Any = None
        self._stream: Any = None
        self.frames = 0

    def __enter__(self) -> VideoWriter:
        return self

    def _open(self, height: int, width: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = self._av.open(os.fspath(self.path), mode="w")
        for codec in _CODECS:
            try:
                stream = self._container.add_stream(codec, rate=self.fps)
                break
            except (self._av.error.FFmpegError, ValueError):
                continue
        else:
            raise DataError(f"{self.path}: this PyAV has no H.264 or MPEG-4 encoder")
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        self._stream = stream

    def write(self, frame: UInt8[Tensor, "3 H W"]) -> None:
        """Append one frame."""
        height, width = (int(frame.shape[-2]) // 2) * 2, (int(frame.shape[-1]) // 2) * 2
        if self._stream is None:
            self._open(max(height, 2), max(width, 2))
        rgb = frame[:, :height, :width].permute(1, 2, 0).contiguous().cpu().numpy()
        if rgb.shape[:2] != (self._stream.height, self._stream.width):
            raise ValueError(
                f"{self.path}: frame {self.frames} is {rgb.shape[0]}x{rgb.shape[1]}, the video "
                f"{self._stream.height}x{self._stream.width}"
            )
        video_frame = self._av.VideoFrame.from_ndarray(rgb, format="rgb24")
        for packet in self._stream.encode(video_frame):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        """Flush the encoder and close the file (nothing is written without a frame)."""
        if self._container is None:
            return
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        self._container = None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
