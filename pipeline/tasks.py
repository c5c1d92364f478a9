"""The task seam: one class per kind of target, the only place that branches on the kind.

A task knows the prediction columns (of oof.csv / test.csv), the head size, how raw targets
read, the loss, how mixup/cutmix mixes targets, how logits become predictions, the trivial
baseline and the default decisions. Serialisable, so a package carries it.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from pipeline import metrics
from pipeline.errors import UserError

KINDS = ("multiclass", "binary", "multilabel", "regression", "ordinal")


def _class_sort_key(name: str):
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)


def sorted_classes(values) -> list[str]:
    return sorted(set(values), key=_class_sort_key)


def _pos_weight(y: np.ndarray) -> list[float]:
    """Per-column negatives / positives of 0/1 targets (BCE's `balanced` positive weight)."""
    pos = y.sum(0)
    return [float((len(y) - p) / max(p, 1)) for p in np.atleast_1d(pos)]


def _bce(logits, y, label_smoothing: float, pos_weight) -> torch.Tensor:
    """BCE-with-logits on 0/1 (or mixed) targets, smoothed towards 0.5, positives weighted."""
    y = y.float()
    if label_smoothing:
        y = y * (1 - label_smoothing) + 0.5 * label_smoothing
    w = None if pos_weight is None else torch.tensor(pos_weight, device=logits.device)
    return F.binary_cross_entropy_with_logits(logits, y, pos_weight=w)


class Task:
    kind = ""
    simplex = False  # prediction rows are probabilities summing to 1

    def __init__(self, columns, **extra):
        self.columns = tuple(columns)
        self.extra = extra

    @property
    def n_outputs(self) -> int:
        return len(self.columns)

    def to_json(self) -> dict:
        return dict(kind=self.kind, columns=list(self.columns), **self.extra)

    def finish(self, pred: np.ndarray) -> np.ndarray:
        """float64 predictions as stored (probability rows renormalised where they sum to 1)."""
        return np.asarray(pred, dtype=np.float64)

    def mix(self, mixer, x: torch.Tensor, y: torch.Tensor):
        """Mixup/cutmix for non-softmax targets: timm's batch mix gives lam, targets mix alike."""
        lam = mixer._mix_batch(x)
        y = y.float()
        return x, lam * y + (1 - lam) * y.flip(0)


class Multiclass(Task):
    kind = "multiclass"
    simplex = True

    def __init__(self, columns, class_weights=None):
        super().__init__(columns, class_weights=class_weights)

    @classmethod
    def build(cls, train: pd.DataFrame, classes, cfg) -> Multiclass:
        weights = None
        if getattr(cfg, "train", None) is not None and cfg.train.class_weights == "balanced":
            counts = pd.Series(train["target"]).value_counts().reindex(classes).fillna(0).to_numpy()
            weights = (len(train) / (len(classes) * np.maximum(counts, 1))).tolist()
        return cls(classes, weights)

    def targets(self, values: pd.Series, source: str = "") -> np.ndarray:
        lookup = {c: i for i, c in enumerate(self.columns)}
        return values.map(lookup).to_numpy(dtype=np.int64)

    def loss(self, logits, y, label_smoothing: float = 0.0):
        w = self.extra["class_weights"]
        w = None if w is None else torch.tensor(w, device=logits.device)
        if y.dim() == 2:  # mixed soft targets
            return SoftTargetCrossEntropy()(logits, y) if w is None else \
                -(y * w * F.log_softmax(logits, 1)).sum(1).mean()
        return F.cross_entropy(logits, y, weight=w, label_smoothing=label_smoothing)

    def mix(self, mixer, x, y):
        return mixer(x, y)

    def activate(self, logits):
        return F.softmax(logits.float(), dim=1)

    def finish(self, pred):
        pred = np.asarray(pred, dtype=np.float64)
        return pred / pred.sum(1, keepdims=True)

    def baseline(self, y: np.ndarray) -> np.ndarray:
        prior = np.bincount(y, minlength=self.n_outputs) / len(y)
        return np.tile(prior, (len(y), 1))


class Binary(Multiclass):
    """One logit with BCE; predictions stored as two columns [1 - p, p], as multi-class."""

    kind = "binary"

    def __init__(self, columns, pos_weight=None):
        Task.__init__(self, columns, pos_weight=pos_weight)

    @property
    def n_outputs(self) -> int:
        return 1

    @classmethod
    def build(cls, train, classes, cfg) -> Binary:
        if len(classes) != 2:
            raise UserError(f"task: binary needs 2 classes, the train table has {len(classes)}")
        weight = None
        if getattr(cfg, "train", None) is not None and cfg.train.pos_weight == "balanced":
            weight = _pos_weight((train["target"] == classes[1]).to_numpy(np.float64)[:, None])
        return cls(classes, weight)

    def loss(self, logits, y, label_smoothing: float = 0.0):
        return _bce(logits[:, 0], y, label_smoothing, self.extra["pos_weight"])

    def mix(self, mixer, x, y):
        return Task.mix(self, mixer, x, y)

    def activate(self, logits):
        p = torch.sigmoid(logits.float())
        return torch.cat([1 - p, p], dim=1)

    def baseline(self, y):
        return np.tile(np.bincount(y, minlength=2) / len(y), (len(y), 1))


class Multilabel(Task):
    """BCE-with-logits per label; predictions: one probability column per label."""

    kind = "multilabel"

    def __init__(self, columns, separator=" ", pos_weight=None):
        super().__init__(columns, separator=separator, pos_weight=pos_weight)

    @classmethod
    def build(cls, train, classes, cfg) -> Multilabel:
        task = cls(classes, cfg.data.label_separator)
        if getattr(cfg, "train", None) is not None and cfg.train.pos_weight == "balanced":
            task.extra["pos_weight"] = _pos_weight(
                task.targets(train["target"], cfg.data.path("train_csv")))
        return task

    def split(self, value: str) -> list[str]:
        return [p for p in value.split(self.extra["separator"]) if p.strip()]

    def targets(self, values: pd.Series, source: str = "") -> np.ndarray:
        lookup = {c: i for i, c in enumerate(self.columns)}
        y = np.zeros((len(values), self.n_outputs), dtype=np.float32)
        for row, value in enumerate(values):
            for label in self.split(value):
                if label.strip() not in lookup:
                    raise UserError(f"{source}: row {row + 2}: unknown label {label.strip()!r}")
                y[row, lookup[label.strip()]] = 1
        return y

    def loss(self, logits, y, label_smoothing: float = 0.0):
        return _bce(logits, y, label_smoothing, self.extra["pos_weight"])

    def activate(self, logits):
        return torch.sigmoid(logits.float())

    def baseline(self, y):
        return np.tile(y.mean(0), (len(y), 1))


class Regression(Task):
    """One output on the target scaled to [0, 1] by the train range; predictions in target units."""

    kind = "regression"

    def __init__(self, columns, low=0.0, high=1.0, loss="mse"):
        super().__init__(columns, low=float(low), high=float(high), loss=loss)

    @classmethod
    def build(cls, train, classes, cfg) -> Regression:
        y = numeric(train["target"], cfg.data.path("train_csv"))
        loss = "mse"
        if getattr(cfg, "train", None) is not None and cfg.train.loss != "auto":
            loss = cfg.train.loss
        high = y.max() if y.max() > y.min() else y.min() + 1
        return cls([cfg.data.target_column], y.min(), high, loss)

    def targets(self, values: pd.Series, source: str = "") -> np.ndarray:
        return numeric(values, source)

    def scale(self, y):
        return (y - self.extra["low"]) / (self.extra["high"] - self.extra["low"])

    def loss(self, logits, y, label_smoothing: float = 0.0):
        out, t = logits[:, 0].float(), self.scale(y.float())
        kind = self.extra["loss"]
        if kind == "bce":
            return F.binary_cross_entropy_with_logits(out, t)
        if kind == "huber":
            return F.huber_loss(out, t, delta=0.1)
        return F.mse_loss(out, t)

    def activate(self, logits):
        out = logits.float()
        if self.extra["loss"] == "bce":
            out = torch.sigmoid(out)
        return out * (self.extra["high"] - self.extra["low"]) + self.extra["low"]

    def baseline(self, y):
        return np.full((len(y), 1), float(np.mean(y)))


class Ordinal(Regression):
    """Regression on the grade (MSE on the grade scaled to [0, 1]); decisions by cut points
    between the grades (default: midpoints, i.e. rounding to the nearest grade)."""

    kind = "ordinal"

    def __init__(self, columns, low=0.0, high=1.0, loss="mse", grades=()):
        Task.__init__(self, columns, low=float(low), high=float(high), loss=loss,
                      grades=[float(g) for g in grades])

    @classmethod
    def build(cls, train, classes, cfg) -> Ordinal:
        base = Regression.build(train, classes, cfg)
        y = numeric(train["target"], cfg.data.path("train_csv"))
        if not np.allclose(y, np.round(y)):
            raise UserError(f"{cfg.data.path('train_csv')}: task: ordinal needs integer grades "
                            f"in {cfg.data.target_column}")
        return cls(base.columns, base.extra["low"], base.extra["high"], base.extra["loss"],
                   sorted(set(y.tolist())))

    @property
    def grades(self) -> np.ndarray:
        return np.asarray(self.extra["grades"])

    def cuts(self) -> np.ndarray:
        """Default cut points: midpoints between neighbouring grades (rounding)."""
        g = self.grades
        return (g[1:] + g[:-1]) / 2

    def grade(self, values: np.ndarray, cuts: np.ndarray | None = None) -> np.ndarray:
        """Grade of each value: the grade whose interval between cut points holds it."""
        return metrics.grade_of(values, self.grades, self.cuts() if cuts is None else cuts)


def numeric(values: pd.Series, source) -> np.ndarray:
    """A numeric target column as float64; a value that is not a number stops with its row."""
    y = pd.to_numeric(values, errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(y)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise UserError(f"{source}: row {row + 2}: target {values.iloc[row]!r} is not a number")
    return y


CLASSES = {c.kind: c for c in (Multiclass, Binary, Multilabel, Regression, Ordinal)}


def label_set(train: pd.DataFrame, cfg) -> list[str]:
    """Prediction columns' names before the task is built: classes or labels from the train table."""
    if cfg.task == "multilabel":
        sep = cfg.data.label_separator
        return sorted_classes(p.strip() for v in train["target"] for p in v.split(sep) if p.strip())
    if cfg.task in ("regression", "ordinal"):
        return [cfg.data.target_column]
    return sorted_classes(train["target"])


def build(cfg, train: pd.DataFrame, classes) -> Task:
    """The config's task, fitted to the train table (class weights, target range, grades)."""
    return CLASSES[cfg.task].build(train, list(classes), cfg)


def from_json(d: dict) -> Task:
    d = dict(d)
    kind, columns = d.pop("kind"), d.pop("columns")
    return CLASSES[kind](columns, **d)
