"""Writing generated clips to files: ``export_to_video`` (H.264 mp4 through PyAV) and ``export_to_gif`` (PIL).

    from moezoo.pipelines import export_to_video, export_to_gif
    export_to_video(out.frames[0], "clip.mp4", fps=8)   # frames [F, H, W, C] in [0, 1]
    export_to_gif(out.frames[0], "clip.gif", fps=8)

The mp4 is what browsers play: H.264 (libx264) in yuv420p with the index at the front (``+faststart``).
yuv420p stores colour at half resolution, so frames with an odd side get one replicated row / column.
Tiny clips (32x32) are best exported with ``scale=`` (nearest-neighbour upscaling): browsers otherwise blur
them when they enlarge them, and the chroma subsampling smears 1-pixel colour edges.
Both writers write a temporary file beside the target and move it into place, so a file at ``path`` is
always complete. Each writes one format and refuses a path whose extension names another (``.mp4`` for
``export_to_video``, ``.gif`` for ``export_to_gif``; any case), so a file's name never lies about its content.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from moezoo.zoo.hub import atomic_path

__all__ = ["export_to_video", "export_to_gif", "frames_to_uint8"]


def frames_to_uint8(frames) -> np.ndarray:
    """One clip as uint8 RGB [F, H, W, 3].

    Accepts: a numpy array [F, H, W, C] (float in [0, 1] or uint8; C = 1 or 3), a torch tensor
    [F, C, H, W] in [0, 1] (the pipelines' ``output_type="pt"`` for one clip), or a list of PIL images.
    """
    if isinstance(frames, (list, tuple)):
        if not frames or not all(isinstance(f, Image.Image) for f in frames):
            raise ValueError("a list of frames must be a non-empty list of PIL images")
        array = np.stack([np.asarray(f.convert("RGB")) for f in frames])
    elif isinstance(frames, torch.Tensor):
        if frames.dim() != 4:
            raise ValueError(f"a torch clip must be [F, C, H, W], got shape {tuple(frames.shape)}; "
                             "for a batch [B, F, C, H, W] export each clip")
        array = frames.detach().float().permute(0, 2, 3, 1).cpu().numpy()
    elif isinstance(frames, np.ndarray):
        array = frames
    else:
        raise TypeError(f"frames must be a numpy array, a torch tensor or a list of PIL images, "
                        f"got {type(frames).__name__}")
    if array.ndim != 4 or array.shape[-1] not in (1, 3) or 0 in array.shape:
        raise ValueError(f"one clip must be [F, H, W, C] with C = 1 or 3 and no empty axis, got shape "
                         f"{array.shape}; for a batch [B, F, H, W, C] export each clip")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise TypeError(f"frames must be uint8 or float in [0, 1], got {array.dtype}")
        array = np.round(np.clip(array, 0.0, 1.0) * 255).astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array)


def _upscale(frames_FHWC: np.ndarray, scale: int) -> np.ndarray:
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    if scale == 1:
        return frames_FHWC
    return frames_FHWC.repeat(scale, axis=1).repeat(scale, axis=2)


def _checked_fps(fps) -> Fraction:
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    return Fraction(fps).limit_denominator(1001)


VIDEO_SUFFIXES = (".mp4",)
GIF_SUFFIXES = (".gif",)


def _checked_target(path, suffixes: tuple[str, ...], writes: str, other: str) -> Path:
    """``path`` as a Path if its extension is one of ``suffixes`` (any case), else a ValueError that says what
    the writer writes (``writes``), which extensions it accepts and which writer to use instead (``other``)."""
    target = Path(path)
    if target.suffix.lower() not in suffixes:
        raise ValueError(f"{writes}: the path must end in {' or '.join(suffixes)}, got {str(target)!r}; {other}")
    return target


def export_to_video(frames, path: str | os.PathLike, fps: float = 8, scale: int = 1, crf: int = 18) -> str:
    """Write one clip as an H.264 mp4 that browsers play; returns the path.

    Args:
        frames: one clip, see :func:`frames_to_uint8` (numpy [F, H, W, C] in [0, 1] / uint8, torch
            [F, C, H, W], or a list of PIL images).
        path: the output file, ending in ``.mp4`` (its folder is created).
        fps: frames per second.
        scale: integer nearest-neighbour upscaling before encoding (e.g. 8 for 32x32 clips).
        crf: libx264 constant rate factor (0 lossless .. 51 worst; 18 looks lossless).
    """
    import av

    target = _checked_target(path, VIDEO_SUFFIXES, "export_to_video writes H.264 MP4 files",
                             "for a GIF use export_to_gif")
    rate = _checked_fps(fps)
    if not isinstance(crf, int) or not 0 <= crf <= 51:
        raise ValueError(f"crf must be an integer in [0, 51], got {crf!r}")
    array = _upscale(frames_to_uint8(frames), scale)
    # yuv420p needs even sides: replicate the last row / column where a side is odd.
    pad_h, pad_w = array.shape[1] % 2, array.shape[2] % 2
    if pad_h or pad_w:
        array = np.pad(array, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    with atomic_path(target) as tmp:
        with av.open(str(tmp), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream("libx264", rate=rate)
            stream.width, stream.height = array.shape[2], array.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf), "preset": "medium"}
            for frame in array:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():  # flush the encoder's delayed frames
                container.mux(packet)
    return str(target)


def export_to_gif(frames, path: str | os.PathLike, fps: float = 8, scale: int = 1, loop: int = 0) -> str:
    """Write one clip as an animated GIF (PIL, adaptive palette per frame); returns the path.

    Args:
        frames: one clip, as for :func:`export_to_video`.
        path: the output file, ending in ``.gif`` (its folder is created).
        fps: frames per second (GIF stores per-frame durations in 10 ms steps).
        scale: integer nearest-neighbour upscaling.
        loop: how many times to loop (0: forever).
    """
    target = _checked_target(path, GIF_SUFFIXES, "export_to_gif writes GIF files", "for an MP4 use export_to_video")
    rate = _checked_fps(fps)
    images = [Image.fromarray(frame) for frame in _upscale(frames_to_uint8(frames), scale)]
    with atomic_path(target) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], loop=loop,
                       duration=round(1000 / float(rate)), disposal=1, optimize=False)
    return str(target)
