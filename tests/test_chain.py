"""End to end on a tiny competition: folds -> train -> predict -> ensemble -> submit."""
import json
import os
import stat

import pandas as pd

from conftest import EXPERIMENT, write_yaml
from pipeline import ensemble, folds, package, predict, submit, train


def test_whole_chain_writes_a_valid_submission(tiny):
    learning = {**EXPERIMENT, "train": {**EXPERIMENT["train"], "epochs": 12}}
    write_yaml(tiny / "configs/tiny/lenet5.yaml", learning)
    write_yaml(tiny / "configs/tiny/lenet5b.yaml", {**learning, "seed": 1})
    write_yaml(tiny / "configs/tiny/ensemble.yaml",
               {"competition": "competition.yaml", "experiments": ["lenet5", "lenet5b"],
                "trials": 5})
    folds.main(["configs/tiny/competition.yaml"])
    for exp in ("lenet5", "lenet5b"):
        train.main([f"configs/tiny/{exp}.yaml"])
        predict.main([f"configs/tiny/{exp}.yaml"])
    ensemble.main(["configs/tiny/ensemble.yaml"])
    submit.main(["configs/tiny/ensemble.yaml"])

    oof = pd.read_csv(tiny / "runs/tiny/lenet5/oof.csv")
    assert list(oof.columns) == ["id", "fold", "class_0", "class_1", "class_2"]
    assert len(oof) == 24 and oof[["class_0", "class_1", "class_2"]].sum(1).round(6).eq(1).all()
    scores = json.loads((tiny / "runs/tiny/lenet5/scores.json").read_text())
    assert set(scores["per_fold"]) == {"0", "1"}
    assert scores["cv"] >= scores["baseline_cv"] + 0.4  # learnt: prior 1/3, measured 1.0
    sub = pd.read_csv(tiny / "submissions/tiny.csv")
    sample = pd.read_csv(tiny / "data/tiny/sample_submission.csv")
    assert list(sub.columns) == list(sample.columns)
    assert list(sub["image_id"]) == list(sample["image_id"])
    assert sub["target"].isin(["class_0", "class_1", "class_2"]).all()


def test_every_output_takes_the_umasks_mode(tiny):
    """Written through temporary files, the outputs still get the mode any new file gets (0644
    under umask 022), so several users or machines can share one folder."""
    saved = os.umask(0o022)
    try:
        folds.main(["configs/tiny/competition.yaml"])
        train.main(["configs/tiny/lenet5.yaml"])
        predict.main(["configs/tiny/lenet5.yaml"])
        write_yaml(tiny / "configs/tiny/ensemble.yaml",
                   {"competition": "competition.yaml", "experiments": ["lenet5"], "trials": 3})
        ensemble.main(["configs/tiny/ensemble.yaml"])
        submit.main(["configs/tiny/ensemble.yaml"])
        package.main(["configs/tiny/ensemble.yaml"])
    finally:
        os.umask(saved)
    files = [p for top in ("folds", "runs", "submissions", "packages", "cache")
             for p in (tiny / top).rglob("*")]
    assert len(files) > 40
    modes = {p.relative_to(tiny).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in files}
    assert {p: m for p, m in modes.items() if (tiny / p).is_file() and m != 0o644} == {}
    assert {m for p, m in modes.items() if (tiny / p).is_dir()} == {0o755}, modes
