"""Run folders as history: a finished run built from another config or fold file is kept, not deleted.

`runs/<comp>/<exp>/` holds the current version; each finished past version moves to
`runs/<comp>/<exp>/history/<tag>/` (tag: config hash - fold-file hash) when its experiment is
rebuilt. Only `prune` (`make prune COMP=c KEEP=n`) removes past versions, never the current one.

    python -m pipeline.runs configs/<comp>/competition.yaml --keep 3
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from pipeline.artifacts import write_text
from pipeline.config import load_competition
from pipeline.errors import UserError, cli, stage_args

HISTORY = "history"


def _tag(run_dir: Path) -> str | None:
    tag_file = run_dir / "tag.txt"
    return tag_file.read_text().strip() if tag_file.is_file() else None


def finished(run_dir: Path) -> bool:
    """Training wrote the run's scores: every fold is done."""
    return (run_dir / "scores.json").is_file()


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
        if (partial / "tag.txt").is_file():
            os.replace(partial, _free_name(history, partial.name[1:-len(".partial")]))


def archive(run_dir: Path) -> Path:
    """Move the current version's files to history/<tag>/ (tag.txt last); returns that folder."""
    history = run_dir / HISTORY
    tag = _tag(run_dir)
    partial = history / f".{tag}.partial"
    partial.mkdir(parents=True, exist_ok=True)
    for entry in sorted(run_dir.iterdir()):
        if entry.name not in (HISTORY, "tag.txt"):
            os.replace(entry, partial / entry.name)
    os.replace(run_dir / "tag.txt", partial / "tag.txt")
    dest = _free_name(history, tag)
    os.replace(partial, dest)
    return dest


def discard(run_dir: Path) -> None:
    """Remove an unfinished version's files (never the history)."""
    for entry in run_dir.iterdir():
        if entry.name != HISTORY:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def start_version(run_dir: Path, tag: str) -> None:
    """Make `run_dir` the home of version `tag`: a finished version built from another tag
    goes to the history, an unfinished one is discarded, the same tag is resumed."""
    if (run_dir / HISTORY).is_dir():
        _finish_partial(run_dir / HISTORY)
    old = _tag(run_dir)
    if old is not None and old != tag:
        if finished(run_dir):
            dest = archive(run_dir)
            print(f"{run_dir}: built from {old}, now {tag}: kept the finished run in {dest}, "
                  f"rebuilding", file=sys.stderr)
        else:
            discard(run_dir)
            print(f"{run_dir}: unfinished run built from {old}, now {tag}: discarded, rebuilding",
                  file=sys.stderr)
    write_text(tag + "\n", run_dir / "tag.txt")


def versions(run_dir: Path) -> list[Path]:
    """The experiment's past versions, oldest first (by when they were archived)."""
    history = run_dir / HISTORY
    if not history.is_dir():
        return []
    past = [p for p in history.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(past, key=lambda p: (p.stat().st_mtime_ns, p.name))


def prune(comp_runs: Path, keep: int) -> list[Path]:
    """Remove all but the `keep` newest past versions of every experiment; returns the removed."""
    removed = []
    for run_dir in sorted(p for p in comp_runs.iterdir() if p.is_dir()):
        old = versions(run_dir)
        for path in old[:max(0, len(old) - keep)]:
            shutil.rmtree(path)
            removed.append(path)
    return removed


def resume_point(run_dir: Path, n_splits: int) -> str:
    """Where the next `train` of this run starts: the first unfinished fold, its stage and epoch."""
    import torch  # here: pruning and the leaderboard need no torch

    for fold in range(n_splits):
        fold_dir = run_dir / f"fold{fold}"
        if (fold_dir / "oof.csv").is_file():
            continue
        if (fold_dir / "last.pt").is_file():
            state = torch.load(fold_dir / "last.pt", map_location="cpu", weights_only=True)["state"]
            return f"fold {fold} stage {state['stage']} epoch {state['epoch']}"
        return f"the start of fold {fold}"
    return "the OOF of the finished folds"


def _keep_option(parser) -> None:
    parser.add_argument("--keep", type=int, required=True,
                        help="past versions to keep per experiment (0: only the current ones)")


@cli
def main(argv: list[str] | None = None) -> None:
    args = stage_args(argv, __doc__, "configs/<comp>/competition.yaml", _keep_option)
    if args.keep < 0:
        raise UserError(f"--keep {args.keep}: must be 0 or more")
    comp_runs = Path("runs") / load_competition(args.config, args.overrides).name
    removed = prune(comp_runs, args.keep) if comp_runs.is_dir() else []
    size = sum(f.stat().st_size for f in comp_runs.rglob("*") if f.is_file()) \
        if comp_runs.is_dir() else 0
    print(f"pruned {len(removed)} past versions; {comp_runs} now holds {size / 2**20:.1f} MiB",
          file=sys.stderr)


if __name__ == "__main__":
    main()
