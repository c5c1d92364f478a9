"""The ensemble and submit stages' work: load the members, tune and choose the blend (or the
stack), write the blended test predictions, weights.json, the study and the report
(`make ensemble`); then the submission in sample_submission's format at the chosen decisions
(`make submit`)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.blending import blend, search, stack
from pipeline.blending.choose import blend_modes, evaluate
from pipeline.blending.members import load_inputs
from pipeline.core import layout, thresholds
from pipeline.core.artifacts import write_csv, write_json
from pipeline.core.competition import load_competition_data
from pipeline.core.config import EnsembleConfig
from pipeline.core.errors import UserError
from pipeline.core.submission import format_submission, write_submission
from pipeline.reports import ensemble as ensemble_report


def run_ensemble(cfg: EnsembleConfig) -> dict:
    """Tune and choose the blend, write the blended test predictions, weights.json (every
    score), the study and the report; returns weights.json's content."""
    data = load_inputs(cfg)
    run = layout.Run.of(cfg.name, cfg.experiment)
    run.dir.mkdir(parents=True, exist_ok=True)
    study = search.open_study(cfg, data.names, blend_modes(cfg))
    if len(data.names) == 1:
        print(f"ensemble: one experiment ({data.names[0]}): nothing to blend; its decisions are "
              f"still chosen under nested CV", file=sys.stderr)
    result = evaluate(cfg, data, study)
    print(f"ensemble: {result['decision']}", file=sys.stderr)
    if not cfg.storage:
        search.save_study(study, run.study, f"{cfg.name}-{cfg.experiment}")
    weights = np.array([result["weights"][n] for n in data.names])
    blended = pd.DataFrame(blend.blend(data.test, weights, result["mode"], data.task,
                                       meta=stack.from_json(result["stack"])),
                           columns=data.classes)
    blended.insert(0, "id", data.test_ids)
    write_csv(blended, run.test)
    write_json(result, run.weights)
    ensemble_report.write(study, result, cfg, run)
    print(f"ensemble: {ensemble_report.headline(result)}; report {run.report}", file=sys.stderr)
    return result


def read_thresholds(run: layout.Run):
    """The ensemble's chosen decision thresholds (weights.json), or None for the defaults."""
    if not run.weights.is_file():
        return None
    return thresholds.from_json(json.loads(run.weights.read_text()).get("thresholds"))


def submit(cfg: EnsembleConfig, out: Path | None = None) -> Path:
    """submissions/<comp>.csv (or `out`) from the ensemble's blended test predictions; returns
    its path."""
    comp = load_competition_data(cfg)
    run = layout.Run.of(cfg.name, cfg.experiment)
    if not run.test.is_file():
        raise UserError(f"{run.test}: not found; run the ensemble stage first")
    blended = pd.read_csv(run.test, dtype={"id": str}, keep_default_na=False)
    classes = list(comp.classes)
    lacking = [c for c in classes if c not in blended.columns]
    if lacking:
        raise UserError(f"{run.test}: no column for class {lacking[0]!r}; "
                        f"rerun the ensemble stage")
    df = format_submission(comp.submission, comp.task, list(blended["id"]),
                           blended[classes].to_numpy(), read_thresholds(run))
    out = out or layout.submission_file(cfg.name)
    write_submission(df, out, comp.submission, comp.task)
    print(f"wrote {out}: {len(df)} rows, format {comp.submission.format}", file=sys.stderr)
    return out
