"""Stage 4: blend experiments with optuna-tuned simplex weights -> runs/<comp>/<ensemble>/.

Reads each experiment's oof_tta.csv, test.csv and scores.json and refuses, naming the
experiments, to blend OOF built on different fold files, ids or class orders. Writes:
  weights.json   the weights and mode used, and every score below;
  test.csv       the blended test probabilities (the submit stage formats them);
  report.md      in-sample tuned vs nested-CV tuned vs equal weights vs the best single model,
                 the weights, history.png (optimisation history), folds.png (per-fold scores);
  study.db       the optuna study: `optuna-dashboard sqlite:///runs/<comp>/ensemble/study.db`.

When the tuned weights do not beat equal weights under nested CV the stage says so and, with
`fallback_to_equal` (the default), uses equal weights (in the `mean` mode when `mode: tune`).

Determinism: by default every run tunes a fresh study seeded by `seed` (in memory, then saved
to study.db through a temporary file), so the same inputs give byte-identical weights.json and
test.csv. With `storage: <optuna database URL>` the study `<comp>-<ensemble>` lives there and
persists: a rerun reuses its trials, and several workers may run this stage at once on it,
stopping together at `trials`. Their sampling is then unseeded (seeded workers would propose
the same trials), so results depend on the interleaving; each worker writes the artifacts from
the best trial it sees, so rerun the stage once after the last worker has finished.
"""
from __future__ import annotations

import json
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import sqlalchemy.exc

from pipeline import blend, metrics, thresholds
from pipeline.ensemble_report import headline, plot_folds, plot_history, render_report
from pipeline.artifacts import atomic_path, write_csv, write_json, write_text
from pipeline.competition import load_competition_data
from pipeline.config import EnsembleConfig, load_ensemble
from pipeline.errors import UserError, cli, stage_args


@dataclass
class Member:
    name: str
    oof: pd.DataFrame  # id, fold, one probability column per class
    test: pd.DataFrame  # id, one probability column per class
    fold_hash: str  # hash of the fold file the experiment was trained on


def load_member(run_dir: Path) -> Member:
    paths = {k: run_dir / f for k, f in (("oof", "oof_tta.csv"), ("test", "test.csv"),
                                           ("scores", "scores.json"))}
    for p in paths.values():
        if not p.is_file():
            raise UserError(f"{p}: not found; train and predict experiment {run_dir.name} first")
    tag = json.loads(paths["scores"].read_text()).get("tag")
    if not tag:
        raise UserError(f"{paths['scores']}: no 'tag'; retrain experiment {run_dir.name}")
    tables = {}
    for part, needed in (("oof", ["id", "fold"]), ("test", ["id"])):
        df = pd.read_csv(paths[part], dtype={"id": str}, keep_default_na=False)
        if not set(needed) <= set(df.columns):
            raise UserError(f"{paths[part]}: needs columns {needed}; "
                            f"rerun predict for {run_dir.name}")
        dup = df["id"].duplicated()
        if dup.any():
            raise UserError(f"{paths[part]}: duplicate id {df['id'][dup].iloc[0]!r}")
        tables[part] = df
    return Member(run_dir.name, tables["oof"], tables["test"], tag.rsplit("-", 1)[-1])


def classes_of(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c not in ("id", "fold")]


def _id_difference(a: pd.Series, b: pd.Series) -> str | None:
    only = set(a).symmetric_difference(b)
    return f"{len(only)} ids in only one of them, e.g. {min(only)!r}" if only else None


def align(members: list[Member], classes: list[str]) -> list[Member]:
    """Check the experiments can be blended; return them with rows in the first one's order.

    Refuses, naming both experiments, OOF from different fold files or fold assignments,
    different OOF or test ids, and different class columns or class order.
    """
    ref = members[0]
    aligned = [ref]
    for m in members[1:]:
        pair = f"experiments {ref.name!r} and {m.name!r}"
        if m.fold_hash != ref.fold_hash:
            raise UserError(f"{pair} were trained on different fold files; retrain one of them")
        for part in ("oof", "test"):
            a, b = getattr(ref, part), getattr(m, part)
            if classes_of(a) != classes_of(b):
                raise UserError(f"{pair} have different {part} class columns or order: "
                                f"{classes_of(a)} vs {classes_of(b)}")
            diff = _id_difference(a["id"], b["id"])
            if diff:
                raise UserError(f"{pair} have different {part} ids ({diff})")
        oof = m.oof.set_index("id").loc[ref.oof["id"]].reset_index()
        test = m.test.set_index("id").loc[ref.test["id"]].reset_index()
        if not np.array_equal(oof["fold"].to_numpy(), ref.oof["fold"].to_numpy()):
            raise UserError(f"{pair} assign some OOF ids to different folds; retrain one of them")
        aligned.append(Member(m.name, oof, test, m.fold_hash))
    for part in ("oof", "test"):
        if classes_of(getattr(ref, part)) != classes:
            raise UserError(f"experiment {ref.name!r}: {part} class columns "
                            f"{classes_of(getattr(ref, part))} differ from the competition's "
                            f"classes {classes}; rerun its predict stage")
    return aligned


def targets(member: Member, train: pd.DataFrame, y_train: np.ndarray) -> np.ndarray:
    """Class indices of the OOF rows, looked up in the train table by id."""
    index = pd.Index(train["id"]).get_indexer(member.oof["id"])
    if (index < 0).any():
        missing = member.oof["id"][index < 0].iloc[0]
        raise UserError(f"experiment {member.name!r}: OOF id {missing!r} is not in the train table")
    return y_train[index]


def open_study(cfg: EnsembleConfig, experiments: list[str], modes: tuple[str, ...]) -> optuna.Study:
    """The study to tune: a fresh seeded one in memory, or the one named `<comp>-<ensemble>` in
    `cfg.storage` (refused when it was tuned for another metric, experiments or modes)."""
    setup = dict(metric=metrics.name(cfg.metric), experiments=experiments, modes=list(modes))
    if cfg.storage:
        name = f"{cfg.name}-{cfg.experiment}"
        try:
            study = blend.new_study(cfg.metric, None, cfg.storage, name)
        except (ValueError, ImportError, sqlalchemy.exc.SQLAlchemyError) as err:
            raise UserError(f"storage: optuna cannot open {cfg.storage!r} "
                            f"({str(err).splitlines()[0]})") from None
        found = {k: study.user_attrs.get(k) for k in setup}
        if study.trials and found != setup:
            raise UserError(f"storage: study {name!r} in {cfg.storage} was tuned for {found}, "
                            f"not {setup}; set another storage or ensemble name")
    else:
        study = blend.new_study(cfg.metric, cfg.seed)
    for key, value in setup.items():
        study.set_user_attr(key, value)
    return study


def save_study(study: optuna.Study, path: Path, name: str) -> None:
    """Copy an in-memory study into a SQLite file, atomically. The temporary file is written
    without syncs or a rollback journal: it only takes its final name once complete."""
    with atomic_path(path) as tmp:
        def connect() -> sqlite3.Connection:
            connection = sqlite3.connect(tmp)
            connection.execute("PRAGMA synchronous = OFF")
            connection.execute("PRAGMA journal_mode = MEMORY")
            return connection

        storage = optuna.storages.RDBStorage(f"sqlite:///{tmp}",
                                             engine_kwargs={"creator": connect})
        saved = optuna.create_study(storage=storage, study_name=name,
                                    direction=study.direction.name.lower())
        for key, value in study.user_attrs.items():
            saved.set_user_attr(key, value)
        saved.add_trials(study.trials)
        storage.engine.dispose()


def decide(cfg: EnsembleConfig, nested: float | None, equal: float) -> tuple[str, str]:
    """(choice, one-line reason): tuned or equal weights, from the nested-CV comparison."""
    if nested is None:
        return "tuned", "Nested CV is off: the tuned weights are not checked against equal ones."
    versus = f"equal weights under nested CV ({nested:.5f} vs {equal:.5f})"
    if metrics.better(cfg.metric, nested, equal):
        return "tuned", f"Tuned weights beat {versus}."
    verdict = f"Tuned weights do not beat {versus}"
    if cfg.fallback_to_equal:
        return "equal", verdict + ": using equal weights."
    return "tuned", verdict + ": keeping them anyway (fallback_to_equal: false)."


@dataclass
class Inputs:
    names: list[str]
    classes: list[str]
    y: np.ndarray  # targets of the OOF rows (pipeline.tasks)
    folds: np.ndarray  # (N,) fold of each OOF row
    oof: np.ndarray  # (M, N, K) OOF probabilities
    test: np.ndarray  # (M, T, K) test probabilities
    test_ids: np.ndarray  # (T,)
    task: object  # pipeline.tasks.Task


def load_inputs(cfg: EnsembleConfig) -> Inputs:
    if len(set(cfg.experiments)) != len(cfg.experiments):
        raise UserError(f"experiments: {cfg.experiments} names an experiment twice")
    comp = load_competition_data(cfg)
    classes = list(comp.classes)
    members = align([load_member(Path("runs") / cfg.name / e) for e in cfg.experiments], classes)
    return Inputs([m.name for m in members], classes,
                  targets(members[0], comp.train, comp.targets()),
                  members[0].oof["fold"].to_numpy(),
                  np.stack([m.oof[classes].to_numpy(np.float64) for m in members]),
                  np.stack([m.test[classes].to_numpy(np.float64) for m in members]),
                  members[0].test["id"].to_numpy(), comp.task)


def blend_modes(cfg: EnsembleConfig) -> tuple[str, ...]:
    """The modes to search; with `mode: tune` the first (mean) is also the equal-weight one."""
    if cfg.mode != "tune":
        return (cfg.mode,)
    return blend.MODES if cfg.task in ("multiclass", "binary", "multilabel") else ("mean", "rank")


def evaluate(cfg: EnsembleConfig, data: Inputs, study: optuna.Study) -> dict:
    """Tune, score the comparison (in-sample tuned, nested-CV tuned, equal weights, single
    models, overall and per fold) and choose the weights; returns weights.json's content."""
    metric, y, folds, oof = cfg.metric, data.y, data.folds, data.oof
    modes = blend_modes(cfg)
    tuned = blend.tune(oof, y, metric, cfg.trials, modes, study, folds)
    eq = blend.equal_weights(len(data.names))
    equal_oof = blend.blend(oof, eq, modes[0], folds)
    equal_cv = metrics.score(metric, y, equal_oof)
    nested = blend.nested_cv(oof, y, folds, metric, cfg.trials, modes, cfg.seed) \
        if cfg.nested_cv else None
    choice, decision = decide(cfg, nested.score if nested else None, equal_cv)
    weights, mode = (tuned.weights, tuned.mode) if choice == "tuned" else (eq, modes[0])

    def named(w: np.ndarray) -> dict:
        return dict(zip(data.names, np.asarray(w).tolist()))

    single = {n: metrics.score(metric, y, p) for n, p in zip(data.names, oof)}
    per_fold = {n: metrics.fold_scores(metric, y, folds, p) for n, p in zip(data.names, oof)}
    per_fold["equal weights"] = metrics.fold_scores(metric, y, folds, equal_oof)
    per_fold["in-sample tuned"] = metrics.fold_scores(
        metric, y, folds, blend.blend(oof, tuned.weights, tuned.mode, folds))
    if nested:
        per_fold["nested-CV tuned"] = nested.per_fold
    blended = blend.blend(oof, weights, mode, folds)
    return dict(
        metric=metrics.name(metric), experiments=data.names, choice=choice, decision=decision,
        weights=named(weights), mode=mode, cv=metrics.score(metric, y, blended),
        tuned_weights=named(tuned.weights), tuned_mode=tuned.mode,
        tuned_in_sample_cv=tuned.score, nested_cv=nested.score if nested else None,
        equal_weights_cv=equal_cv, single_cv=single, best_single=metrics.best_key(metric, single),
        nested_fold_weights={f: named(w) for f, w in nested.weights.items()} if nested else {},
        nested_fold_modes=nested.modes if nested else {},
        per_fold=per_fold, trials=len(study.trials),
        **decision_thresholds(cfg, data, blended))


def decision_thresholds(cfg: EnsembleConfig, data: Inputs, blended: np.ndarray) -> dict:
    """Thresholds for the metric's decisions on the chosen blend's OOF, where it needs them:
    the default, tuned in sample, and tuned under nested CV (each fold's rows decided by
    thresholds tuned on the other folds). The tuned ones are used only when their nested-CV
    score beats the default's. Plus the per-label or per-grade scores of the blend."""
    task, y, metric = data.task, data.y, cfg.metric
    out = dict(per_column=per_column_scores(task, y, blended))
    which = thresholds.kind(metric, task)
    if which is None:
        return dict(out, thresholds=None)
    default = thresholds.default(which, task)
    tuned = thresholds.fit(which, metric, y, blended, task)
    nested, per_fold = thresholds.nested(which, metric, y, blended, data.folds, task)
    default_cv = metrics.score(metric, y, blended, default)
    use = tuned if metrics.better(metric, nested, default_cv) else None
    return dict(out, thresholds=thresholds.to_json(which, use), threshold_scores=dict(
        kind=which, default=default_cv, in_sample=metrics.score(metric, y, blended, tuned),
        nested=nested, nested_per_fold=per_fold, used="tuned" if use is not None else "default",
        tuned=thresholds.to_json(which, tuned)))


def per_column_scores(task, y: np.ndarray, pred: np.ndarray) -> dict:
    """{label: OOF ROC-AUC} (multi-label) or {grade: OOF mean absolute error} (ordinal); {}
    for the other tasks."""
    if task.kind == "multilabel":
        return {c: metrics.score("roc_auc", y[:, [j]], pred[:, [j]])
                for j, c in enumerate(task.columns) if 0 < y[:, j].sum() < len(y)}
    if task.kind == "ordinal":
        return {f"{g:g}": float(np.abs(pred[y == g, 0] - g).mean()) for g in task.grades
                if (y == g).any()}
    return {}


def run(cfg: EnsembleConfig) -> dict:
    data = load_inputs(cfg)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(cfg, data.names, blend_modes(cfg))
    result = evaluate(cfg, data, study)
    print(f"ensemble: {result['decision']}", file=sys.stderr)
    if not cfg.storage:
        save_study(study, run_dir / "study.db", f"{cfg.name}-{cfg.experiment}")
    weights = np.array([result["weights"][n] for n in data.names])
    blended = pd.DataFrame(blend.blend(data.test, weights, result["mode"]), columns=data.classes)
    blended.insert(0, "id", data.test_ids)
    write_csv(blended, run_dir / "test.csv")
    write_json(result, run_dir / "weights.json")
    plot_history(study, metrics.name(cfg.metric), run_dir / "history.png")
    plot_folds(result["per_fold"], metrics.name(cfg.metric), run_dir / "folds.png")
    write_text(render_report(result, cfg), run_dir / "report.md")
    print(f"ensemble: {headline(result)}; report {run_dir / 'report.md'}", file=sys.stderr)
    return result


@cli
def main(argv: list[str] | None = None) -> None:
    args = stage_args(argv, __doc__, "configs/<comp>/ensemble.yaml")
    run(load_ensemble(args.config, args.overrides))


if __name__ == "__main__":
    main()
