"""Images in and out of JSON: base64 PNG for an image, base64 animated GIF for a video, a base64 input image read."""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

__all__ = ["decode_image", "encode_output", "png_b64"]


def png_b64(picture: Any) -> str:
    """A PIL image (or an HxWxC array in [0, 1]) as base64 PNG; the same pixels give the same bytes."""
    buffer = io.BytesIO()
    _picture(picture).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def gif_b64(frames: Any, frame_ms: int = 125) -> str:
    """A video's frames as a base64 animated GIF (looping)."""
    pictures = [_picture(f) for f in frames]
    buffer = io.BytesIO()
    pictures[0].save(buffer, format="GIF", save_all=True, append_images=pictures[1:], duration=frame_ms, loop=0)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def encode_output(item: Any, video: bool) -> dict[str, Any]:
    """One image's response entry: ``b64_json`` (PNG), or for a video an animated GIF and the frames as PNGs."""
    if not video:
        return {"b64_json": png_b64(item)}
    return {"b64_json": gif_b64(item), "frames_b64_json": [png_b64(f) for f in item]}


def decode_image(text: str) -> Any:
    """A base64 PNG or JPEG (optionally a ``data:image/...;base64,`` URL) as an RGB PIL image.

    Raises:
        ValueError: not base64, or not an image PIL reads.
    """
    from PIL import Image, UnidentifiedImageError

    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
        return Image.open(io.BytesIO(data)).convert("RGB")
    except (binascii.Error, UnidentifiedImageError, OSError) as error:
        raise ValueError(f"image is not a base64 PNG or JPEG ({error})") from None


def _picture(item: Any) -> Any:
    from PIL import Image

    if isinstance(item, Image.Image):
        return item
    import numpy as np
    import torch

    if isinstance(item, torch.Tensor):
        item = item.detach().float().cpu().permute(1, 2, 0).numpy()
    array = np.asarray(item)
    return Image.fromarray((np.clip(array, 0, 1) * 255).round().astype("uint8"))
