"""make as a user drives it: a changed train table or image set rebuilds what it affects and
nothing else; an up-to-date project does no work."""
import subprocess
import sys
from pathlib import Path

import pandas as pd

from conftest import EXPERIMENT, write_yaml
from pipeline import ensemble, folds, predict, submit, train
from pipeline.core.config import load_experiment
from pipeline.training.experiment import prepare

REPO = Path(__file__).resolve().parents[1]


def dry_run(tiny: Path, *goals: str) -> list[str]:
    """The stage commands `make -n` would start, e.g. ['train lenet5', 'predict lenet5'] (the
    data check itself runs: it decides what is out of date)."""
    done = subprocess.run(["make", "-f", str(REPO / "Makefile"), "--no-print-directory", "-n",
                           *goals, "COMP=tiny", f"PY={sys.executable}"], cwd=tiny,
                          capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    found = []
    for line in done.stdout.splitlines():
        for stage in ("folds", "train", "predict", "ensemble", "submit"):
            if f"-m pipeline.{stage} " in line and "--check" not in line:
                found.append(f"{stage} {Path(line.split()[3]).stem}")
    return found


def build(tiny: Path) -> None:
    """What `make all` builds, in its order (in this process: faster than make's)."""
    folds.main(["configs/tiny/competition.yaml", "--check"])
    folds.main(["configs/tiny/competition.yaml"])
    train.main(["configs/tiny/lenet5.yaml"])
    predict_and_submit()


def predict_and_submit() -> None:
    predict.main(["configs/tiny/lenet5.yaml"])
    ensemble.main(["configs/tiny/ensemble.yaml"])
    submit.main(["configs/tiny/ensemble.yaml"])


def test_edited_labels_and_images_rebuild_what_they_affect_and_nothing_else(tiny):
    write_yaml(tiny / "configs/tiny/ensemble.yaml",
               {"competition": "competition.yaml", "experiments": ["lenet5"], "trials": 3})
    write_yaml(tiny / "configs/tiny/lenet5.yaml", {**EXPERIMENT, "train": {**EXPERIMENT["train"],
                                                                         "epochs": 1}})
    build(tiny)
    assert dry_run(tiny, "all") == []  # up to date: nothing to rebuild

    test_image = next((tiny / "data/tiny/test").iterdir())
    test_image.write_bytes(test_image.read_bytes())  # a new modification time: re-predict only
    assert dry_run(tiny, "all") == ["predict lenet5", "ensemble ensemble", "submit ensemble"]
    predict_and_submit()

    tag = prepare(load_experiment("configs/tiny/lenet5.yaml")).tag
    table = pd.read_csv(tiny / "data/tiny/train.csv", dtype=str)
    table.loc[0, "target"] = "class_1"  # a corrected label: the same ids, maybe the same folds
    table.to_csv(tiny / "data/tiny/train.csv", index=False)
    assert dry_run(tiny, "all") == ["folds competition", "train lenet5", "predict lenet5",
                                    "ensemble ensemble", "submit ensemble"]
    assert prepare(load_experiment("configs/tiny/lenet5.yaml")).tag != tag  # retrained, not reused
