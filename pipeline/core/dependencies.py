"""What make cannot read from file names: the runs a config needs before its own.

An ensemble needs its members predicted (their test.csv); an experiment learning from others
(`pseudo.source`, `distill.teacher`) needs each source finished: an experiment predicted, an
ensemble blended (its weights.json). `makefile` writes these as prerequisites for make
(runs/<comp>/deps.mk); a cycle is refused.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.core import layout
from pipeline.core.config import EnsembleConfig, ExperimentConfig
from pipeline.core.errors import UserError

Config = ExperimentConfig | EnsembleConfig


def needs(cfg: Config) -> list[str]:
    """The configs `cfg`'s run needs built first."""
    return list(cfg.experiments) if isinstance(cfg, EnsembleConfig) else cfg.sources


def check_acyclic(configs: dict[str, Config], folder: Path) -> None:
    """Refuse a config that needs itself, through any chain of members and sources."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            chain = " -> ".join(path[path.index(name):] + [name])
            raise UserError(f"{folder / (name + '.yaml')}: needs its own results: {chain}")
        if name in done or name not in configs:
            return
        for other in needs(configs[name]):
            visit(other, path + [name])
        done.add(name)

    for name in configs:
        visit(name, [])


def finished_file(comp: str, name: str, configs: dict[str, Config]) -> Path:
    """The file that says `name`'s run is done: an ensemble's weights.json, an experiment's
    test.csv (its predict stage)."""
    run = layout.Run.of(comp, name)
    return run.weights if isinstance(configs[name], EnsembleConfig) else run.test


def makefile(comp: str, configs: dict[str, Config]) -> str:
    """make's prerequisites: each ensemble's weights.json on its members, each learner's
    oof.csv on its sources."""
    lines = [f"# generated from configs/{comp}/ by `python -m pipeline.folds --deps`: "
             f"the runs each run needs first"]
    for name, cfg in sorted(configs.items()):
        target = finished_file(comp, name, configs) if isinstance(cfg, EnsembleConfig) \
            else layout.Run.of(comp, name).oof
        prerequisites = [str(finished_file(comp, n, configs)) for n in needs(cfg) if n in configs]
        if prerequisites:
            lines.append(f"{target}: {' '.join(prerequisites)}")
    return "\n".join(lines) + "\n"
