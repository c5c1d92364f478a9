"""Metrics: values on toy cases and the optimisation direction of each."""
import os

import numpy as np
import pytest

from sklearn.metrics import cohen_kappa_score

from pipeline.core import metrics, tasks
from pipeline.core.config import NamedMetric
from pipeline.core.errors import UserError

Y = np.array([0, 1, 2, 2])
P = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.3, 0.5], [0.5, 0.1, 0.4]])
CLASSES = tasks.Multiclass(("0", "1", "2"))
TWO = tasks.Binary(("no", "yes"))
FIVE = tasks.Multiclass(tuple("01234"))
LABELS = tasks.Multilabel(("a", "b"))
VALUES = tasks.Regression(("v",), 0, 4)


def test_label_metrics_score_the_argmax():
    assert metrics.score("accuracy", CLASSES, Y, P) == 0.75  # the last row predicts class 0
    # per-class F1: class 0: P=1/2 R=1 -> 2/3; class 1: 1; class 2: P=1 R=1/2 -> 2/3
    assert metrics.score("macro_f1", CLASSES, Y, P) == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)


def test_log_loss_is_the_mean_negative_log_probability_of_the_true_class():
    expected = -np.mean(np.log([0.7, 0.6, 0.5, 0.4]))
    assert metrics.score("log_loss", CLASSES, Y, P) == pytest.approx(expected)
    assert np.isfinite(metrics.score("log_loss", CLASSES, np.array([0]), np.array([[0.0, 1.0, 0.0]])))


def test_roc_auc_binary_and_one_vs_rest():
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.6, 0.4, 0.9])  # 3 of the 4 positive-negative pairs are ordered right
    assert metrics.score("roc_auc", TWO, y, np.c_[1 - p1, p1]) == pytest.approx(0.75)
    # OvR: class 0 and class 1 are separated perfectly; class 2 (rows 2, 3): 0.5, 0.4 vs 0.1, 0.3
    assert metrics.score("roc_auc", CLASSES, Y, P) == pytest.approx(1.0)
    # columns reversed: class 0 -> 0, class 1 -> 1, class 2 -> 2 of 4 pairs
    assert metrics.score("roc_auc", CLASSES, Y, P[:, ::-1]) == pytest.approx(0.5)


def test_qwk_rewards_near_misses_over_far_misses():
    y = np.array([0, 1, 2, 3, 4])
    onehot = lambda pred: np.eye(5)[pred]  # noqa: E731
    assert metrics.score("qwk", FIVE, y, onehot(y)) == pytest.approx(1.0)
    near = metrics.score("qwk", FIVE, y, onehot(np.array([1, 1, 2, 3, 3])))
    far = metrics.score("qwk", FIVE, y, onehot(np.array([4, 1, 2, 3, 0])))
    assert 0 < near < 1 and far < 0


@pytest.mark.parametrize("metric, direction", [("accuracy", "maximize"), ("macro_f1", "maximize"),
                                               ("roc_auc", "maximize"), ("qwk", "maximize"),
                                               ("log_loss", "minimize")])
def test_direction_follows_the_metric(metric, direction):
    assert metrics.direction(metric) == direction
    good, bad = (0.9, 0.1) if direction == "maximize" else (0.1, 0.9)
    assert metrics.better(metric, good, bad) and not metrics.better(metric, bad, good)
    assert metrics.best_key(metric, {"a": bad, "b": good, "c": good}) == "b"


def test_unknown_metric_is_refused():
    with pytest.raises(ValueError, match="unknown metric .brier."):
        metrics.score("brier", CLASSES, Y, P)


def test_fold_scores_score_each_fold_on_its_own_rows():
    y = np.array([0, 1, 1, 0, 1])
    folds = np.array([1, 0, 1, 0, 1])
    proba = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.1, 0.9]])
    assert metrics.fold_scores("accuracy", TWO, y, folds, proba) == {0: 0.5, 1: 2 / 3}


def test_a_user_metric_is_imported_from_the_config_folder_and_called_with_ids(tiny):
    from conftest import COMPETITION, write_yaml
    from pipeline.core.config import load_competition

    (tiny / "configs/tiny/my_metric.py").write_text(
        "import numpy as np\n\n\ndef score(ids, truth, predictions):\n"
        "    assert list(ids) == ['a', 'b', 'c', 'd']\n"
        "    return float(np.mean(predictions.argmax(1) == truth))\n")
    spec = {"file": "my_metric.py", "function": "score", "direction": "maximize"}
    write_yaml(tiny / "configs/tiny/competition.yaml", {**COMPETITION, "metric": spec})
    cfg = load_competition("configs/tiny/competition.yaml")
    assert metrics.score(cfg.metric, CLASSES, Y, P, ids=["a", "b", "c", "d"]) == 0.75
    assert metrics.name(cfg.metric) == "score:maximize" and metrics.direction(cfg.metric) == "maximize"
    assert not (tiny / "configs/tiny/__pycache__").exists()
    fn = metrics.load_user_metric(cfg.metric)
    assert metrics.load_user_metric(cfg.metric) is fn  # imported once, not per score
    path = tiny / "configs/tiny/my_metric.py"
    path.write_text(path.read_text().replace("def score", "def renamed"))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    with pytest.raises(UserError, match="has no function 'score'"):  # an edited file is reread
        metrics.load_user_metric(cfg.metric)


@pytest.mark.parametrize("metric, task, truth, pred, expected", [
    ("rmse", VALUES, [1.0, 3.0], [[2.0], [3.0]], np.sqrt(0.5)),
    ("mae", VALUES, [1.0, 3.0], [[2.0], [3.0]], 0.5),
    ("micro_f1", LABELS, [[1.0, 0.0], [1.0, 1.0]], [[0.9, 0.6], [0.2, 0.7]], 2 * 2 / (2 * 2 + 1 + 1)),
    ("samples_f1", LABELS, [[1.0, 0.0], [1.0, 1.0]], [[0.9, 0.1], [0.2, 0.7]], (1 + 2 / 3) / 2),
    ("roc_auc", LABELS, [[1.0, 0.0], [0.0, 1.0]], [[0.9, 0.1], [0.2, 0.7]], 1.0),
    ("qwk", VALUES, [0.0, 1.0, 2.0], [[0.1], [1.2], [1.9]], 1.0),
])
def test_value_and_label_metrics(metric, task, truth, pred, expected):
    assert metrics.score(metric, task, np.array(truth), np.array(pred)) == pytest.approx(expected)


GRADES = tasks.Ordinal(("grade",), 0, 4, "mse", (0.0, 1.0, 2.0, 3.0, 4.0))


def test_qwk_scores_over_every_grade_of_the_task_as_kaggle_does():
    """A fold holding grades {0, 1, 4} only is scored on the 0-4 scale: without the task's grade
    list scikit-learn would put grade 4 next to grade 1 (0.571 instead of 0.629)."""
    y = np.array([0, 0, 1, 1, 4, 4], dtype=np.float64)
    pred = np.array([[0.1], [0.9], [1.2], [0.3], [3.8], [1.1]])
    expected = cohen_kappa_score(y.astype(int), [0, 1, 1, 0, 4, 1], weights="quadratic",
                                 labels=range(5))
    assert metrics.score("qwk", GRADES, y, pred) == pytest.approx(expected) == pytest.approx(0.6292, 1e-3)


def test_grade_decisions_use_the_tasks_range_not_the_scored_truths():
    """A value of 3.6 is grade 4 even in a fold whose truth holds grades 0-2 only (the truth must
    not post-process the predictions)."""
    y = np.array([0.0, 1.0, 2.0])
    pred = np.array([[0.2], [1.1], [3.6]])
    assert GRADES.decisions(y, pred)[1].tolist() == [0, 1, 4]
    regression = tasks.Regression(("v",), 0.0, 4.0)
    assert regression.decisions(y, pred)[1].tolist() == [0, 1, 4]
    assert regression.decisions(y, np.array([[9.0]]))[1].tolist() == [4]  # within the range


@pytest.mark.parametrize("zero_division, expected", [(0, 0.5), (1, 1.0)])
def test_samples_f1_counts_empty_rows_by_the_configured_convention(zero_division, expected):
    """A row with no true and no predicted label scores 0 (scikit-learn's default) or 1."""
    metric = NamedMetric(name="samples_f1", zero_division=zero_division)
    y = np.array([[1.0, 0.0], [0.0, 0.0]])
    pred = np.array([[0.9, 0.1], [0.1, 0.2]])
    assert metrics.score(metric, LABELS, y, pred) == pytest.approx(expected)
    assert metrics.score("samples_f1", LABELS, y, pred) == pytest.approx(0.5)
    assert metrics.name(metric) == ("samples_f1" if not zero_division else "samples_f1[zero_division=1]")
