"""Several workers on one study: each trial is run by the one worker that claims it, a running
trial carries its worker's heartbeat, and a dead worker's trial is failed and its parameters
queued again, once.

A worker's bookkeeping (claims, failing and queueing again) holds a file lock in the study
folder, so workers on one host (or sharing the run folder) never do it twice; across hosts the
storage's own atomic updates do (a database's row locks, the journal's ordered log). Heartbeats
are a user attribute, the same for every storage (optuna's journal storage has none): a trial
whose heartbeat is GRACE_S old has failed, wherever its worker ran; on the worker's own host a
trial fails as soon as its process is gone. Hosts' clocks must agree to well within GRACE_S.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import optuna
import sqlalchemy.exc
from optuna.trial import FrozenTrial, TrialState

from pipeline.core.artifacts import file_lock
from pipeline.core.config import ExperimentConfig
from pipeline.tuning.study import study_dir, tidy, trial_dir

HOST = socket.gethostname()
WORKER = f"{HOST}:{os.getpid()}"
HEARTBEAT_S, GRACE_S = 30, 120  # a running trial without a heartbeat for GRACE_S has failed


def study_lock(cfg: ExperimentConfig):
    """The workers' file lock of the study folder (held for a few storage calls at a time)."""
    return file_lock(study_dir(cfg) / "workers")


def fresh(study: optuna.Study, number: int) -> FrozenTrial:
    """Trial `number` as the storage holds it now."""
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def claim(cfg: ExperimentConfig, study: optuna.Study, trial: optuna.Trial) -> bool:
    """Make the trial this worker's; False when another worker took the same queued trial (on
    SQLite two workers can both pop it)."""
    with study_lock(cfg):
        t = fresh(study, trial.number)
        if t.state != TrialState.RUNNING or t.user_attrs.get("worker"):
            return False
        trial.set_user_attr("worker", WORKER)
        trial.set_user_attr("heartbeat", time.time())
    return True


@contextmanager
def heartbeat(trial: optuna.Trial) -> Iterator[None]:
    """Record the trial's heartbeat every HEARTBEAT_S while the block runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                trial.set_user_attr("heartbeat", time.time())
            except optuna.exceptions.UpdateFinishedTrialError:  # failed by another worker
                return
            except (sqlalchemy.exc.SQLAlchemyError, OSError):  # the storage is busy: next time
                continue

    thread = threading.Thread(target=beat, name=f"heartbeat {trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def dead(t: FrozenTrial, now: float) -> bool:
    """Has running trial `t`'s worker gone: its process on this host, or its heartbeat?"""
    host, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
    if host == HOST and pid.isdigit() and not _alive(int(pid)):
        return True
    started = t.datetime_start.timestamp() if t.datetime_start else now
    return now - float(t.user_attrs.get("heartbeat", started)) > GRACE_S


def requeue(cfg: ExperimentConfig, study: optuna.Study, number: int) -> bool:
    """Fail trial `number` if it still runs, queue its parameters again (`retry_of`) unless
    some trial already retries it, and tidy its folder as `tune.keep` says; True when this call
    queued it."""
    with study_lock(cfg):
        t = fresh(study, number)
        if t.state == TrialState.RUNNING:
            try:
                study.tell(number, state=TrialState.FAIL)
            except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
                return False  # another host's worker failed it meanwhile, and queues it
        elif t.state != TrialState.FAIL:
            return False
        if any(other.user_attrs.get("retry_of") == number
               for other in study.get_trials(deepcopy=False)):
            return False
        attrs = {"retry_of": number, **({"base": True} if t.user_attrs.get("base") else {})}
        study.enqueue_trial(t.params or t.system_attrs.get("fixed_params", {}), user_attrs=attrs)
    tidy(trial_dir(cfg, number), cfg.tune.keep)
    return True


def retry_dead(cfg: ExperimentConfig, study: optuna.Study) -> list[int]:
    """Fail the running trials whose workers are gone and queue their parameters again;
    returns the numbers this worker queued."""
    now = time.time()
    return [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if dead(t, now) and requeue(cfg, study, t.number)]
