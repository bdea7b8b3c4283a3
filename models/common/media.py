"""Images and videos in and out, the way the models see them: float32 [3, T, H, W] in [-1, 1].

Reading follows the official LaVin-DiT preprocessing (specs/lavin_dit.md §4): RGB, bicubic resize (Pillow, skipped
when the image already has the size), uint8 -> ``x / 255`` -> ``(x - 0.5) * 2``. A medium is an image file (T = 1),
a folder of frame images (name order) or a video file (PyAV). Writing rounds back to uint8; videos go to MP4
(H.264 through PyAV) or to a folder of PNG frames, which keeps exact pixel values.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
PathLike = Union[str, os.PathLike]


def check_size(size) -> Optional[tuple[int, int]]:
    """None, or (H, W) from an int or a pair of positive ints; anything else is a ValueError."""
    if size is None:
        return None
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (int(size), int(size))
    if (not isinstance(size, Sequence) or len(size) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in size)):
        raise ValueError(f"'size' must be None, an int or a pair (H, W) of positive ints, got {size!r}")
    return int(size[0]), int(size[1])


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] (or an image [3, H, W]) in [-1, 1] -> uint8 [T, H, W, 3], rounded."""
    x = x.detach().float().cpu()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    u = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return u.permute(1, 2, 3, 0).contiguous().numpy()


def _to_tensor(frames: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 [H, W, 3] frames -> float32 [3, T, H, W] in [-1, 1], the official way."""
    x = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float() / 255
    return ((x - 0.5) * 2).contiguous()


def _image(img: Image.Image, size: Optional[tuple[int, int]]) -> np.ndarray:
    img = img.convert("RGB")
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def _av(path: Path, what: str):
    try:
        import av
    except ImportError as e:
        raise ImportError(f"{what}: the video {path} needs PyAV (pip install av)") from e
    return av


def is_medium(path: PathLike) -> bool:
    """Whether ``path`` is something :func:`load_media` reads: an image or video file, or a frame folder."""
    p = Path(path)
    if p.is_dir():
        return any(q.suffix.lower() in FRAME_SUFFIXES for q in p.iterdir())
    return p.is_file() and p.suffix.lower() in FRAME_SUFFIXES + VIDEO_SUFFIXES


def load_media(path: PathLike, size=None) -> torch.Tensor:
    """An image file (T = 1), a folder of frame images (name order) or a video file -> float32 [3, T, H, W] in
    [-1, 1], resized to ``size`` = (H, W) when given."""
    path, size = Path(path), check_size(size)
    if path.is_dir():
        names = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not names:
            raise ValueError(f"load_media: frame folder {path} holds no images")
        frames = []
        for p in names:
            with Image.open(p) as img:
                frames.append(_image(img, size))
    elif path.suffix.lower() in VIDEO_SUFFIXES:
        av = _av(path, "load_media")
        with av.open(str(path)) as container:
            frames = [_image(f.to_image(), size) for f in container.decode(video=0)]
        if not frames:
            raise ValueError(f"load_media: video {path} has no frames")
    elif path.is_file():
        with Image.open(path) as img:
            frames = [_image(img, size)]
    else:
        raise FileNotFoundError(f"load_media: {path} does not exist")
    if len({f.shape for f in frames}) != 1:
        raise ValueError(f"load_media: frames of {path} differ in size; pass 'size' to resize them")
    return _to_tensor(frames)


def write_video(path: PathLike, frames: np.ndarray, fps: int = 8) -> Path:
    """Write uint8 frames [T, H, W, 3] (H, W even) as an H.264 MP4 (yuv420p, near-lossless crf 10); returns the
    path. Lossy: keep PNG frames where exact pixels matter."""
    path = Path(path)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"write_video: 'frames' must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    T, H, W, _ = frames.shape
    if T < 1 or H % 2 or W % 2:
        raise ValueError(f"write_video: need T >= 1 and even H, W (4:2:0 chroma), got T={T}, H={H}, W={W}")
    av = _av(path, "write_video")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        if stream.codec_context.name == "libx264":
            stream.options = {"crf": "10"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
