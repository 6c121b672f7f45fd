"""Encoding decoded pixels into the bytes a client receives (PNG images, H.264 MP4 videos).

Runs inside the decode role so that only compressed media leave the worker (a decoded 480p Wan clip
is ~100 MB of uint8 frames). Both encoders are deterministic for equal input: PNG through Pillow
with no metadata; MP4 through the ffmpeg binary shipped by imageio-ffmpeg with a single encoder
thread and the bitexact flags (no encoder version string, no timestamps in the container).
"""

from __future__ import annotations

import io
import os
import tempfile

import numpy as np
import torch

VIDEO_FPS = 16  # Wan2.1 is trained on 16 fps clips
MP4_CRF = 18  # visually near-lossless; the bits are what bit-exactness tests compare


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[..., 3, H, W] floats in [0, 1] -> [..., H, W, 3] uint8, rounded the way diffusers' PIL path does."""
    x = pixels.detach().to("cpu", torch.float32)
    x = (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return x.movedim(-3, -1).contiguous().numpy()


def encode_png(image: torch.Tensor) -> bytes:
    """One image [3, H, W] in [0, 1] -> PNG bytes."""
    from PIL import Image

    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image [3, H, W], got {tuple(image.shape)}")
    buf = io.BytesIO()
    Image.fromarray(to_uint8(image), mode="RGB").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def encode_mp4(video: torch.Tensor, fps: int = VIDEO_FPS) -> bytes:
    """One video [F, 3, H, W] in [0, 1] -> H.264 (yuv420p) MP4 bytes."""
    import imageio_ffmpeg

    if video.dim() != 4 or video.shape[1] != 3:
        raise ValueError(f"expected a video [F, 3, H, W], got {tuple(video.shape)}")
    frames = to_uint8(video)
    n, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs even sides, got {h}x{w}")
    fd, path = tempfile.mkstemp(suffix=".mp4", prefix="diffdisagg-")
    os.close(fd)
    try:
        writer = imageio_ffmpeg.write_frames(
            path,
            (w, h),
            fps=fps,
            codec="libx264",
            pix_fmt_in="rgb24",
            pix_fmt_out="yuv420p",
            macro_block_size=1,
            ffmpeg_log_level="error",
            ffmpeg_timeout=120,
            output_params=[
                "-crf",
                str(MP4_CRF),
                "-preset",
                "medium",
                "-threads",
                "1",
                "-fflags",
                "+bitexact",
                "-flags:v",
                "+bitexact",
                "-map_metadata",
                "-1",
                "-movflags",
                "+faststart",
            ],
        )
        writer.send(None)  # start the generator: ffmpeg begins reading frames
        for i in range(n):
            writer.send(frames[i])
        writer.close()
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)
