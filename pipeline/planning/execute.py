"""The auto mode's loop: measure, plan, run the plan's next experiment through the ordinary
stages (train, predict), blend every finished one and write the submission, then plan again
with the real times; stop cleanly when the next epoch would not leave time to finish.

Everything it runs is an ordinary config of the competition's folder: `configs/<comp>/
auto-<candidate>-<size>.yaml` per experiment and the ensemble (ensemble.yaml, or
auto-ensemble.yaml beside a hand-written one, submitting to submissions/<comp>-auto.csv).
"""
from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path

import pandas as pd
import yaml

from pipeline.blending.run import run_ensemble, submit
from pipeline.core import layout
from pipeline.core.artifacts import write_text
from pipeline.core.competition import Competition, load_competition_data
from pipeline.core.config import (CompetitionConfig, ExperimentConfig, experiment_from_keys,
                                  load_competition, load_ensemble, load_experiment)
from pipeline.core.errors import UserError
from pipeline.core.splits import write_data_stamps, write_folds
from pipeline.planning import measure, plan as planner, report
from pipeline.planning.candidates import (AutoSettings, Candidate, Choice, experiment_keys,
                                          experiment_yaml, load_candidates, load_settings,
                                          unavailable)
from pipeline.planning.state import Clock, State
from pipeline.runtime import device
from pipeline.training.kfold import train_experiment
from pipeline.training.prediction import predict_experiment

HEADER = "# Written by `make auto`"
MEASURE_SHARE = 0.15  # of the budget, at most, for measuring speeds
ENSEMBLE_TRIALS = 50
UNITS = {"s": 1, "m": 60, "h": 3600}


class OutOfTime(Exception):
    """The budget cannot cover another epoch and the experiment's finish."""


def parse_budget(text: str) -> float:
    """`90s`, `30m`, `1.5h`, `1h30m` -> seconds."""
    parts = re.fullmatch(r"((\d+(\.\d+)?)[smh])+", text.strip())
    if not parts:
        raise UserError(f"--budget {text!r}: give a duration with its unit, e.g. 90s, 30m, 2h "
                        f"or 1h30m")
    seconds = sum(float(n) * UNITS[u] for n, _, u in re.findall(r"(\d+(\.\d+)?)([smh])", text))
    if seconds <= 0:
        raise UserError(f"--budget {text!r}: must be more than nothing")
    return seconds


def owned(path: Path, written: str | None = None) -> bool:
    """Whether the auto mode may (re)write `path`: absent, or as it wrote it (its header, and
    the text it recorded writing, when it recorded one: not edited since)."""
    if not path.is_file():
        return True
    text = path.read_text()
    return text.startswith(HEADER) and (written is None or text == written)


def epochs_done(cfg: ExperimentConfig) -> int:
    """Epochs the experiment's folds and refit have trained (their logs; a finished fold all)."""
    run, done = layout.Run.of(cfg.name, cfg.experiment), 0
    folders = [run.fold(k) for k in range(cfg.folds.n_splits)] + \
        [run.refit(s) for s in (cfg.refit.seeds if cfg.refit else [])]
    for folder in folders:
        log = folder / layout.LOG
        done += len(pd.read_csv(log)) if log.is_file() else 0
    return done


class Auto:
    """One invocation of the auto mode on one competition."""

    def __init__(self, competition_path: str | Path, budget: float,
                 started: float | None = None, overrides: list[str] | None = None):
        self.path, self.overrides = Path(competition_path), overrides or []
        self.cfg: CompetitionConfig = load_competition(self.path, self.overrides)
        state_file, self.report_file = layout.auto_files(self.cfg.name)
        self.state = State.load(state_file)
        self.state.data["budget_seconds"] = budget
        self.state.data["invocations"] += 1
        self.clock = Clock(self.state.data["spent_seconds"], budget, started)
        self.settings: AutoSettings = load_settings(self.path)
        self.candidates: list[Candidate] = load_candidates(only=self.settings.candidates)
        self.by_name = {c.name: c for c in self.candidates}
        self.profile: measure.Profile | None = None  # set by `measure`
        ensemble = layout.config_file(self.cfg.name, "ensemble")
        self.ensemble = "ensemble" if owned(ensemble, self.state.data.get("ensemble_config")) \
            else "auto-ensemble"

    def say(self, text: str) -> None:
        print(f"auto: {text}", file=sys.stderr)
        self.state.event(text, self.clock)

    # -- measuring -------------------------------------------------------------------------
    def experiment_config(self, candidate: Candidate, choice: Choice):
        keys = experiment_keys(candidate, choice, self.settings, self.cfg.seed)
        return experiment_from_keys(layout.config_file(self.cfg.name, choice.name), keys,
                                    self.overrides)

    def measure(self, comp: Competition, rt: device.Runtime) -> tuple[list[Candidate],
                                                                       dict[str, str]]:
        """The profile (self.profile) and every usable candidate's speed at its useful sizes
        (smallest sizes first; none past what the images' size can use), within MEASURE_SHARE
        of the budget; a size is skipped when the size below it shows that even its fewest
        epochs cannot fit the time left. Returns (the usable candidates, {skipped one: why})."""
        state = self.state
        profile = state.profile(rt.device_name())
        if profile is None:
            profile = measure.profile(comp, self.cfg.folds.n_splits, rt)
            state.set_profile(profile)
            self.say(f"measured the data: {profile.n_train} train and {profile.n_test} test "
                     f"images of about {profile.side} px, task {profile.task}, on "
                     f"{profile.device}")
        self.profile = profile
        skipped = {c.name: why for c in self.candidates
                   if (why := unavailable(c, profile.device_type))}
        usable = [c for c in self.candidates if c.name not in skipped]
        sizes = {c.name: planner.useful_sizes(c, profile) for c in usable}
        queue = [(c, s) for rank in range(max(map(len, sizes.values()), default=0))
                 for c in usable for s in sizes[c.name][rank:rank + 1]]
        for c, size in queue:
            if state.measured(c.name, size):
                continue
            if state.data["measure_seconds"] >= MEASURE_SHARE * self.clock.budget:
                self.say(f"measuring stopped at {MEASURE_SHARE:.0%} of the budget: "
                         f"{c.name} at {size} px and larger sizes are not measured")
                break
            smaller = [(s, sp) for (n, s), sp in state.speeds().items() if n == c.name and s < size]
            if smaller:
                below, sp = max(smaller)
                scaled = measure.Speed(sp.train_ips * (below / size) ** 2,
                                       sp.predict_ips * (below / size) ** 2, sp.setup_seconds, 0)
                fewest = planner.seconds(profile, scaled, Choice(c.name, size, c.epochs.min))
                if fewest > self.clock.left():
                    continue
            started = self.clock.spent()
            speed = measure.speed(self.experiment_config(c, Choice(c.name, size, c.epochs.min)),
                                  comp, rt)
            state.set_speed(c.name, size, speed)
            state.data["measure_seconds"] += self.clock.spent() - started
            print(f"auto: {c.name} at {size} px: {speed.train_ips:.0f} train img/s, "
                  f"{speed.predict_ips:.0f} predict img/s", file=sys.stderr)
            state.save(self.clock)
        return usable, skipped

    # -- running ---------------------------------------------------------------------------
    def ratios(self) -> dict[str, float]:
        """Per candidate, how much longer its finished experiments took than planned (median,
        0.25 to 4); a candidate yet to finish one takes the others' when they ran slower (a
        busy machine), never their speed-up (a measurement error of theirs, not its)."""
        seen: dict[str, list[float]] = {}
        for e in self.state.experiments("done").values():
            if e["planned_seconds"] > 0:
                seen.setdefault(e["choice"]["candidate"], []).append(
                    e["actual_seconds"] / e["planned_seconds"])
        own = {n: min(4.0, max(0.25, statistics.median(r))) for n, r in seen.items()}
        others = max(1.0, statistics.median(own.values())) if own else 1.0
        return {c.name: own.get(c.name, others) for c in self.candidates}

    def blend_seconds(self) -> float:
        return self.state.data["blend_seconds"] or 5.0

    def run_experiment(self, candidate: Candidate, choice: Choice, planned: float) -> None:
        """Write the choice's config (unless someone else's file has its name), train and
        predict it; the clock is checked after every epoch."""
        path = layout.config_file(self.cfg.name, choice.name)
        text = experiment_yaml(candidate, choice, self.settings, self.cfg.seed)
        entry = self.state.experiments().get(choice.name)
        if owned(path, entry and entry["config"]):
            if not path.is_file() or path.read_text() != text:  # an unchanged file keeps its time
                write_text(text, path)
        else:
            self.say(f"{path} was not written by make auto (or was edited): trained as it is")
        entry = self.state.start(choice, planned, path.read_text(), self.clock)
        cfg = load_experiment(path, self.overrides)
        before, started = entry["actual_seconds"], self.clock.spent()
        speed = self.state.speeds()[(choice.candidate, choice.size)]
        finish = (planner.predict_seconds(self.profile, speed,
                                          choice.views, choice.refit)
                  * self.ratios()[choice.candidate]
                  + self.blend_seconds() + 1.0)

        left_epochs = [(cfg.folds.n_splits + (len(cfg.refit.seeds) if cfg.refit else 0))
                       * cfg.train.epochs
                       - epochs_done(cfg)]
        last = [self.clock.spent()]

        def on_epoch(epoch: int, score: float) -> None:
            now = self.clock.spent()
            entry["actual_seconds"] = round(before + now - started, 1)
            self.state.save(self.clock)
            left_epochs[0] -= 1
            need = finish + now - last[0]  # the predictions and blend, and one more epoch
            last[0] = now
            if left_epochs[0] > 0 and self.clock.left() < need:
                raise OutOfTime(f"{choice.name}: stopped after epoch {epoch + 1}: the "
                                f"{self.clock.left():.0f} s left do not cover another epoch and "
                                f"its predictions and blend ({need:.0f} s)")

        self.say(f"{choice.name}: {choice.why}")
        try:
            train_experiment(cfg, on_epoch=on_epoch)
            scores = predict_experiment(cfg)
        except OutOfTime:
            entry["status"] = "stopped"
            entry["actual_seconds"] = round(before + self.clock.spent() - started, 1)
            self.state.save(self.clock)
            raise
        entry.update(status="done", actual_seconds=round(before + self.clock.spent() - started, 1),
                     cv=scores["cv"], cv_tta=scores.get("cv_tta"), metric=scores["metric"])
        self.state.save(self.clock)

    def blend(self) -> None:
        """The ensemble of every finished experiment, and the submission from it."""
        members = sorted(self.state.experiments("done"))
        path = layout.config_file(self.cfg.name, self.ensemble)
        keys = dict(competition="competition.yaml", experiments=members, mode="mean",
                    trials=ENSEMBLE_TRIALS, nested_cv=True, fallback_to_equal=True)
        text = (f"{HEADER}: the experiments it has finished, blended with optuna-tuned "
                f"weights\n# under nested CV (rewritten after each one).\n"
                + yaml.safe_dump(keys, sort_keys=False))
        write_text(text, path)
        self.state.data["ensemble_config"] = text
        started = self.clock.spent()
        cfg = load_ensemble(path, self.overrides)
        result = run_ensemble(cfg)
        out = submit(cfg, layout.submission_file(self.cfg.name,
                                                 "" if self.ensemble == "ensemble" else "auto"))
        self.state.data["blend_seconds"] = round(self.clock.spent() - started, 1)
        self.state.data["ensemble"] = dict(name=self.ensemble, members=members, cv=result["cv"],
                                           basis=result.get("cv_basis"),
                                           in_sample=result.get("in_sample_cv"),
                                           metric=result["metric"], submission=str(out))
        self.state.save(self.clock)

    def pending(self) -> tuple[Choice, float] | None:
        """An experiment started by an earlier invocation and not finished: (choice, its
        planned seconds), resumed first (its config is fixed: a new one would start over)."""
        for entry in self.state.experiments().values():
            if entry["status"] in ("running", "stopped"):
                return State.choice(entry), entry["planned_seconds"]
        return None

    def next_choice(self, usable: list[Candidate],
                    skipped: dict[str, str]) -> tuple[Choice, float] | None:
        """The experiment to run next: an unfinished one to resume, or the first of a new plan
        (recorded in state.json); None when nothing fits."""
        state, ratios, blend = self.state, self.ratios(), self.blend_seconds()
        pending = self.pending()
        if pending:
            choice, planned = pending
            entry = state.experiments()[choice.name]
            left = max(0.0, planned - entry["actual_seconds"]) * ratios[choice.candidate] + blend
            if left <= self.clock.left():
                self.say(f"{choice.name}: resuming ({entry['actual_seconds']:.0f} of its "
                         f"planned {planned:.0f} s spent)")
                return choice, planned
            entry["status"] = "dropped"
            self.say(f"{choice.name}: dropped: its remaining {left:.0f} s do not fit the "
                     f"{self.clock.left():.0f} s left")
        by_name = self.by_name
        entries = [e for e in state.experiments().values() if e["choice"]["candidate"] in by_name]
        done = [(c, planner.value(by_name[c.candidate], c.size, c.epochs, self.profile))
                for c in (State.choice(e) for e in entries if e["status"] == "done")]
        gone = {e["choice"]["candidate"]: "dropped: it did not fit the time left"
                for e in entries if e["status"] == "dropped"}
        usable = [c for c in usable if c.name not in gone]
        p = planner.make_plan(self.profile, usable, state.speeds(), self.clock.left(),
                              self.clock.budget, done, ratios, blend, {**skipped, **gone})
        state.data["plans"].append(dict(
            spent=round(self.clock.spent(), 1), left=round(p.left, 1),
            ratios={k: round(v, 3) for k, v in ratios.items() if v != 1.0},
            order=[c.name for c in p.choices], why={c.name: c.why for c in p.choices},
            estimates={k: round(v, 1) for k, v in p.estimates.items()}, dropped=p.dropped))
        state.save(self.clock)
        if not p.choices:
            return None
        first = p.choices[0]
        return first, p.estimates[first.name] - blend

    def run(self) -> None:
        cfg, state = self.cfg, self.state
        if state.data["invocations"] > 1:
            self.say(f"resumed: {self.clock.before:.0f} s spent before, budget "
                     f"{self.clock.budget:.0f} s")
        write_data_stamps(cfg)
        if not layout.folds_file(cfg.name).is_file():
            write_folds(cfg)
        rt = device.runtime(cfg.device)
        comp = load_competition_data(cfg)
        usable, skipped = self.measure(comp, rt)
        try:
            blended = (state.data.get("ensemble") or {}).get("members")
            if state.experiments("done") and sorted(state.experiments("done")) != blended:
                self.blend()  # killed between an experiment's end and its blend
            while self.clock.left() > 0:
                nxt = self.next_choice(usable, skipped)
                if nxt is None:
                    break
                choice, planned = nxt
                self.run_experiment(self.by_name[choice.candidate], choice, planned)
                self.blend()
        except OutOfTime as stop:
            self.say(f"{stop}; the next `make auto` with a larger BUDGET resumes it")
        finally:
            state.save(self.clock)
            report.write(state, self.report_file)
        ens = state.data.get("ensemble")
        print(f"auto: {self.clock.spent():.0f} s of {self.clock.budget:.0f} s spent; "
              + (f"{ens['submission']}: {ens['basis']} {ens['metric']} {ens['cv']:.5f} "
                 f"({len(ens['members'])} experiments); report {self.report_file}" if ens else
                 "no experiment finished: no submission (a larger BUDGET, or faster candidates)"),
              file=sys.stderr)
