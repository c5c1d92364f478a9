"""An experiment's search space: dot paths (`finetune.stages[1].epochs`) to ranges or choices,
checked against the experiment's config model before the first trial."""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import optuna
from pydantic import ValidationError

from pipeline.core.config import ExperimentConfig, RangeSpec
from pipeline.core.errors import UserError

SEGMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)$")
FIXED = {"tune", "name", "experiment"}  # what a trial may not change


class SpaceError(UserError):
    """A search-space key that cannot be tuned as given; `key` names it."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Param:
    """One searched key: an int or float range, or categorical choices."""

    path: str
    type: str  # int, float or categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()


def split_path(path: str) -> list[str | int]:
    """`finetune.stages[1].epochs` -> ['finetune', 'stages', 1, 'epochs']."""
    parts: list[str | int] = []
    for segment in path.split("."):
        match = SEGMENT.match(segment)
        if not match:
            raise UserError(f"tune.space: {path!r} is not a dot path such as train.lr or "
                            f"finetune.stages[1].epochs")
        parts.append(match.group(1))
        parts += [int(i) for i in re.findall(r"\d+", match.group(2))]
    return parts


def set_value(data: dict, parts: list[str | int], value: Any, source: dict | None = None) -> dict:
    """A copy of `data` with the key at `parts` set to `value`. A missing section is taken from
    `source` (the same path there) when it has one, else made empty; list items must exist."""
    data = copy.deepcopy(data)
    node, src = data, source
    for i, part in enumerate(parts[:-1]):
        where = _join(parts[:i + 1])
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise UserError(f"tune.space: {where}: no such item in the experiment's config")
        elif not isinstance(node, dict):
            raise UserError(f"tune.space: {_join(parts[:i])} is not a section")
        elif part not in node:
            found = src.get(part) if isinstance(src, dict) else None
            node[part] = copy.deepcopy(found) if isinstance(found, (dict, list)) else {}
        node = node[part]
        src = _child(src, part)
    last = parts[-1]
    if isinstance(last, int) and (not isinstance(node, list) or last >= len(node)):
        raise UserError(f"tune.space: {_join(parts)}: no such item in the experiment's config")
    if isinstance(last, str) and not isinstance(node, dict):
        raise UserError(f"tune.space: {_join(parts[:-1])} is not a section")
    node[last] = value
    return data


def _child(node: Any, part: str | int) -> Any:
    if isinstance(part, int):
        return node[part] if isinstance(node, list) and part < len(node) else None
    return node.get(part) if isinstance(node, dict) else None


def _join(parts: list[str | int]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")


def get_value(cfg: ExperimentConfig, parts: list[str | int]) -> Any:
    node: Any = cfg
    for part in parts:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def _try(base: dict, path: str, parts: list, role: str, value: Any) -> ExperimentConfig:
    """The experiment with `value` at `parts`; a one-line UserError when it does not validate."""
    try:
        return ExperimentConfig.model_validate(set_value(base, parts, value))
    except ValidationError as err:
        first = err.errors()[0]
        if first["type"] == "extra_forbidden":
            raise UserError(f"tune.space: {path}: unknown key "
                            f"{'.'.join(map(str, first['loc']))}") from None
        raise UserError(f"tune.space: {path}: {role} {value!r} does not fit this key "
                        f"({first['msg']})") from None


def parse_space(data: dict) -> list[Param]:
    """The search space of experiment `data` (config.experiment_data's keys, with a validated
    `tune` section): each key resolved against the config model and each bound or choice
    validated in place, so an unknown path or a value outside the key's type stops here with
    a SpaceError naming the key."""
    space = ExperimentConfig.model_validate(data).tune.space
    base = {k: v for k, v in data.items() if k != "tune"}
    params = []
    for path, spec in space.items():
        try:
            params.append(_param(base, path, spec))
        except UserError as err:
            raise SpaceError(path, str(err)) from None
    return params


def _param(base: dict, path: str, spec: RangeSpec | list) -> Param:
    parts = split_path(path)
    if parts[0] in FIXED:
        raise UserError(f"tune.space: {path}: {parts[0]} cannot be tuned")
    if isinstance(spec, RangeSpec):
        return _range(base, path, parts, spec)
    if not spec or len(set(map(repr, spec))) != len(spec):
        raise UserError(f"tune.space: {path}: give one or more distinct choices")
    for choice in spec:
        _try(base, path, parts, "choice", choice)
    return Param(path, "categorical", choices=tuple(spec))


def _range(base: dict, path: str, parts: list, spec: RangeSpec) -> Param:
    if not spec.low < spec.high:
        raise UserError(f"tune.space: {path}: low ({spec.low}) must be below high ({spec.high})")
    value = get_value(_try(base, path, parts, "low", spec.low), parts)
    _try(base, path, parts, "high", spec.high)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"tune.space: {path}: a range needs a numeric key; "
                        f"give a list of choices instead")
    type_ = "int" if isinstance(value, int) else "float"
    if type_ == "int" and not all(float(v).is_integer() for v in (spec.low, spec.high,
                                                                  spec.step or 1)):
        raise UserError(f"tune.space: {path}: an integer key needs integer low, high and step")
    if spec.log and spec.step is not None:
        raise UserError(f"tune.space: {path}: use log or step, not both")
    if spec.log and spec.low <= 0:
        raise UserError(f"tune.space: {path}: a log range needs low > 0")
    if type_ == "int":
        return Param(path, type_, int(spec.low), int(spec.high), spec.log, int(spec.step or 1))
    return Param(path, type_, float(spec.low), float(spec.high), spec.log,
                 None if spec.step is None else float(spec.step))


def suggest(trial: optuna.Trial, p: Param) -> Any:
    """The trial's value for `p` (optuna's distributions: uniform, log-uniform, stepped)."""
    if p.type == "int":
        return trial.suggest_int(p.path, p.low, p.high, step=p.step, log=p.log)
    if p.type == "float":
        return trial.suggest_float(p.path, p.low, p.high, step=p.step, log=p.log)
    return trial.suggest_categorical(p.path, list(p.choices))


def with_values(data: dict, values: dict[str, Any]) -> dict:
    """Experiment `data` (less its `tune` section) with each dot path set to its value."""
    out = {k: v for k, v in data.items() if k != "tune"}
    for path, value in values.items():
        out = set_value(out, split_path(path), value)
    return out


def fits(p: Param, value: Any) -> bool:
    """Could a trial draw `value` for `p`?"""
    if p.type == "categorical":
        return any(value == c and isinstance(value, bool) == isinstance(c, bool)
                   for c in p.choices)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if not p.low <= value <= p.high:
        return False
    return p.step is None or abs((value - p.low) / p.step - round((value - p.low) / p.step)) < 1e-9


def _sets(data: dict, parts: list[str | int]) -> bool:
    """Does experiment `data` set the key at `parts` (rather than leave it to its default)?"""
    node: Any = data
    for part in parts:
        if isinstance(part, int) and isinstance(node, list) and part < len(node):
            node = node[part]
        elif isinstance(part, str) and isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return False
    return True


def base_values(data: dict, space: list[Param]) -> dict[str, Any]:
    """The experiment's own value of every searched key it sets that a trial could draw: the
    base trial's parameters. Other keys keep the experiment's values unsearched (a default set
    explicitly can mean something else: an explicit `train.epochs` rescales the stages)."""
    cfg = ExperimentConfig.model_validate({k: v for k, v in data.items() if k != "tune"})
    own = {p.path: get_value(cfg, split_path(p.path)) for p in space
           if _sets(data, split_path(p.path))}
    return {p.path: own[p.path] for p in space if p.path in own and fits(p, own[p.path])}
