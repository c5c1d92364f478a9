"""Atomic artifact writing: temp file in the same folder, then rename."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # not POSIX: no inter-process locks (file_lock runs unlocked)
    fcntl = None

import numpy as np
import pandas as pd

from pipeline.core.errors import UserError


def umask() -> int:
    """The process's file-creation mask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it over `path` only on success. The file
    gets the mode any new file gets (mkstemp's private 0600 would keep it from the other users
    or machines sharing the folder)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise UserError(f"{path.parent}: output folder is not writable ({err.strerror})") from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        tmp.chmod(0o666 & ~umask())  # after writing: some writers (safetensors) make a new file
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Holds an exclusive lock on `<path>.lock` (fcntl.flock: released by the kernel if the
    holder dies), so one process at a time builds or updates `path`. Where no lock file can be
    made or locked (not POSIX, a file system without locks), runs unlocked: writes are atomic
    renames, so the result is still one whole file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_name(path.name + ".lock"), "a")
    except OSError:
        lock = None
    try:
        if lock is not None and fcntl is not None:
            with contextlib.suppress(OSError):  # e.g. a file system without locks
                fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        if lock is not None:
            lock.close()  # releases the lock


CSV_FLOAT = "%.8g"


def write_csv(df: pd.DataFrame, path: str | os.PathLike,
              float_format: str | None = CSV_FLOAT) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format=float_format)


def as_written(values: np.ndarray) -> np.ndarray:
    """A float array as the next stage reads it back from `write_csv`'s file: written with
    CSV_FLOAT, parsed by pandas. Code that hands values on in memory (infer) rounds through
    this, so it computes with the very numbers the file-based stages do."""
    text = pd.DataFrame(np.asarray(values)).to_csv(index=False, float_format=CSV_FLOAT)
    return pd.read_csv(io.StringIO(text)).to_numpy(np.float64)


def write_json(obj, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text(text: str, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read a MiB at a time (weights files can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_hash(path: str | os.PathLike) -> str:
    """Short sha256 of a file's bytes."""
    return sha256(path)[:16]


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
