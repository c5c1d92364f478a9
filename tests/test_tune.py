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
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from conftest import EXPERIMENT, write_yaml
from pipeline import folds, tune
from pipeline.tuning import study as tuning_study
from pipeline.tuning import trials as trials_module
from pipeline.tuning import workers
from pipeline.tuning.results import tuned_yaml
from pipeline.tuning.run import run_claimed, tune_experiment
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


def tune_setup(tiny, experiment=None, **tune_section):
    section = {"space": {"train.lr": {"low": 1e-3, "high": 1e-2, "log": True},
                         "augment.preset": ["none", "light"]},
               "trials": 3, "pruner": "none", **tune_section}
    write_yaml(tiny / "configs/tiny/exp.yaml", {**(experiment or EXPERIMENT), "tune": section})
    folds.main(["configs/tiny/competition.yaml"])


def load(tiny, storage=None):
    return optuna.load_study(study_name="tiny-exp",
                             storage=storage or f"sqlite:///{tiny}/runs/tiny/exp/tune/study.db")


def running(tiny, storage=None) -> list:
    """The study's running trials; none while the workers are still creating it."""
    try:
        return load(tiny, storage).get_trials(states=(TrialState.RUNNING,))
    except (KeyError, sqlalchemy.exc.SQLAlchemyError):
        return []


# the experiment as written scores the trivial baseline (1/3) on the tuning fold, higher
# rates learn something in two epochs
WEAK = {**EXPERIMENT, "train": {"epochs": 2, "batch_size": 4, "lr": 0.001}}


def test_a_study_writes_a_tuned_config_that_differs_only_in_the_tuned_keys(tiny, capsys):
    tune_setup(tiny, WEAK, space={"train.lr": {"low": 0.01, "high": 0.1, "log": True},
                                  "augment.preset": ["none", "light"]})
    summary = tune_experiment("configs/tiny/exp.yaml")
    out = tiny / "runs/tiny/exp/tune"
    study = load(tiny)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert summary["best_value"] == study.best_value and summary["folds"] == [0]
    assert all(t.user_attrs["epochs"] == 2 for t in study.trials)
    base = study.trials[0]  # the experiment as written: its lr is outside the searched range
    assert base.user_attrs["base"] and base.params == {"augment.preset": "light"}
    assert (summary["base_trial"], summary["base_value"]) == (0, base.value)
    assert study.best_value > base.value

    err = capsys.readouterr().err
    trial_1 = study.trials[1].params
    assert "tune: trial 0 (the base config): augment.preset=light\n" in err
    assert (f"tune: trial 1: train.lr={trial_1['train.lr']:.4g} "
            f"augment.preset={trial_1['augment.preset']}\n") in err
    assert f"tune: trial 1: accuracy {study.trials[1].value:.5f}\n" in err
    assert ("tune: trial 0: accuracy 0.33333, no better than the trivial baseline's 0.33333: "
            "diverged? try a lower lr (augment.preset=light)\n") in err
    assert (f"tune: best accuracy {study.best_value:.5f} (trial {study.best_trial.number}; "
            f"base config 0.33333) -> configs/tiny/exp-tuned.yaml; report ") in err

    tuned_file = tiny / "configs/tiny/exp-tuned.yaml"
    text = tuned_file.read_text()
    assert text.startswith("# Tuned by `make tune` from exp.yaml: study 'tiny-exp' in sqlite:///")
    assert f"best trial {study.best_trial.number}: accuracy {study.best_value:.5f}" in text
    assert "; the base config 0.33333." in text
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
    assert "| base config, tuning score | 0.33333 | trial 0: the experiment as written" in report
    assert "| tuned config, full CV | not trained yet |" in report
    assert all((out / f).stat().st_size > 1000 for f in ("history.png", "importances.png",
                                                        "intermediate.png"))

    written = tuned_file.stat().st_mtime_ns
    assert tune_experiment("configs/tiny/exp.yaml")["trials"]["complete"] == 3  # done: no new trial
    assert tuned_file.stat().st_mtime_ns == written  # unchanged, so make keeps its run


def test_no_tuned_config_is_written_when_no_trial_beats_the_base_config(tiny, capsys):
    tune_setup(tiny, trials=2)  # two epochs of 8 images: every trial scores the baseline
    summary = tune_experiment("configs/tiny/exp.yaml")
    study = load(tiny)
    assert study.trials[0].user_attrs["base"] and study.trials[0].params == {
        "train.lr": 0.003, "augment.preset": "light"}  # the experiment's own values
    assert [t.value for t in study.trials] == [study.trials[0].value] * 2
    assert not (tiny / "configs/tiny/exp-tuned.yaml").exists()
    line = ("no trial beat the base config (accuracy 0.33333, trial 0): it stays best; "
            "configs/tiny/exp-tuned.yaml not written")
    assert summary["tuned_config"] is None and summary["verdict"] == line
    assert f"tune: {line}; report runs/tiny/exp/tune/report.md\n" in capsys.readouterr().err
    assert f"\nOutcome: {line}.\n" in (tiny / "runs/tiny/exp/tune/report.md").read_text()


def test_a_non_finite_score_fails_the_trial_with_a_one_line_warning(tiny, capsys):
    tune_setup(tiny)
    cfg = load_experiment("configs/tiny/exp.yaml")
    study = optuna.create_study()
    trial = study.ask()
    trial.suggest_float("train.lr", 1e-3, 1e-2, log=True)
    run_claimed(cfg, study, trial, lambda t: float("nan"))
    assert study.trials[0].state == TrialState.FAIL
    assert capsys.readouterr().err.endswith(
        f"\ntune: trial 0: accuracy nan, not finite: diverged? try a lower lr "
        f"(train.lr={trial.params['train.lr']:.4g})\n")


@pytest.mark.parametrize("where", ["exp.yaml", "exp.tune.yaml"])
def test_a_search_space_error_names_the_file_the_key_is_in(tiny, capsys, where):
    section = {"space": {"train.lrr": [0.1]}}
    write_yaml(tiny / "configs/tiny/exp.yaml",
               {**EXPERIMENT, "tune": {"space": {"train.lr": [0.1]}}} if where != "exp.yaml"
               else {**EXPERIMENT, "tune": section})
    if where == "exp.tune.yaml":
        write_yaml(tiny / "configs/tiny/exp.tune.yaml", section)
    with pytest.raises(SystemExit):
        tune.main(["configs/tiny/exp.yaml"])
    assert capsys.readouterr().err == (f"error: configs/tiny/{where}: tune.space: train.lrr: "
                                       f"unknown key train.lrr\n")


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
    study.optimize(objective(cfg, data, parse_space(data), 2), n_trials=1)
    trial = study.trials[0]
    assert trial.state == TrialState.PRUNED and list(trial.intermediate_values) == [1]
    assert trial.user_attrs["epochs"] == 1
    files = sorted(p.name for p in (tiny / "runs/tiny/exp/tune/trial_0000").rglob("*"))
    assert files == ["fold0", "log.csv"]


@pytest.mark.parametrize("pruner", ["median", "hyperband"])
def test_with_two_folds_no_fold_is_pruned_before_min_epochs(tiny, monkeypatch, capsys, pruner):
    """Validation scores scripted: trials 0-2 good on both folds, later ones good on fold 0
    and bad on fold 1, so the pruner stops them in fold 1, never before its second epoch."""
    real = trials_module.train_fold

    def scripted(exp, fold, fold_dir, on_epoch=None, **kw):
        number = int(fold_dir.parent.name.removeprefix("trial_"))
        bad = number >= 3 and fold == 1
        real(exp, fold, fold_dir, on_epoch=lambda e, v: on_epoch(e, 0.1 if bad else 0.9), **kw)

    monkeypatch.setattr(trials_module, "train_fold", scripted)
    tune_setup(tiny, {**EXPERIMENT, "train": {"epochs": 3, "batch_size": 8, "lr": 0.003}},
               trials=8, folds=[0, 1], pruner=pruner, min_epochs=2, startup_trials=2,
               sampler="random")
    tune_experiment("configs/tiny/exp.yaml")
    study = load(tiny)
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert pruned and all(t.number >= 3 for t in pruned)
    for t in pruned:  # epochs trained: fold 0's three, then at least min_epochs of fold 1
        assert t.user_attrs["epochs"] - 3 >= 2, (t.number, t.user_attrs["epochs"])
        assert t.last_step == t.user_attrs["epochs"]  # step = epochs trained over the folds
        assert sorted(t.intermediate_values) == list(range(1, t.last_step + 1))
        rungs = [v for k, v in t.system_attrs.items() if k.startswith("completed_rung_")]
        assert all(v in t.intermediate_values.values() for v in rungs)
    assert study.user_attrs["steps_per_fold"] == 3
    err = capsys.readouterr().err
    assert f"tune: trial {pruned[0].number}: pruned at epoch " \
           f"{pruned[0].user_attrs['epochs'] - 3} of fold 1 (accuracy 0.10000)\n" in err


def test_a_changed_space_refuses_the_old_study(tiny):
    tune_setup(tiny, trials=1)
    tune_experiment("configs/tiny/exp.yaml")
    with pytest.raises(UserError, match=r"was run with other settings \(folds\); set another"):
        tune_experiment("configs/tiny/exp.yaml", ["tune.folds=all"])


# A worker whose first SQLite update of a trial in state RACE_STATE (and id RACE_TRIAL, when
# set) waits until RACE_N workers have read that trial, so they all act on the same read: the
# race two workers can run into, made certain. All wait after their imports until all started.
RACE = """
import os, sys, time
from pathlib import Path
from optuna.storages._rdb import models
from optuna.trial import TrialState
import pipeline.tune

def gate(name, seconds):
    folder = Path(os.environ["RACE_DIR"]) / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / str(os.getpid())).touch()
    end = time.time() + seconds
    while len(list(folder.iterdir())) < int(os.environ["RACE_N"]) and time.time() < end:
        time.sleep(0.02)

find = models.TrialModel.find_or_raise_by_id.__func__
state, only = TrialState[os.environ["RACE_STATE"]], os.environ.get("RACE_TRIAL")
raced = []

def find_slowly(cls, trial_id, session, for_update=False):
    trial = find(cls, trial_id, session, for_update)
    if for_update and not raced and trial.state == state and only in (None, str(trial_id)):
        raced.append(trial_id)
        gate("race", float(os.environ["RACE_WAIT"]))
    return trial

models.TrialModel.find_or_raise_by_id = classmethod(find_slowly)
gate("start", 120)
pipeline.tune.main(sys.argv[1:])
"""


def _worker(tiny: Path, *overrides: str, race: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # a core each
    code = ["-m", "pipeline.tune"]
    if race is not None:
        env.update({"RACE_DIR": str(tiny / "race"), "RACE_N": "2", "RACE_WAIT": "4", **race})
        code = ["-c", RACE]
    return subprocess.Popen([sys.executable, *code, "configs/tiny/exp.yaml", *overrides],
                            cwd=tiny, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _finish(*workers: subprocess.Popen) -> list[str]:
    """Each worker's stderr, once all have exited 0."""
    errs = [w.communicate(timeout=180)[1].decode() for w in workers]
    assert [w.returncode for w in workers] == [0] * len(workers), "\n".join(
        e[-3000:] for e in errs)
    return errs


def _with_queued_trial(tiny) -> optuna.trial.FrozenTrial:
    """A study whose trial 0 is done and whose trial 1 is queued (a retry of trial 0)."""
    tune_setup(tiny, trials=1)
    tune_experiment("configs/tiny/exp.yaml")
    study = load(tiny)
    study.enqueue_trial(study.trials[0].params, user_attrs={"retry_of": 0})
    return study.trials[0]


LONG = {**EXPERIMENT, "train": {**EXPERIMENT["train"], "epochs": 200}}  # a base trial to stop


def test_two_workers_that_pop_the_same_queued_trial_run_it_once(tiny):
    first = _with_queued_trial(tiny)
    errs = _finish(*[_worker(tiny, "tune.trials=2", race={"RACE_STATE": "WAITING"})
                     for _ in range(2)])
    assert len(os.listdir(tiny / "race/race")) == 2  # both popped trial 1 together
    trials = load(tiny).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert trials[1].user_attrs["retry_of"] == 0 and trials[1].params == first.params
    started = [line for e in errs for line in e.splitlines()
               if line.startswith("tune: trial 1 (retry of trial 0): ")]
    assert len(started) == 1, errs  # one worker ran it, the other left it


def test_two_workers_that_find_one_dead_trial_queue_it_again_once(tiny):
    first = _with_queued_trial(tiny)
    study = load(tiny)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    trial = study.ask()  # pops queued trial 1, as a worker that then died would have
    trial.set_user_attr("worker", f"{os.uname().nodename}:{dead}")
    race = {"RACE_STATE": "RUNNING", "RACE_TRIAL": str(trial._trial_id)}
    errs = _finish(*[_worker(tiny, "tune.trials=2", race=race) for _ in range(2)])
    trials = load(tiny).trials
    assert trials[1].state == TrialState.FAIL
    retries = [t for t in trials if t.user_attrs.get("retry_of") == 1]
    assert len(retries) == 1, errs
    assert retries[0].state == TrialState.COMPLETE and retries[0].params == first.params
    assert sum("tune: trial 1's worker is gone" in e for e in errs) == 1


def test_ctrl_c_fails_the_running_trial_and_queues_it_again(tiny):
    tune_setup(tiny, LONG, trials=1, space={"train.epochs": {"low": 200, "high": 210}})
    worker = _worker(tiny)
    deadline, stopped = time.time() + 120, None
    while stopped is None and time.time() < deadline and worker.poll() is None:
        time.sleep(0.2)
        mine = [t for t in running(tiny) if t.intermediate_values]
        if mine:
            worker.send_signal(signal.SIGINT)
            stopped = mine[0]
    err = worker.communicate(timeout=60)[1].decode()
    assert stopped is not None and worker.returncode == 130, err[-2000:]
    n = stopped.number
    assert err.endswith(f"\ninterrupted: trial {n} failed and its parameters are queued again; "
                        f"make tune resumes the study\n")
    trials = load(tiny).trials
    assert trials[n].state == TrialState.FAIL
    retry = [t for t in trials if t.user_attrs.get("retry_of") == n]
    assert len(retry) == 1 and retry[0].state == TrialState.WAITING
    assert retry[0].system_attrs["fixed_params"] == stopped.params
    assert not list((tiny / f"runs/tiny/exp/tune/trial_{n:04d}").rglob("*.safetensors"))


def test_a_journal_trial_whose_heartbeat_stops_is_failed_and_retried_from_another_host(
        tiny, monkeypatch):
    journal = tiny / "journal.log"
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
    tune_setup(tiny, LONG, trials=1, space={"train.epochs": {"low": 200, "high": 210}},
               storage=f"journal:{journal}")
    worker = _worker(tiny)
    deadline, killed = time.time() + 120, None
    while killed is None and time.time() < deadline and worker.poll() is None:
        time.sleep(0.2)
        mine = [t for t in running(tiny, storage) if t.intermediate_values]
        if mine:
            worker.send_signal(signal.SIGKILL)
            killed = mine[0]
    worker.wait()
    assert killed is not None, worker.stderr.read().decode()[-2000:]
    storage.set_trial_user_attr(killed._trial_id, "worker", "elsewhere:1")  # another host's
    cfg = load_experiment("configs/tiny/exp.yaml")
    study = load(tiny, storage)
    assert workers.retry_dead(cfg, study) == []  # its heartbeat is recent: it may be alive

    monkeypatch.setattr(workers, "GRACE_S", 0.5)  # then no heartbeat for the grace period
    time.sleep(1)
    assert workers.retry_dead(cfg, study) == [killed.number]
    trials = load(tiny, storage).trials
    assert trials[killed.number].state == TrialState.FAIL
    retry = [t for t in trials if t.user_attrs.get("retry_of") == killed.number]
    assert len(retry) == 1 and retry[0].state == TrialState.WAITING and retry[0].user_attrs["base"]
    assert retry[0].system_attrs["fixed_params"] == killed.params == {"train.epochs": 200}
    assert workers.retry_dead(cfg, study) == []  # once


def test_make_tune_refuses_a_missing_exp_before_anything_runs(tiny):
    write_yaml(tiny / "configs/tiny/exp.yaml",
               {**EXPERIMENT, "tune": {"space": {"train.lr": [0.1]}}})
    make = ["make", "--no-print-directory", "-n", "-f", str(ROOT / "Makefile"), "tune", "STAMP="]
    out = subprocess.run(make, cwd=tiny, capture_output=True, text=True)
    assert out.returncode != 0 and out.stdout == ""
    assert out.stderr.splitlines()[-1].endswith(
        "EXP is not set: say which experiment to tune, e.g. make tune "
        "EXP=configs/tiny/exp.yaml (configs with a search space: configs/tiny/exp.yaml).  Stop.")
    out = subprocess.run(make + ["EXP=configs/tiny/nope.yaml"], cwd=tiny, capture_output=True,
                         text=True)
    assert out.returncode != 0 and "EXP=configs/tiny/nope.yaml: no such file" in out.stderr
    out = subprocess.run(make + ["EXP=configs/tiny/exp.yaml", "PY=true"], cwd=tiny,
                         capture_output=True, text=True, check=True)
    assert "true -m pipeline.tune configs/tiny/exp.yaml" in out.stdout


def test_two_workers_share_a_study_and_a_killed_workers_trial_is_retried(tiny):
    tune_setup(tiny, trials=3, space={"train.epochs": {"low": 20, "high": 25}})
    db = tiny / "runs/tiny/exp/tune/study.db"
    a, b = _worker(tiny), _worker(tiny)
    deadline, killed = time.time() + 180, None
    while killed is None and time.time() < deadline and a.poll() is None:  # kill a mid-trial
        time.sleep(0.05)
        mine = [t for t in running(tiny) if t.user_attrs.get("worker", "").endswith(f":{a.pid}")
                and t.params and t.intermediate_values]  # an epoch done: checkpoints written
        if mine:
            a.send_signal(signal.SIGKILL)
            killed = mine[0]
    a.wait()
    assert killed is not None, a.stderr.read().decode()[-2000:]
    folder = tiny / f"runs/tiny/exp/tune/trial_{killed.number:04d}"
    assert list(folder.rglob("*.safetensors"))  # what a SIGKILL leaves behind
    tune.main(["configs/tiny/exp.yaml"])  # a restarted here, beside b
    assert b.wait(timeout=120) == 0, b.stderr.read().decode()[-2000:]

    trials = load(tiny).trials
    done = [t for t in trials if t.state in tuning_study.DONE]
    assert len(done) == 3 and len({t.number for t in trials}) == len(trials)
    assert trials[killed.number].state == TrialState.FAIL  # not a result
    retry = [t for t in done if t.user_attrs.get("retry_of") == killed.number]
    assert len(retry) == 1 and retry[0].params == killed.params  # queued again
    assert {t.user_attrs["worker"] for t in done if t.number > killed.number} <= {
        f"{os.uname().nodename}:{pid}" for pid in (b.pid, os.getpid())}
    assert (folder / "fold0/log.csv").is_file()  # tidied as `keep: logs` says
    assert not list(folder.rglob("*.safetensors")) and not list(folder.rglob("last.pt"))
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
