"""The experiments and ensembles an experiment learns from (`pseudo.source`,
`distill.teacher`): which kind each is, and their identity, part of the learner's run tag (a
retrained source retrains its learners)."""
from __future__ import annotations

from pipeline.core import layout
from pipeline.core.artifacts import text_hash
from pipeline.core.config import ExperimentConfig, read_yaml
from pipeline.core.errors import UserError


def is_ensemble(comp: str, name: str) -> bool:
    path = layout.config_file(comp, name)
    if not path.is_file():
        raise UserError(f"{path}: not found (named by pseudo.source or distill.teacher)")
    return "experiments" in read_yaml(path)


def identity(cfg: ExperimentConfig) -> str:
    """The sources' state as a hash: their scores.json (an ensemble's weights.json), and the
    pseudo-label source's test predictions (new test images relabel the test rows)."""
    parts = []
    for name in cfg.sources:
        run = layout.Run.of(cfg.name, name)
        needed = [run.weights if is_ensemble(cfg.name, name) else run.scores]
        if cfg.pseudo and name == cfg.pseudo.source:
            needed.append(run.test)
        for path in needed:
            if not path.is_file():
                raise UserError(f"{path}: not found; {cfg.experiment} learns from {name}: build "
                                f"it first (make ensemble or make predict COMP={cfg.name})")
            parts.append(path.read_text())
    return text_hash("\n".join(parts))
