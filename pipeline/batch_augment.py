"""Albumentations pipelines run on whole uint8 batches with a few vectorised torch ops.

`compile_compose` turns an `A.Compose` whose transforms all have an equivalent here into a
`BatchAugment`: each transform's arguments are read from its `to_dict()`, its parameters are
drawn per image with albumentations' distributions, and consecutive geometric transforms fuse
into one bilinear resampling (cv2's INTER_LINEAR). The data path then costs a handful of tensor
ops per batch instead of one albumentations call per image. A pipeline with any other transform
compiles to None and the caller applies it image by image.
"""
from __future__ import annotations

import math
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
        kind, ranges = self.translate
        if kind == "px":
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


# Pixel transforms: apply(x, rng, mask) on float N x C x H x W in [0, 255] (also uint8 for those
# that keep it); mask picks the images.

def _per_image(values: np.ndarray, mask: np.ndarray, neutral: float) -> Tensor:
    """n values, `neutral` where the mask is off, shaped to broadcast over a batch."""
    return torch.from_numpy(np.where(mask, values, neutral).astype(np.float32)).view(-1, 1, 1, 1)


@dataclass
class RGBShift:
    ranges: list  # per channel, as fractions of 255
    resizes = None
    keeps_uint8 = True

    @classmethod
    def build(cls, d: dict):
        return cls([tuple(r) for r in d["noise_params"]["ranges"]])

    def apply(self, x: Tensor, rng: Rng, mask: np.ndarray) -> Tensor:
        n, c = x.shape[:2]
        ranges = self.ranges * c if len(self.ranges) == 1 else self.ranges
        if len(ranges) < c:
            raise ValueError(f"RGBShift has {len(ranges)} channel ranges for {c} channels")
        lo, hi = np.array(ranges[:c]).T * 255.0
        # as albumentations shifts uint8 images: by whole numbers (truncated), saturating
        shift = np.where(mask[:, None], np.trunc(rng.uniform(lo, hi, (n, c))), 0.0)
        if x.dtype == torch.uint8:  # clamped first, adding the shift modulo 256 cannot wrap
            whole = shift.astype(np.int64)
            low, high, wrapped = np.maximum(-whole, 0), 255 - np.maximum(whole, 0), whole % 256
            return _per_channel(x, lambda v, lay: torch.clamp(v, lay(low), lay(high))
                                .add_(lay(wrapped)))
        return _per_channel(x, lambda v, lay: v.add_(lay(shift)).clamp_(0, 255))


def _per_channel(x: Tensor, op) -> Tensor:
    """`op(values, lay)` on a batch, `lay` shaping n x c values to broadcast over `values`.

    A batch in NHWC memory is handed over as rows of w * c values, and per-channel values
    repeated along a row: a 3-wide innermost broadcast would not vectorise.
    """
    n, c, h, w = x.shape
    dtype = np.uint8 if x.dtype == torch.uint8 else np.float32
    if c > 1 and x.is_contiguous(memory_format=torch.channels_last):
        rows = lambda v: torch.from_numpy(  # noqa: E731
            np.repeat(v.astype(dtype)[:, None], w, axis=1).reshape(n, 1, w * c))
        return op(x.permute(0, 2, 3, 1).view(n, h, w * c), rows).view(n, h, w, c).permute(0, 3, 1, 2)
    return op(x, lambda v: torch.from_numpy(v.astype(dtype).reshape(n, c, 1, 1)))


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

    def apply(self, x: Tensor, rng: Rng, mask: np.ndarray) -> Tensor:
        n = x.shape[0]
        alpha = _per_image(1.0 + rng.uniform(*self.contrast, n), mask, 1.0)
        beta = _per_image(rng.uniform(*self.brightness, n), mask, 0.0)
        beta = beta * (255.0 if self.by_max else x.mean((1, 2, 3), keepdim=True))
        return torch.addcmul(beta, x, alpha).clamp_(0, 255)


def rgb_to_hsv(x: Tensor) -> Tensor:
    """RGB in [0, 255] -> H in degrees [0, 360), S in [0, 1], V in [0, 255] (OpenCV's formulas)."""
    r, g, b = x.unbind(1)
    v, top = x.max(1)
    delta = v - x.min(1)[0]
    safe = torch.where(delta > 0, delta, 1.0)
    base = torch.tensor([0.0, 2.0, 4.0])[top]  # which channel is largest picks the sector
    num = torch.where(top == 0, g - b, torch.where(top == 1, b - r, r - g))
    hue = torch.where(delta > 0, ((base + num / safe) * 60.0) % 360.0, 0.0)
    sat = delta / torch.where(v > 0, v, 1.0)
    return torch.stack([hue, sat, v], 1)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    hue, sat, v = (t[:, None] for t in hsv.unbind(1))
    k = (torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1) + hue / 60.0) % 6.0
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

    def apply(self, x: Tensor, rng: Rng, mask: np.ndarray) -> Tensor:
        n, c = x.shape[:2]
        hue, sat, val = (rng.uniform(*r, n)[mask] for r in (self.hue, self.sat, self.val))
        idx = torch.from_numpy(np.flatnonzero(mask))
        shift = lambda t: torch.from_numpy(t.astype(np.float32)).view(-1, 1, 1)  # noqa: E731
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

    def apply(self, x: Tensor, rng: Rng, mask: np.ndarray) -> Tensor:
        n, c, h, w = x.shape
        sigma = rng.uniform(*self.sigma_limit, n)[mask]
        ksize = rng.integers(self.blur_limit[0], self.blur_limit[1], n, endpoint=True)[mask]
        ksize = np.where(ksize == 0, np.floor(sigma * 3.5).astype(int) * 2 + 1, ksize)
        ksize = ksize + (ksize % 2 == 0)
        width = int(ksize.max())
        kernel = _gauss_kernels(sigma, ksize, width).repeat_interleave(c, 0)
        idx = torch.from_numpy(np.flatnonzero(mask))
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

    def apply(self, x: Tensor, rng: Rng, mask: np.ndarray) -> Tensor:
        n, c, h, w = x.shape
        std = _per_image(rng.uniform(*self.std_range, n) * 255.0, mask, 0.0)
        mean = _per_image(rng.uniform(*self.mean_range, n) * 255.0, mask, 0.0)
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        noise = torch.randn((n, c if self.per_channel else 1, h, w), generator=gen)
        return x.add_(torch.addcmul(mean, noise, std)).clamp_(0, 255)


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

    def apply(self, x: Tensor, rng: Rng, mask: np.ndarray) -> Tensor:
        n, _, h, w = x.shape
        count = rng.integers(self.holes[0], self.holes[1], n, endpoint=True)
        shape = (n, self.holes[1])
        hh, ww = self._sizes(rng, self.heights, h, shape), self._sizes(rng, self.widths, w, shape)
        y0, x0 = rng.integers(0, h - hh, endpoint=True), rng.integers(0, w - ww, endpoint=True)
        active = (np.arange(shape[1])[None] < count[:, None]) & mask[:, None]
        rows, cols = np.arange(h), np.arange(w)
        in_rows = (rows >= y0[..., None]) & (rows < (y0 + hh)[..., None]) & active[..., None]
        in_cols = (cols >= x0[..., None]) & (cols < (x0 + ww)[..., None])
        # a pixel is in a hole when some hole covers both its row and its column
        hits = torch.from_numpy(in_rows.transpose(0, 2, 1).astype(np.float32)) \
            @ torch.from_numpy(in_cols.astype(np.float32))
        return x.masked_fill_(hits[:, None] > 0, self.fill)


@dataclass
class OneOf:
    children: list  # (weight, pixel transform)
    resizes = None

    def apply(self, x: Tensor, rng: Rng, mask: np.ndarray) -> Tensor:
        weights = np.array([wt for wt, _ in self.children], dtype=np.float64)
        choice = rng.choice(len(self.children), x.shape[0], p=weights / weights.sum())
        for i, (_, child) in enumerate(self.children):
            picked = mask & (choice == i)
            if picked.any():
                x = child.apply(x, rng, picked)
        return x


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


def _pixel_boxes(m: np.ndarray, h: int, w: int, sh: int, sw: int):
    """Whole-pixel source boxes (x0, y0, width, height, mirror x, mirror y) when every map is a
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
    return x0, y0, cw, ch, fx, fy


def _crop_resize(x: Tensor, boxes, h: int, w: int) -> Tensor:
    """uint8 crops resized with cv2 (albumentations' own call, so the same pixels), mirrored."""
    src = np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())
    n, c = src.shape[0], src.shape[3]
    x0, y0, cw, ch, fx, fy = boxes
    out = np.empty((n, h, w, c), np.uint8)
    resize, size, linear = cv2.resize, (w, h), cv2.INTER_LINEAR
    for i, left, top, width, height in zip(range(n), x0.tolist(), y0.tolist(), cw.tolist(),
                                            ch.tolist()):  # the hot loop: positional arguments
        resize(src[i, top:top + height, left:left + width], size, out[i], 0, 0, linear)
    if fx.any():
        out[fx] = out[fx][:, :, ::-1]
    if fy.any():
        out[fy] = out[fy][:, ::-1]
    return torch.from_numpy(out).permute(0, 3, 1, 2)


def resample(x: Tensor, m: np.ndarray, h: int, w: int, padding: str = "border",
             fill: float = 0.0) -> Tensor:
    """out[n, :, v, u] = bilinear sample of x[n] at m[n] @ (u, v, 1) (pixel centres at integers).

    Whole-pixel crops of a uint8 batch are sliced (one box for all) or resized image by image
    with cv2 (faster than `grid_sample` and identical to albumentations); other maps go
    through one `grid_sample`.
    """
    n, _, sh, sw = x.shape
    shift = m[:, :2, 2]
    if np.array_equal(m[:, :2, :2], _eye(n)[:, :2, :2]) and (shift == shift[0]).all() \
            and (shift == np.round(shift)).all():  # one integer crop for the whole batch
        left, top = int(shift[0, 0]), int(shift[0, 1])
        if 0 <= left and left + w <= sw and 0 <= top and top + h <= sh:
            return x[:, :, top:top + h, left:left + w]
    if x.dtype == torch.uint8 and (boxes := _pixel_boxes(m, h, w, sh, sw)) is not None:
        return _crop_resize(x, boxes, h, w)
    x = x.float() if x.dtype == torch.uint8 else x
    to_unit = _scale_shift(2.0 / sw, 2.0 / sh, 1.0 / sw - 1.0, 1.0 / sh - 1.0, n)
    g = torch.from_numpy((to_unit @ m)[:, :2].astype(np.float32))  # -> grid_sample's [-1, 1]
    u, v = torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32)
    grid = torch.empty(n, h, w, 2)
    for axis in (0, 1):  # coordinate = a*u + b*v + c, as a row term plus a column term
        grid[..., axis] = (g[:, axis, 0:1] * u)[:, None, :] \
            + (g[:, axis, 1:2] * v + g[:, axis, 2:3])[:, :, None]
    if padding == "zeros" and fill:
        return F.grid_sample(x - fill, grid, "bilinear", "zeros", align_corners=False) + fill
    return F.grid_sample(x, grid, "bilinear", padding, align_corners=False)


class BatchAugment:
    """A compiled pipeline: `augment(x, rng)` maps a uint8 N x C x H x W batch to N x C x h x w.

    The result stays uint8 when only whole-pixel crops and RGBShift applied; otherwise it is
    float32 in [0, 255], unrounded (rounding to uint8 would cost more than the normalisation
    it feeds).
    """

    def __init__(self, steps: list[Step]):
        self.steps = steps

    def __call__(self, x: Tensor, rng: Rng) -> Tensor:
        if x.dtype != torch.uint8:
            raise TypeError(f"expected a uint8 batch, got {x.dtype}")
        n, _, h, w = x.shape
        out, pending, border = x, None, ()  # geometry not yet resampled; an Affine's border
        for step in self.steps:
            mask = rng.random(n) < step.p
            if step.op.resizes is not None:
                if isinstance(step.op, Affine):
                    if border and border != (step.op.padding, step.op.fill):
                        out, pending = resample(out, pending, h, w, *border), None
                    border = (step.op.padding, step.op.fill)
                m, h, w = step.op.matrix(n, h, w, rng)
                m = np.where(mask[:, None, None], m, _eye(n)) if step.p < 1 else m
                pending = m if pending is None else pending @ m
                continue
            if pending is not None:
                out, pending, border = resample(out, pending, h, w, *border), None, ()
            if mask.any():
                keep = getattr(step.op, "keeps_uint8", False)
                out = step.op.apply(out if keep else out.float(), rng, mask)
        if pending is not None:
            out = resample(out, pending, h, w, *border)
        return out


def compile_compose(compose: A.Compose) -> BatchAugment | None:
    """The batched equivalent of `compose`, or None when a transform has none."""
    d = compose.to_dict()["transform"]
    if d.get("p", 1.0) < 1:
        return None
    try:
        return BatchAugment([_build(t) for t in d["transforms"]])
    except Unsupported:
        return None
