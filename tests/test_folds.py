"""Fold assignment: deterministic, stratified, group-disjoint, with clear errors."""
import numpy as np
import pandas as pd
import pytest

from pipeline import folds
from pipeline.core import splits
from pipeline.core.errors import UserError


def data(n=120, n_groups=30, seed=0):
    rng = np.random.default_rng(seed)
    targets = rng.choice(["a", "b", "c"], size=n, p=[0.5, 0.3, 0.2])
    groups = rng.integers(0, n_groups, size=n)
    return targets, groups


@pytest.mark.parametrize("method", ["kfold", "stratified", "group", "stratified_group"])
def test_same_seed_same_folds_other_seed_other_folds(method):
    targets, groups = data()
    g = groups if "group" in method else None
    a = splits.assign_folds(targets, g, 5, method, seed=7)
    b = splits.assign_folds(targets, g, 5, method, seed=7)
    c = splits.assign_folds(targets, g, 5, method, seed=8)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert set(a) == set(range(5))


@pytest.mark.parametrize("method", ["group", "stratified_group"])
def test_groups_never_straddle_folds(method):
    targets, groups = data()
    fold = splits.assign_folds(targets, groups, 4, method, seed=0)
    per_group = pd.DataFrame({"g": groups, "f": fold}).groupby("g")["f"].nunique()
    assert (per_group == 1).all()


def test_stratified_keeps_class_ratios():
    targets, _ = data(n=300)
    fold = splits.assign_folds(targets, None, 5, "stratified", seed=0)
    for k in range(5):
        share = np.mean(targets[fold == k] == "a")
        assert abs(share - np.mean(targets == "a")) < 0.03


def test_auto_picks_stratified_group_when_groups_given():
    assert splits.choose_method("auto", has_groups=True) == "stratified_group"
    assert splits.choose_method("auto", has_groups=False) == "stratified"
    with pytest.raises(UserError, match="folds.method: group needs data.group_column"):
        splits.choose_method("group", has_groups=False)


@pytest.mark.parametrize("method", ["kfold", "stratified"])
def test_a_method_that_ignores_the_group_column_is_refused(method):
    """An explicit method without groups would let one group's rows fall in several folds."""
    targets, groups = data()
    with pytest.raises(UserError, match=f"folds.method: {method} ignores data.group_column"):
        splits.assign_folds(targets, groups, 5, method, seed=0)


def test_too_many_folds_for_a_class():
    targets = np.array(["a"] * 10 + ["b"] * 3)
    with pytest.raises(UserError, match="folds.n_splits: 5 folds but class 'b' has only 3 rows"):
        splits.assign_folds(targets, None, 5, "stratified", seed=0)


def test_stage_writes_fold_file_deterministically(tiny):
    folds.main(["configs/tiny/competition.yaml"])
    first = (tiny / "folds/tiny.csv").read_bytes()
    folds.main(["configs/tiny/competition.yaml"])
    assert (tiny / "folds/tiny.csv").read_bytes() == first
    df = pd.read_csv(tiny / "folds/tiny.csv")
    assert list(df.columns) == ["id", "fold"] and len(df) == 24
    assert sorted(df["fold"].unique()) == [0, 1]


def test_stage_uses_group_column(tmp_path, monkeypatch):
    from conftest import COMPETITION, make_competition, write_yaml
    monkeypatch.chdir(tmp_path)
    make_competition(tmp_path / "data/tiny", groups=True)
    cfg = {**COMPETITION, "data": {**COMPETITION["data"], "group_column": "site"}}
    write_yaml(tmp_path / "configs/tiny/competition.yaml", cfg)
    folds.main(["configs/tiny/competition.yaml"])
    df = pd.read_csv("folds/tiny.csv").merge(pd.read_csv("data/tiny/train.csv"),
                                             left_on="id", right_on="image_id")
    assert (df.groupby("site")["fold"].nunique() == 1).all()


def test_multilabel_folds_stratify_every_label_and_regression_folds_stratify_bins():
    rng = np.random.default_rng(0)
    labels = (rng.random((200, 5)) < [0.5, 0.3, 0.1, 0.05, 0.6]).astype(np.float32)
    fold = splits.assign_folds(labels, None, 4, "auto", seed=0, strata="labels")
    assert set(fold) == {0, 1, 2, 3}
    for j in range(5):  # every label in every fold, in about its share
        counts = np.array([labels[fold == k, j].sum() for k in range(4)])
        assert counts.min() > 0 and counts.max() - counts.min() <= 2
    values = rng.normal(size=200) ** 3  # skewed: bins keep the tails spread over the folds
    fold = splits.assign_folds(values, None, 4, "auto", seed=0, strata="values")
    top = np.argsort(values)[-20:]
    assert np.bincount(fold[top], minlength=4).min() >= 4
    groups = np.arange(200) // 5
    fold = splits.assign_folds(values, groups, 4, "auto", seed=0, strata="values")
    assert all(len(set(fold[groups == g])) == 1 for g in np.unique(groups))
