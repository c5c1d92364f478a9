"""Image decoding to uint8 and the resized uint8 cache shared by folds, epochs and experiments.

The cache is one memory-mapped `.npy` per image set and side: `N x side x side x C` uint8,
decoded and resized once. Its name carries a hash of the paths and a hash of their sizes and
modification times, so a changed image makes a new cache and the stale one is removed.

Processes that need the same cache (the ranks of a torchrun, trainings of separate folds) share
one build: the first takes a file lock next to the cache (`<cache>.lock`) and builds it, the
others wait on the lock (not at a collective, which would time out) and then read it.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from pipeline.core.artifacts import atomic_path, file_lock, write_json
from pipeline.core.errors import UserError

HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float images -> 8-bit L, scaled by their nominal range."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        hi = 65535.0
    elif img.mode == "F" and arr.size and arr.max() <= 1.0:
        hi = 1.0
    else:
        hi = 65535.0 if arr.size and arr.max() > 255 else 255.0
    return Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")


def to_uint8(img: Image.Image, channels: int = 3) -> np.ndarray:
    """Any PIL mode (1, L, P, RGB, RGBA, LA, PA, CMYK, YCbCr, I;16, I, F...) -> H x W x channels uint8.

    Transparent pixels are composited onto white; `channels=1` gives the luminance.
    """
    if img.mode in HIGH_DEPTH:
        img = _to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    arr = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    return arr[:, :, None] if channels == 1 else arr


def decode(path: str | os.PathLike, channels: int = 3) -> np.ndarray:
    """Decode an image file (EXIF orientation applied); a corrupt file raises a UserError naming it."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_uint8(ImageOps.exif_transpose(img), channels)
    except DECODE_ERRORS as err:
        raise UserError(f"{path}: cannot decode image ({type(err).__name__}: {err})") from None


def resize(img: np.ndarray, side: int) -> np.ndarray:
    """Square resize (aspect not kept); area interpolation when shrinking, bicubic when enlarging."""
    h, w = img.shape[:2]
    if (h, w) == (side, side):
        return img
    interp = cv2.INTER_AREA if side < min(h, w) else cv2.INTER_CUBIC
    out = cv2.resize(img, (side, side), interpolation=interp)
    return out[:, :, None] if out.ndim == 2 else out


def _hash(parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(f"{part}\n".encode())
    return h.hexdigest()[:16]


def set_key(paths: list[str]) -> str:
    """Names the image set (which files, in which order)."""
    return _hash(paths)


def state_key(paths: list[str]) -> str:
    """Changes whenever a file's size or modification time changes."""
    stats = (os.stat(p) for p in paths)
    return _hash(f"{s.st_size}:{s.st_mtime_ns}" for s in stats)


def cache_path(paths: list[str], side: int, channels: int, cache_dir: str | os.PathLike) -> Path:
    return Path(cache_dir) / f"{set_key(paths)}-{state_key(paths)}_{side}px_{channels}c.npy"


def _workers() -> int:
    return min(8, os.cpu_count() or 1)


def _remove_stale(path: Path, pattern: str) -> None:
    for old in path.parent.glob(pattern):
        if old != path:
            old.unlink(missing_ok=True)


def image_cache(paths: list[str], side: int, channels: int, cache_dir: str | os.PathLike) -> np.ndarray:
    """N x side x side x channels uint8 array of the decoded, resized images (memory-mapped).

    Built once per image set, side and channel count (by one process: the others wait for
    it, `file_lock`); reused by every fold, epoch and experiment; rebuilt (and the stale file
    removed) when any image file changes.
    """
    path = cache_path(paths, side, channels, cache_dir)
    if not path.is_file():
        with file_lock(path):
            if not path.is_file():  # another process may have built it while this one waited
                _build_cache(paths, side, channels, path)
    return np.load(path, mmap_mode="r")


def _build_cache(paths: list[str], side: int, channels: int, path: Path) -> None:
    with atomic_path(path) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                        shape=(len(paths), side, side, channels))

        def load(i: int) -> None:
            arr[i] = resize(decode(paths[i], channels), side)

        with ThreadPoolExecutor(_workers()) as pool:  # PIL and cv2 release the GIL
            for _ in tqdm(pool.map(load, range(len(paths))), total=len(paths),
                          desc=f"cache {side}px", file=sys.stderr, leave=False, mininterval=1.0,
                          disable=None):  # no bar when stderr is not a terminal (logs)
                pass
        arr.flush()
        del arr
    stale = f"{set_key(paths)}-*_{side}px_{channels}c.npy"
    _remove_stale(path, stale)
    _remove_stale(path.with_name(path.name + ".lock"), stale + ".lock")


def _problem(path: str) -> str | None:
    try:
        decode(path)
    except UserError as err:
        return str(err)
    return None


def undecodable(paths: list[str], cache_dir: str | os.PathLike) -> dict[str, str]:
    """{path: reason} for the files that cannot be decoded; remembered per image-set state
    (checked by one process: the others wait for it, `file_lock`)."""
    if not paths:
        return {}
    record = Path(cache_dir) / f"{set_key(paths)}-{state_key(paths)}_bad.json"
    if not record.is_file():
        with file_lock(record):
            if not record.is_file():
                _check_decodable(paths, record)
    return json.loads(record.read_text())


def _check_decodable(paths: list[str], record: Path) -> None:
    with ThreadPoolExecutor(_workers()) as pool:
        problems = dict(zip(paths, pool.map(_problem, paths)))
    write_json({p: msg for p, msg in problems.items() if msg is not None}, record)
    stale = f"{set_key(paths)}-*_bad.json"
    _remove_stale(record, stale)
    _remove_stale(record.with_name(record.name + ".lock"), stale + ".lock")
