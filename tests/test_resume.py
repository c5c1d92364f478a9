"""Faults: SIGKILL mid-training and mid-predict, rerun, and get byte-identical final files;
two separate runs of the chain give byte-identical artifacts."""
from __future__ import annotations

import hashlib
import os
import pkgutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pipeline
from conftest import COMPETITION, EXPERIMENT, make_competition, write_yaml
from pipeline import ensemble, folds, predict, submit, train

REPO = Path(__file__).resolve().parents[1]
FINAL = ["folds/tiny.csv", "runs/tiny/lenet5/oof.csv", "runs/tiny/lenet5/oof_tta.csv",
         "runs/tiny/lenet5/test.csv", "submissions/tiny.csv"]
EXP = {**EXPERIMENT, "train": {**EXPERIMENT["train"], "epochs": 6}, "tta": {"views": "hflip"}}


def setup_folder(root: Path) -> Path:
    make_competition(root / "data/tiny")
    write_yaml(root / "configs/tiny/competition.yaml", COMPETITION)
    write_yaml(root / "configs/tiny/lenet5.yaml", EXP)
    write_yaml(root / "configs/tiny/ensemble.yaml",
               {"competition": "competition.yaml", "experiments": ["lenet5"], "trials": 5})
    return root


def stage(root: Path, name: str, config: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", f"pipeline.{name}", f"configs/tiny/{config}.yaml"],
                            cwd=root, env=env, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]


def kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    """SIGKILL `proc` as soon as `ready()` holds (polled every 5 ms)."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, "stage finished before the kill point"
        assert time.time() < deadline, "kill point never reached"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


def blend_and_submit(root: Path, monkeypatch) -> None:
    monkeypatch.chdir(root)
    ensemble.main(["configs/tiny/ensemble.yaml"])
    submit.main(["configs/tiny/ensemble.yaml"])


def digests(root: Path) -> dict:
    return {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in FINAL}


def test_sigkill_during_train_and_predict_then_resume_is_byte_identical(tmp_path, monkeypatch):
    ref = setup_folder(tmp_path / "ref")
    for name, config in (("folds", "competition"), ("train", "lenet5"), ("predict", "lenet5")):
        finish(stage(ref, name, config))
    blend_and_submit(ref, monkeypatch)

    run = setup_folder(tmp_path / "killed")
    finish(stage(run, "folds", "competition"))
    first_epoch = run / "runs/tiny/lenet5/fold0/last.pt"
    kill_when(stage(run, "train", "lenet5"), first_epoch.is_file)
    assert not (run / "runs/tiny/lenet5/oof.csv").exists()
    finish(stage(run, "train", "lenet5"))

    proc = stage(run, "predict", "lenet5")
    kill_when(proc, lambda: "fold 0 predicted" in (proc.stderr.readline() or ""))
    assert not (run / "runs/tiny/lenet5/test.csv").exists()
    assert not list((run / "runs/tiny/lenet5").glob(".*.tmp")), "no half-written file is left"
    finish(stage(run, "predict", "lenet5"))
    blend_and_submit(run, monkeypatch)

    assert digests(run) == digests(ref)


def test_two_runs_in_separate_folders_are_byte_identical(tmp_path, monkeypatch):
    results = []
    for name in ("a", "b"):
        root = setup_folder(tmp_path / name)
        monkeypatch.chdir(root)
        folds.main(["configs/tiny/competition.yaml"])
        train.main(["configs/tiny/lenet5.yaml"])
        predict.main(["configs/tiny/lenet5.yaml"])
        blend_and_submit(root, monkeypatch)
        results.append(digests(root))
    assert results[0] == results[1]


STAGES = sorted(m.name for m in pkgutil.iter_modules(pipeline.__path__) if not m.ispkg)


@pytest.mark.parametrize("module", STAGES)
def test_every_stage_has_help(module, capsys):
    mod = __import__(f"pipeline.{module}", fromlist=["main"])
    with pytest.raises(SystemExit) as exc:
        mod.main(["--help"])
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out
