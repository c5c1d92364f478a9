"""The auto mode's record across invocations (runs/<comp>/auto/state.json) and its clock.

The budget counts every second any `make auto` of the competition has spent: a rerun resumes
with what is left (a killed run loses only the time since its last record, an epoch at most).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from pipeline.core.artifacts import write_json
from pipeline.planning.candidates import Choice
from pipeline.planning.measure import Profile, Speed


class State:
    """state.json's content with typed accessors; `save` records the clock's time spent."""

    def __init__(self, path: Path, data: dict | None = None):
        self.path = path
        self.data = data or dict(budget_seconds=0.0, spent_seconds=0.0, invocations=0,
                                 device=None, profile=None, speeds={}, measure_seconds=0.0,
                                 blend_seconds=None, experiments={}, plans=[], events=[])

    @classmethod
    def load(cls, path: Path) -> State:
        return cls(path, json.loads(path.read_text()) if path.is_file() else None)

    def save(self, clock: Clock | None = None) -> None:
        if clock is not None:
            self.data["spent_seconds"] = round(clock.spent(), 2)
        write_json(self.data, self.path)

    def event(self, text: str, clock: Clock) -> None:
        self.data["events"].append(f"{clock.spent():.0f} s: {text}")

    # profile and speeds: measured once per device
    def profile(self, device: str) -> Profile | None:
        p = self.data["profile"]
        return Profile(**p) if p and self.data["device"] == device else None

    def set_profile(self, profile: Profile) -> None:
        if self.data["device"] != profile.device:
            self.data["speeds"] = {}
        self.data["device"], self.data["profile"] = profile.device, dataclasses.asdict(profile)

    def speeds(self) -> dict[tuple[str, int], Speed]:
        return {(k.rsplit("@", 1)[0], int(k.rsplit("@", 1)[1])): Speed(**v)
                for k, v in self.data["speeds"].items()}

    def set_speed(self, candidate: str, size: int, speed: Speed | None) -> None:
        self.data["speeds"][f"{candidate}@{size}"] = dataclasses.asdict(speed) if speed else None

    def measured(self, candidate: str, size: int) -> bool:
        return f"{candidate}@{size}" in self.data["speeds"]

    # experiments
    def experiments(self, status: str | None = None) -> dict[str, dict]:
        return {n: e for n, e in self.data["experiments"].items()
                if status is None or e["status"] == status}

    @staticmethod
    def choice(entry: dict) -> Choice:
        c = entry["choice"]
        return Choice(c["candidate"], c["size"], c["epochs"], tuple(c["views"]), c["refit"],
                      c["why"], tuple(c["notes"]), c["seed"])

    def start(self, choice: Choice, planned: float, text: str, clock: Clock) -> dict:
        entry = self.data["experiments"].setdefault(choice.name, dict(
            choice=dataclasses.asdict(choice), planned_seconds=round(planned, 1),
            actual_seconds=0.0, config=text, cv=None, cv_tta=None))
        entry["status"] = "running"
        self.save(clock)
        return entry


class Clock:
    """Seconds spent by every invocation: those recorded before this one, plus this one's since
    `started` (a Unix time: when make began, or when this process did)."""

    def __init__(self, before: float, budget: float, started: float | None = None):
        self.before, self.budget = before, budget
        self.started = started if started is not None else time.time()

    def spent(self) -> float:
        return self.before + time.time() - self.started

    def left(self) -> float:
        return self.budget - self.spent()
