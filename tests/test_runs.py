"""Run history, provenance, the leaderboard and pruning."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from conftest import EXPERIMENT, write_yaml
from pipeline import folds, leaderboard, predict, prune, train
from pipeline.core import history, layout, provenance
from pipeline.reports.leaderboard import build as build_leaderboard
from pipeline.core.config import load_competition, load_experiment

REPO = Path(__file__).resolve().parents[1]
EXP = "configs/tiny/lenet5.yaml"
ONE_EPOCH = {**EXPERIMENT, "train": {**EXPERIMENT["train"], "epochs": 1}}


def scores_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "scores.json").read_text())


def test_editing_an_experiment_keeps_the_old_run_readable_and_listed(tiny, capsys):
    write_yaml(tiny / EXP, ONE_EPOCH)
    folds.main(["configs/tiny/competition.yaml"])
    train.main([EXP])
    predict.main([EXP])
    run_dir = tiny / "runs/tiny/lenet5"
    old_tag, old_scores = (run_dir / "tag.txt").read_text().strip(), scores_of(run_dir)
    old_oof = (run_dir / "oof_tta.csv").read_bytes()

    write_yaml(tiny / EXP, {**ONE_EPOCH, "train": {**ONE_EPOCH["train"], "lr": 0.01}})
    train.main([EXP])
    assert "kept the finished run in runs/tiny/lenet5/history/" in capsys.readouterr().err
    new_tag = (run_dir / "tag.txt").read_text().strip()
    assert new_tag != old_tag and scores_of(run_dir)["tag"] == new_tag
    assert not (run_dir / "oof_tta.csv").exists(), "nothing of the old version is mixed in"
    assert json.loads((run_dir / "config.json").read_text())["train"]["lr"] == 0.01

    past = run_dir / "history" / old_tag
    assert scores_of(past) == old_scores and (past / "oof_tta.csv").read_bytes() == old_oof
    assert (past / "fold0/best.safetensors").is_file() and (past / "report.md").is_file()

    leaderboard.main(["configs/tiny/competition.yaml"])
    board = pd.read_csv(tiny / "runs/tiny/leaderboard.csv", dtype={"version": str})
    by_version = board.set_index("version")
    assert set(board["version"]) == {"current", old_tag}
    assert by_version.loc[old_tag, "cv_tta"] == pytest.approx(old_scores["cv_tta"], abs=1e-6)
    assert by_version.loc["current", "cv"] == pytest.approx(scores_of(run_dir)["cv"], abs=1e-6)
    assert by_version.loc[old_tag, "changes"] == "train.lr=0.003"  # against the current config
    assert "| lenet5 | " + old_tag + " |" in capsys.readouterr().out


def test_an_unfinished_stale_run_is_discarded_not_archived(tiny, capsys):
    write_yaml(tiny / EXP, ONE_EPOCH)
    folds.main(["configs/tiny/competition.yaml"])
    train.main([EXP, "--fold", "0"])
    write_yaml(tiny / EXP, {**ONE_EPOCH, "seed": 3})
    train.main([EXP, "--fold", "1"])
    assert "unfinished run built from" in capsys.readouterr().err
    run_dir = tiny / "runs/tiny/lenet5"
    assert not (run_dir / "history").exists() and not (run_dir / "fold0").exists()


def test_a_finished_fold_keeps_only_what_prediction_needs_and_records_provenance(tiny):
    write_yaml(tiny / EXP, ONE_EPOCH)
    folds.main(["configs/tiny/competition.yaml"])
    train.main([EXP])
    run_dir = tiny / "runs/tiny/lenet5"
    for k in (0, 1):
        assert sorted(p.name for p in (run_dir / f"fold{k}").iterdir()) == \
            ["best.safetensors", "log.csv", "oof.csv"]
    record = json.loads((run_dir / "provenance.json").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()
    assert record["commit"] == head and isinstance(record["dirty"], bool)
    assert record["code_hash"] == provenance.code_hash()
    assert set(record["versions"]) == {"python", "torch", "timm", "albumentations", "optuna"}
    assert record["versions"]["torch"].split("+")[0] == __import__("torch").__version__.split("+")[0]
    assert (record["device"], record["precision"], record["processes"]) == ("cpu (CPU)", "fp32", 1)
    assert set(record["fold_seconds"]) == {"0", "1"} and all(
        s > 0 for s in record["fold_seconds"].values())


def test_code_flag_names_changed_and_uncommitted_code():
    same = {"code_hash": provenance.code_hash(), "commit": "abcdef123456", "dirty": False}
    assert provenance.code_changed(same) is None
    assert provenance.code_changed({**same, "dirty": True}) == \
        "built from uncommitted code on abcdef12"
    assert provenance.code_changed({**same, "code_hash": "0" * 16}) == \
        "code changed since abcdef12"


def fake_run(folder: Path, cv: float, metric: str = "accuracy", tta: float | None = None,
             lr: float = 0.001, code: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    scores = {"metric": metric, "cv": cv, "per_fold": {"0": cv - 0.01, "1": cv + 0.01}, "tag": "t"}
    if tta is not None:
        scores.update(cv_tta=tta, per_fold_tta={"0": tta, "1": tta}, tta_views="hflip")
    (folder / "scores.json").write_text(json.dumps(scores))
    (folder / "test.csv").write_text("id\n")
    (folder / "config.json").write_text(load_experiment(
        "configs/tiny/lenet5.yaml", [f"train.lr={lr}", f"metric={metric}"]).model_dump_json())
    (folder / "provenance.json").write_text(json.dumps(
        {"code_hash": code or provenance.code_hash(), "commit": "abc", "dirty": False,
         "fold_seconds": {"0": 30, "1": 90}}))


@pytest.mark.parametrize("metric", ["accuracy", "log_loss"])
def test_leaderboard_lists_every_version_sorted_in_the_metric_direction(tiny, metric):
    comp = Path("runs/tiny")
    fake_run(comp / "a", 0.70, metric, tta=0.72)
    fake_run(comp / "a/history/old1", 0.60, metric, lr=0.01)
    fake_run(comp / "a/history/old2", 0.90, metric, lr=0.02, code="0" * 16)
    fake_run(comp / "b", 0.80, metric)
    (comp / "ensemble").mkdir()
    (comp / "ensemble/weights.json").write_text(json.dumps({"weights": {"a": 0.25, "b": 0.75}}))
    blended = (comp / "ensemble/weights.json").stat().st_mtime
    for version, age in (("a/history/old1", 9), ("a/history/old2", 8), ("a", 5)):
        os.utime(comp / version / "test.csv", (blended - age, blended - age))
    os.utime(comp / "b/test.csv", (blended + 9, blended + 9))  # predicted after the blend
    cfg = load_competition("configs/tiny/competition.yaml", [f"metric={metric}"])
    df, md = build_leaderboard(cfg)

    expected = {("a", "current"): 0.72, ("a", "old1"): 0.60, ("a", "old2"): 0.90,
                ("b", "current"): 0.80}
    got = {(r.experiment, r.version): r.cv_tta if pd.notna(r.cv_tta) else r.cv
           for r in df.itertuples()}
    assert got == pytest.approx(expected)
    order = sorted(expected, key=expected.get, reverse=metric == "accuracy")
    assert list(zip(df["experiment"], df["version"])) == order
    assert list(df["rank"]) == [1, 2, 3, 4]
    row = df.set_index(["experiment", "version"])
    assert row.loc[("a", "current"), "fold_std"] == pytest.approx(0.0)
    assert row.loc[("b", "current"), "fold_std"] == pytest.approx(0.01)
    assert row.loc[("a", "current"), "blend_weight"] == "0.250"  # the newest before the blend
    assert pd.isna(row.loc[("a", "old1"), "blend_weight"])
    assert pd.isna(row.loc[("b", "current"), "blend_weight"])  # not the version blended
    assert row.loc[("a", "current"), "train_min"] == 2.0
    assert row.loc[("a", "old1"), "changes"] == "train.lr=0.01"
    assert row.loc[("a", "current"), "changes"] == "train.epochs=2 train.batch_size=8"
    assert row.loc[("a", "old2"), "code"].startswith("code changed since")
    assert row.loc[("a", "current"), "code"] == ""
    assert md.splitlines()[2].startswith("| rank | experiment | version | cv_tta | cv |")
    assert (comp / "leaderboard.md").read_text() == md
    assert pd.read_csv(comp / "leaderboard.csv")["experiment"].tolist() == list(df["experiment"])


def test_prune_keeps_the_newest_past_versions_and_every_current_run(tiny, capsys):
    comp = Path("runs/tiny")
    for i, name in enumerate(["v1", "v2", "v3"]):
        fake_run(comp / f"a/history/{name}", 0.5)
        stamp = 1_700_000_000 + i
        os.utime(comp / f"a/history/{name}", (stamp, stamp))
    fake_run(comp / "a", 0.6)
    prune.main(["configs/tiny/competition.yaml", "--keep", "1"])
    assert sorted(p.name for p in (comp / "a/history").iterdir()) == ["v3"]
    assert (comp / "a/scores.json").is_file()
    assert capsys.readouterr().err.startswith("pruned 2 past versions; runs/tiny now holds ")
    prune.main(["configs/tiny/competition.yaml", "--keep", "0"])
    assert list((comp / "a/history").iterdir()) == [] and (comp / "a/scores.json").is_file()


def test_prune_keeps_past_versions_tuning_studies_unless_asked(tiny, capsys):
    comp = Path("runs/tiny")
    for i, name in enumerate(["v1", "v2"]):
        fake_run(comp / f"a/history/{name}", 0.5)
        (comp / f"a/history/{name}/tune/trial_0000").mkdir(parents=True)
        (comp / f"a/history/{name}/tune/study.db").write_text("trials")
        os.utime(comp / f"a/history/{name}", (1_700_000_000 + i, 1_700_000_000 + i))
    fake_run(comp / "a", 0.6)
    prune.main(["configs/tiny/competition.yaml", "--keep", "1"])
    history_dir = comp / "a/history"
    assert [p.name for p in (history_dir / "v1").iterdir()] == ["tune"]  # the study survives
    assert (history_dir / "v1/tune/study.db").read_text() == "trials"
    assert (history_dir / "v2/scores.json").is_file()
    assert capsys.readouterr().err.startswith(
        "pruned 1 past versions, kept 1 past tuning studies (history/<tag>/tune/; --studies "
        "removes them); runs/tiny now holds ")
    prune.main(["configs/tiny/competition.yaml", "--keep", "1"])  # a kept study is no version
    assert (history_dir / "v2/scores.json").is_file()
    assert capsys.readouterr().err.startswith("pruned 0 past versions, kept 1 past tuning")
    prune.main(["configs/tiny/competition.yaml", "--keep", "0"])
    assert sorted(p.name for p in history_dir.iterdir()) == ["v1", "v2"]
    assert capsys.readouterr().err.startswith("pruned 1 past versions, kept 2 past tuning")
    prune.main(["configs/tiny/competition.yaml", "--keep", "0", "--studies"])
    assert list(history_dir.iterdir()) == [] and (comp / "a/scores.json").is_file()
    assert capsys.readouterr().err.startswith("pruned 0 past versions; runs/tiny now holds ")


def test_an_archive_cut_short_is_completed_on_the_next_start(tmp_path):
    run_dir = tmp_path / "exp"
    partial = run_dir / "history/.old.partial"
    partial.mkdir(parents=True)
    (partial / "scores.json").write_text("{}")
    (partial / "tag.txt").write_text("old\n")
    history.start_version(layout.Run(run_dir), "new")
    assert (run_dir / "history/old/scores.json").is_file()
    assert [p.name for p in history.versions(layout.Run(run_dir))] == ["old"]
    assert (run_dir / "tag.txt").read_text() == "new\n"
