"""A fold's checkpoints: the best weights (safetensors with the fold's task, what predict and
packages read: pipeline.models.predictor.save_checkpoint) and the last state for resume
(`last.pt`: model, optimizer, EMA, loss scaler and loop state, loaded with
`weights_only=True`), each written atomically."""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.core import layout
from pipeline.core.artifacts import atomic_path


def save_last(path: Path, tag: str, state: dict, model, optimizer, ema, scaler) -> None:
    """The state to resume from, under the run's `tag`."""
    with atomic_path(path) as tmp:
        torch.save(dict(tag=tag, model=model.state_dict(), state=state,
                        optimizer=optimizer.state_dict(),
                        ema=ema.state_dict() if ema is not None else {},
                        scaler=scaler.state_dict() if scaler is not None else {}), tmp)


def load_last(path: Path, tag: str, model, optimizer, ema, scaler) -> dict | None:
    """Load model, optimizer, EMA and loss scaler from `path` when written with `tag`; returns
    its loop state (None: nothing to resume)."""
    if not path.is_file():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt["tag"] != tag:
        return None
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ema is not None:
        ema.load_state_dict(ckpt["ema"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    return ckpt["state"]


def resume_point(run: layout.Run, n_splits: int) -> str:
    """Where the next `train` of this run starts: the first unfinished fold, its stage and epoch
    (stages counted from 0, epochs from 1, as the progress lines count them)."""
    for fold in range(n_splits):
        if run.fold_oof(fold).is_file():
            continue
        if run.last(fold).is_file():
            state = torch.load(run.last(fold), map_location="cpu", weights_only=True)["state"]
            return f"fold {fold} stage {state['stage']} epoch {state['epoch'] + 1}"
        return f"the start of fold {fold}"
    return "the OOF of the finished folds"
