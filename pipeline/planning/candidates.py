"""The candidate models of the auto mode (candidates.yaml beside this file) and the experiment
YAML each becomes; `configs/<comp>/auto.yaml` (optional) adapts them to one competition."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from pipeline.core.config import ExperimentConfig, Strict, deep_merge, read_yaml
from pipeline.core.errors import UserError
from pipeline.models.pretrained import check_pretrained

CANDIDATES = Path(__file__).with_name("candidates.yaml")


class Epochs(Strict):
    min: int = Field(ge=1)
    good: int = Field(ge=1)
    max: int = Field(ge=1)


class Candidate(Strict):
    name: str
    devices: list[str] = Field(min_length=1)
    sizes: list[int] = Field(min_length=1)
    epochs: Epochs
    prior: float = Field(gt=0, le=1)
    config: dict[str, Any]

    @property
    def pretrained(self) -> bool:
        return bool(self.config.get("model", {}).get("pretrained"))


class AutoSettings(Strict):
    """configs/<comp>/auto.yaml: `experiment`: keys merged into every experiment the auto mode
    writes (e.g. `augment: {hflip: false}` for images that are not mirror-symmetric);
    `candidates`: only these candidates (default: all of candidates.yaml)."""

    experiment: dict[str, Any] = {}
    candidates: list[str] | None = None


def settings_file(competition_path: str | Path) -> Path:
    return Path(competition_path).with_name("auto.yaml")


def load_settings(competition_path: str | Path) -> AutoSettings:
    path = settings_file(competition_path)
    if not path.is_file():
        return AutoSettings()
    try:
        return AutoSettings(**read_yaml(path))
    except ValidationError as err:
        first = err.errors()[0]
        raise UserError(f"{path}: {'.'.join(map(str, first['loc']))}: "
                        f"{'unknown key' if first['type'] == 'extra_forbidden' else first['msg']}"
                        ) from None


def load_candidates(path: Path = CANDIDATES, only: list[str] | None = None) -> list[Candidate]:
    raw = read_yaml(path)
    unknown = sorted(set(only or []) - set(raw))
    if unknown:
        raise UserError(f"auto.yaml: candidates: {unknown[0]!r} is not in {path} "
                        f"(it has: {', '.join(raw)})")
    return [Candidate(name=name, **entry) for name, entry in raw.items()
            if only is None or name in only]


def unavailable(candidate: Candidate, device_type: str) -> str | None:
    """Why `candidate` cannot run here, or None: not for this device, or its weights missing."""
    if device_type not in candidate.devices:
        return f"not a {device_type} candidate (devices: {', '.join(candidate.devices)})"
    model = ExperimentConfig.model_fields["model"].annotation(**candidate.config["model"])
    try:
        check_pretrained(model)
    except UserError as e:
        return f"cannot load: {e}"
    return None


@dataclass(frozen=True)
class Choice:
    """One planned experiment: a candidate at an image size, for some epochs, with its TTA
    candidates (views: auto chooses among them under nested CV) and whether it refits."""

    candidate: str
    size: int
    epochs: int
    views: tuple[str, ...] = ("none",)
    refit: bool = False
    why: str = ""
    notes: tuple[str, ...] = field(default=())
    seed: int = 0  # the candidate's member number: 0 for its first, seed offset of the others

    @property
    def name(self) -> str:
        return f"auto-{self.candidate}-{self.size}" + (f"-s{self.seed}" if self.seed else "")


def experiment_keys(candidate: Candidate, choice: Choice, settings: AutoSettings,
                    seed: int = 0) -> dict:
    """The experiment YAML's keys: the candidate's config, the competition's auto settings, and
    the choice's size, epochs, TTA and refit (a candidate's later members: `seed` + their
    number). Every fold keeps its last epoch (train.keep: last): nothing is chosen on a fold's
    validation rows."""
    keys = deep_merge(candidate.config, settings.experiment)
    keys = deep_merge(keys, {
        "image_size": choice.size,
        "train": {"epochs": choice.epochs, "keep": "last"},
        "tta": ({"views": "auto", "candidates": list(choice.views)} if len(choice.views) > 1
                else {"views": "none"}),
    })
    if choice.refit:
        keys["refit"] = {"seeds": [0]}
    if choice.seed:
        keys["seed"] = seed + choice.seed
    return {"competition": "competition.yaml", **keys}


def experiment_yaml(candidate: Candidate, choice: Choice, settings: AutoSettings,
                    seed: int = 0) -> str:
    """The experiment file: a header saying why it was chosen, then its keys."""
    why = [f"# Written by `make auto` (pipeline.planning): {choice.why}"] + \
          [f"# {note}" for note in choice.notes] + \
          ["# An ordinary experiment: edit it and `make all` retrains it; the next `make auto` "
           "leaves a config it did not write alone."]
    return "\n".join(why) + "\n" + yaml.safe_dump(
        experiment_keys(candidate, choice, settings, seed), sort_keys=False)
