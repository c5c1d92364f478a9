"""The run layout: every path and file name under folds/, runs/, packages/ and submissions/.

```
folds/<comp>.csv                          id, fold
runs/<comp>/leaderboard.{md,csv}  train-data.json test-data.json (the data's hashes)
runs/<comp>/<exp>/                        an experiment's current version (a Run)
  tag.txt config.json provenance.json scores.json oof.csv oof_tta.csv test.csv report.md *.png
  label_noise.csv
  fold<k>/best.safetensors last.pt log.csv oof.csv  round<r>/ (earlier pseudo-label rounds)
          epoch<e>.safetensors average.json teacher.csv
  refit<seed>/best.safetensors last.pt log.csv  (full-data refits)
  tune/study.db best.json report.md *.png trial_<n>/
  history/<tag>/                          a past version, laid out as the current one
runs/<comp>/<ensemble>/                   weights.json test.csv report.md study.db *.png
runs/<comp>/auto/                         state.json report.md (make auto)
packages/<comp>/                          manifest.json package.json blend.json <exp>/settings.json
                                          <exp>/fold<k>.safetensors refit<seed>.safetensors, the wheel
submissions/<comp>.csv <comp>-auto.csv
```
Paths are relative to the working folder (the project root when run by make).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FOLDS, RUNS, PACKAGES, SUBMISSIONS = Path("folds"), Path("runs"), Path("packages"), Path("submissions")
CONFIGS = Path("configs")


def config_file(comp: str, name: str) -> Path:
    """configs/<comp>/<name>.yaml: an experiment or ensemble of the competition."""
    return CONFIGS / comp / f"{name}.yaml"


def folds_file(comp: str) -> Path:
    return FOLDS / f"{comp}.csv"


def competition_runs(comp: str) -> Path:
    """runs/<comp>/: every experiment and ensemble of the competition."""
    return RUNS / comp


def leaderboard_files(comp: str) -> tuple[Path, Path]:
    """(leaderboard.md, leaderboard.csv) of the competition."""
    return RUNS / comp / "leaderboard.md", RUNS / comp / "leaderboard.csv"


def data_stamp(comp: str, split: str) -> Path:
    """runs/<comp>/<split>-data.json: the hash of the train or test data (make's dependency:
    rewritten only when the data changes)."""
    return RUNS / comp / f"{split}-data.json"


def submission_file(comp: str, suffix: str = "") -> Path:
    """submissions/<comp>.csv, or <comp>-<suffix>.csv (e.g. the auto mode's beside a
    hand-written ensemble's)."""
    return SUBMISSIONS / f"{comp}{'-' + suffix if suffix else ''}.csv"


def auto_files(comp: str) -> tuple[Path, Path]:
    """(state.json, report.md) of the auto mode under runs/<comp>/auto/."""
    folder = RUNS / comp / "auto"
    return folder / "state.json", folder / "report.md"


BEST, LAST, LOG, FOLD_OOF = "best.safetensors", "last.pt", "log.csv", "oof.csv"  # a fold folder's
CHECKPOINTS = ("*.safetensors", LAST)  # what a fold folder holds besides its log and OOF


@dataclass(frozen=True)
class Run:
    """A run folder: runs/<comp>/<name>/ (an experiment or an ensemble), or one of its past
    versions under history/<tag>/, which keeps the same layout."""

    dir: Path

    @classmethod
    def of(cls, comp: str, name: str) -> Run:
        return cls(RUNS / comp / name)

    @property
    def name(self) -> str:
        return self.dir.name

    def file(self, name: str) -> Path:
        """A file of the run folder by name (reports and their plots)."""
        return self.dir / name

    # an experiment's files
    tag = property(lambda self: self.dir / "tag.txt")
    config = property(lambda self: self.dir / "config.json")
    provenance = property(lambda self: self.dir / "provenance.json")
    scores = property(lambda self: self.dir / "scores.json")
    oof = property(lambda self: self.dir / "oof.csv")
    oof_tta = property(lambda self: self.dir / "oof_tta.csv")
    test = property(lambda self: self.dir / "test.csv")  # also the ensemble's blended test
    report = property(lambda self: self.dir / "report.md")
    label_noise = property(lambda self: self.dir / "label_noise.csv")  # written with the report
    preview = property(lambda self: self.dir / "preview.png")
    history = property(lambda self: self.dir / "history")

    def fold(self, k: int) -> Path:
        return self.dir / f"fold{k}"

    def best(self, k: int) -> Path:
        return self.fold(k) / BEST

    def last(self, k: int) -> Path:
        return self.fold(k) / LAST

    def log(self, k: int) -> Path:
        return self.fold(k) / LOG

    def fold_oof(self, k: int) -> Path:
        return self.fold(k) / FOLD_OOF

    def refit(self, seed: int) -> Path:
        return self.dir / f"refit{seed}"

    def fold_logs(self) -> dict[int, Path]:
        """{fold: its log.csv} for the folds that have one."""
        return {int(p.parent.name[len("fold"):]): p for p in sorted(self.dir.glob(f"fold*/{LOG}"))}

    # an ensemble's files
    weights = property(lambda self: self.dir / "weights.json")
    study = property(lambda self: self.dir / "study.db")

    # tuning (make tune)
    tune = property(lambda self: self.dir / "tune")

    def trial(self, number: int) -> Path:
        return self.tune / f"trial_{number:04d}"


@dataclass(frozen=True)
class Package:
    """packages/<comp>/: an inference package (make package)."""

    dir: Path

    @classmethod
    def of(cls, comp: str) -> Package:
        return cls(PACKAGES / comp)

    MANIFEST = "manifest.json"
    manifest = property(lambda self: self.dir / self.MANIFEST)
    meta = property(lambda self: self.dir / "package.json")  # task, classes, thresholds, format
    blend = property(lambda self: self.dir / "blend.json")  # experiments, weights, mode

    def settings(self, experiment: str) -> Path:
        return self.dir / experiment / "settings.json"

    def weights(self, experiment: str, model: str) -> Path:
        """An experiment's test model (fold<k>, refit<seed>)."""
        return self.dir / experiment / f"{model}.safetensors"
