"""An inference package's manifest: the sha256 and size of every file and the library
versions it was built with; verified before any file of the package is used."""
from __future__ import annotations

import json
import platform
from pathlib import Path

import albumentations
import numpy as np
import timm
import torch

from pipeline.core import layout, provenance
from pipeline.core.artifacts import sha256
from pipeline.core.errors import UserError


def versions() -> dict[str, str]:
    return dict(python=platform.python_version(), torch=torch.__version__,
                timm=timm.__version__, albumentations=albumentations.__version__,
                numpy=np.__version__)


def manifest(root: Path, created: dict) -> dict:
    """Every file under `root` (but the manifest) with its sha256 and size, the library
    versions, and the hash of the code the package's wheel holds."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != layout.Package.MANIFEST)
    return dict(files={p.relative_to(root).as_posix(): dict(sha256=sha256(p), bytes=p.stat().st_size)
                       for p in files},
                versions=versions(), created=created, code_hash=provenance.code_hash())


def verify(pkg: layout.Package) -> dict:
    """The manifest, once every file it lists is present with its recorded sha256 and the code
    running is the code the package was built with."""
    path = pkg.manifest
    if not path.is_file():
        raise UserError(f"{path}: not found; PACKAGE must be a folder written by `make package`")
    try:
        listed = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err}); rebuild the package") from None
    for name, entry in listed["files"].items():
        file = pkg.dir / name
        if not file.is_file():
            raise UserError(f"{file}: missing from the package (listed in {path.name}); "
                            f"upload the whole package folder")
        if file.stat().st_size != entry["bytes"] or sha256(file) != entry["sha256"]:
            raise UserError(f"{file}: differs from the sha256 in {path.name} (changed or "
                            f"corrupt); rebuild the package with `make package`")
    if listed["code_hash"] != provenance.code_hash():
        wheel = next((n for n in listed["files"] if n.endswith(".whl")), "its wheel")
        raise UserError(f"{pkg.dir}: built with pipeline code {listed['code_hash']}, but the code "
                        f"running is {provenance.code_hash()}; install the package's own: pip "
                        f"install --no-index --no-deps --force-reinstall {pkg.dir / wheel}")
    return listed
