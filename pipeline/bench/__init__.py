"""Benchmarks (`make bench`) and the committed CV comparison reports (`make reports`)."""
import shutil
from pathlib import Path

from pipeline.core import layout
from pipeline.core.config import ExperimentConfig, load_competition
from pipeline.core.splits import write_folds
from pipeline.datasets import digits
from pipeline.training.kfold import train_experiment

CONFIGS = Path("configs/digits")


def experiment_configs() -> list[Path]:
    """The digits demo's experiment configs: every YAML but competition, ensemble and search
    spaces (`<exp>.tune.yaml`)."""
    return [p for p in sorted(CONFIGS.glob("*.yaml"))
            if p.stem not in ("competition", "ensemble") and not p.name.endswith(".tune.yaml")]


def ensure_demo_inputs() -> None:
    """The digits competition folder and its fold file, built where missing."""
    digits.build()
    if not layout.folds_file("digits").is_file():
        write_folds(load_competition(CONFIGS / "competition.yaml"))


def train_afresh(cfg: ExperimentConfig) -> dict:
    """Train every fold from scratch, so every number a report shows comes from this run."""
    shutil.rmtree(layout.Run.of(cfg.name, cfg.experiment).dir, ignore_errors=True)
    return train_experiment(cfg)
