"""Typed, validated configs loaded from YAML with `key=value` dot-path overrides.

An experiment file names its competition file (`competition: competition.yaml`) and
overrides only what differs; the two are deep-merged and validated as one structure.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.core import metrics, tasks
from pipeline.core.artifacts import text_hash
from pipeline.core.errors import UserError

TaskKind = Literal[tasks.KINDS]
ViewSet = Literal["none", "hflip", "five_crop", "ten_crop", "dihedral8", "multiscale"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Strict):
    root: str
    train_csv: str = "train.csv"
    train_images: str = "train"
    test_images: str = "test"
    sample_submission: str = "sample_submission.csv"
    id_column: str = "id"
    target_column: str = "label"
    target_columns: list[str] | None = Field(None, min_length=1)  # multilabel: a 0/1 column each
    target_prefix: str | None = Field(None, min_length=1)  # multilabel: the 0/1 columns' prefix
    label_separator: str = Field(" ", min_length=1)  # multilabel: between labels in one column
    group_column: str | None = None
    image_suffix: str = ""
    channels: Literal[1, 3] = 3
    on_bad_image: Literal["error", "skip"] = "error"
    cache_dir: str = "cache"
    # train ids dropped before folds: a list, or a CSV with an `id` column (e.g. a run's
    # label_noise.csv), relative to the competition config's folder
    exclude: Union[list[Union[str, int]], str, None] = None

    def path(self, name: str) -> Path:
        return Path(self.root) / getattr(self, name)


class FoldsConfig(Strict):
    n_splits: int = Field(5, ge=2)
    method: Literal["auto", "kfold", "stratified", "group", "stratified_group"] = "auto"


class SubmissionConfig(Strict):
    format: Literal["auto", "label", "proba", "binary_proba", "labels", "columns",
                    "value"] = "auto"
    positive_class: str | None = None
    allow_untrained_columns: bool = False  # a sample column no train row has: predicted "never"


Device = Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")]


class NamedMetric(Strict):
    """A registered metric with options: `{name: samples_f1, zero_division: 1}` (see
    pipeline.core.metrics)."""

    name: str
    zero_division: Literal[0, 1] = 0  # F1 of a row or label with no true and no predicted labels


class UserMetric(Strict):
    """A metric function in a file of the competition's config folder, called as
    `function(ids, truth, predictions)` (see pipeline.core.metrics)."""

    file: str
    function: str
    direction: Literal["maximize", "minimize"]


class CompetitionConfig(Strict):
    name: str
    data: DataConfig
    device: Device = "auto"  # where tensors run; not part of a run's identity (pipeline.runtime)
    task: TaskKind = "multiclass"
    metric: Union[str, NamedMetric, UserMetric] = "accuracy"  # a name in metrics.REGISTRY
    folds: FoldsConfig = FoldsConfig()
    image_size: int = Field(224, ge=8)
    seed: int = 42
    submission: SubmissionConfig = SubmissionConfig()

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric):
        name = metrics.base(metric)
        if name is not None and name not in metrics.REGISTRY:
            raise ValueError(metrics.unknown(name))
        if isinstance(metric, NamedMetric) and metric.zero_division and \
                name not in metrics.F1_METRICS:
            raise ValueError(f"zero_division is an F1 option; {name} has none")
        return metric


class ModelConfig(Strict):
    backbone: str
    pretrained: Union[bool, str] = False
    drop_rate: float = Field(0.0, ge=0, lt=1)
    drop_path_rate: float = Field(0.0, ge=0, lt=1)  # stochastic depth (timm's DropPath)
    crop_pct: float | None = Field(None, gt=0, le=1)


class StageConfig(Strict):
    """One fine-tuning stage: its epochs and what trains: `head`, `all`, or an integer k,
    the top k layer groups (the head counts as one)."""

    epochs: int = Field(ge=1)
    train: Union[Literal["head", "all"], int] = "all"


class FinetuneConfig(Strict):
    """Progressive unfreezing (pipeline.models.finetune): `stages`, or `policy: auto` to choose them
    from the training-set size; each group's rate is the one above's / `lr_decay` (for a
    randomly initialised model only when set explicitly)."""

    policy: Literal["manual", "auto"] = "manual"
    stages: list[StageConfig] | None = None
    lr_decay: float = Field(2.6, ge=1)
    layer_decay: float | None = Field(None, gt=0, le=1)
    bn: Literal["frozen", "train"] = "frozen"
    schedule: Literal["cosine", "onecycle"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)


class AverageConfig(Strict):
    """Checkpoint averaging (pipeline.training.averaging): the weights of the `last` k epochs
    (SWA-like), of the `best` k by validation score, or a `greedy` soup of the best k (each
    added while the validation score does not drop); BatchNorm statistics recomputed."""

    checkpoints: int = Field(ge=2)
    of: Literal["last", "best", "greedy"] = "last"


class TrainConfig(Strict):
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    loss: Literal["auto", "mse", "huber", "bce"] = "auto"  # regression / ordinal; auto: mse
    class_weights: Literal["none", "balanced"] = "none"  # multiclass cross-entropy weights
    pos_weight: Literal["none", "balanced"] = "none"  # BCE positive weights (binary, multilabel)
    grad_clip: float | None = Field(5.0, gt=0)
    ema_decay: float | None = Field(None, gt=0, lt=1)
    patience: int | None = Field(None, ge=1)
    num_workers: int = Field(0, ge=0)  # 0: a background thread if a core is free, else the main one
    eval_batch_size: int = Field(256, ge=1)
    channels_last: bool = False  # NHWC model and inputs: faster for some models (`make bench`)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16/fp16 on GPU, fp32 on CPU
    accumulate: int = Field(1, ge=1)  # micro-batches per optimizer step
    compile: bool = False  # torch.compile the model
    sync_bn: bool = False  # SyncBatchNorm across GPUs under torchrun
    deterministic: bool = False  # torch's deterministic algorithms on GPU (slower)
    augment_on: Literal["auto", "loader", "device"] = "auto"  # auto: the device when it is a GPU
    average: AverageConfig | None = None  # checkpoint averaging at the end of each fold
    # best: the epoch (or average) scoring best on the fold's validation rows; last: the last
    # epoch's weights, no choice made on those rows (a fold model blind to its fold's labels)
    keep: Literal["best", "last"] = "best"

    @field_validator("keep")
    @classmethod
    def _keep_last_chooses_nothing(cls, keep, info):
        average = info.data.get("average")
        if keep == "last" and info.data.get("patience"):
            raise ValueError("last keeps the last epoch; train.patience would choose when to "
                             "stop on the validation rows: remove one")
        if keep == "last" and average is not None and average.of != "last":
            raise ValueError(f"last keeps the last epochs; train.average.of {average.of} "
                             f"chooses epochs on the validation rows: use of: last")
        return keep


class AugmentConfig(Strict):
    preset: Literal["none", "light", "medium", "heavy"] = "light"
    hflip: bool = True
    vflip: bool = False
    custom: list[dict[str, Any]] | None = None
    mixup_alpha: float = Field(0.0, ge=0)
    cutmix_alpha: float = Field(0.0, ge=0)
    mix_prob: float = Field(1.0, ge=0, le=1)
    switch_prob: float = Field(0.5, ge=0, le=1)


class TTAConfig(Strict):
    views: Union[ViewSet, Literal["auto"]] = "none"
    candidates: list[ViewSet] = Field(["none", "hflip", "five_crop", "ten_crop", "dihedral8",
                                       "multiscale"], min_length=1)
    merge: Literal["mean", "geometric"] = "mean"
    max_batch: int | None = Field(None, ge=1)  # views per forward pass; None: train.eval_batch_size


Scalar = Union[None, bool, int, float, str]


class RangeSpec(Strict):
    """A numeric search range: `{low, high}`, optionally `log: true` or a `step`."""

    low: Union[int, float]
    high: Union[int, float]
    log: bool = False
    step: Union[int, float, None] = Field(None, gt=0)


class TuneConfig(Strict):
    """`make tune` (pipeline.tune): `space` maps dot paths of this experiment's keys to a range
    or a list of choices; trials count completed and pruned ones. `folds`: the folds tuned on
    ("all" for full CV). `storage`: an optuna database URL or `journal:<file>` (default: SQLite
    in the run folder). `keep`: what a finished trial's folder keeps (logs: no checkpoints)."""

    space: dict[str, Union[RangeSpec, list[Scalar]]] = Field(min_length=1)
    trials: int = Field(20, ge=1)
    folds: Union[list[int], Literal["all"]] = Field([0], min_length=1)
    sampler: Literal["tpe", "random"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    startup_trials: int = Field(5, ge=0)  # trials that finish before the pruner judges any
    min_epochs: int = Field(3, ge=1)  # epochs a trial trains before it can be pruned
    storage: str | None = None
    keep: Literal["none", "logs", "all"] = "logs"


class PseudoConfig(Strict):
    """Pseudo-labelled test rows (pipeline.training.teacher): fold k learns them from the
    `source`'s fold-k models only (an experiment or ensemble of this competition), so its CV
    stays honest. `labels`: the source's probabilities (soft) or its decisions (hard);
    `confidence`: test rows whose prediction is at least this sure; `share`: of those, this
    share (seeded); `weight`: a pseudo-labelled row's loss weight; `rounds` > 1: each round
    relabels with this experiment's own fold-k model of the round before."""

    source: str
    labels: Literal["soft", "hard"] = "soft"
    confidence: float = Field(0.0, ge=0, le=1)
    share: float = Field(1.0, gt=0, le=1)
    weight: float = Field(1.0, gt=0)
    rounds: int = Field(1, ge=1)


class DistillConfig(Strict):
    """A student learning the `teacher`'s predictions (an experiment or ensemble): each train
    row's target is `alpha` x the teacher's fold-k prediction + (1 - alpha) x its label, from
    the teacher's fold-k models (never the held-out fold's labels). With `pseudo`, the test rows
    too."""

    teacher: str
    alpha: float = Field(1.0, ge=0, le=1)


class RefitConfig(Strict):
    """Full-data refit after the k-fold run: one model per seed on every train row, the epochs
    of each stage taken from the folds' best epochs; its test predictions `join` the fold
    models' or `replace` them. It has no OOF: the run's CV stays the k-fold models'."""

    seeds: list[int] = Field([0], min_length=1)
    use: Literal["join", "replace"] = "join"


class ExperimentConfig(CompetitionConfig):
    experiment: str
    model: ModelConfig
    finetune: FinetuneConfig = FinetuneConfig()
    train: TrainConfig = TrainConfig()
    augment: AugmentConfig = AugmentConfig()
    tta: TTAConfig = TTAConfig()
    pseudo: PseudoConfig | None = None
    distill: DistillConfig | None = None
    refit: RefitConfig | None = None
    tune: TuneConfig | None = Field(None, exclude=True)  # no part of the run's tag or dumps

    @field_validator("refit")
    @classmethod
    def _refit_not_a_student(cls, refit, info):
        if refit is not None and info.data.get("distill") is not None:
            raise ValueError("a student (distill) has no refit: its teacher's targets for the "
                             "train rows come from fold models, and no teacher covers every row")
        return refit

    @property
    def sources(self) -> list[str]:
        """The experiments and ensembles this one learns from (pseudo-labels, a teacher)."""
        named = [self.pseudo.source if self.pseudo else None,
                 self.distill.teacher if self.distill else None]
        return list(dict.fromkeys(n for n in named if n))


class EnsembleConfig(CompetitionConfig):
    """`mode: tune` searches the blend mode as an optuna categorical; `mode: stack` fits the
    task's meta-model on the members' OOF instead (pipeline.blending.stack); `trials` is per
    study (nested CV tunes one more study per fold); `storage`: an optuna database URL holding
    a persistent study that several workers may share (default: a fresh study each run)."""

    experiment: str = "ensemble"
    experiments: list[str] = Field(min_length=1)
    trials: int = Field(200, ge=1)
    mode: Literal["mean", "geometric", "rank", "tune", "stack"] = "mean"
    nested_cv: bool = True
    fallback_to_equal: bool = True
    storage: str | None = None


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: invalid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of keys at the top level")
    return data


def deep_merge(base: dict, update: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides; values are parsed as YAML scalars, never as code."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r}: expected key=value, e.g. train.epochs=3")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"override {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw else ""
    return data


def _check_task(cfg: CompetitionConfig, source: Path) -> None:
    """The metric, TTA merge and blend mode fit the task; a user metric's file and function
    exist (nothing evaluated)."""
    task = tasks.of(cfg.task)
    labels = cfg.data.target_columns is not None or cfg.data.target_prefix is not None
    if labels and not task.reads_label_columns:
        key = "target_columns" if cfg.data.target_columns is not None else "target_prefix"
        raise UserError(f"{source}: data.{key}: 0/1 label columns are for task multilabel; task "
                        f"is {cfg.task} (its labels are in data.target_column)")
    if isinstance(cfg.metric, UserMetric):
        if not Path(cfg.metric.file).is_absolute():  # relative to the config's folder
            cfg.metric = cfg.metric.model_copy(
                update={"file": str(source.parent / cfg.metric.file)})
        metrics.load_user_metric(cfg.metric)
    elif metrics.base(cfg.metric) not in task.fitting_metrics():
        raise UserError(f"{source}: metric: {metrics.base(cfg.metric)} does not fit task "
                        f"{cfg.task}; use one of {sorted(task.fitting_metrics())}")
    merge = getattr(getattr(cfg, "tta", None), "merge", "mean")
    if merge not in task.tta_merges:
        raise UserError(f"{source}: tta.merge: {merge} needs probabilities; task {cfg.task} "
                        f"predicts {task.predicts} (use {' or '.join(task.tta_merges)})")
    mode = getattr(cfg, "mode", "mean")
    if mode not in ("tune", "stack") and mode not in task.blend_modes:
        raise UserError(f"{source}: mode: {mode} needs probabilities; task {cfg.task} "
                        f"predicts {task.predicts} (use {' or '.join(task.blend_modes)})")


def _validate(cls: type[BaseModel], data: dict, source: Path):
    try:
        cfg = cls.model_validate(data)
        _check_task(cfg, source)
        return cfg
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(top level)"
        if first["type"] == "extra_forbidden":
            msg = "unknown key"
        elif first["type"] == "value_error":
            msg = str(first["ctx"]["error"])
        elif first["type"] == "missing":
            msg = "missing required key"
        else:
            msg = f"{first['msg']} (got {first.get('input')!r})"
        raise UserError(f"{source}: {key}: {msg}") from None


def _own_overrides(cls: type[BaseModel], overrides: list[str] | None) -> list[str]:
    """Keep the overrides meant for `cls`; drop those for the other config kinds.

    One `SET="..."` list serves every stage (folds, train, ensemble), so `train.epochs=3`
    is dropped for the competition file; a key no config kind knows is kept, so it fails.
    """
    known = set().union(*(c.model_fields for c in (ExperimentConfig, EnsembleConfig)))
    return [o for o in overrides or []
            if o.partition("=")[0].split(".")[0] in cls.model_fields
            or o.partition("=")[0].split(".")[0] not in known]


def experiment_overrides(overrides: list[str] | None) -> list[str]:
    """The overrides an experiment takes from a `SET` list shared by every stage."""
    return _own_overrides(ExperimentConfig, overrides)


def _anchor_exclude(data: dict, folder: Path) -> dict:
    """`data.exclude` naming a file relative to the competition config's `folder`, as a path
    from the working folder."""
    section = data.get("data")
    exclude = section.get("exclude") if isinstance(section, dict) else None
    if isinstance(exclude, str) and not Path(exclude).is_absolute():
        section["exclude"] = str(folder / exclude)
    return data


def _resolve(path: str | Path, overrides: list[str] | None,
             own: dict | None = None) -> tuple[dict, Path]:
    """The file's keys (or `own`, read from it) merged over its competition file's, overridden
    (a `data.exclude` file is relative to the competition file's folder)."""
    path = Path(path)
    own = read_yaml(path) if own is None else own
    comp_name = own.pop("competition", None)
    if comp_name is None:
        comp_path, base = path, {}
    else:
        comp_path = path.parent / str(comp_name)
        base = read_yaml(comp_path)
    folder = comp_path.parent.name
    for file, data in ((comp_path, base), (path, own)):
        if data.get("name", folder) != folder:
            raise UserError(f"{file}: name: {data['name']!r} disagrees with its folder "
                            f"{comp_path.parent}; remove `name` (it is the folder's name)")
    merged = deep_merge(base, own)
    merged["name"] = folder
    return _anchor_exclude(apply_overrides(merged, overrides or []), comp_path.parent), path


def load_competition(path: str | Path, overrides: list[str] | None = None) -> CompetitionConfig:
    data, path = _resolve(path, _own_overrides(CompetitionConfig, overrides))
    return _validate(CompetitionConfig, data, path)


def tune_file(path: str | Path) -> Path:
    """`<exp>.tune.yaml` beside experiment file `<exp>.yaml`: its search settings."""
    path = Path(path)
    return path.with_name(f"{path.stem}.tune.yaml")


def experiment_data(path: str | Path, overrides: list[str] | None = None) -> dict:
    """An experiment's merged keys before validation (what its YAML files set, no defaults),
    with the `tune` section of `<exp>.tune.yaml` merged over the experiment's own."""
    own = read_yaml(path)
    if tune_file(path).is_file():
        own["tune"] = deep_merge(own.get("tune") or {}, read_yaml(tune_file(path)))
    data, path = _resolve(path, _own_overrides(ExperimentConfig, overrides), own)
    data.setdefault("experiment", path.stem)
    return data


def validate_experiment(data: dict, source: str | Path) -> ExperimentConfig:
    """`data` (as experiment_data returns it) as a validated experiment; errors name `source`."""
    return _validate(ExperimentConfig, data, Path(source))


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    return validate_experiment(experiment_data(path, overrides), path)


def experiment_from_keys(path: str | Path, keys: dict,
                         overrides: list[str] | None = None) -> ExperimentConfig:
    """The experiment `keys` would be if written at `path` (the auto mode's, before it writes)."""
    data, path = _resolve(path, _own_overrides(ExperimentConfig, overrides), copy.deepcopy(keys))
    data.setdefault("experiment", path.stem)
    return validate_experiment(data, path)


def load_ensemble(path: str | Path, overrides: list[str] | None = None) -> EnsembleConfig:
    data, path = _resolve(path, _own_overrides(EnsembleConfig, overrides))
    data.setdefault("experiment", path.stem)
    return _validate(EnsembleConfig, data, path)


def check_folder(competition_path: str | Path,
                 overrides: list[str] | None = None) -> dict[str, ExperimentConfig | EnsembleConfig]:
    """Validate every config of a competition's folder (its experiments and ensembles; search
    spaces are the tune stage's), so a typo stops make before any stage has run: each
    ensemble's members are experiments (a member not written yet, e.g. a tuned config, is the
    ensemble stage's to report), each source (`pseudo.source`, `distill.teacher`) another
    experiment or ensemble of the folder. Returns {name: config}."""
    folder = Path(competition_path).parent
    configs: dict[str, ExperimentConfig | EnsembleConfig] = {}
    for path in sorted(folder.glob("*.yaml")):
        if path.name in (Path(competition_path).name, "auto.yaml") or \
                path.name.endswith(".tune.yaml"):
            continue
        configs[path.stem] = (load_ensemble if "experiments" in read_yaml(path)
                              else load_experiment)(path, overrides)
    for name, cfg in configs.items():
        named = ([("experiments", m) for m in cfg.experiments] if isinstance(cfg, EnsembleConfig)
                 else [("pseudo.source", cfg.pseudo and cfg.pseudo.source),
                       ("distill.teacher", cfg.distill and cfg.distill.teacher)])
        for key, other in named:
            wrong = ("this config" if other == name else
                     None if key == "experiments" and other not in configs else
                     "not a config of the folder" if other and other not in configs else
                     "an ensemble, not an experiment" if key == "experiments" and
                     isinstance(configs[other], EnsembleConfig) else None)
            if other and wrong:
                raise UserError(f"{folder / (name + '.yaml')}: {key}: {other!r} is {wrong}")
    return configs


def config_hash(cfg: BaseModel, exclude: set[str] | None = None) -> str:
    """Hash of the resolved config (less `exclude` sections), recorded with its artifacts."""
    return text_hash(cfg.model_dump_json(exclude=exclude))
