"""Building an inference package from an ensemble's runs (`make package`): each blended
experiment's test models' weights (its folds', its refits'; `half`: float16, loaded back as
float32) and prediction spec (model, input, the TTA views its predict stage chose), the
blend, the task, classes and submission format, a wheel of this project's code, and the
manifest. Built in a temporary folder and renamed into place, so a finished package is only
ever replaced by a complete one.
"""
from __future__ import annotations

import datetime
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline.core import layout, provenance
from pipeline.core.artifacts import umask, write_json
from pipeline.core.competition import Competition, load_competition_data
from pipeline.core.config import EnsembleConfig, load_experiment
from pipeline.core.errors import UserError
from pipeline.models.predictor import save_weights
from pipeline.packaging.manifest import manifest
from pipeline.training.experiment import Experiment, prepare
from pipeline.training.prediction import candidate_view_sets

SOURCE = Path(__file__).resolve().parents[2]  # the project: pyproject.toml and pipeline/


def build_wheel(dest: Path) -> Path:
    """A wheel of this project's `pipeline` package (no tests, no dependencies) in `dest`,
    versioned by the code's hash (`0.1.0+<hash>`), so pip never keeps other code as already
    satisfied."""
    if not (SOURCE / "pyproject.toml").is_file():
        raise UserError(f"{SOURCE}: no pyproject.toml; package from the project's source tree")
    with tempfile.TemporaryDirectory() as work:
        project = (SOURCE / "pyproject.toml").read_text()
        version = re.search(r'^version = "([^"+]+)"', project, re.M).group(1)
        (Path(work) / "pyproject.toml").write_text(project.replace(
            f'version = "{version}"', f'version = "{version}+{provenance.code_hash()}"', 1))
        shutil.copytree(SOURCE / "pipeline", Path(work) / "pipeline",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                               "--no-build-isolation", "--quiet", "--wheel-dir", str(dest), work],
                              capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise UserError(f"building the project wheel failed: {last}")
    return next(dest.glob("*.whl"))


def chosen_views(exp: Experiment, scores: dict) -> str:
    """The view set the experiment's predict stage chose, refusing one predicted with other TTA."""
    views, cfg = scores.get("tta_views"), exp.cfg
    if views is None or scores.get("tta_merge") != cfg.tta.merge or \
            views not in candidate_view_sets(cfg, exp.side):
        raise UserError(f"{exp.run.scores}: not predicted with the experiment's current TTA "
                        f"settings; run `make predict COMP={cfg.name}`")
    return views


def add_experiment(config: Path, pkg: layout.Package, half: bool) -> None:
    """The experiment's prediction spec and test models (its folds', its refits') in the
    package."""
    exp = prepare(load_experiment(config))
    views = chosen_views(exp, exp.trained_scores())
    models = exp.test_checkpoints()
    for model, path in models.items():
        save_weights(path, pkg.weights(exp.cfg.experiment, model), half)
    write_json(dict(exp.predict_spec([views]).to_json(), models=list(models),
                    weights="float16" if half else "float32"), pkg.settings(exp.cfg.experiment))


def describe(cfg: EnsembleConfig, comp: Competition, thresholds: dict | None = None) -> dict:
    """package.json: what the submission needs besides the predictions (the task, the
    ensemble's decision thresholds, the format)."""
    return dict(name=cfg.name, task=cfg.task, classes=list(comp.classes),
                task_spec=comp.task.to_json(), thresholds=thresholds,
                image_suffix=cfg.data.image_suffix, submission=comp.submission.to_json())


def read_blend(cfg: EnsembleConfig) -> dict:
    path = layout.Run.of(cfg.name, cfg.experiment).weights
    if not path.is_file():
        raise UserError(f"{path}: not found; run `make ensemble COMP={cfg.name}` first")
    result = json.loads(path.read_text())
    names = result["experiments"]
    return dict(experiments=names, weights=[result["weights"][n] for n in names],
                mode=result["mode"], stack=result.get("stack"), thresholds=result.get("thresholds"))


def build(cfg: EnsembleConfig, config_dir: Path, out: Path, half: bool) -> Path:
    """Write the package to `out`, atomically: built beside it, then renamed into place."""
    blend = read_blend(cfg)
    comp = load_competition_data(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp.chmod(0o777 & ~umask())  # mkdtemp's 0700 would keep the package from others
    pkg = layout.Package(tmp)
    try:
        for name in blend["experiments"]:
            add_experiment(config_dir / f"{name}.yaml", pkg, half)
        chosen = blend.pop("thresholds")
        write_json(blend, pkg.blend)
        write_json(describe(cfg, comp, chosen), pkg.meta)
        build_wheel(tmp)
        created = dict(utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       competition=cfg.name, half=half)
        write_json(manifest(tmp, created), pkg.manifest)
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
