"""Where and how tensors run: the device, mixed precision, and the distributed world.

The one place that knows about CUDA, autocast, the gradient scaler and torch.distributed.
Train, predict, infer and the bench ask a `Runtime` (loader options, the input copy stream,
peak memory, synchronisation); none of them branches on the device. On a CPU with one
process every method is a no-op (fp32, no scaler, no barrier, no stream), so CPU results stay
byte-identical.

Distributed: launched by `torchrun`, each process reads RANK / WORLD_SIZE / LOCAL_RANK from
its environment, takes GPU LOCAL_RANK (or the CPU with the gloo backend), and joins one
process group, whose collectives time out after PIPELINE_DIST_TIMEOUT_S seconds (default
1800). Rank 0 writes every artifact; the others wait at `barrier()`. Long work that every rank
needs (the image cache) is not waited for at a collective: a file lock serialises it
(`data.images`), so no collective is pending for long.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from pipeline.core.errors import UserError
from pipeline.runtime import cpu

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TIMEOUT_ENV, DEFAULT_TIMEOUT_S = "PIPELINE_DIST_TIMEOUT_S", 1800


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def primary(self) -> bool:
        return self.rank == 0


def world_from_env() -> World:
    """The torchrun world this process belongs to (one process when not launched by torchrun)."""
    env = os.environ
    return World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def dist_timeout() -> timedelta:
    """How long a collective may wait for every rank: PIPELINE_DIST_TIMEOUT_S seconds, default
    1800 (NCCL's own default, 10 minutes, is short for rank 0 writing a large checkpoint)."""
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise UserError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return timedelta(seconds=seconds)


def resolve_device(spec: str, world: World = World()) -> torch.device:
    """`auto` (a GPU when one is visible), `cpu`, `cuda` or `cuda:N`; under torchrun, `cuda`
    and `auto` mean the GPU of this process's local rank."""
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"device: {spec} asked for, but torch sees no CUDA GPU "
                        f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
                        f"use device=cpu")
    index = int(spec.split(":")[1]) if ":" in spec else world.local_rank
    if index >= torch.cuda.device_count():
        raise UserError(f"device: {spec}: only {torch.cuda.device_count()} GPU(s) visible")
    return torch.device("cuda", index)


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 on GPUs that support it, fp16 (with a gradient scaler) on older ones
    (T4, P100), fp32 on the CPU."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


class Runtime:
    """The device, the autocast dtype and the distributed world of one process."""

    def __init__(self, device: torch.device, precision: str = "fp32", world: World = World()):
        self.device, self.precision, self.world = device, precision, world

    @classmethod
    def on(cls, device: torch.device, precision: str = "auto") -> Runtime:
        """A one-process runtime on `device`, `precision` resolved for it (predictions)."""
        return cls(device, resolve_precision(precision, device))

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def device_name(self) -> str:
        """E.g. `cuda:0 (NVIDIA H200)` or `cpu (CPU)`."""
        name = torch.cuda.get_device_name(self.device) if self.cuda else "CPU"
        return f"{self.device} ({name})"

    def describe(self) -> str:
        ranks = f", {self.world.size} processes" if self.world.size > 1 else ""
        return f"{self.device_name()}, {self.precision}{ranks}"

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for forward passes; nothing in fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision])

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A loss scaler for fp16 (whose gradients would underflow), else None."""
        return torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

    @staticmethod
    def backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
        (scaler.scale(loss) if scaler is not None else loss).backward()

    @staticmethod
    def step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
             params: list[torch.nn.Parameter], clip: float | None) -> None:
        """Unscale (fp16), clip the gradient norm, step, update the scale (timm's NativeScaler)."""
        if scaler is not None:
            scaler.unscale_(optimizer)
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()

    def synchronize(self) -> None:
        """Wait for the device's queued work (timing a GPU needs it)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def keep_freed_memory(self) -> None:
        """On the CPU, keep freed tensor memory in the process for the next batch
        (`cpu.reuse_freed_memory`); a GPU's caching allocator does so already."""
        if not self.cuda:
            cpu.reuse_freed_memory()

    def loader_options(self) -> dict:
        """How loaders feed this device: on a GPU, pinned batches made by the loader's own
        workers or the main thread (the GPU overlaps them); on the CPU, a background thread
        when a core is free for it (`data.loader.make_loader`)."""
        return dict(background=False if self.cuda else None, pin_memory=self.cuda)

    def peak_memory_mb(self) -> float:
        """Peak memory of this process so far: the GPU's allocations, or the resident set size."""
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _side_stream(self) -> torch.cuda.Stream:
        """One CUDA stream for input copies, made once per runtime (a stream per epoch would
        hold on to memory: timm issue #2781)."""
        if getattr(self, "_stream", None) is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def input_stream(self) -> contextlib.AbstractContextManager:
        """Where input batches are copied and prepared: a side stream on a GPU, so the next
        batch is made while the model runs on this one; nothing on the CPU."""
        return torch.cuda.stream(self._side_stream()) if self.cuda else contextlib.nullcontext()

    def inputs_ready(self, tensors: tuple[torch.Tensor, ...]) -> None:
        """Make the compute stream wait for tensors made under `input_stream` (and keep their
        memory until it has used them)."""
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self._side_stream())
            for t in tensors:
                t.record_stream(current)

    def to_device(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Tensors on the device; from pinned memory the copies overlap with compute."""
        if not self.cuda:
            return tensors
        return tuple(t.to(self.device, non_blocking=True) for t in tensors)

    # distributed

    @property
    def distributed(self) -> bool:
        return self.world.size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) copied to every rank, in place: each
        rank's last forward pass updated its own from its shard (no-op with one process)."""
        if self.distributed:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)

    def gather_rows(self, part: np.ndarray) -> np.ndarray:
        """Every rank's rows, concatenated in rank order (each rank passes its own shard)."""
        if not self.distributed:
            return part
        parts: list = [None] * self.world.size
        dist.all_gather_object(parts, part)
        return np.concatenate(parts)

    def shard(self, rows: np.ndarray) -> np.ndarray:
        """This rank's contiguous share of `rows` (the first ranks take one more when uneven)."""
        return np.array_split(rows, self.world.size)[self.world.rank]

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model as trained: DistributedDataParallel over the parameters that train now.

        DDP registers only parameters requiring grad when it is built, so a stage that
        unfreezes more groups must wrap again.
        """
        if not self.distributed:
            return model
        ids = [self.device.index] if self.cuda else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    @staticmethod
    def no_sync(model: torch.nn.Module, skip: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on accumulation micro-steps but the last (`model` may
        be DDP, or DDP under torch.compile)."""
        ddp = getattr(model, "_orig_mod", model)
        if skip and isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            return ddp.no_sync()
        return contextlib.nullcontext()


def close() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def runtime(device: str, precision: str = "auto", deterministic: bool = False) -> Runtime:
    """This process's runtime: joins torchrun's process group when launched by it, and sets
    the GPU's speed/determinism trade-off (`deterministic`: torch's deterministic algorithms;
    otherwise cuDNN picks the fastest kernels and results may differ in the last digits)."""
    world = world_from_env()
    dev = resolve_device(device, world)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not deterministic
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
    if world.size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=dist_timeout())
    return Runtime(dev, resolve_precision(precision, dev), world)
