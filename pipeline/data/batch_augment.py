"""Albumentations pipelines run on whole uint8 batches with a few vectorised torch ops.

`compile_compose` turns an `A.Compose` whose transforms all have an equivalent here into a
`BatchAugment`. Each transform's arguments are read from its `to_dict()`. Its parameters are
drawn with albumentations' distributions for many image slots at once (`data` draws whole
epochs): a `Plan`, sliced per batch. Consecutive geometric transforms fuse into one
resampling: a crop, cv2 resizes of whole-pixel boxes (albumentations' own call) or one
bilinear `grid_sample`. A batch then costs a handful of tensor ops and no parameter drawing.
A pipeline with any other transform compiles to None and the caller applies it image by image.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F

Tensor = torch.Tensor
Rng = np.random.Generator
PADDING = {cv2.BORDER_CONSTANT: "zeros", cv2.BORDER_REPLICATE: "border",
           cv2.BORDER_REFLECT: "reflection", cv2.BORDER_REFLECT_101: "reflection"}


class Unsupported(Exception):
    """The transform (or these arguments of it) has no batched equivalent."""


def _eye(n: int) -> np.ndarray:
    return np.repeat(np.eye(3)[None], n, axis=0)


def _scale_shift(sx, sy, tx, ty, n: int) -> np.ndarray:
    """Maps output pixel (u, v) to input (sx*u + tx, sy*v + ty), pixel centres at integers."""
    m = _eye(n)
    m[:, 0, 0], m[:, 1, 1], m[:, 0, 2], m[:, 1, 2] = sx, sy, tx, ty
    return m


def _resized_box(x0, y0, cw, ch, w: int, h: int, n: int) -> np.ndarray:
    """Box (x0, y0, cw, ch) of the input resized to w x h, like cv2.resize (half-pixel centres)."""
    sx, sy = np.divide(cw, w), np.divide(ch, h)
    return _scale_shift(sx, sy, x0 + 0.5 * sx - 0.5, y0 + 0.5 * sy - 0.5, n)


def _crop_start(rng: Rng, size: int, crop, n: int) -> np.ndarray:
    """albumentations' get_crop_coords: int((size - crop + 1) * U[0, 1))."""
    return np.floor((size - crop + 1) * rng.random(n))


def _need_linear(d: dict, key: str = "interpolation") -> None:
    if d.get(key, cv2.INTER_LINEAR) != cv2.INTER_LINEAR:
        raise Unsupported("only linear interpolation is batched")


# Geometric transforms: matrix(n, h, w, rng) -> (n x 3 x 3 output->input map, out h, out w).
# `resizes`: True for those that set the output size, False for the other geometric ones,
# None for pixel transforms.

@dataclass
class RandomResizedCrop:
    size: tuple[int, int]
    scale: tuple[float, float]
    ratio: tuple[float, float]
    resizes = True

    @classmethod
    def build(cls, d: dict):
        _need_linear(d)
        return cls(tuple(d["size"]), tuple(d["scale"]), tuple(d["ratio"]))

    def matrix(self, n: int, h: int, w: int, rng: Rng):
        area = h * w
        target = rng.uniform(self.scale[0] * area, self.scale[1] * area, (n, 10))
        aspect = np.exp(rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1]), (n, 10)))
        cw, ch = np.round(np.sqrt(target * aspect)), np.round(np.sqrt(target / aspect))
        ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
        first = ok.argmax(1)
        cw, ch = cw[np.arange(n), first], ch[np.arange(n), first]
        y0, x0 = _crop_start(rng, h, ch, n), _crop_start(rng, w, cw, n)
        fw, fh = w, h  # fallback: the central crop of the clamped aspect ratio
        if w / h < self.ratio[0]:
            fh = round(w / self.ratio[0])
        elif w / h > self.ratio[1]:
            fw = round(h * self.ratio[1])
        found = ok.any(1)
        cw, ch = np.where(found, cw, fw), np.where(found, ch, fh)
        x0, y0 = np.where(found, x0, (w - fw) // 2), np.where(found, y0, (h - fh) // 2)
        oh, ow = self.size
        return _resized_box(x0, y0, cw, ch, ow, oh, n), oh, ow


@dataclass
class _FixedCrop:
    """A crop of a fixed size; subclasses choose where it starts."""
    height: int
    width: int
    resizes = True

    @classmethod
    def build(cls, d: dict):
        if d.get("pad_if_needed"):
            raise Unsupported("pad_if_needed")
        return cls(d["height"], d["width"])

    def matrix(self, n: int, h: int, w: int, rng: Rng):
        if self.height > h or self.width > w:
            raise ValueError(f"{type(self).__name__} {self.height}x{self.width} is larger than "
                             f"the {h}x{w} image")
        x0, y0 = self.start(n, h, w, rng)
        return _scale_shift(1.0, 1.0, x0, y0, n), self.height, self.width


class RandomCrop(_FixedCrop):
    def start(self, n: int, h: int, w: int, rng: Rng):
        y0 = _crop_start(rng, h, self.height, n)
        return _crop_start(rng, w, self.width, n), y0


class CenterCrop(_FixedCrop):
    def start(self, n: int, h: int, w: int, rng: Rng):
        return (w - self.width) // 2, (h - self.height) // 2


@dataclass
class Resize:
    height: int
    width: int
    resizes = True

    @classmethod
    def build(cls, d: dict):
        _need_linear(d)
        return cls(d["height"], d["width"])

    def matrix(self, n: int, h: int, w: int, rng: Rng):
        return _resized_box(0.0, 0.0, w, h, self.width, self.height, n), self.height, self.width


@dataclass
class Flip:
    axis: int  # 0: mirror left-right (HorizontalFlip), 1: upside down (VerticalFlip)
    resizes = False

    def matrix(self, n: int, h: int, w: int, rng: Rng):
        m = _eye(n)
        m[:, self.axis, self.axis] = -1.0
        m[:, self.axis, 2] = (w if self.axis == 0 else h) - 1.0
        return m, h, w


@dataclass
class Affine:
    translate: tuple[str, dict]  # ("percent" | "px", {"x": range, "y": range})
    scale: dict
    keep_ratio: bool
    rotate: tuple[float, float]
    shear: dict
    padding: str
    fill: float
    resizes = False

    @classmethod
    def build(cls, d: dict):
        _need_linear(d)
        if d.get("fit_output") or d.get("balanced_scale") or d["border_mode"] not in PADDING:
            raise Unsupported("fit_output, balanced_scale or this border_mode")
        if not isinstance(d.get("fill", 0.0), (int, float)):
            raise Unsupported("per-channel fill")
        still = {"x": (0.0, 0.0), "y": (0.0, 0.0)}
        translate = (("px", d["translate_px"]) if d.get("translate_px")
                     else ("percent", d.get("translate_percent") or still))
        return cls(translate, d["scale"], bool(d.get("keep_ratio")), tuple(d["rotate"]), d["shear"],
                   PADDING[d["border_mode"]], float(d.get("fill", 0.0)))

    def matrix(self, n: int, h: int, w: int, rng: Rng):
        unit, ranges = self.translate
        if unit == "px":
            tx = rng.integers(int(ranges["x"][0]), int(ranges["x"][1]), n, endpoint=True)
            ty = rng.integers(int(ranges["y"][0]), int(ranges["y"][1]), n, endpoint=True)
        else:
            tx = np.trunc(rng.uniform(*ranges["x"], n) * w)
            ty = np.trunc(rng.uniform(*ranges["y"], n) * h)
        sx = rng.uniform(*self.scale["x"], n)
        sy = sx if self.keep_ratio else rng.uniform(*self.scale["y"], n)
        angle = np.deg2rad(rng.uniform(*self.rotate, n))
        shx = np.tan(np.deg2rad(-rng.uniform(*self.shear["x"], n)))
        shy = np.tan(np.deg2rad(-rng.uniform(*self.shear["y"], n)))
        cx, cy = w / 2 - 0.5, h / 2 - 0.5
        cos, sin = np.cos(angle), np.sin(angle)
        rot, shear, scale = _eye(n), _eye(n), _eye(n)
        rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1] = cos, sin, -sin, cos
        shear[:, 0, 1], shear[:, 1, 0] = shx, shy
        scale[:, 0, 0], scale[:, 1, 1] = sx, sy
        # albumentations: centre @ translate @ shear @ rotate @ scale @ uncentre (input -> output)
        forward = _scale_shift(1.0, 1.0, cx + tx, cy + ty, n) @ shear @ rot @ scale \
            @ _scale_shift(1.0, 1.0, -cx, -cy, n)
        return np.linalg.inv(forward), h, w


# Pixel transforms: draw(n, c, h, w, rng, mask) -> {name: per-slot array} for n slots of c x h x w
# images (mask: the slots it applies to), and apply(x, params) on a batch's slice of those:
# float N x C x H x W in [0, 255] (also uint8 for those that keep it), changed in place (a batch
# is always a copy, never a view of the cache).

def _masked(values: np.ndarray, mask: np.ndarray, neutral: float) -> np.ndarray:
    """n values, `neutral` where the mask is off."""
    return np.where(mask, values, neutral).astype(np.float32)


def _on(x: Tensor, values: np.ndarray) -> Tensor:
    """`values` as a tensor on `x`'s device (the same memory when that is the CPU)."""
    return torch.from_numpy(values).to(x.device, non_blocking=True)


def _per_image(values: np.ndarray, x: Tensor) -> Tensor:
    """n values shaped to broadcast over the N x C x H x W batch `x`, on its device."""
    return _on(x, values).view(-1, 1, 1, 1)


@dataclass
class RGBShift:
    ranges: list  # per channel, as fractions of 255
    resizes = None
    keeps_uint8 = True

    @classmethod
    def build(cls, d: dict):
        return cls([tuple(r) for r in d["noise_params"]["ranges"]])

    def draw(self, n: int, c: int, h: int, w: int, rng: Rng, mask: np.ndarray) -> dict:
        ranges = self.ranges * c if len(self.ranges) == 1 else self.ranges
        if len(ranges) < c:
            raise ValueError(f"RGBShift has {len(ranges)} channel ranges for {c} channels")
        lo, hi = np.array(ranges[:c]).T * 255.0
        # as albumentations shifts uint8 images: by whole numbers (truncated), saturating
        whole = np.where(mask[:, None], np.trunc(rng.uniform(lo, hi, (n, c))), 0.0).astype(np.int64)
        # for uint8: clamped to [low, high] first, adding the shift modulo 256 cannot wrap
        return dict(shift=whole.astype(np.float32), low=np.maximum(-whole, 0).astype(np.uint8),
                    high=(255 - np.maximum(whole, 0)).astype(np.uint8),
                    wrapped=(whole % 256).astype(np.uint8))

    def apply(self, x: Tensor, p: dict) -> Tensor:
        if x.dtype == torch.uint8:
            return _per_channel(x, lambda v, lay: v.clamp_(lay(p["low"]), lay(p["high"]))
                                .add_(lay(p["wrapped"])))
        return _per_channel(x, lambda v, lay: v.add_(lay(p["shift"])).clamp_(0, 255))


def _per_channel(x: Tensor, op) -> Tensor:
    """`op(values, lay)` on a batch, `lay` shaping n x c values to broadcast over `values`.

    A batch in NHWC memory is handed over as rows of w * c values, and per-channel values
    repeated along a row: a 3-wide innermost broadcast would not vectorise.
    """
    n, c, h, w = x.shape
    if c > 1 and x.is_contiguous(memory_format=torch.channels_last):
        def rows(v: np.ndarray) -> Tensor:
            return _on(x, np.repeat(v[:, None], w, axis=1).reshape(n, 1, w * c))
        return op(x.permute(0, 2, 3, 1).view(n, h, w * c), rows).view(n, h, w, c).permute(0, 3, 1, 2)
    return op(x, lambda v: _on(x, v.reshape(n, c, 1, 1)))


@dataclass
class RandomBrightnessContrast:
    brightness: tuple[float, float]
    contrast: tuple[float, float]
    by_max: bool
    resizes = None

    @classmethod
    def build(cls, d: dict):
        if d.get("ensure_safe_range"):
            raise Unsupported("ensure_safe_range")
        return cls(tuple(d["brightness_limit"]), tuple(d["contrast_limit"]), d["brightness_by_max"])

    def draw(self, n: int, c: int, h: int, w: int, rng: Rng, mask: np.ndarray) -> dict:
        alpha = _masked(1.0 + rng.uniform(*self.contrast, n), mask, 1.0)
        return dict(alpha=alpha, beta=_masked(rng.uniform(*self.brightness, n), mask, 0.0))

    def apply(self, x: Tensor, p: dict) -> Tensor:
        beta = _per_image(p["beta"], x) * (255.0 if self.by_max else x.mean((1, 2, 3), keepdim=True))
        return torch.addcmul(beta, x, _per_image(p["alpha"], x)).clamp_(0, 255)


def rgb_to_hsv(x: Tensor) -> Tensor:
    """RGB in [0, 255] -> H in degrees [0, 360), S in [0, 1], V in [0, 255] (OpenCV's formulas)."""
    r, g, b = x.unbind(1)
    v, top = x.max(1)
    delta = v - x.min(1)[0]
    safe = torch.where(delta > 0, delta, 1.0)
    base = torch.tensor([0.0, 2.0, 4.0], device=x.device)[top]  # the largest channel: the sector
    num = torch.where(top == 0, g - b, torch.where(top == 1, b - r, r - g))
    hue = torch.where(delta > 0, ((base + num / safe) * 60.0) % 360.0, 0.0)
    sat = delta / torch.where(v > 0, v, 1.0)
    return torch.stack([hue, sat, v], 1)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    hue, sat, v = (t[:, None] for t in hsv.unbind(1))
    k = (torch.tensor([5.0, 3.0, 1.0], device=hsv.device).view(1, 3, 1, 1) + hue / 60.0) % 6.0
    return v - v * sat * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


@dataclass
class HueSaturationValue:
    hue: tuple[float, float]  # OpenCV uint8 units: 180 = a full turn
    sat: tuple[float, float]
    val: tuple[float, float]
    resizes = None

    @classmethod
    def build(cls, d: dict):
        return cls(*(tuple(d[f"{k}_shift_limit"]) for k in ("hue", "sat", "val")))

    def draw(self, n: int, c: int, h: int, w: int, rng: Rng, mask: np.ndarray) -> dict:
        return dict(hue=rng.uniform(*self.hue, n), sat=rng.uniform(*self.sat, n),
                    val=rng.uniform(*self.val, n))

    def apply(self, x: Tensor, p: dict) -> Tensor:
        c, mask = x.shape[1], p["mask"]
        hue, sat, val = (p[k][mask] for k in ("hue", "sat", "val"))
        idx = _on(x, np.flatnonzero(mask))
        shift = lambda t: _on(x, t.astype(np.float32)).view(-1, 1, 1)  # noqa: E731
        if c == 1:  # grayscale: only the value shift applies (as in albumentations)
            x[idx] = (x[idx] + shift(val)[:, None]).clamp_(0, 255)
            return x
        hsv = rgb_to_hsv(x[idx])
        h = (hsv[:, 0] + 2.0 * shift(hue)) % 360.0
        s = (hsv[:, 1] * 255.0 + shift(sat)).clamp_(0, 255) / 255.0
        v = (hsv[:, 2] + shift(val)).clamp_(0, 255)
        x[idx] = hsv_to_rgb(torch.stack([h, s, v], 1)).clamp_(0, 255)
        return x


def _gauss_kernels(sigma: np.ndarray, ksize: np.ndarray, width: int) -> Tensor:
    """len(sigma) x width 1D Gaussian kernels, each of its own odd size, centred, zero-padded."""
    offsets = np.arange(width) - width // 2
    k = np.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
    k = np.where(np.abs(offsets)[None] <= (ksize[:, None] // 2), k, 0.0)
    return torch.from_numpy((k / k.sum(1, keepdims=True)).astype(np.float32))


@dataclass
class GaussianBlur:
    blur_limit: tuple[int, int]
    sigma_limit: tuple[float, float]
    resizes = None

    @classmethod
    def build(cls, d: dict):
        return cls(tuple(d["blur_limit"]), tuple(d["sigma_limit"]))

    def draw(self, n: int, c: int, h: int, w: int, rng: Rng, mask: np.ndarray) -> dict:
        sigma = rng.uniform(*self.sigma_limit, n)
        ksize = rng.integers(self.blur_limit[0], self.blur_limit[1], n, endpoint=True)
        ksize = np.where(ksize == 0, np.floor(sigma * 3.5).astype(int) * 2 + 1, ksize)
        return dict(sigma=sigma, ksize=ksize + (ksize % 2 == 0))

    def apply(self, x: Tensor, p: dict) -> Tensor:
        _, c, h, w = x.shape
        mask = p["mask"]
        sigma, ksize = p["sigma"][mask], p["ksize"][mask]
        width = int(ksize.max())
        kernel = _gauss_kernels(sigma, ksize, width).to(x.device).repeat_interleave(c, 0)
        idx = _on(x, np.flatnonzero(mask))
        pad = width // 2
        mode = "reflect" if pad < min(h, w) else "replicate"  # reflect = cv2's BORDER_REFLECT_101
        y = F.pad(x[idx].reshape(1, -1, h, w), (pad, pad, pad, pad), mode=mode)
        y = F.conv2d(y, kernel[:, None, :, None], groups=y.shape[1])
        y = F.conv2d(y, kernel[:, None, None, :], groups=y.shape[1])
        x[idx] = y.view(-1, c, h, w)
        return x


@dataclass
class GaussNoise:
    std_range: tuple[float, float]
    mean_range: tuple[float, float]
    per_channel: bool
    resizes = None

    @classmethod
    def build(cls, d: dict):
        if d.get("noise_scale_factor", 1.0) != 1.0:
            raise Unsupported("noise_scale_factor")
        return cls(tuple(d["std_range"]), tuple(d["mean_range"]), bool(d["per_channel"]))

    def draw(self, n: int, c: int, h: int, w: int, rng: Rng, mask: np.ndarray) -> dict:
        return dict(std=_masked(rng.uniform(*self.std_range, n) * 255.0, mask, 0.0),
                    mean=_masked(rng.uniform(*self.mean_range, n) * 255.0, mask, 0.0),
                    seed=rng.integers(2**62, size=n))

    def apply(self, x: Tensor, p: dict) -> Tensor:
        n, c, h, w = x.shape
        # the batch's first slot seeds it
        gen = torch.Generator(x.device).manual_seed(int(p["seed"][0]))
        noise = torch.randn((n, c if self.per_channel else 1, h, w), generator=gen, device=x.device)
        noise = torch.addcmul(_per_image(p["mean"], x), noise, _per_image(p["std"], x))
        return x.add_(noise).clamp_(0, 255)


@dataclass
class CoarseDropout:
    holes: tuple[int, int]
    heights: tuple[float, float]
    widths: tuple[float, float]
    fill: float
    resizes = None

    @classmethod
    def build(cls, d: dict):
        if not isinstance(d.get("fill", 0), (int, float)):
            raise Unsupported("non-numeric fill")
        return cls(tuple(d["num_holes_range"]), tuple(d["hole_height_range"]),
                   tuple(d["hole_width_range"]), float(d.get("fill", 0)))

    @staticmethod
    def _sizes(rng: Rng, limits: tuple, side: int, shape) -> np.ndarray:
        if limits[1] >= 1:  # pixels
            return rng.integers(int(limits[0]), min(int(limits[1]), side), shape, endpoint=True)
        return np.trunc(rng.uniform(*limits, shape) * side).astype(np.int64)

    def draw(self, n: int, c: int, h: int, w: int, rng: Rng, mask: np.ndarray) -> dict:
        count = rng.integers(self.holes[0], self.holes[1], n, endpoint=True)
        shape = (n, self.holes[1])
        hh, ww = self._sizes(rng, self.heights, h, shape), self._sizes(rng, self.widths, w, shape)
        y0, x0 = rng.integers(0, h - hh, endpoint=True), rng.integers(0, w - ww, endpoint=True)
        active = (np.arange(shape[1])[None] < count[:, None]) & mask[:, None]
        return dict(hh=hh, ww=ww, y0=y0, x0=x0, active=active)

    def apply(self, x: Tensor, p: dict) -> Tensor:
        _, _, h, w = x.shape
        hh, ww, y0, x0, active = (p[k] for k in ("hh", "ww", "y0", "x0", "active"))
        rows, cols = np.arange(h), np.arange(w)
        in_rows = (rows >= y0[..., None]) & (rows < (y0 + hh)[..., None]) & active[..., None]
        in_cols = (cols >= x0[..., None]) & (cols < (x0 + ww)[..., None])
        # a pixel is in a hole when some hole covers both its row and its column
        hits = _on(x, in_rows.transpose(0, 2, 1).astype(np.float32)) \
            @ _on(x, in_cols.astype(np.float32))
        return x.masked_fill_(hits[:, None] > 0, self.fill)


@dataclass
class OneOf:
    children: list  # (weight, pixel transform)
    resizes = None

    def draw(self, n: int, c: int, h: int, w: int, rng: Rng, mask: np.ndarray) -> dict:
        weights = np.array([wt for wt, _ in self.children], dtype=np.float64)
        choice = rng.choice(len(self.children), n, p=weights / weights.sum())
        return dict(children=[_drawn(child, n, c, h, w, rng, mask & (choice == i))
                              for i, (_, child) in enumerate(self.children)])

    def apply(self, x: Tensor, p: dict) -> Tensor:
        for (_, child), params in zip(self.children, p["children"]):
            if params["mask"].any():
                x = child.apply(x, params)
        return x


def _drawn(op, n: int, c: int, h: int, w: int, rng: Rng, mask: np.ndarray) -> dict:
    """A pixel transform's parameters for n slots, with the mask of slots it applies to."""
    return dict(op.draw(n, c, h, w, rng, mask), mask=mask)


BUILDERS = {
    "RandomResizedCrop": RandomResizedCrop.build, "RandomCrop": RandomCrop.build,
    "CenterCrop": CenterCrop.build, "Resize": Resize.build, "Affine": Affine.build,
    "HorizontalFlip": lambda d: Flip(0), "VerticalFlip": lambda d: Flip(1),
    "RGBShift": RGBShift.build, "RandomBrightnessContrast": RandomBrightnessContrast.build,
    "HueSaturationValue": HueSaturationValue.build, "GaussianBlur": GaussianBlur.build,
    "GaussNoise": GaussNoise.build, "CoarseDropout": CoarseDropout.build,
}


@dataclass
class Step:
    p: float
    op: object


def _build(d: dict) -> Step:
    name = d["__class_fullname__"]
    if name == "OneOf":
        children = [_build(c) for c in d["transforms"]]
        if any(c.op.resizes is not None for c in children):
            raise Unsupported("geometric transforms inside OneOf")
        return Step(d["p"], OneOf([(c.p, c.op) for c in children]))
    if name not in BUILDERS:
        raise Unsupported(name)
    step = Step(d["p"], BUILDERS[name](d))
    if step.op.resizes and step.p < 1:
        raise Unsupported("a size-changing transform with p < 1")
    return step


def _pixel_boxes(m: np.ndarray, h: int, w: int, sh: int, sw: int) -> dict | None:
    """Whole-pixel source boxes {x0, y0, cw, ch, fx, fy} (fx, fy: mirrored) when every map is a
    crop of the sh x sw input resized to h x w, possibly mirrored; else None."""
    if m[:, 0, 1].any() or m[:, 1, 0].any():
        return None
    boxes = []
    for axis, out, size in ((0, w, sw), (1, h, sh)):
        scale, shift = m[:, axis, axis], m[:, axis, 2]
        mirrored = scale < 0  # x = -a*u + t is x = a*(out-1-u) + t - a*(out-1)
        start_map = np.where(mirrored, shift + scale * (out - 1), shift)
        length = np.abs(scale) * out
        start = start_map - 0.5 * np.abs(scale) + 0.5
        exact = np.stack([start, length])
        whole = np.round(exact)
        if np.abs(whole - exact).max() > 1e-6:
            return None
        start, length = whole.astype(np.int64)
        if (start < 0).any() or (length < 1).any() or (start + length > size).any():
            return None
        boxes.append((start, length, mirrored))
    (x0, cw, fx), (y0, ch, fy) = boxes
    return dict(x0=x0, y0=y0, cw=cw, ch=ch, fx=fx, fy=fy)


def gather_rows(images: np.ndarray, index: np.ndarray) -> Tensor:
    """Rows `index` of an N x H x W x C uint8 array as an N x C x H x W view of NHWC memory."""
    return torch.from_numpy(np.ascontiguousarray(images[index])).permute(0, 3, 1, 2)


def _nhwc(x: Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())


# Resampling stages (fused geometric transforms): apply(x, params) on a batch; gather(images,
# index, params) reads the batch's rows straight from the cache when the stage comes first.

@dataclass(frozen=True)
class Crop:
    """One whole-pixel window for every image (a centre crop, an integer shift)."""
    top: int
    left: int
    h: int
    w: int

    def gather(self, images: np.ndarray, index: np.ndarray, p: dict) -> Tensor:
        window = images[index, self.top:self.top + self.h, self.left:self.left + self.w]
        return torch.from_numpy(window).permute(0, 3, 1, 2)

    def apply(self, x: Tensor, p: dict) -> Tensor:
        return x[:, :, self.top:self.top + self.h, self.left:self.left + self.w]


@dataclass(frozen=True)
class CropResize:
    """Whole-pixel boxes resized with cv2 (albumentations' own call: the same pixels), mirrored."""
    h: int
    w: int

    def gather(self, images: np.ndarray, index: np.ndarray, p: dict) -> Tensor:
        return self._resize(images, index.tolist(), p)

    def apply(self, x: Tensor, p: dict) -> Tensor:
        return self._resize(_nhwc(x.cpu()), range(len(x)), p).to(x.device)

    def _resize(self, images: np.ndarray, index, p: dict) -> Tensor:
        out = np.empty((len(index), self.h, self.w, images.shape[3]), np.uint8)
        resize, size, linear = cv2.resize, (self.w, self.h), cv2.INTER_LINEAR
        for i, row, left, top, width, height in zip(  # the hot loop: positional arguments
                range(len(out)), index, *(p[k].tolist() for k in ("x0", "y0", "cw", "ch"))):
            resize(images[row, top:top + height, left:left + width], size, out[i], 0, 0, linear)
        if p["fx"].any():
            out[p["fx"]] = out[p["fx"]][:, :, ::-1]
        if p["fy"].any():
            out[p["fy"]] = out[p["fy"]][:, ::-1]
        return torch.from_numpy(out).permute(0, 3, 1, 2)


@dataclass(frozen=True)
class Warp:
    """out[n, :, v, u] = bilinear sample of x[n] at m[n] @ (u, v, 1), one `grid_sample`."""
    h: int
    w: int
    padding: str = "border"
    fill: float = 0.0

    def apply(self, x: Tensor, p: dict) -> Tensor:
        n, _, sh, sw = x.shape
        x = x.float() if x.dtype == torch.uint8 else x
        to_unit = _scale_shift(2.0 / sw, 2.0 / sh, 1.0 / sw - 1.0, 1.0 / sh - 1.0, n)
        g = _on(x, (to_unit @ p["m"])[:, :2].astype(np.float32))  # -> [-1, 1]
        u = torch.arange(self.w, dtype=torch.float32, device=x.device)
        v = torch.arange(self.h, dtype=torch.float32, device=x.device)
        grid = torch.empty(n, self.h, self.w, 2, device=x.device)
        for axis in (0, 1):  # coordinate = a*u + b*v + c, as a row term plus a column term
            grid[..., axis] = (g[:, axis, 0:1] * u)[:, None, :] \
                + (g[:, axis, 1:2] * v + g[:, axis, 2:3])[:, :, None]
        if self.padding == "zeros" and self.fill:
            return F.grid_sample(x - self.fill, grid, "bilinear", "zeros", align_corners=False) \
                + self.fill
        return F.grid_sample(x, grid, "bilinear", self.padding, align_corners=False)


def resampling(m: np.ndarray, sh: int, sw: int, h: int, w: int, border: tuple, uint8: bool):
    """The cheapest stage mapping sh x sw images to h x w by the n x 3 x 3 output->input maps
    `m` (pixel centres at integers), with its per-slot parameters; None when nothing moves."""
    n = len(m)
    linear_id = np.array_equal(m[:, :2, :2], _eye(n)[:, :2, :2])
    shift = m[:, :2, 2]
    if linear_id and (shift == shift[0]).all() and (shift == np.round(shift)).all():
        left, top = int(shift[0, 0]), int(shift[0, 1])
        if (left, top, h, w) == (0, 0, sh, sw):
            return None
        if 0 <= left and left + w <= sw and 0 <= top and top + h <= sh:
            return Crop(top, left, h, w), {}
    if uint8 and (boxes := _pixel_boxes(m, h, w, sh, sw)) is not None:
        return CropResize(h, w), boxes
    return Warp(h, w, *border), dict(m=m)


def _take(params, rows: slice):
    """Per-slot parameters (arrays, possibly nested in dicts and lists) of the slots `rows`."""
    if isinstance(params, dict):
        return {k: _take(v, rows) for k, v in params.items()}
    if isinstance(params, list):
        return [_take(v, rows) for v in params]
    return params[rows]


@dataclass(frozen=True)
class Plan:
    """Every random parameter of a pipeline for a run of image slots (an epoch): its stages, each
    an op and that op's per-slot parameters. `plan[a:b]` is the plan of slots a..b-1."""
    stages: list

    def __getitem__(self, rows: slice) -> Plan:
        return Plan([(op, _take(p, rows)) for op, p in self.stages])


class BatchTransform(ABC):
    """What a loader needs of an augmentation: `plan` draws parameters for many image slots at
    once, `apply` runs a batch's slice of them on uint8 rows of the cache; calling it does both
    for one batch."""

    @abstractmethod
    def plan(self, n: int, c: int, h: int, w: int, rng: Rng) -> Plan:
        """Parameters for n slots of c x h x w images."""

    @abstractmethod
    def apply(self, images: np.ndarray, index: np.ndarray, plan: Plan) -> Tensor:
        """Rows `index` of the uint8 N x H x W x C `images`, augmented by `plan` (one per row)."""

    def __call__(self, x: Tensor, rng: Rng) -> Tensor:
        """A uint8 N x C x H x W batch augmented with parameters drawn from `rng`."""
        if x.dtype != torch.uint8:
            raise TypeError(f"expected a uint8 batch, got {x.dtype}")
        n, c, h, w = x.shape
        return self.apply(_nhwc(x), np.arange(n), self.plan(n, c, h, w, rng))


class BatchAugment(BatchTransform):
    """A compiled pipeline: `plan` draws parameters for many slots at once, `apply` runs a
    batch's slice of them on uint8 rows of the cache, N x C x H x W -> N x C x h x w.

    The result stays uint8 when only whole-pixel crops and RGBShift applied; otherwise it is
    float32 in [0, 255], unrounded (rounding to uint8 would cost more than the normalisation
    it feeds).
    """

    def __init__(self, steps: list[Step]):
        self.steps = steps

    def plan(self, n: int, c: int, h: int, w: int, rng: Rng) -> Plan:
        """Parameters for n slots of c x h x w images, drawn in the pipeline's order."""
        stages, uint8 = [], True  # uint8: no stage so far turns the batch to float
        # geometry not yet resampled: its maps, an Affine's border, the size it starts from
        pending, border, sh, sw = None, (), h, w

        def flush():
            if pending is not None and (stage := resampling(pending, sh, sw, h, w, border, uint8)):
                stages.append(stage)

        for step in self.steps:
            mask = rng.random(n) < step.p
            if step.op.resizes is not None:
                if isinstance(step.op, Affine):
                    if border and border != (step.op.padding, step.op.fill):
                        flush()
                        pending, sh, sw = None, h, w
                    border = (step.op.padding, step.op.fill)
                m, h, w = step.op.matrix(n, h, w, rng)
                m = np.where(mask[:, None, None], m, _eye(n)) if step.p < 1 else m
                pending = m if pending is None else pending @ m
                continue
            flush()
            pending, border, sh, sw = None, (), h, w
            stages.append((step.op, _drawn(step.op, n, c, h, w, rng, mask)))
            uint8 = uint8 and getattr(step.op, "keeps_uint8", False)
        flush()
        return Plan(stages)

    def apply(self, images: np.ndarray, index: np.ndarray, plan: Plan) -> Tensor:
        """Rows `index` of the uint8 N x H x W x C `images`, augmented by `plan` (one per row)."""
        stages = plan.stages
        if stages and hasattr(stages[0][0], "gather"):
            out, stages = stages[0][0].gather(images, index, stages[0][1]), stages[1:]
        else:
            out = gather_rows(images, index)
        return self.run(out, Plan(stages))

    @staticmethod
    def split(plan: Plan) -> tuple[Plan, Plan]:
        """(what reads the cache, the rest): a first stage that gathers its rows straight from
        the cache (a crop or cv2 resizes) stays with the loader, the rest may run on a GPU."""
        cut = 1 if plan.stages and hasattr(plan.stages[0][0], "gather") else 0
        return Plan(plan.stages[:cut]), Plan(plan.stages[cut:])

    @staticmethod
    def run(x: Tensor, plan: Plan) -> Tensor:
        """`plan`'s stages on a batch, on whatever device it is."""
        for op, p in plan.stages:
            if "mask" not in p:  # resampling
                x = op.apply(x, p)
            elif p["mask"].any():
                x = op.apply(x if getattr(op, "keeps_uint8", False) else x.float(), p)
        return x


def compile_compose(compose: A.Compose) -> BatchAugment | None:
    """The batched equivalent of `compose`, or None when a transform has none."""
    d = compose.to_dict()["transform"]
    if d.get("p", 1.0) < 1:
        return None
    try:
        return BatchAugment([_build(t) for t in d["transforms"]])
    except Unsupported:
        return None
