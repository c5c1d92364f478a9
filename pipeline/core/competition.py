"""Reading and validating a competition folder: train table, images, sample submission."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core import tasks
from pipeline.core.config import CompetitionConfig
from pipeline.core.errors import UserError
from pipeline.core.submission import SubmissionFormat, infer_format
from pipeline.core.artifacts import text_hash
from pipeline.data.images import set_key, state_key, undecodable


@dataclass(frozen=True)
class Competition:
    train: pd.DataFrame  # columns: id, target, [group], path
    test: pd.DataFrame  # columns: id, path; sample_submission's order
    classes: tuple[str, ...]  # the prediction columns: classes, labels, or the target's name
    submission: SubmissionFormat
    task: tasks.Task
    y: np.ndarray  # the targets: class index, N x L 0/1 labels, or values (Task.targets)
    skipped: tuple[str, ...] = ()


def read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot parse as CSV ({str(err).splitlines()[0]})") from None


def _require_columns(df: pd.DataFrame, columns: list[str], path: Path, key: str) -> None:
    for col in columns:
        if col not in df.columns:
            raise UserError(
                f"{path}: no column {col!r} (set by {key}); columns are {list(df.columns)}"
            )


def _check_unique(ids: pd.Series, path: Path) -> None:
    dup = ids.duplicated()
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        raise UserError(f"{path}: row {row + 2}: duplicate id {ids.iloc[row]!r}")


class ImageIndex:
    """Finds the image file of an id: `<folder>/<id><suffix>`, else by name anywhere below.
    Counts the ids found with the suffix, so a suffix no file has can be pointed out."""

    def __init__(self, folder: Path, suffix: str):
        if not folder.is_dir():
            raise UserError(f"{folder}: image folder not found")
        self.folder, self.suffix = folder, suffix
        self._by_name: dict[str, Path] | None = None
        self.with_suffix = self.without_suffix = 0

    def _names(self) -> dict[str, Path]:
        if self._by_name is None:
            self._by_name = {}
            for root, _, files in os.walk(self.folder):
                for name in files:
                    path = Path(root) / name
                    self._by_name.setdefault(name, path)
                    self._by_name.setdefault(path.stem, path)
        return self._by_name

    def find(self, image_id: str) -> Path | None:
        named = image_id + self.suffix
        if (self.folder / named).is_file():
            path = self.folder / named
        elif (self.folder / image_id).is_file():
            path = self.folder / image_id
        else:
            names = self._names()
            path = names.get(Path(named).name) or names.get(Path(image_id).name)
        if path is not None and self.suffix:
            if path.name == Path(named).name:
                self.with_suffix += 1
            else:
                self.without_suffix += 1
        return path

    def note_unused_suffix(self, table: Path) -> None:
        """Say once when `data.image_suffix` names no file: the images were found without it."""
        if self.suffix and not self.with_suffix and self.without_suffix:
            print(f"note: {table}: no image is named <id>{self.suffix} (data.image_suffix); "
                  f"{self.without_suffix} were found by their names without it in {self.folder}",
                  file=sys.stderr)


def _attach_paths(ids: pd.Series, index: ImageIndex, table: Path, on_bad: str,
                  cache_dir: str | None) -> tuple[list, list]:
    """Image path per id, every file decode-checked (the result remembered in `cache_dir`;
    None: not checked); with on_bad='skip', missing, empty and undecodable files give None,
    else the first one stops with its row."""
    paths, bad = [], []
    for row, image_id in enumerate(ids):
        path = index.find(image_id)
        problem = None
        if path is None:
            problem = f"no image file for id {image_id!r} in {index.folder}"
        elif path.stat().st_size == 0:
            problem = f"image file {path} is empty (0 bytes)"
        if problem and on_bad == "error":
            raise UserError(f"{table}: row {row + 2}: {problem}")
        if problem:
            bad.append(f"{table} row {row + 2}: {problem}")
        paths.append(None if problem else str(path))
    index.note_unused_suffix(table)
    corrupt = {} if cache_dir is None else \
        undecodable([p for p in paths if p is not None], cache_dir)  # remembered: cheap
    for row, path in enumerate(paths):
        if path in corrupt:
            if on_bad == "error":
                raise UserError(f"{table}: row {row + 2}: {corrupt[path]}")
            bad.append(f"{table} row {row + 2}: {corrupt[path]}")
            paths[row] = None
    return paths, bad


def find_images(ids: pd.Series, folder: Path, suffix: str, table: Path,
                cache_dir: str | None = None) -> list[str]:
    """The image path of every id; a missing, empty or (with `cache_dir`) undecodable file stops
    with a UserError naming its row."""
    return _attach_paths(ids, ImageIndex(folder, suffix), table, "error", cache_dir)[0]


def label_columns(train: pd.DataFrame, cfg: CompetitionConfig, path: Path) -> list[str] | None:
    """Multilabel targets' 0/1 columns (`data.target_columns`, or those named with
    `data.target_prefix`), or None when the labels are in one separated column."""
    d = cfg.data
    if d.target_columns is None and d.target_prefix is None:
        return None
    if d.target_columns is not None:
        _require_columns(train, d.target_columns, path, "data.target_columns")
        return list(d.target_columns)
    found = [c for c in train.columns if c.startswith(d.target_prefix)]
    if not found:
        raise UserError(f"{path}: no column starts with {d.target_prefix!r} (data.target_prefix)")
    return found


def label_names(columns: list[str], cfg: CompetitionConfig) -> list[str]:
    """The labels the 0/1 columns stand for: their names, less `data.target_prefix`."""
    prefix = cfg.data.target_prefix if cfg.data.target_columns is None else ""
    return [c[len(prefix):] for c in columns]


def join_label_columns(train: pd.DataFrame, columns: list[str], cfg: CompetitionConfig,
                       path: Path) -> pd.Series:
    """0/1 label columns -> one column of the labels present, joined by the separator."""
    names = label_names(columns, cfg)
    values = train[columns].apply(lambda col: col.str.strip())
    for col in columns:
        bad = ~values[col].isin(["0", "1", "0.0", "1.0"])
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise UserError(f"{path}: row {row + 2}: column {col!r} holds {values[col].iloc[row]!r}"
                            f", not 0 or 1")
    on = values.isin(["1", "1.0"]).to_numpy()
    sep = cfg.data.label_separator
    return pd.Series([sep.join(n for n, hit in zip(names, r) if hit) for r in on], index=train.index)


def read_train(cfg: CompetitionConfig) -> tuple[pd.DataFrame, list[str] | None]:
    """The train table as columns id, target[, group] (multilabel 0/1 columns joined into the
    target), validated: ids unique, no empty target; and the label columns, if any."""
    d = cfg.data
    path = d.path("train_csv")
    table = read_table(path)
    _require_columns(table, [d.id_column], path, "data.id_column")
    if d.group_column:
        _require_columns(table, [d.group_column], path, "data.group_column")
    label_cols = label_columns(table, cfg, path)
    if label_cols is None:
        _require_columns(table, [d.target_column], path, "data.target_column")
        target = table[d.target_column]
    else:
        target = join_label_columns(table, label_cols, cfg, path)
    train = pd.DataFrame({"id": table[d.id_column], "target": target})
    if d.group_column:
        train["group"] = table[d.group_column]
    train["id"] = train["id"].str.strip()
    train["target"] = train["target"].str.strip()
    _check_unique(train["id"], path)
    empty = train["target"].str.lower().isin(["nan", "none", "null"])
    if not tasks.of(cfg.task).allows_empty_target:
        empty |= train["target"] == ""
    if empty.any():
        row = int(np.flatnonzero(empty.to_numpy())[0])
        raise UserError(f"{path}: row {row + 2}: empty target for id {train['id'].iloc[row]!r}")
    return train, label_cols


def drop_excluded(train: pd.DataFrame, cfg: CompetitionConfig, path: Path) -> pd.DataFrame:
    """The train table less the rows `data.exclude` names (a list of ids, or a CSV file with an
    `id` column), said in one line; an id the table does not have stops with its name."""
    exclude = cfg.data.exclude
    if exclude is None:
        return train
    if isinstance(exclude, list):
        ids, source = [str(i).strip() for i in exclude], "data.exclude"
    else:
        table = read_table(Path(exclude))
        _require_columns(table, ["id"], Path(exclude), "data.exclude")
        ids, source = list(table["id"].str.strip()), f"{exclude} (data.exclude)"
    known = set(train["id"])
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise UserError(f"{source}: id {unknown[0]!r} is not in the train table {path}")
    dropped = train["id"].isin(ids)
    print(f"data.exclude: dropped {int(dropped.sum())} of {len(train)} train rows ({source})",
          file=sys.stderr)
    return train[~dropped]


def read_sample_submission(cfg: CompetitionConfig) -> pd.DataFrame:
    path = cfg.data.path("sample_submission")
    sample = read_table(path)
    if sample.empty:
        raise UserError(f"{path}: has no rows")
    _check_unique(sample[sample.columns[0]], path)
    return sample


def load_competition_data(cfg: CompetitionConfig) -> Competition:
    """Read and validate everything the pipeline needs from the competition folder; the train
    rows `data.exclude` names are dropped once validated (the label set, the task's range and
    grades are the whole table's)."""
    d = cfg.data
    train, label_cols = read_train(cfg)
    sample = read_sample_submission(cfg)
    task_cls = tasks.of(cfg.task)
    train_classes = task_cls.label_set(
        train, cfg, None if label_cols is None else label_names(label_cols, cfg))
    fmt = infer_format(sample, train_classes, task_cls, cfg, d.path("sample_submission"))
    # a column per class or label: the sample's columns, in its order (a train label without
    # one is refused as unknown; a column without train rows is a label never seen)
    classes = list(fmt.columns) if fmt.format in ("proba", "columns") else train_classes
    task = tasks.build(cfg, train, classes)
    train_path = d.path("train_csv")
    train_paths, bad = _attach_paths(train["id"], ImageIndex(d.path("train_images"), d.image_suffix),
                                     train_path, d.on_bad_image, d.cache_dir)
    train["path"] = train_paths
    test = pd.DataFrame({"id": sample[sample.columns[0]].str.strip()})
    test["path"] = find_images(test["id"], d.path("test_images"), d.image_suffix,
                               d.path("sample_submission"), d.cache_dir)
    for line in bad:
        print(f"warning: skipped {line}", file=sys.stderr)
    train = drop_excluded(train, cfg, train_path)
    train = train[train["path"].notna()].reset_index(drop=True)
    y = task.targets(train["target"], train_path)
    return Competition(train, test, tuple(task.columns), fmt, task, y, tuple(bad))


def data_identity(comp: Competition) -> dict[str, str]:
    """What the competition's data is, as hashes: `train` (the train rows' ids, targets and
    groups, and their image files' paths, sizes and modification times) and `test` (the test
    ids and image files). A run built from other data is another version of it."""
    columns = [c for c in ("id", "target", "group") if c in comp.train.columns]
    rows = comp.train[columns].to_csv(index=False)
    train_paths, test_paths = list(comp.train["path"]), list(comp.test["path"])
    return dict(train=text_hash(f"{rows}\n{set_key(train_paths)}\n{state_key(train_paths)}"),
                test=text_hash(f"{'|'.join(comp.test['id'])}\n{set_key(test_paths)}\n"
                               f"{state_key(test_paths)}"))
