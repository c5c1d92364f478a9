"""Image decoding to uint8 RGB and the resized uint8 cache shared by folds, epochs and experiments."""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from pipeline.artifacts import atomic_path
from pipeline.errors import UserError


def to_uint8_rgb(img: Image.Image, channels: int = 3) -> np.ndarray:
    """Any PIL mode (L, P, RGBA, CMYK, I;16, I, F, ...) -> HxWxC uint8."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    target = "L" if channels == 1 else "RGB"
    arr = np.asarray(img.convert(target), dtype=np.uint8)
    return arr[:, :, None] if channels == 1 else arr


def decode(path: str | os.PathLike, channels: int = 3) -> np.ndarray:
    """Decode an image file; a corrupt, truncated or empty file raises a UserError naming it."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_uint8_rgb(img, channels)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UserError(f"{path}: cannot decode image ({err})") from None


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """Square resize; area interpolation when shrinking, bicubic when enlarging."""
    h, w = img.shape[:2]
    interp = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_CUBIC
    out = cv2.resize(img, (size, size), interpolation=interp)
    return out[:, :, None] if out.ndim == 2 else out


def cache_key(paths: list[str], size: int, channels: int) -> str:
    """Changes whenever a path, its size or modification time, the side or channels change."""
    h = hashlib.sha256(f"{size}:{channels}".encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def image_cache(paths: list[str], size: int, channels: int, cache_dir: str | os.PathLike) -> np.ndarray:
    """N x size x size x C uint8 array of the decoded, resized images (memory-mapped, built once)."""
    path = Path(cache_dir) / f"{cache_key(paths, size, channels)}_{size}px.npy"
    if path.is_file():
        return np.load(path, mmap_mode="r")
    with atomic_path(path) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                        shape=(len(paths), size, size, channels))
        for i, p in enumerate(tqdm(paths, desc=f"cache {size}px", file=sys.stderr,
                                   leave=False, mininterval=1.0)):
            arr[i] = resize(decode(p, channels), size)
        arr.flush()
        del arr
    return np.load(path, mmap_mode="r")
