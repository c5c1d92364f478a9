"""What built a run: code (git commit, dirty tree, a hash of the pipeline's source), package
versions, host, device and precision. Written to runs/<comp>/<exp>/provenance.json."""
from __future__ import annotations

import functools
import hashlib
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path

CODE = Path(__file__).resolve().parents[1]  # the pipeline package
PACKAGES = ("torch", "timm", "albumentations", "optuna")


@functools.lru_cache(maxsize=None)
def code_hash(folder: Path = CODE) -> str:
    """Hash of every .py file under `folder` (names and bytes): changes with the code. Read once
    per process: the code this process runs (the leaderboard asks once per row)."""
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*.py")):
        h.update(f"{path.relative_to(folder)}\n".encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def git_state(folder: Path = CODE) -> dict:
    """{commit, dirty}: HEAD of the repository holding `folder`, and whether `folder` has
    uncommitted changes (untracked files included); None values outside a git checkout."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--", ".") if commit else None
    return dict(commit=commit, dirty=None if status is None else bool(status))


def versions() -> dict:
    """python and the packages that shape a run's numbers."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def collect(device: str = "cpu", precision: str = "fp32", processes: int = 1) -> dict:
    """The provenance record of a run started now on `device` (its description, e.g.
    "cuda:0 (NVIDIA H200)") at `precision`, in `processes` torchrun processes."""
    return dict(**git_state(), code_hash=code_hash(), versions=versions(),
                host=socket.gethostname(), platform=platform.platform(),
                device=device, precision=precision, processes=processes)


def code_changed(record: dict) -> str | None:
    """Why a run's recorded code differs from the code here, or None when it is the same."""
    if record.get("code_hash") != code_hash():
        return f"code changed since {(record.get('commit') or 'unknown')[:8]}"
    if record.get("dirty"):
        return f"built from uncommitted code on {(record.get('commit') or 'unknown')[:8]}"
    return None
