"""Images out of the pipeline: uint8 pixels, PNG bytes, a PNG grid on disk, and the one PNG note.

The note (the PNG's "var-ssg" text chunk) is written by one function for generate.py and the
server alike, so the same request gives the same PNG from either (README "Serving")."""
from __future__ import annotations

import io
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from var_ssg.common.files import atomic_path


def to_uint8(images: np.ndarray) -> np.ndarray:
    """B 3 H W float32 in [0, 1] -> B H W 3 uint8 (float32 arithmetic, ties to even)."""
    x = np.clip(np.asarray(images, dtype=np.float32), 0, 1) * np.float32(255)
    return np.ascontiguousarray(np.round(x).astype(np.uint8).transpose(0, 2, 3, 1))


def _png_info(note: str):
    from PIL import PngImagePlugin
    meta = PngImagePlugin.PngInfo()
    if note:
        meta.add_text("var-ssg", note)
    return meta


def png_bytes(image: np.ndarray, note: str = "") -> bytes:
    """One image (3 H W in [0, 1]) as PNG bytes; `note` goes into a tEXt chunk ("var-ssg")."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(to_uint8(image[None])[0]).save(buf, format="PNG", pnginfo=_png_info(note))
    return buf.getvalue()


def save_grid(images: np.ndarray, path: str, note: str = "") -> None:
    """Save a PNG grid (up to 8 per row) atomically; `note` goes into a tEXt chunk."""
    from PIL import Image
    arr = to_uint8(images)
    B, H, W, _ = arr.shape
    cols = min(B, 8)
    rows = (B + cols - 1) // cols
    grid = np.zeros((rows * H, cols * W, 3), dtype=np.uint8)
    for i in range(B):
        r, c = divmod(i, cols)
        grid[r * H:(r + 1) * H, c * W:(c + 1) * W] = arr[i]
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG", pnginfo=_png_info(note))


def png_note(model: str, backend: str, classes: Sequence[int], seed: int, *, guidance: float,
             ssg: Union[str, Tuple[float, ...]], top_k: Optional[int], top_p: float, temperature: float,
             transform: str, more_smooth: bool, source: str) -> str:
    """The PNG's text chunk: what made the image (classes with seeds seed, seed+1, ...) and where
    the weights came from. One class reads `class=C seed=S`, several `classes=[..] seeds=S..E`."""
    beta = ssg if isinstance(ssg, str) else ",".join(f"{b:g}" for b in ssg)
    who = (f"class={classes[0]} seed={seed}" if len(classes) == 1
           else f"classes={list(classes)} seeds={seed}..{seed + len(classes) - 1}")
    smooth = " more_smooth" if more_smooth else ""
    return (f"{model} backend={backend} {who} cfg={guidance} top_k={top_k} top_p={top_p} T={temperature} "
            f"ssg={beta} dse={transform}{smooth}; {source}")
