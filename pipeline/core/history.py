"""Run folders as history: a finished run built from another config or fold file is kept, not deleted.

`runs/<comp>/<exp>/` holds the current version; each finished past version moves to
`runs/<comp>/<exp>/history/<tag>/` (tag: config hash - fold-file hash) when its experiment is
rebuilt. Only `prune` (`make prune COMP=c KEEP=n`) removes past versions, never the current one,
and it keeps their tuning studies (tune/) unless asked.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from pipeline.core import layout
from pipeline.core.artifacts import write_text


def _tag(run: layout.Run) -> str | None:
    return run.tag.read_text().strip() if run.tag.is_file() else None


def finished(run: layout.Run) -> bool:
    """Training wrote the run's scores: every fold is done."""
    return run.scores.is_file()


def _free_name(folder: Path, name: str) -> Path:
    """`folder/name`, or `folder/name.2`, `.3`... when taken (the same tag rebuilt again later)."""
    path, n = folder / name, 1
    while path.exists():
        n += 1
        path = folder / f"{name}.{n}"
    return path


def _finish_partial(history: Path) -> None:
    """Complete an archive cut short by a crash: its tag.txt moved last, so it holds everything."""
    for partial in history.glob(".*.partial"):
        if layout.Run(partial).tag.is_file():
            os.replace(partial, _free_name(history, partial.name[1:-len(".partial")]))


def archive(run: layout.Run) -> Path:
    """Move the current version's files to history/<tag>/ (tag.txt last); returns that folder."""
    tag = _tag(run)
    partial = run.history / f".{tag}.partial"
    partial.mkdir(parents=True, exist_ok=True)
    for entry in sorted(run.dir.iterdir()):
        if entry not in (run.history, run.tag):
            os.replace(entry, partial / entry.name)
    os.replace(run.tag, partial / run.tag.name)
    dest = _free_name(run.history, tag)
    os.replace(partial, dest)
    return dest


def discard(run: layout.Run) -> None:
    """Remove an unfinished version's files (never the history)."""
    for entry in run.dir.iterdir():
        if entry != run.history:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def start_version(run: layout.Run, tag: str, fresh: bool = False) -> None:
    """Make `run` the home of version `tag`: a finished version built from another tag (or any,
    when `fresh`) goes to the history, an unfinished one is discarded, the same tag is resumed."""
    if run.history.is_dir():
        _finish_partial(run.history)
    old = _tag(run)
    if old is not None and (old != tag or fresh):
        if finished(run):
            dest = archive(run)
            print(f"{run.dir}: built from {old}, now {tag}: kept the finished run in {dest}, "
                  f"rebuilding", file=sys.stderr)
        else:
            discard(run)
            print(f"{run.dir}: unfinished run built from {old}, now {tag}: discarded, rebuilding",
                  file=sys.stderr)
    write_text(tag + "\n", run.tag)


def versions(run: layout.Run) -> list[layout.Run]:
    """The run's past versions, oldest first (by when they were archived)."""
    if not run.history.is_dir():
        return []
    past = [p for p in run.history.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return [layout.Run(p) for p in sorted(past, key=lambda p: (p.stat().st_mtime_ns, p.name))]


def _study_only(run: layout.Run) -> bool:
    """A pruned past version that kept its tuning study and nothing else."""
    return [p.name for p in run.dir.iterdir()] == [run.tune.name]


def prune(comp: str, keep: int, studies: bool = False) -> tuple[list[Path], list[Path]]:
    """Remove all but the `keep` newest past versions of every run of competition `comp`,
    except their tuning studies (`tune/`) unless `studies`; returns (the pruned version folders,
    the studies kept in them). A version left with its study alone no longer counts as one."""
    removed, kept = [], []
    runs = layout.competition_runs(comp)
    for folder in sorted(p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []:
        past = versions(layout.Run(folder))
        old = [v for v in past if not _study_only(v)]
        for version in old[:max(0, len(old) - keep)]:
            removed.append(version.dir)
            if studies or not version.tune.is_dir():
                shutil.rmtree(version.dir)
                continue
            for entry in version.dir.iterdir():
                if entry != version.tune:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        for version in past:
            if version.dir.is_dir() and _study_only(version):
                if studies:
                    shutil.rmtree(version.dir)
                else:
                    kept.append(version.tune)
    return removed, kept
