"""Tuning stage: the search-space parser, a study end to end, pruning, shared workers."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
import yaml
from optuna.trial import TrialState

from conftest import EXPERIMENT, write_yaml
from pipeline import folds, tune
from pipeline.tuning import study as tuning_study
from pipeline.tuning.results import tuned_yaml
from pipeline.tuning.run import tune_experiment
from pipeline.tuning.trials import objective
from pipeline.core.config import config_hash, experiment_data, load_experiment
from pipeline.core.errors import UserError
from pipeline.tuning.space import Param, parse_space, split_path

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"stages": [{"epochs": 1, "train": "head"}, {"epochs": 2, "train": "all"}]}


def space_of(tiny, space, **experiment):
    write_yaml(tiny / "configs/tiny/exp.yaml", {**EXPERIMENT, **experiment, "tune": {"space": space}})
    return parse_space(experiment_data("configs/tiny/exp.yaml"))


def test_every_kind_of_range_and_choice_is_parsed_to_its_key_type(tiny):
    params = space_of(tiny, {
        "train.lr": {"low": "1e-4", "high": 1.0e-2, "log": True},
        "train.weight_decay": {"low": 0, "high": 0.1, "step": 0.05},
        "train.epochs": {"low": 2, "high": 8},
        "train.batch_size": {"low": 8.0, "high": 32, "step": 8},
        "finetune.stages[1].epochs": {"low": 2, "high": 6},
        "model.drop_rate": {"low": 0, "high": 0.5},
        "augment.preset": ["light", "medium", "heavy"],
        "train.ema_decay": [None, 0.9],
    }, finetune=STAGES)
    assert params == [
        Param("train.lr", "float", 1e-4, 1e-2, True, None),
        Param("train.weight_decay", "float", 0.0, 0.1, False, 0.05),
        Param("train.epochs", "int", 2, 8, False, 1),
        Param("train.batch_size", "int", 8, 32, False, 8),
        Param("finetune.stages[1].epochs", "int", 2, 6, False, 1),
        Param("model.drop_rate", "float", 0.0, 0.5, False, None),  # int bounds, float key
        Param("augment.preset", "categorical", choices=("light", "medium", "heavy")),
        Param("train.ema_decay", "categorical", choices=(None, 0.9)),
    ]
    assert split_path("finetune.stages[1].epochs") == ["finetune", "stages", 1, "epochs"]


@pytest.mark.parametrize("space, message", [
    ({"train.lrr": {"low": 1, "high": 2}}, "tune.space: train.lrr: unknown key train.lrr"),
    ({"trian.lr": [0.1]}, "tune.space: trian.lr: unknown key trian"),
    ({"finetune.stages[2].epochs": {"low": 1, "high": 3}},
     "tune.space: finetune.stages[2]: no such item in the experiment's config"),
    ({"train.lr.max": [1]}, "tune.space: train.lr is not a section"),
    ({"train..lr": [1]}, "tune.space: 'train..lr' is not a dot path"),
    ({"tune.trials": [1, 2]}, "tune.space: tune.trials: tune cannot be tuned"),
    ({"train.epochs": {"low": 1.5, "high": 4}},
     "tune.space: train.epochs: low 1.5 does not fit this key (Input should be a valid integer"),
    ({"train.epochs": {"low": 1.0, "high": 4, "step": 0.5}},
     "tune.space: train.epochs: an integer key needs integer low, high and step"),
    ({"train.lr": {"low": -1, "high": 0.1}},
     "tune.space: train.lr: low -1 does not fit this key (Input should be greater than 0)"),
    ({"model.drop_rate": {"low": 0.1, "high": 1.0}},
     "tune.space: model.drop_rate: high 1.0 does not fit this key (Input should be less than 1)"),
    ({"augment.preset": ["light", "extreme"]},
     "tune.space: augment.preset: choice 'extreme' does not fit this key (Input should be 'none'"),
    ({"augment.preset": {"low": 1, "high": 2}}, "tune.space: augment.preset: low 1 does not fit"),
    ({"train.channels_last": {"low": 0, "high": 1}},
     "tune.space: train.channels_last: a range needs a numeric key; give a list of choices"),
    ({"train.lr": {"low": 0.1, "high": 0.01}}, "tune.space: train.lr: low (0.1) must be below high"),
    ({"train.lr": {"low": 0.001, "high": 0.1, "log": True, "step": 0.01}},
     "tune.space: train.lr: use log or step, not both"),
    ({"train.weight_decay": {"low": 0, "high": 0.1, "log": True}},
     "tune.space: train.weight_decay: a log range needs low > 0"),
    ({"augment.preset": ["light", "light"]}, "tune.space: augment.preset: give one or more distinct"),
])
def test_bad_paths_and_types_are_one_line_errors(tiny, space, message):
    with pytest.raises(UserError) as err:
        space_of(tiny, space, finetune=STAGES)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_bad_tune_section_fails_when_the_experiment_loads(tiny):
    write_yaml(tiny / "configs/tiny/exp.yaml", EXPERIMENT)
    write_yaml(tiny / "configs/tiny/exp.tune.yaml", {"space": {"train.lr": [0.1]}, "pruner": "x"})
    with pytest.raises(UserError, match=r"^configs/tiny/exp.yaml: tune.pruner: Input should be"):
        load_experiment("configs/tiny/exp.yaml")


def test_an_experiment_without_a_search_space_is_a_one_line_error(tiny, capsys):
    write_yaml(tiny / "configs/tiny/exp.yaml", EXPERIMENT)
    with pytest.raises(SystemExit) as exit_:
        tune.main(["configs/tiny/exp.yaml"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("error: configs/tiny/exp.yaml: no search space: add a "
                                       "`tune:` section or exp.tune.yaml beside it (README, Tuning)\n")


def test_a_search_space_leaves_the_run_tag_alone_and_a_tune_file_merges_over_the_section(tiny):
    write_yaml(tiny / "configs/tiny/exp.yaml", EXPERIMENT)
    plain = config_hash(load_experiment("configs/tiny/exp.yaml"))
    write_yaml(tiny / "configs/tiny/exp.yaml",
               {**EXPERIMENT, "tune": {"space": {"train.lr": [0.1]}, "trials": 7}})
    write_yaml(tiny / "configs/tiny/exp.tune.yaml", {"trials": 9, "folds": "all"})
    cfg = load_experiment("configs/tiny/exp.yaml", ["tune.pruner=none"])
    assert config_hash(cfg) == plain and "tune" not in cfg.model_dump()
    assert (cfg.tune.trials, cfg.tune.folds, cfg.tune.pruner) == (9, "all", "none")
    assert cfg.tune.space["train.lr"] == [0.1]


def test_trial_seeded_sampler_repeats_a_study_and_differs_between_trials():
    def draws():
        study = optuna.create_study(sampler=tuning_study.make_sampler("tpe", 3))
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=4)
        return [t.params["x"] for t in study.trials]

    first = draws()
    assert first == draws() and len(set(first)) == 4


def tune_setup(tiny, **tune_section):
    section = {"space": {"train.lr": {"low": 1e-3, "high": 1e-2, "log": True},
                         "augment.preset": ["none", "light"]},
               "trials": 3, "pruner": "none", **tune_section}
    write_yaml(tiny / "configs/tiny/exp.yaml", {**EXPERIMENT, "tune": section})
    folds.main(["configs/tiny/competition.yaml"])


def test_a_study_writes_a_tuned_config_that_differs_only_in_the_tuned_keys(tiny):
    tune_setup(tiny)
    summary = tune_experiment("configs/tiny/exp.yaml")
    out = tiny / "runs/tiny/exp/tune"
    study = optuna.load_study(study_name="tiny-exp", storage=f"sqlite:///{out / 'study.db'}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert summary["best_value"] == study.best_value and summary["folds"] == [0]
    assert all(t.user_attrs["epochs"] == 2 for t in study.trials)

    tuned_file = tiny / "configs/tiny/exp-tuned.yaml"
    text = tuned_file.read_text()
    assert text.startswith("# Tuned by `make tune` from exp.yaml: study 'tiny-exp' in sqlite:///")
    assert f"best trial {study.best_trial.number}: accuracy {study.best_value:.5f}" in text
    tuned, original = load_experiment(tuned_file), load_experiment("configs/tiny/exp.yaml")
    assert tuned.experiment == "exp-tuned" and tuned.tune is None
    assert (tuned.train.lr, tuned.augment.preset) == (study.best_params["train.lr"],
                                                       study.best_params["augment.preset"])
    a = original.model_dump(exclude={"experiment"})
    b = tuned.model_dump(exclude={"experiment"})
    a["train"].pop("lr"), b["train"].pop("lr"), a["augment"].pop("preset"), b["augment"].pop("preset")
    assert a == b

    for n in range(3):  # logs kept, no checkpoints
        trial = out / f"trial_{n:04d}/fold0"
        assert (trial / "log.csv").is_file()
        assert not list(trial.glob("*.safetensors")) and not (trial / "last.pt").exists()
    report = (out / "report.md").read_text()
    assert "Trials: 3 complete, 0 pruned, 0 failed, 0 running; 6 epochs trained" in report
    assert "| tuned config, full CV | not trained yet |" in report
    assert all((out / f).stat().st_size > 1000 for f in ("history.png", "importances.png",
                                                        "intermediate.png"))

    written = tuned_file.stat().st_mtime_ns
    assert tune_experiment("configs/tiny/exp.yaml")["trials"]["complete"] == 3  # done: no new trial
    assert tuned_file.stat().st_mtime_ns == written  # unchanged, so make keeps its run


def test_the_tuned_config_keeps_the_overrides_the_trials_trained_with(tiny):
    tune_setup(tiny)
    text = tuned_yaml(Path("configs/tiny/exp.yaml"), experiment_data("configs/tiny/exp.yaml"),
                           {"train.lr": 0.005}, "note\nmore",
                           ["train.batch_size=4", "tune.trials=9", "trials=9"])
    assert text.startswith("# note\n# more\ncompetition: competition.yaml\n")
    assert yaml.safe_load(text)["train"] == {"epochs": 2, "batch_size": 4, "lr": 0.005}
    assert "tune" not in yaml.safe_load(text) and "trials" not in yaml.safe_load(text)


def test_a_pruned_trial_leaves_no_checkpoint_behind(tiny):
    tune_setup(tiny, min_epochs=1)
    cfg = load_experiment("configs/tiny/exp.yaml")
    data = experiment_data("configs/tiny/exp.yaml")
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(lower=2.0))  # prunes all
    study.optimize(objective(cfg, data, parse_space(data), study), n_trials=1)
    trial = study.trials[0]
    assert trial.state == TrialState.PRUNED and list(trial.intermediate_values) == [0]
    assert trial.user_attrs["epochs"] == 1
    files = sorted(p.name for p in (tiny / "runs/tiny/exp/tune/trial_0000").rglob("*"))
    assert files == ["fold0", "log.csv"]


def test_a_changed_space_refuses_the_old_study(tiny):
    tune_setup(tiny, trials=1)
    tune_experiment("configs/tiny/exp.yaml")
    with pytest.raises(UserError, match=r"was run with other settings \(folds\); set another"):
        tune_experiment("configs/tiny/exp.yaml", ["tune.folds=all"])


def _worker(tiny: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # a core each
    return subprocess.Popen([sys.executable, "-m", "pipeline.tune", "configs/tiny/exp.yaml"],
                            cwd=tiny, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_two_workers_share_a_study_and_a_killed_workers_trial_is_retried(tiny):
    tune_setup(tiny, trials=3, space={"train.epochs": {"low": 20, "high": 25}})
    db = tiny / "runs/tiny/exp/tune/study.db"
    a, b = _worker(tiny), _worker(tiny)
    deadline, killed = time.time() + 180, None
    while killed is None and time.time() < deadline and a.poll() is None:  # kill a mid-trial
        time.sleep(0.2)
        try:
            running = optuna.load_study(study_name="tiny-exp", storage=f"sqlite:///{db}") \
                .get_trials(states=(TrialState.RUNNING,))
        except (KeyError, sqlalchemy.exc.OperationalError):  # no study yet
            continue
        mine = [t for t in running
                if t.user_attrs.get("worker", "").endswith(f":{a.pid}") and t.params]
        if mine:
            a.send_signal(signal.SIGKILL)
            killed = mine[0]
    a.wait()
    assert killed is not None, a.stderr.read().decode()[-2000:]
    tune.main(["configs/tiny/exp.yaml"])  # a restarted here, beside b
    assert b.wait(timeout=120) == 0, b.stderr.read().decode()[-2000:]

    trials = optuna.load_study(study_name="tiny-exp", storage=f"sqlite:///{db}").trials
    done = [t for t in trials if t.state in tuning_study.DONE]
    assert len(done) == 3 and len({t.number for t in trials}) == len(trials)
    assert trials[killed.number].state == TrialState.FAIL  # not a result
    retry = [t for t in done if t.user_attrs.get("retry_of") == killed.number]
    assert len(retry) == 1 and retry[0].params == killed.params  # queued again
    assert {t.user_attrs["worker"] for t in done} <= {f"{os.uname().nodename}:{pid}"
                                                      for pid in (b.pid, os.getpid())}
    assert yaml.safe_load((tiny / "configs/tiny/exp-tuned.yaml").read_text())["train"]["epochs"] \
        in range(20, 26)


def test_make_trains_tuned_configs_but_not_search_space_files(tiny):
    for name in ("exp", "exp-tuned"):
        write_yaml(tiny / f"configs/tiny/{name}.yaml", EXPERIMENT)
    write_yaml(tiny / "configs/tiny/exp.tune.yaml", {"space": {"train.lr": [0.1]}})
    out = subprocess.run(["make", "-n", "-f", str(ROOT / "Makefile"), "train", "COMP=tiny",
                          f"PY={sys.executable}"], cwd=tiny, capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    trained = sorted(line.split()[-1] for line in out.splitlines() if "pipeline.train" in line)
    assert trained == ["configs/tiny/exp-tuned.yaml", "configs/tiny/exp.yaml",
                       "configs/tiny/lenet5.yaml"]
