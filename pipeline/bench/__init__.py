"""Benchmarks (`make bench`) and the committed CV comparison reports (`make reports`)."""
import shutil
from pathlib import Path

from pipeline import demo, folds, train
from pipeline.config import ExperimentConfig

CONFIGS = Path("configs/digits")


def experiment_configs() -> list[Path]:
    """The digits demo's experiment configs: every YAML but competition, ensemble and search
    spaces (`<exp>.tune.yaml`)."""
    return [p for p in sorted(CONFIGS.glob("*.yaml"))
            if p.stem not in ("competition", "ensemble") and not p.name.endswith(".tune.yaml")]


def ensure_demo_inputs() -> None:
    """The digits competition folder and its fold file, built where missing."""
    demo.build()
    if not folds.folds_path("digits").is_file():
        folds.main([str(CONFIGS / "competition.yaml")])


def train_afresh(cfg: ExperimentConfig) -> dict:
    """Train every fold from scratch, so every number a report shows comes from this run."""
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    return train.run(cfg)
