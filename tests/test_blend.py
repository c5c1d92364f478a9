"""Blending: simplex weights, the three blend modes, the optuna search and nested CV."""
import numpy as np
import pytest

from pipeline.blending import blend, search
from pipeline.core import metrics, tasks

TASK = tasks.Multiclass(("a", "b", "c"))

# Two models, three rows, two classes.
A = np.array([[0.2, 0.8], [0.6, 0.4], [0.9, 0.1]])
B = np.array([[0.3, 0.7], [0.2, 0.8], [0.7, 0.3]])
TOY = np.stack([A, B])


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def noisy_models(n=600, k=3, seed=0):
    """Two informative models and one of pure noise, with targets and 3 folds."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    good = [softmax(2 * np.eye(k)[y] + rng.normal(0, 1, (n, k))) for _ in range(2)]
    noise = rng.dirichlet(np.ones(k), n)
    return np.stack(good + [noise]), y, np.arange(n) % 3


def test_simplex_weights_are_non_negative_and_sum_to_one():
    rng = np.random.default_rng(0)
    for u in [rng.uniform(blend.U_LOW, 1, 4) for _ in range(50)] + [np.array([1.0, 0.3, 1e-6])]:
        w = blend.simplex_weights(u)
        assert (w >= 0).all() and w.sum() == pytest.approx(1.0)
    assert blend.simplex_weights(np.array([1.0, 0.3, 1e-6]))[0] == 0.0  # u = 1: an exact zero
    np.testing.assert_allclose(blend.simplex_weights(np.ones(3)), [1 / 3] * 3)


def test_uniform_draws_cover_the_simplex_evenly():
    """Uniform u must give Dirichlet(1, 1, 1): each weight is Beta(1, 2), P(w < 1/2) = 3/4."""
    w = np.array([blend.simplex_weights(u)
                  for u in np.random.default_rng(1).uniform(0, 1, (20000, 3))])
    assert abs(w.mean(0) - 1 / 3).max() < 0.01
    assert abs((w < 0.5).mean(0) - 0.75).max() < 0.015
    assert abs(np.bincount(w.argmax(1)) / len(w) - 1 / 3).max() < 0.015


def test_mean_blend_is_the_weighted_mean_of_probabilities():
    np.testing.assert_allclose(blend.blend(TOY, [0.5, 0.5], "mean", TASK),
                               [[0.25, 0.75], [0.4, 0.6], [0.8, 0.2]])
    np.testing.assert_allclose(blend.blend(TOY, [0.75, 0.25], "mean", TASK)[0], [0.225, 0.775])
    np.testing.assert_allclose(blend.blend(TOY, [1.0, 0.0], "mean", TASK), A)


def test_geometric_blend_is_the_renormalised_mean_of_log_probabilities():
    got = blend.blend(TOY, [0.5, 0.5], "geometric", TASK)
    row0 = np.sqrt([0.2 * 0.3, 0.8 * 0.7])
    np.testing.assert_allclose(got[0], row0 / row0.sum())
    np.testing.assert_allclose(got.sum(1), 1.0)
    np.testing.assert_allclose(blend.blend(TOY, [1.0, 0.0], "geometric", TASK), A)
    # a zero probability stays finite and near zero instead of producing NaN
    zero = np.stack([np.array([[0.0, 1.0]]), np.array([[0.5, 0.5]])])
    out = blend.blend(zero, [0.5, 0.5], "geometric", TASK)
    assert np.isfinite(out).all() and out[0, 0] < 1e-6


def test_rank_blend_averages_rank_quantiles_over_rows():
    # A's ranks: class 0 -> 1,2,3; class 1 -> 3,2,1. B's: class 0 -> 2,1,3; class 1 -> 2,3,1.
    # Mean quantiles: class 0 -> 1/2, 1/2, 1; class 1 -> 5/6, 5/6, 1/3; rows renormalised.
    np.testing.assert_allclose(blend.blend(TOY, [0.5, 0.5], "rank", TASK),
                               [[3 / 8, 5 / 8], [3 / 8, 5 / 8], [3 / 4, 1 / 4]])
    ties = np.array([[[0.5, 0.5], [0.5, 0.5], [0.1, 0.9]]])
    np.testing.assert_allclose(blend.transform(ties, "rank")[0, :, 0], [2.5 / 3, 2.5 / 3, 1 / 3])


def test_rank_mode_ranks_each_fold_on_its_own_like_the_test_set():
    p = np.array([[[0.1, 0.9], [0.2, 0.8], [0.3, 0.7], [0.4, 0.6]]])
    folds = np.array([0, 1, 0, 1])
    np.testing.assert_allclose(blend.transform(p, "rank")[0, :, 0], [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(blend.transform(p, "rank", folds)[0, :, 0], [0.5, 0.5, 1.0, 1.0])
    two = np.concatenate([p, p[:, ::-1]])
    by_fold = np.concatenate([blend.blend(two[:, folds == f], [0.3, 0.7], "rank", TASK)
                              for f in (0, 1)])[np.argsort(np.argsort(folds, kind="stable"))]
    np.testing.assert_allclose(blend.blend(two, [0.3, 0.7], "rank", TASK, folds), by_fold)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown blend mode 'median'"):
        blend.blend(TOY, [0.5, 0.5], "median", TASK)


def test_tune_stores_simplex_weights_on_every_trial_and_minimises_log_loss():
    p, y, _ = noisy_models()
    study = search.new_study("log_loss", 0)
    tuned = search.tune(blend.Blender(p, TASK, blend.MODES), y, TASK, "log_loss", 30, ("mean",), study)
    assert len(study.trials) == 30 and study.direction.name == "MINIMIZE"
    for t in study.trials:
        w = np.array(t.user_attrs["weights"])
        assert (w >= 0).all() and w.sum() == pytest.approx(1.0) and t.user_attrs["mode"] == "mean"
    np.testing.assert_allclose(study.trials[0].user_attrs["weights"], [1 / 3] * 3)  # equal first
    assert tuned.score == min(t.value for t in study.trials)
    assert tuned.score == pytest.approx(metrics.score("log_loss", TASK, y, blend.blend(p, tuned.weights, "mean", TASK)))
    assert tuned.score < study.trials[0].value


def test_tune_is_deterministic_for_a_seed_and_tunes_the_mode_as_a_categorical():
    p, y, _ = noisy_models(n=300)
    studies = [search.new_study("log_loss", 7) for _ in range(2)]
    runs = [search.tune(blend.Blender(p, TASK, blend.MODES), y, TASK, "log_loss", 25, blend.MODES, study) for study in studies]
    assert runs[0].weights.tolist() == runs[1].weights.tolist() and runs[0].mode == runs[1].mode
    tried = {t.params["mode"] for t in studies[0].trials}
    assert tried == set(blend.MODES) and runs[0].mode in blend.MODES


def test_tune_counts_the_trials_already_in_the_study():
    p, y, _ = noisy_models(n=200)
    study = search.new_study("accuracy", 0)
    search.tune(blend.Blender(p, TASK, blend.MODES), y, TASK, "accuracy", 12, ("mean",), study)
    search.tune(blend.Blender(p, TASK, blend.MODES), y, TASK, "accuracy", 12, ("mean",), study)  # a rerun on a finished study
    assert len(study.trials) == 12


VALUES = tasks.Regression(("v",), 0.0, 100.0)


def test_a_rank_blend_of_values_stays_in_target_units():
    """Rank quantiles map back through the blended values' own distribution: a lone model's rank
    blend is its own values, and a blend of two lies within their range, in the same order as
    the rank blend (so Spearman-type metrics are untouched) and in target units (not (0, 1])."""
    rng = np.random.default_rng(0)
    a = rng.uniform(1, 100, (50, 1))
    b = a + rng.normal(0, 10, (50, 1))
    np.testing.assert_allclose(blend.blend(a[None], [1.0], "rank", VALUES), a)
    out = blend.blend(np.stack([a, b]), [0.5, 0.5], "rank", VALUES)
    mean = blend.blend(np.stack([a, b]), [0.5, 0.5], "mean", VALUES)
    assert out.min() >= mean.min() - 1e-9 and out.max() <= mean.max() + 1e-9 and out.max() > 50
    ranks = blend.combine(blend.transform(np.stack([a, b]), "rank"), [0.5, 0.5], "rank", False)
    assert (np.diff(out[np.argsort(ranks[:, 0]), 0]) >= 0).all()  # monotone in the rank blend
    folds = np.arange(50) % 2  # ranked within each fold, mapped within each fold
    by_fold = blend.blend(np.stack([a, b]), [0.5, 0.5], "rank", VALUES, folds)
    np.testing.assert_allclose(by_fold[folds == 1],
                               blend.blend(np.stack([a, b])[:, folds == 1], [0.5, 0.5], "rank", VALUES))
