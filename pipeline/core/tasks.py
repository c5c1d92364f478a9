"""The task seam: one class per kind of target, the only place that branches on the kind.

A task answers what the rest of the pipeline asks: how raw targets read, the head size, the
loss and how mixup/cutmix mixes targets, how logits become predictions and how their views
and blends average, how predictions read (`predicts`: classes, labels or values) and become
hard decisions, which thresholds a metric needs, which metrics, submission formats, blend
modes and TTA merges fit, how a stack's meta-model reads the members' predictions (its
features and which meta-model), which rows confidently contradict their label, how folds
stratify it, what the per-column report shows, the trivial baseline. Its parameters are typed
fields, and a task round-trips through JSON.

Two levels: the competition's task (`build`, from the whole train table) holds what defines
the label space (classes, labels, grades, the target's range for grade metrics); a fold's task
(`fit`, from that fold's training rows only) adds what shapes training (class weights, positive
weights, the range the target is scaled by), so no statistic of a held-out fold reaches its
model. Each fold checkpoint carries its fold's task (pipeline.models.predictor).
"""
from __future__ import annotations

import abc
import dataclasses
import functools
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from pipeline.core import metrics
from pipeline.core.errors import UserError

PROBABILITY_MODES = ("mean", "geometric", "rank")
EPS = 1e-15  # probabilities are clipped to [EPS, 1 - EPS] before a log


def _class_sort_key(name: str):
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)


def sorted_classes(values) -> list[str]:
    return sorted(set(values), key=_class_sort_key)


def _pos_weight(y: np.ndarray) -> tuple[float, ...]:
    """Per-column negatives / positives of 0/1 targets (BCE's `balanced` positive weight)."""
    pos = y.sum(0)
    return tuple(float((len(y) - p) / max(p, 1)) for p in np.atleast_1d(pos))


@functools.lru_cache(maxsize=64)
def _on(values: tuple[float, ...] | None, device: torch.device) -> torch.Tensor | None:
    """`values` as a float32 tensor on `device`, made once (a copy per step would make the
    host wait for the device)."""
    return None if values is None else torch.tensor(values, device=device)


def _bce(logits, y, label_smoothing: float, pos_weight) -> torch.Tensor:
    """BCE-with-logits on 0/1 (or mixed) targets, smoothed towards 0.5, positives weighted."""
    y = y.float()
    if label_smoothing:
        y = y * (1 - label_smoothing) + 0.5 * label_smoothing
    return F.binary_cross_entropy_with_logits(logits, y, pos_weight=_on(pos_weight, logits.device))


def _training(cfg):
    """The experiment's train section (None for a competition or ensemble config)."""
    return getattr(cfg, "train", None)


def grade_of(values: np.ndarray, grades, cuts) -> np.ndarray:
    """The grade of each value: the one whose interval between the sorted cut points holds it."""
    grades, cuts = np.asarray(grades, dtype=np.float64), np.asarray(cuts, dtype=np.float64)
    return grades[np.searchsorted(cuts, np.asarray(values).reshape(-1), side="right")]


@dataclass(frozen=True)
class Task(abc.ABC):
    """What every task has: the prediction columns (of oof.csv and test.csv, in order)."""

    kind: ClassVar[str]
    predicts: ClassVar[str]  # how predictions read: classes, labels or values (pipeline.core.metrics)
    simplex: ClassVar[bool] = False  # prediction rows are probabilities summing to 1
    submission_formats: ClassVar[tuple[str, ...]]
    blend_modes: ClassVar[tuple[str, ...]] = PROBABILITY_MODES
    tta_merges: ClassVar[tuple[str, ...]] = ("mean", "geometric")
    loss_metric: ClassVar[str] = "log_loss"  # the validation loss logged per epoch
    reads_label_columns: ClassVar[bool] = False  # data.target_columns / data.target_prefix
    allows_empty_target: ClassVar[bool] = False
    decision_labels: ClassVar = None  # the label set decision metrics score over (None: found)
    stack_model: ClassVar[str]  # the meta-model of `mode: stack` (pipeline.blending.stack)

    columns: tuple[str, ...]

    @property
    def n_outputs(self) -> int:
        return len(self.columns)

    @classmethod
    def fitting_metrics(cls) -> list[str]:
        return metrics.fitting(cls.kind)

    def to_json(self) -> dict:
        return dict(kind=self.kind, **{f.name: _jsonable(getattr(self, f.name))
                                       for f in dataclasses.fields(self)})

    def fit(self, y: np.ndarray) -> Task:
        """The fold's task: this one with the statistics that shape training taken from the
        fold's training targets `y` (none by default)."""
        return self

    @abc.abstractmethod
    def as_predictions(self, y: np.ndarray, label_smoothing: float = 0.0) -> np.ndarray:
        """Targets `y` in prediction space (what `activate` outputs), float64."""

    @abc.abstractmethod
    def harden(self, pred: np.ndarray) -> np.ndarray:
        """Predictions as decisions, in prediction space (hard pseudo-labels)."""

    @abc.abstractmethod
    def row_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Each row's training loss against targets in prediction space."""

    def soft_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss against targets in prediction space (what `activate` outputs: a teacher's
        or a pseudo-label's probabilities or values), N x (columns + 1), the last column each
        row's loss weight: the weighted mean of the rows' losses."""
        return (self.row_loss(logits, targets[:, :-1]) * targets[:, -1]).mean()

    def confidence(self, pred: np.ndarray) -> np.ndarray:
        """How sure each prediction is, in [0, 1] (1 for values: every row qualifies)."""
        return np.ones(len(pred))

    def finish(self, pred: np.ndarray) -> np.ndarray:
        """float64 predictions as stored (probability rows renormalised where they sum to 1)."""
        return np.asarray(pred, dtype=np.float64)

    def mix_soft(self, mixer, x: torch.Tensor, y: torch.Tensor):
        """Mixup/cutmix of target vectors (soft targets, with their weights): timm's batch mix
        gives lam, targets mix alike."""
        lam = mixer._mix_batch(x)
        y = y.float()
        return x, lam * y + (1 - lam) * y.flip(0)

    def mix(self, mixer, x: torch.Tensor, y: torch.Tensor):
        """Mixup/cutmix of labels: for non-softmax targets, as target vectors."""
        return self.mix_soft(mixer, x, y)

    def threshold_kind(self, metric) -> str | None:
        """Which decision thresholds `metric` can have tuned on this task (pipeline.core.thresholds):
        None by default."""
        return None

    def per_column_scores(self, y: np.ndarray, pred: np.ndarray) -> dict:
        """The blend's per-column figures for the ensemble report ({} where there are none)."""
        return {}

    @abc.abstractmethod
    def stack_features(self, probas: np.ndarray) -> np.ndarray:
        """Members' predictions (M, N, K) as the stack's meta-model reads them: (N, G, M, P),
        G independent meta-models (one, or one per label), each over M members x P features."""

    def label_noise(self, y: np.ndarray, pred: np.ndarray, level: float) -> pd.DataFrame | None:
        """The rows whose prediction contradicts their target with confidence >= `level`: a
        frame of row (index into y), predicted (as the train table spells it) and confidence,
        most confident first; None where a prediction carries no confidence (values)."""
        return None

    def fold_strata(self, target: pd.Series, y: np.ndarray) -> tuple[np.ndarray, str]:
        """(what folds stratify on, how: classes, labels or values), from the train table's
        target column and the targets."""
        return target.to_numpy(), "classes"


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class _Classes(Task):
    """Single-label classification: a probability per class."""

    predicts: ClassVar[str] = "classes"
    simplex: ClassVar[bool] = True
    submission_formats: ClassVar = ("label", "proba", "binary_proba")
    stack_model: ClassVar[str] = "multinomial"  # binary too: two classes

    @property
    def decision_labels(self) -> np.ndarray:
        return np.arange(len(self.columns))

    @classmethod
    def label_set(cls, train: pd.DataFrame, cfg, names=None) -> list[str]:
        return sorted_classes(train["target"])

    @staticmethod
    def auto_format(value_columns: list[str], classes: list[str], probabilities: bool) -> str:
        """`proba` for a column per class; one column: the positive class's probability where
        probabilities are wanted (the metric scores them, or the sample holds fractions) and
        there are two classes, else the label."""
        if len(value_columns) >= 2:
            return "proba"
        return "binary_proba" if len(classes) == 2 and probabilities else "label"

    def targets(self, values: pd.Series, source: str = "") -> np.ndarray:
        lookup = {c: i for i, c in enumerate(self.columns)}
        return values.map(lookup).to_numpy(dtype=np.int64)

    def activate(self, logits):
        return F.softmax(logits.float(), dim=1)

    def finish(self, pred):
        pred = np.asarray(pred, dtype=np.float64)
        return pred / pred.sum(1, keepdims=True)

    def baseline(self, y: np.ndarray) -> np.ndarray:
        prior = np.bincount(y, minlength=len(self.columns)) / len(y)
        return np.tile(prior, (len(y), 1))

    def as_predictions(self, y: np.ndarray, label_smoothing: float = 0.0) -> np.ndarray:
        """Targets in prediction space: one-hot class probabilities (smoothed as the loss
        smooths labels)."""
        k = len(self.columns)
        return np.eye(k)[y] * (1 - label_smoothing) + label_smoothing / k

    def confidence(self, pred: np.ndarray) -> np.ndarray:
        return pred.max(1)

    def harden(self, pred: np.ndarray) -> np.ndarray:
        """Predictions as decisions in prediction space: the argmax class, one-hot."""
        return np.eye(pred.shape[1])[pred.argmax(1)]

    def decide(self, pred: np.ndarray, thresholds=None) -> np.ndarray:
        """Class index per row: argmax, or the positive class at a scalar threshold."""
        if thresholds is not None and pred.shape[1] == 2:
            return (pred[:, 1] >= float(thresholds)).astype(np.int64)
        return pred.argmax(1)

    def decisions(self, y, pred, thresholds=None):
        return y, self.decide(pred, thresholds)

    def spell(self, hard: np.ndarray) -> list[str]:
        """Decisions as the train table spells them."""
        return list(np.asarray(self.columns, dtype=object)[hard])

    @property
    def label_names(self) -> list[str]:
        return list(self.columns)

    def stack_features(self, probas):
        """Every member's log-probability of every class, for one multinomial meta-model."""
        return np.log(np.clip(probas, EPS, 1.0)).transpose(1, 0, 2)[:, None]

    def label_noise(self, y, pred, level):
        """Rows whose predicted class has probability >= level and true class <= 1 - level."""
        hard = pred.argmax(1)
        confidence = pred[np.arange(len(y)), hard]
        rows = np.flatnonzero((confidence >= level) & (pred[np.arange(len(y)), y] <= 1 - level))
        rows = rows[np.argsort(-confidence[rows], kind="stable")]
        return pd.DataFrame(dict(row=rows, predicted=self.spell(hard[rows]),
                                 confidence=confidence[rows]))


@dataclass(frozen=True)
class Multiclass(_Classes):
    kind: ClassVar[str] = "multiclass"
    balanced: bool = False  # train.class_weights: balanced
    class_weights: tuple[float, ...] | None = None  # fitted: n / (K x count) per class

    @classmethod
    def build(cls, train: pd.DataFrame, classes, cfg) -> Multiclass:
        training = _training(cfg)
        return cls(tuple(classes), training is not None and training.class_weights == "balanced")

    def fit(self, y):
        if not self.balanced:
            return self
        counts = np.bincount(y, minlength=len(self.columns))
        weights = len(y) / (len(self.columns) * np.maximum(counts, 1))
        return dataclasses.replace(self, class_weights=tuple(weights.tolist()))

    def row_loss(self, logits, targets):
        w = _on(self.class_weights, logits.device)
        log_p = F.log_softmax(logits, 1)
        return -(targets * (log_p if w is None else w * log_p)).sum(1)

    def loss(self, logits, y, label_smoothing: float = 0.0):
        w = _on(self.class_weights, logits.device)
        if y.dim() == 2:  # mixed soft targets
            return SoftTargetCrossEntropy()(logits, y) if w is None else \
                -(y * w * F.log_softmax(logits, 1)).sum(1).mean()
        return F.cross_entropy(logits, y, weight=w, label_smoothing=label_smoothing)

    def mix(self, mixer, x, y):
        return mixer(x, y)


@dataclass(frozen=True)
class Binary(_Classes):
    """One logit with BCE; predictions stored as two columns [1 - p, p], as multi-class."""

    kind: ClassVar[str] = "binary"
    balanced: bool = False  # train.pos_weight: balanced
    pos_weight: tuple[float, ...] | None = None  # fitted: negatives / positives

    @property
    def n_outputs(self) -> int:
        return 1

    @classmethod
    def build(cls, train, classes, cfg) -> Binary:
        if len(classes) != 2:
            raise UserError(f"task: binary needs 2 classes, the train table has {len(classes)}")
        training = _training(cfg)
        return cls(tuple(classes), training is not None and training.pos_weight == "balanced")

    def fit(self, y):
        if not self.balanced:
            return self
        return dataclasses.replace(self, pos_weight=_pos_weight((y == 1).astype(np.float64)[:, None]))

    def loss(self, logits, y, label_smoothing: float = 0.0):
        return _bce(logits[:, 0], y, label_smoothing, self.pos_weight)

    def row_loss(self, logits, targets):
        return F.binary_cross_entropy_with_logits(
            logits[:, 0], targets[:, 1], pos_weight=_on(self.pos_weight, logits.device),
            reduction="none")

    def activate(self, logits):
        p = torch.sigmoid(logits.float())
        return torch.cat([1 - p, p], dim=1)

    def baseline(self, y):
        return np.tile(np.bincount(y, minlength=2) / len(y), (len(y), 1))

    def threshold_kind(self, metric) -> str | None:
        return "positive" if metrics.needs_decisions(metric) and metrics.base(metric) != "qwk" \
            else None


@dataclass(frozen=True)
class Multilabel(Task):
    """BCE-with-logits per label; predictions: one probability column per label."""

    kind: ClassVar[str] = "multilabel"
    predicts: ClassVar[str] = "labels"
    submission_formats: ClassVar = ("labels", "columns")
    reads_label_columns: ClassVar[bool] = True
    allows_empty_target: ClassVar[bool] = True  # an empty label set is a row's "no label"
    stack_model: ClassVar[str] = "logistic"  # one per label
    separator: str = " "
    balanced: bool = False  # train.pos_weight: balanced
    pos_weight: tuple[float, ...] | None = None  # fitted: negatives / positives per label

    @classmethod
    def label_set(cls, train: pd.DataFrame, cfg, names=None) -> list[str]:
        """The labels: the 0/1 columns' names when given, else those present in the train table."""
        if names is not None:
            return list(names)
        sep = cfg.data.label_separator
        found = sorted_classes(p.strip() for v in train["target"] for p in v.split(sep) if p.strip())
        if not found:
            raise UserError(f"{cfg.data.path('train_csv')}: no row has a label in "
                            f"{cfg.data.target_column}")
        return found

    @staticmethod
    def auto_format(value_columns: list[str], classes: list[str], probabilities: bool) -> str:
        single = len(value_columns) == 1 and not set(classes) <= set(value_columns)
        return "labels" if single else "columns"

    @classmethod
    def build(cls, train, classes, cfg) -> Multilabel:
        training = _training(cfg)
        return cls(tuple(classes), cfg.data.label_separator,
                   training is not None and training.pos_weight == "balanced")

    def fit(self, y):
        return dataclasses.replace(self, pos_weight=_pos_weight(y)) if self.balanced else self

    def split(self, value: str) -> list[str]:
        return [p for p in value.split(self.separator) if p.strip()]

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
        return _bce(logits, y, label_smoothing, self.pos_weight)

    def row_loss(self, logits, targets):
        return F.binary_cross_entropy_with_logits(
            logits, targets, pos_weight=_on(self.pos_weight, logits.device),
            reduction="none").mean(1)

    def as_predictions(self, y: np.ndarray, label_smoothing: float = 0.0) -> np.ndarray:
        return np.asarray(y, dtype=np.float64) * (1 - label_smoothing) + 0.5 * label_smoothing

    def confidence(self, pred: np.ndarray) -> np.ndarray:
        """The least sure label's: min over labels of max(p, 1 - p)."""
        return np.maximum(pred, 1 - pred).min(1)

    def harden(self, pred: np.ndarray) -> np.ndarray:
        return (pred >= 0.5).astype(np.float64)

    def activate(self, logits):
        return torch.sigmoid(logits.float())

    def baseline(self, y):
        return np.tile(y.mean(0), (len(y), 1))

    def decide(self, pred: np.ndarray, thresholds=None) -> np.ndarray:
        """0/1 per label at per-label thresholds (default 0.5)."""
        t = 0.5 if thresholds is None else np.asarray(thresholds, dtype=np.float64)
        return (pred >= t).astype(np.int64)

    def decisions(self, y, pred, thresholds=None):
        return y.astype(np.int64), self.decide(pred, thresholds)

    def join(self, hard: np.ndarray) -> list[str]:
        """Each row's labels joined by the separator (the `labels` format)."""
        return [self.separator.join(c for c, on in zip(self.columns, row) if on) for row in hard]

    def threshold_kind(self, metric) -> str | None:
        return "labels" if metrics.needs_decisions(metric) else None

    def per_column_scores(self, y, pred) -> dict:
        """{label: OOF ROC-AUC} over the labels with both outcomes."""
        return {c: float(metrics.REGISTRY["roc_auc"].on["labels"](y[:, [j]], pred[:, [j]]))
                for j, c in enumerate(self.columns) if 0 < y[:, j].sum() < len(y)}

    def stack_features(self, probas):
        """Each label's member logits, for one logistic meta-model per label."""
        p = np.clip(probas, EPS, 1 - EPS)
        return (np.log(p) - np.log1p(-p)).transpose(1, 2, 0)[..., None]

    def label_noise(self, y, pred, level):
        """Rows with a label whose probability contradicts it with confidence >= level (a
        present label at <= 1 - level, an absent one at >= level); predicted: the labels at
        0.5, confidence: the strongest contradiction."""
        confidence = np.where(y >= 0.5, 1 - pred, pred).max(1)
        rows = np.flatnonzero(confidence >= level)
        rows = rows[np.argsort(-confidence[rows], kind="stable")]
        return pd.DataFrame(dict(row=rows, predicted=self.join(self.decide(pred[rows])),
                                 confidence=confidence[rows]))

    def fold_strata(self, target, y):
        return y, "labels"


@dataclass(frozen=True)
class Regression(Task):
    """One output on the target scaled to [0, 1] by a range, predictions in target units: the
    competition's task holds the whole train table's range (the grades a grade metric such as
    QWK scores over), a fold's task its training rows' range (what its model is scaled by)."""

    kind: ClassVar[str] = "regression"
    predicts: ClassVar[str] = "values"
    submission_formats: ClassVar = ("value",)
    blend_modes: ClassVar = ("mean", "rank")
    tta_merges: ClassVar = ("mean",)
    loss_metric: ClassVar[str] = "rmse"
    stack_model: ClassVar[str] = "ridge"
    low: float = 0.0
    high: float = 1.0
    loss_kind: str = "mse"

    @classmethod
    def label_set(cls, train, cfg, names=None) -> list[str]:
        return [cfg.data.target_column]

    @staticmethod
    def auto_format(value_columns, classes, probabilities) -> str:
        return "value"

    @classmethod
    def build(cls, train, classes, cfg) -> Regression:
        y = numeric(train["target"], cfg.data.path("train_csv"))
        loss = "mse"
        if _training(cfg) is not None and cfg.train.loss != "auto":
            loss = cfg.train.loss
        high = y.max() if y.max() > y.min() else y.min() + 1
        return cls((cfg.data.target_column,), float(y.min()), float(high), loss)

    def to_json(self) -> dict:
        d = super().to_json()
        d["loss"] = d.pop("loss_kind")
        return d

    def fit(self, y):
        high = y.max() if y.max() > y.min() else y.min() + 1
        return dataclasses.replace(self, low=float(y.min()), high=float(high))

    @property
    def decision_labels(self) -> np.ndarray:
        """The grades a grade metric scores over: the integers of the target's range."""
        return np.arange(np.rint(self.low), np.rint(self.high) + 1).astype(np.int64)

    def targets(self, values: pd.Series, source: str = "") -> np.ndarray:
        return numeric(values, source)

    def scale(self, y):
        return (y - self.low) / (self.high - self.low)

    def loss(self, logits, y, label_smoothing: float = 0.0):
        return self.row_loss(logits, y[:, None]).mean()

    def row_loss(self, logits, targets):
        out, t = logits[:, 0].float(), self.scale(targets[:, 0].float())
        if self.loss_kind == "bce":
            return F.binary_cross_entropy_with_logits(out, t, reduction="none")
        if self.loss_kind == "huber":
            return F.huber_loss(out, t, delta=0.1, reduction="none")
        return F.mse_loss(out, t, reduction="none")

    def as_predictions(self, y: np.ndarray, label_smoothing: float = 0.0) -> np.ndarray:
        """Targets in prediction space: the values (no smoothing)."""
        return np.asarray(y, dtype=np.float64)[:, None]

    def harden(self, pred: np.ndarray) -> np.ndarray:
        return pred

    def activate(self, logits):
        out = logits.float()
        if self.loss_kind == "bce":
            out = torch.sigmoid(out)
        return out * (self.high - self.low) + self.low

    def baseline(self, y):
        return np.full((len(y), 1), float(np.mean(y)))

    def decide(self, pred: np.ndarray, thresholds=None) -> np.ndarray:
        """The grade of each value: rounding, within the task's grades, or the grade between
        the cut points of `thresholds` = (grades, cut points)."""
        values = np.asarray(pred).reshape(-1)
        if thresholds is None:
            labels = self.decision_labels
            return np.clip(np.rint(values), labels.min(), labels.max())
        return grade_of(values, *thresholds)

    def decisions(self, y, pred, thresholds=None):
        """(true grades, predicted grades) of values (`decide`)."""
        return np.rint(y).astype(np.int64), self.decide(pred, thresholds).astype(np.int64)

    def fold_strata(self, target, y):
        return y, "values"

    def stack_features(self, probas):
        """The members' values, for one ridge regression."""
        return probas.transpose(1, 2, 0)[..., None]


@dataclass(frozen=True)
class Ordinal(Regression):
    """Regression on the grade (MSE on the grade scaled to [0, 1]); decisions by cut points
    between the grades (default: midpoints, i.e. rounding to the nearest grade)."""

    kind: ClassVar[str] = "ordinal"
    submission_formats: ClassVar = ("label", "value")
    grades: tuple[float, ...] = ()

    @staticmethod
    def auto_format(value_columns, classes, probabilities) -> str:
        return "label"

    @classmethod
    def build(cls, train, classes, cfg) -> Ordinal:
        base = Regression.build(train, classes, cfg)
        y = numeric(train["target"], cfg.data.path("train_csv"))
        if not np.allclose(y, np.round(y)):
            raise UserError(f"{cfg.data.path('train_csv')}: task: ordinal needs integer grades "
                            f"in {cfg.data.target_column}")
        return cls(base.columns, base.low, base.high, base.loss_kind,
                   tuple(float(g) for g in sorted(set(y.tolist()))))

    @property
    def decision_labels(self) -> np.ndarray:
        return np.asarray(self.grades).astype(np.int64)

    def cuts(self) -> np.ndarray:
        """Default cut points: midpoints between neighbouring grades (rounding)."""
        g = np.asarray(self.grades)
        return (g[1:] + g[:-1]) / 2

    def grade(self, values: np.ndarray, cuts: np.ndarray | None = None) -> np.ndarray:
        """Grade of each value: the grade whose interval between cut points holds it."""
        return grade_of(values, self.grades, self.cuts() if cuts is None else cuts)

    def decide(self, pred: np.ndarray, thresholds=None) -> np.ndarray:
        """The grade of each value at the cut points of `thresholds` (default: midpoints)."""
        return self.grade(np.asarray(pred).reshape(-1), None if thresholds is None else thresholds[1])

    def harden(self, pred: np.ndarray) -> np.ndarray:
        """Values as decisions: each the nearest grade."""
        return self.grade(np.asarray(pred).reshape(-1)).astype(np.float64)[:, None]

    @property
    def label_names(self) -> list[str]:
        """The grades as the train table spells them (integers without a point)."""
        return [str(int(g)) if float(g).is_integer() else str(g) for g in self.grades]

    def spell(self, hard: np.ndarray) -> list[str]:
        spelled = dict(zip(self.grades, self.label_names))
        return [spelled[g] for g in hard.tolist()]

    def threshold_kind(self, metric) -> str | None:
        return "cuts" if metrics.base(metric) in ("qwk", "accuracy") else None

    def per_column_scores(self, y, pred) -> dict:
        """{grade: OOF mean absolute error of the predicted value}."""
        return {f"{g:g}": float(np.abs(pred[y == g, 0] - g).mean()) for g in self.grades
                if (y == g).any()}

    def fold_strata(self, target, y):
        return y, "classes"


def numeric(values: pd.Series, source) -> np.ndarray:
    """A numeric target column as float64; a value that is not a number stops with its row."""
    y = pd.to_numeric(values, errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(y)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise UserError(f"{source}: row {row + 2}: target {values.iloc[row]!r} is not a number")
    return y


CLASSES: dict[str, type[Task]] = {c.kind: c for c in (Multiclass, Binary, Multilabel, Regression,
                                                       Ordinal)}
KINDS = tuple(CLASSES)


def of(kind: str) -> type[Task]:
    """The task class of a kind (what fits it, before it is built from data)."""
    return CLASSES[kind]


def build(cfg, train: pd.DataFrame, classes) -> Task:
    """The config's task, fitted to the train table (class weights, target range, grades)."""
    return CLASSES[cfg.task].build(train, list(classes), cfg)


def from_json(d: dict) -> Task:
    d = dict(d)
    cls = CLASSES[d.pop("kind")]
    if "loss" in d:
        d["loss_kind"] = d.pop("loss")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
