"""Every task class through the same contract (scikit-learn's check_estimator idea): what the
rest of the pipeline asks of a task, answered consistently by each kind."""
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from timm.data import Mixup

from pipeline.blending import blend, stack
from pipeline.core import metrics, splits, submission, tasks, thresholds
from pipeline.models import tta

N = 24
RNG = np.random.default_rng(0)
TARGETS = {  # the train table's target column, as a competition spells it
    "multiclass": [f"c{i % 3}" for i in range(N)],
    "binary": ["no" if i % 3 else "yes" for i in range(N)],
    "multilabel": [" ".join(t for t, on in zip("ab", (i % 2, i % 3 == 0)) if on) for i in range(N)],
    "regression": [f"{1 + (i * 7) % 10 + 0.5:.1f}" for i in range(N)],
    "ordinal": [str(i % 4) for i in range(N)],
}


def config(kind: str):
    data = SimpleNamespace(label_separator=" ", target_column="target",
                           path=lambda name: "train.csv")
    train = SimpleNamespace(class_weights="balanced", pos_weight="balanced", loss="auto")
    return SimpleNamespace(task=kind, data=data, train=train)


def built(kind: str):
    train = pd.DataFrame({"target": TARGETS[kind]})
    cls = tasks.of(kind)
    task = cls.build(train, cls.label_set(train, config(kind)), config(kind))
    return task, task.targets(train["target"], "train.csv")


def predictions(task, y) -> np.ndarray:
    """What the task's activation makes of random logits, rows in float64 as stored."""
    logits = torch.from_numpy(RNG.normal(0, 1, (len(y), task.n_outputs))).float()
    return task.finish(task.activate(logits).numpy())


@pytest.fixture(params=tasks.KINDS)
def case(request):
    task, y = built(request.param)
    return task, y, predictions(task, y)


def test_the_class_is_registered_under_its_kind_and_round_trips_through_json(case):
    task, _, _ = case
    assert tasks.of(task.kind) is type(task)
    back = tasks.from_json(task.to_json())
    assert back == task and back.to_json() == task.to_json()


def test_targets_predictions_and_baseline_share_the_prediction_columns(case):
    task, y, pred = case
    assert len(y) == N and pred.shape == (N, len(task.columns)) and pred.dtype == np.float64
    assert task.baseline(y).shape == pred.shape
    if task.simplex:
        np.testing.assert_allclose(pred.sum(1), 1.0)


def test_the_loss_takes_hard_and_mixed_targets(case):
    task, y, _ = case
    logits = torch.zeros(N, task.n_outputs, requires_grad=True)
    target = torch.from_numpy(np.array(y))
    loss = task.loss(logits, target, 0.1)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss) and logits.grad is not None
    x, mixed = task.mix(Mixup(mixup_alpha=1.0, num_classes=len(task.columns)),
                        torch.rand(N, 3, 8, 8), target)
    assert x.shape == (N, 3, 8, 8) and torch.isfinite(task.loss(logits, mixed))


def test_every_fitting_metric_scores_its_predictions_and_decisions(case):
    task, y, pred = case
    fitting = type(task).fitting_metrics()
    assert fitting and set(fitting) <= set(metrics.NAMES)
    for name in fitting:
        m = metrics.REGISTRY[name]
        assert m.needs_decisions or task.predicts in m.on
        assert np.isfinite(metrics.score(name, task, y, pred))
    truth, hard = task.decisions(y, pred)
    assert len(truth) == len(hard) == N


def test_tuned_thresholds_are_applied_as_the_task_decides(case):
    task, y, pred = case
    for name in type(task).fitting_metrics():
        which = task.threshold_kind(name)
        if which is None:
            continue
        assert which in ("labels", "positive", "cuts")
        tuned = thresholds.fit(which, name, y, pred, task)
        decided = thresholds.decide(which, pred, tuned, task)
        assert metrics.score(name, task, y, decided) == pytest.approx(
            metrics.score(name, task, y, pred, tuned))
        assert thresholds.from_json(thresholds.to_json(which, tuned)) is not None


def test_every_submission_format_it_allows_is_written_and_validates(case, tmp_path):
    task, y, pred = case
    ids = [f"t{i}" for i in range(N)]
    for fmt_name in type(task).submission_formats:
        columns = tuple(task.columns) if fmt_name in ("proba", "columns") else ("target",)
        fmt = submission.SubmissionFormat("id", fmt_name, columns, tuple(ids),
                                          task.columns[-1] if fmt_name == "binary_proba" else None)
        df = submission.format_submission(fmt, task, ids, pred)
        submission.write_submission(df, tmp_path / f"{fmt_name}.csv", fmt, task)
        assert list(pd.read_csv(tmp_path / f"{fmt_name}.csv").columns) == ["id", *columns]


def test_folds_stratify_as_the_task_says(case):
    task, y, _ = case
    strata, how = task.fold_strata(pd.Series(TARGETS[task.kind]), y)
    assert how in ("classes", "labels", "values") and len(strata) == N
    fold = splits.assign_folds(np.asarray(strata), None, 2, "auto", 0, how)
    assert sorted(np.unique(fold)) == [0, 1]


def test_views_and_blends_average_in_the_modes_it_allows(case):
    task, y, pred = case
    views = torch.from_numpy(np.stack([pred, pred])).float()
    for how in type(task).tta_merges:
        np.testing.assert_allclose(tta.merge(views, how, task.simplex).numpy(), pred, atol=1e-5)
    for mode in type(task).blend_modes:
        out = blend.blend(np.stack([pred, pred]), np.array([0.5, 0.5]), mode, task)
        assert out.shape == pred.shape and np.isfinite(out).all()
        if task.predicts == "values":  # every mode stays in target units
            assert out.min() >= pred.min() - 1e-9 and out.max() <= pred.max() + 1e-9


def test_per_column_scores_name_its_columns_or_grades(case):
    task, y, pred = case
    scores = task.per_column_scores(y, pred)
    assert isinstance(scores, dict) and all(np.isfinite(v) for v in scores.values())


def test_a_stack_of_its_predictions_predicts_its_columns(case):
    task, y, pred = case
    probas = np.stack([pred, predictions(task, y)])
    meta = stack.fit(task, probas, y, 1.0)
    out = blend.blend(probas, np.full(2, 0.5), "mean", task, meta=meta)
    assert meta.model == task.stack_model and out.shape == pred.shape and np.isfinite(out).all()
    assert stack.member_shares(meta).sum() == pytest.approx(1.0)
    if task.simplex:
        np.testing.assert_allclose(out.sum(1), 1.0)


def test_label_noise_lists_rows_most_confident_first_or_does_not_apply(case):
    task, y, pred = case
    noise = task.label_noise(y, pred, 0.5)
    if task.predicts == "values":
        assert noise is None
        return
    assert list(noise.columns) == ["row", "predicted", "confidence"] and len(noise)
    assert (noise["confidence"] >= 0.5).all() and noise["confidence"].is_monotonic_decreasing
    assert noise["row"].between(0, N - 1).all()
    assert all(isinstance(p, str) for p in noise["predicted"])


def test_labels_in_prediction_space_give_the_labels_loss_and_harden_to_decisions(case):
    """Soft targets (a teacher's, a pseudo-label's) go through the same loss: the labels as
    predictions, each row's loss weight 1, give exactly the labels' loss; weights scale rows."""
    task, y, pred = case
    logits = torch.from_numpy(RNG.normal(0, 1, (N, task.n_outputs))).float()
    as_pred = task.as_predictions(y)
    assert as_pred.shape == pred.shape and as_pred.dtype == np.float64
    soft = torch.from_numpy(np.c_[as_pred, np.ones(N)]).float()
    torch.testing.assert_close(task.soft_loss(logits, soft),
                               task.loss(logits, torch.from_numpy(np.array(y))))
    half = soft.clone()
    half[:, -1] = 0.5
    torch.testing.assert_close(task.soft_loss(logits, half), task.soft_loss(logits, soft) / 2)
    hard = task.harden(pred)
    assert hard.shape == pred.shape
    if task.predicts != "values":
        np.testing.assert_array_equal(hard, task.as_predictions(task.decide(pred)))
    assert ((task.confidence(pred) >= 0) & (task.confidence(pred) <= 1)).all()
