"""The command line as a new user meets it: usage text, argument order, Ctrl-C, make's COMP."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import EXPERIMENT, write_yaml
from pipeline import folds, train

REPO = Path(__file__).resolve().parents[1]


def test_usage_names_the_module_and_marks_overrides_optional(capsys):
    with pytest.raises(SystemExit) as stop:
        train.main([])
    err = capsys.readouterr().err.splitlines()
    assert stop.value.code == 2
    assert err[0] == "usage: python -m pipeline.train [-h] [--fold FOLD] config [key=value ...]"
    assert err[-1] == "python -m pipeline.train: error: the following arguments are required: config"


def test_options_and_overrides_in_any_order(tiny):
    folds.main(["configs/tiny/competition.yaml"])
    train.main(["configs/tiny/lenet5.yaml", "--fold", "0", "train.epochs=1", "seed=3"])
    run_dir = tiny / "runs/tiny/lenet5"
    assert len(pd.read_csv(run_dir / "fold0/log.csv")) == 1 and not (run_dir / "fold1").exists()
    assert '"seed": 3' in (run_dir / "config.json").read_text()


def test_ctrl_c_during_training_prints_one_line_exits_130_and_the_rerun_resumes(tiny, capsys):
    write_yaml(tiny / "configs/tiny/lenet5.yaml",
               {**EXPERIMENT, "train": {**EXPERIMENT["train"], "epochs": 12}})
    folds.main(["configs/tiny/competition.yaml"])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pipeline.train", "configs/tiny/lenet5.yaml"]
    proc = subprocess.Popen(cmd, cwd=tiny, env=env, stderr=subprocess.PIPE, text=True)
    last = tiny / "runs/tiny/lenet5/fold0/last.pt"
    deadline = time.time() + 120
    while not last.is_file():
        assert proc.poll() is None and time.time() < deadline, "no epoch finished"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1 and lines[0] == err.strip().splitlines()[-1]
    epochs_done = torch.load(last, weights_only=True)["state"]["epoch"]  # the resume point
    assert lines[0] == f"interrupted: lenet5: the next train resumes at fold 0 stage 0 epoch {epochs_done}"

    train.main(["configs/tiny/lenet5.yaml", "--fold", "0"])
    assert f"fold 0: resuming at stage 0 epoch {epochs_done}" in capsys.readouterr().err
    assert pd.read_csv(tiny / "runs/tiny/lenet5/fold0/log.csv")["epoch"].iloc[-1] == 11
    assert (tiny / "runs/tiny/lenet5/fold0/oof.csv").is_file() and not last.exists()


def make(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("COMP", "MAKEFLAGS", "MAKELEVEL")}
    return subprocess.run(["make", "-n", *args], cwd=REPO, env=env, capture_output=True, text=True)


def test_make_refuses_a_missing_or_unknown_comp_in_one_line():
    out = make("all")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "COMP is not set: say which competition, e.g. make all COMP=digits (configs/ has: " \
        in out.stderr
    out = make("train", "COMP=nope")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "configs/nope/competition.yaml not found: COMP=nope is not a competition" in out.stderr
    assert make("help").returncode == 0
