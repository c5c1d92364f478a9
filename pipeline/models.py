"""Model factory over timm's registry (classic CNNs included) with offline-safe pretrained loading.

`model.pretrained` is `false` (random init), `true` (timm's hub weights: taken from the local
cache, else downloaded; offline it fails within seconds) or a path to a local timm-format
`.safetensors`/`.pth`/`.bin` file. Weights always go through timm's pretrained mechanism, so
the input convolution adapts to `data.channels`; the classifier is always new, sized for the
competition's classes and started at zero.
"""
from __future__ import annotations

import difflib
import pickle
import socket
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.data import resolve_data_config
from timm.models import resolve_pretrained_cfg

import pipeline.classic  # noqa: F401  (registers lenet5 and alexnet in timm)
from pipeline.config import ExperimentConfig, ModelConfig
from pipeline.errors import UserError

HUB_TIMEOUT_S = 3.0
HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")  # the names timm asks the hub for


@dataclass(frozen=True)
class InputSpec:
    """How to feed the model: from its pretrained config unless the experiment overrides."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float


def check_backbone(name: str) -> None:
    """Raise a UserError naming close matches when `name` is not a timm model (tags allowed)."""
    if not timm.is_model(name):
        names = timm.list_models()
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise UserError(f"model.backbone: unknown model {name!r}{hint}")
    try:
        resolve_pretrained_cfg(name)
    except RuntimeError as err:
        raise UserError(f"model.backbone: {name!r}: {err}") from None


def create_model(cfg: ModelConfig, num_classes: int, in_chans: int = 3) -> torch.nn.Module:
    """Build `cfg.backbone` with a fresh `num_classes` head, from random, hub or local weights."""
    check_backbone(cfg.backbone)
    kwargs = dict(num_classes=num_classes, in_chans=in_chans, drop_rate=cfg.drop_rate)
    if cfg.pretrained is False:
        return timm.create_model(cfg.backbone, pretrained=False, **kwargs)
    cached = cached_hub_file(cfg.backbone) if cfg.pretrained is True else None
    if cfg.pretrained is True and cached is None:
        return zero_head(_download(cfg.backbone, kwargs))
    path = cached or Path(cfg.pretrained)
    source = f"cached hub weights {cached}" if cached else str(path)
    state_dict = read_state_dict(path)
    check_fits(cfg.backbone, state_dict, source)
    heads = tuple(f"{n}." for n in _classifier_names(cfg.backbone))
    body = {k: v for k, v in state_dict.items() if not k.startswith(heads)}
    overlay = dict(state_dict=body, num_classes=0)  # no head in the file: timm builds a fresh one
    try:
        model = timm.create_model(cfg.backbone, pretrained=True, pretrained_cfg_overlay=overlay,
                                  **kwargs)
    except (RuntimeError, KeyError, ValueError) as err:
        raise UserError(f"model.pretrained: {source} does not fit {cfg.backbone!r}: "
                        f"{str(err).strip().splitlines()[0][:160]}") from None
    return zero_head(model)


def zero_head(model: torch.nn.Module) -> torch.nn.Module:
    """Start a fresh classifier over pretrained features at zero (as BiT does): the first
    predictions are uniform instead of large random logits from large feature values."""
    for p in model.get_classifier().parameters():
        torch.nn.init.zeros_(p)
    return model


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors` or a weights-only torch file (`state_dict`/`model` unwrapped)."""
    if not path.is_file():
        raise UserError(f"model.pretrained: weights file {path} not found"
                        + ("; run `make weights`" if "lite0" in path.name else ""))
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, OSError, EOFError,
            ValueError) as err:
        raise UserError(f"model.pretrained: cannot read {path} "
                        f"({str(err).strip().splitlines()[0][:120]})") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"model.pretrained: {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _classifier_names(backbone: str) -> tuple[str, ...]:
    classifier = resolve_pretrained_cfg(backbone).classifier
    return (classifier,) if isinstance(classifier, str) else tuple(classifier or ())


def check_fits(backbone: str, state_dict: dict, source: str) -> None:
    """A timm-format file must hold exactly the backbone's tensors (classifier and stem aside).

    timm loads non-strictly once it drops a classifier, so a file for another architecture would
    otherwise load silently as a half-random model.
    """
    with torch.device("meta"):  # shapes only: nothing allocated or initialised
        model = timm.create_model(backbone, pretrained=False)
    skip = tuple(f"{n}." for n in _classifier_names(backbone))
    first_conv = model.pretrained_cfg.get("first_conv")
    stems = {f"{n}.weight" for n in ((first_conv,) if isinstance(first_conv, str) else first_conv or ())}

    def shapes(sd: dict) -> dict:
        return {k: tuple(v.shape) for k, v in sd.items()
                if not k.endswith("num_batches_tracked") and not k.startswith(skip)}

    want, have = shapes(model.state_dict()), shapes(state_dict)
    missing, unexpected = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    reshaped = sorted(k for k in want.keys() & have.keys() if want[k] != have[k] and k not in stems)
    problems = [f"{len(keys)} {what} (e.g. {keys[0]})" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected),
                 ("tensors of another shape", reshaped)) if keys]
    if problems:
        raise UserError(f"model.pretrained: {source} does not fit {backbone!r} "
                        f"(weights of another architecture?): {', '.join(problems)}")


def cached_hub_file(backbone: str) -> Path | None:
    """The backbone's Hugging Face hub weights if already in the local cache (timm's format)."""
    pcfg = resolve_pretrained_cfg(backbone)
    if not pcfg.hf_hub_id:
        return None
    from huggingface_hub import try_to_load_from_cache

    repo = pcfg.hf_hub_id.split("@")[0]
    for name in ([pcfg.hf_hub_filename] if pcfg.hf_hub_filename else HF_FILENAMES):
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str):
            return Path(found)
    return None


def check_pretrained(cfg: ModelConfig) -> None:
    """Fail before any work when `model.pretrained` cannot be loaded: unknown backbone, a
    missing, unreadable or mismatched file, or hub weights neither cached nor reachable."""
    check_backbone(cfg.backbone)
    if cfg.pretrained is True:
        if cached_hub_file(cfg.backbone) is None:
            require_hub(cfg.backbone)
    elif cfg.pretrained is not False:
        check_fits(cfg.backbone, read_state_dict(Path(cfg.pretrained)), cfg.pretrained)


HUB_HINT = "pass a local timm-format file instead: model.pretrained=path/to/weights.safetensors"


def require_hub(backbone: str) -> None:
    """Raise unless timm has hub weights for `backbone` and their host answers within seconds."""
    pcfg = resolve_pretrained_cfg(backbone)
    if not (pcfg.hf_hub_id or pcfg.url):
        raise UserError(f"model.pretrained: true: timm has no pretrained weights for {backbone!r}; "
                        f"use false or a local file")
    if pcfg.hf_hub_id:
        from huggingface_hub import constants

        host = urlparse(constants.ENDPOINT).hostname
    else:
        host = urlparse(pcfg.url).hostname
    if not reachable(host):
        raise UserError(f"model.pretrained: true: cannot reach {host} to download {backbone!r} "
                        f"weights (offline?); {HUB_HINT}")


def _download(backbone: str, kwargs: dict) -> torch.nn.Module:
    """timm's own download, attempted only when the weights host answers."""
    require_hub(backbone)
    try:
        return timm.create_model(backbone, pretrained=True, **kwargs)
    except Exception as err:  # network, hub or missing-weights errors all mean the same here
        raise UserError(f"model.pretrained: true: download of {backbone!r} weights failed "
                        f"({type(err).__name__}); {HUB_HINT}") from None


def reachable(host: str, port: int = 443, timeout: float = HUB_TIMEOUT_S) -> bool:
    """Can a TCP connection to `host` (or the HTTPS proxy) open within `timeout` s, DNS included?"""
    proxy = urllib.request.getproxies().get("https")
    if proxy:
        parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = parsed.hostname, parsed.port or 80
    ok = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)  # bounds a slow DNS lookup too
    thread.start()
    thread.join(timeout + 0.5)
    return bool(ok)


def input_spec(model: torch.nn.Module, cfg: ModelConfig) -> InputSpec:
    """Mean, std and crop fraction from the model's pretrained config (timm's resolve_data_config)."""
    data_cfg = resolve_data_config({}, model=model)
    crop_pct = cfg.crop_pct if cfg.crop_pct is not None else data_cfg.get("crop_pct", 1.0)
    return InputSpec(tuple(data_cfg["mean"]), tuple(data_cfg["std"]), float(crop_pct))


def cache_size(image_size: int, crop_pct: float) -> int:
    """Side of the stored image: crops of `image_size` come from an image `size / crop_pct`."""
    return int(round(image_size / crop_pct))


def experiment_input(cfg: ExperimentConfig, n_classes: int) -> tuple[InputSpec, int]:
    """The experiment's input spec (from the model built without weights) and cached side."""
    probe = create_model(cfg.model.model_copy(update={"pretrained": False}), n_classes,
                         cfg.data.channels)
    spec = input_spec(probe, cfg.model)
    return spec, cache_size(cfg.image_size, spec.crop_pct)
