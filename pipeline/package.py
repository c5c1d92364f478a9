"""Stage 6: a self-contained inference package for a code competition -> packages/<comp>/.

Holds all that `python -m pipeline.infer` needs and nothing else: each blended experiment's
fold weights (`--half`: float16, half the size, loaded back as float32) and resolved
settings (model, input, the TTA views its predict stage chose), the blend's experiments,
weights and mode, the task, classes in order and submission format, a wheel of this
project's code, and manifest.json with every file's sha256 and the library versions used.
Built in a temporary folder and renamed into place, so a finished package is only ever
replaced by a complete one.
"""
from __future__ import annotations

import datetime
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import albumentations
import numpy as np
import timm
import torch

from pipeline import inference, predict
from pipeline.artifacts import sha256, write_json
from pipeline.competition import Competition, load_competition_data
from pipeline.config import EnsembleConfig, load_ensemble, load_experiment
from pipeline.errors import UserError, cli, stage_args
from pipeline.train import prepare

MANIFEST, PACKAGE, BLEND, SETTINGS = "manifest.json", "package.json", "blend.json", "settings.json"
SOURCE = Path(__file__).resolve().parents[1]  # the project: pyproject.toml and pipeline/


def versions() -> dict[str, str]:
    return dict(python=platform.python_version(), torch=torch.__version__,
                timm=timm.__version__, albumentations=albumentations.__version__,
                numpy=np.__version__)


def manifest(root: Path, created: dict) -> dict:
    """Every file under `root` (but the manifest) with its sha256 and size."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
    return dict(files={p.relative_to(root).as_posix(): dict(sha256=sha256(p), bytes=p.stat().st_size)
                       for p in files},
                versions=versions(), created=created)


def build_wheel(dest: Path) -> Path:
    """A wheel of this project's `pipeline` package (no tests, no dependencies) in `dest`."""
    if not (SOURCE / "pyproject.toml").is_file():
        raise UserError(f"{SOURCE}: no pyproject.toml; package from the project's source tree")
    with tempfile.TemporaryDirectory() as work:
        shutil.copy(SOURCE / "pyproject.toml", work)
        shutil.copytree(SOURCE / "pipeline", Path(work) / "pipeline",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                               "--no-build-isolation", "--quiet", "--wheel-dir", str(dest), work],
                              capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise UserError(f"building the project wheel failed: {last}")
    return next(dest.glob("*.whl"))


def chosen_views(cfg, scores: dict, path: Path) -> str:
    """The view set the experiment's predict stage chose, refusing one predicted with other TTA."""
    views = scores.get("tta_views")
    if views is None or scores.get("tta_merge") != cfg.tta.merge or \
            cfg.tta.views not in ("auto", views):
        raise UserError(f"{path}: not predicted with the experiment's current TTA settings; "
                        f"run `make predict COMP={cfg.name}`")
    return views


def add_experiment(config: Path, root: Path, half: bool) -> int:
    """The experiment's settings and fold weights under `root`; returns its number of folds."""
    s = prepare(load_experiment(config))
    scores = predict.read_scores(s)
    views = chosen_views(s.cfg, scores, s.cfg.run_dir / "scores.json")
    settings = predict.settings(s, [views])
    n_folds = s.cfg.folds.n_splits
    for k in range(n_folds):
        inference.save_weights(s.cfg.run_dir / f"fold{k}" / "best.safetensors",
                               root / f"fold{k}.safetensors", half)
    write_json(dict(settings.to_json(), folds=n_folds, weights="float16" if half else "float32"),
               root / SETTINGS)
    return n_folds


def describe(cfg: EnsembleConfig, comp: Competition, thresholds: dict | None = None) -> dict:
    """package.json: what the submission needs besides the predictions (the task, the
    ensemble's decision thresholds, the format)."""
    fmt = comp.submission
    return dict(name=cfg.name, task=cfg.task, classes=list(comp.classes),
                task_spec=comp.task.to_json(), thresholds=thresholds,
                image_suffix=cfg.data.image_suffix,
                submission=dict(id_column=fmt.id_column, kind=fmt.kind, columns=list(fmt.columns),
                                positive_class=fmt.positive_class,
                                binary_columns=fmt.binary_columns))


def read_blend(cfg: EnsembleConfig) -> dict:
    path = cfg.run_dir / "weights.json"
    if not path.is_file():
        raise UserError(f"{path}: not found; run `make ensemble COMP={cfg.name}` first")
    result = json.loads(path.read_text())
    names = result["experiments"]
    return dict(experiments=names, weights=[result["weights"][n] for n in names],
                mode=result["mode"], thresholds=result.get("thresholds"))


def build(cfg: EnsembleConfig, config_dir: Path, out: Path, half: bool) -> Path:
    """Write the package to `out`, atomically: built beside it, then renamed into place."""
    blend = read_blend(cfg)
    comp = load_competition_data(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would keep the package from others on upload hosts
    try:
        folds = {name: add_experiment(config_dir / f"{name}.yaml", tmp / name, half)
                 for name in blend["experiments"]}
        chosen = blend.pop("thresholds")
        write_json(dict(blend, folds=folds), tmp / BLEND)
        write_json(describe(cfg, comp, chosen), tmp / PACKAGE)
        build_wheel(tmp)
        created = dict(utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       competition=cfg.name, half=half)
        write_json(manifest(tmp, created), tmp / MANIFEST)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
            print(f"{out}: replaced the previous package", file=sys.stderr)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _options(parser) -> None:
    parser.add_argument("--half", action="store_true", help="store the weights in float16")
    parser.add_argument("--out", help="package folder (default packages/<comp>)")


@cli
def main(argv: list[str] | None = None) -> None:
    args = stage_args(argv, __doc__, "configs/<comp>/ensemble.yaml", _options)
    cfg = load_ensemble(args.config, args.overrides)
    out = build(cfg, Path(args.config).parent, Path(args.out or f"packages/{cfg.name}"), args.half)
    print(f"wrote {out}: {size(out) / 1e6:.2f} MB ({'float16' if args.half else 'float32'} "
          f"weights)", file=sys.stderr)


if __name__ == "__main__":
    main()
