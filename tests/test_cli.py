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
    assert " ".join(line.strip() for line in err[:-1]) == \
        "usage: python -m pipeline.train [-h] [--fold FOLD] [--fresh] config [key=value ...]"
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
    epochs_done = torch.load(last, weights_only=True)["state"]["epoch"]
    resumes = epochs_done + 1  # counted from 1, as the progress lines ("epoch 3/12") count
    assert lines[0] == f"interrupted: lenet5: the next train resumes at fold 0 stage 0 epoch {resumes}"
    assert f"fold 0 stage 0 epoch {epochs_done}/12: train loss" in err  # the last one done

    train.main(["configs/tiny/lenet5.yaml", "--fold", "0"])
    err = capsys.readouterr().err
    assert f"fold 0: resuming at stage 0 epoch {resumes}/12" in err
    assert f"fold 0 stage 0 epoch {resumes}/12: train loss" in err  # the first one trained
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


def make_in(folder, *args: str) -> subprocess.CompletedProcess:
    """make on this repository's Makefile in `folder` (PY=true: the stages do nothing)."""
    env = {k: v for k, v in os.environ.items() if k not in ("COMP", "MAKEFLAGS", "MAKELEVEL")}
    return subprocess.run(["make", "--no-print-directory", "-f", str(REPO / "Makefile"), *args,
                           "PY=true"], cwd=folder, env=env, capture_output=True, text=True)


def fake_outputs(folder, *paths: str) -> None:
    """Files make takes for built, newer than the configs and each newer than the one before."""
    for config in (folder / "configs/tiny").glob("*.yaml"):
        os.utime(config, (time.time() - 100, time.time() - 100))
    for age, path in enumerate(reversed(paths)):
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text("x\n")
        os.utime(folder / path, (time.time() - 10 - age, time.time() - 10 - age))


def test_make_infer_takes_its_inputs_from_the_competitions_config(tiny):
    """make infer COMP=c: the test images and sample submission of configs/c/competition.yaml,
    not data/c/test (which need not exist)."""
    out = make_in(tiny, "-n", "infer", "COMP=tiny").stdout
    assert "--config configs/tiny/competition.yaml" in out and "--test-images" not in out
    assert "--test-images elsewhere" in make_in(tiny, "-n", "infer", "COMP=tiny",
                                                "TEST_IMAGES=elsewhere").stdout


def test_force_reruns_one_stage_of_one_experiment_and_nothing_upstream(tiny):
    write_yaml(tiny / "configs/tiny/other.yaml", EXPERIMENT)
    fake_outputs(tiny, "runs/tiny/train-data.json", "runs/tiny/test-data.json", "folds/tiny.csv",
                 "runs/tiny/lenet5/oof.csv", "runs/tiny/other/oof.csv")
    out = make_in(tiny, "-n", "train", "COMP=tiny", "EXP=other", "FORCE=1").stdout
    started = [line for line in out.splitlines() if "-m pipeline." in line and "--check" not in line]
    assert started == ["true -m pipeline.train configs/tiny/other.yaml   --fresh"]
    assert [line for line in make_in(tiny, "-n", "train", "COMP=tiny").stdout.splitlines()
            if "pipeline.train" in line] == []  # without FORCE: up to date
    refused = make_in(tiny, "-n", "train", "COMP=tiny", "EXP=absent")
    assert refused.returncode == 2 and "EXP=absent: no experiment configs/tiny/absent.yaml" in \
        refused.stderr


def test_overrides_that_change_nothing_are_pointed_out(tiny):
    fake_outputs(tiny, "runs/tiny/train-data.json", "runs/tiny/test-data.json", "folds/tiny.csv",
                 "runs/tiny/lenet5/oof.csv")
    out = make_in(tiny, "train", "COMP=tiny", "DEVICE=cuda").stdout
    assert "note: device=cuda: no effect, nothing was out of date; add FORCE=1 to rerun" in out
    assert "no effect" not in make_in(tiny, "train", "COMP=tiny").stdout  # no overrides, no note
