"""Images of the miniature LLaVA benchmark: image specs, sampling and rendering.

An image is described by a small JSON-able *spec* (a dict) and rendered to a 32x32 RGB PIL image.
Three kinds:
- ``scene``: 1-4 shapes, one per cell of a 2x2 grid (each cell is 2x2 vision patches at patch 8,
  so every object sits on whole patches);
- ``sign``: a coloured sign with a 1-2 digit number in *real handwritten digits* (scikit-learn's
  bundled UCI digits), each glyph 16x16 in its own patch-aligned cell;
- ``degraded``: a scene or sign blurred, darkened, noised or rotated; ``severe`` makes it unreadable.
"""
from __future__ import annotations

import functools
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 32  # pixels per side
SUPERSAMPLE = 4

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 220, 40),
    "purple": (160, 60, 200),
    "white": (245, 245, 245),
}
SHAPES = ["circle", "square", "triangle", "cross"]
SIZES = {"small": 8, "large": 14}
CELLS = ["top left", "top right", "bottom left", "bottom right"]
CELL_XY = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}
DEGRADATIONS = ["blur", "dark", "noise", "rotate"]

# Digit images are split once by a fixed permutation: the pool and the base use the first 70%,
# validation and test sets the rest, so no real digit image is shared between them.
_DIGIT_SPLIT_SEED = 12345


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(_DIGIT_SPLIT_SEED).permutation(len(d.target))
    return d.images[order].astype(np.float32) / 16.0, d.target[order].astype(np.int64)


@functools.lru_cache(maxsize=2)
def digit_index(split: str) -> dict[int, list[int]]:
    """Digit value -> indices (into the permuted digit array) available to ``split``."""
    images, labels = _digits()
    cut = int(0.7 * len(labels))
    idx = range(cut) if split == "train" else range(cut, len(labels))
    out: dict[int, list[int]] = {d: [] for d in range(10)}
    for i in idx:
        out[int(labels[i])].append(i)
    return out


# ---------------------------------------------------------------- sampling
def sample_scene(rng: random.Random, n_min: int = 1, n_max: int = 4) -> dict:
    n = rng.randint(n_min, n_max)
    cells = sorted(rng.sample(CELLS, n), key=CELLS.index)
    objs = []
    for cell in cells:
        size = rng.choice(list(SIZES))
        jitter = 1 if size == "small" else 0
        objs.append({
            "shape": rng.choice(SHAPES), "color": rng.choice(list(COLORS)), "size": size,
            "cell": cell, "dx": rng.randint(-jitter, jitter), "dy": rng.randint(-jitter, jitter),
        })
    tint = rng.randint(0, 2)
    bg = [40, 40, 40]
    bg[tint] += rng.randint(0, 25)
    return {"kind": "scene", "objs": objs, "bg": bg}


def sample_sign(rng: random.Random, split: str) -> dict:
    ndig = rng.choice([1, 2])
    digits = [rng.randint(1 if ndig == 2 else 0, 9)] + [rng.randint(0, 9) for _ in range(ndig - 1)]
    pool = digit_index("train" if split == "train" else "eval")
    glyphs = [rng.choice(pool[d]) for d in digits]
    bg, fg = rng.sample(list(COLORS), 2)
    return {"kind": "sign", "digits": digits, "glyphs": glyphs, "bg": bg, "fg": fg}


def sample_degraded(rng: random.Random, split: str, severe: bool) -> dict:
    base = sample_scene(rng) if rng.random() < 0.6 else sample_sign(rng, split)
    return {"kind": "degraded", "base": base, "op": rng.choice(DEGRADATIONS),
            "level": "severe" if severe else "mild", "seed": rng.randint(0, 2**31 - 1)}


# ---------------------------------------------------------------- rendering
def render(spec: dict) -> Image.Image:
    kind = spec["kind"]
    if kind == "scene":
        return _render_scene(spec)
    if kind == "sign":
        return _render_sign(spec)
    if kind == "degraded":
        return _degrade(render(spec["base"]), spec)
    raise ValueError(f"unknown image kind {kind!r}")


def _render_scene(spec: dict) -> Image.Image:
    s = SIZE * SUPERSAMPLE
    im = Image.new("RGB", (s, s), tuple(spec["bg"]))
    draw = ImageDraw.Draw(im)
    for o in spec["objs"]:
        gx, gy = CELL_XY[o["cell"]]
        cx = (gx * SIZE // 2 + SIZE // 4 + o["dx"]) * SUPERSAMPLE
        cy = (gy * SIZE // 2 + SIZE // 4 + o["dy"]) * SUPERSAMPLE
        r = SIZES[o["size"]] * SUPERSAMPLE // 2
        col = COLORS[o["color"]]
        if o["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
        elif o["shape"] == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=col)
        elif o["shape"] == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=col)
        else:
            w = max(1, r // 3)
            draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=col)
            draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=col)
    return im.resize((SIZE, SIZE), Image.LANCZOS)


def _render_sign(spec: dict) -> Image.Image:
    images, _ = _digits()
    canvas = np.zeros((SIZE, SIZE, 3), np.float32) + np.array(COLORS[spec["bg"]], np.float32)
    fg = np.array(COLORS[spec["fg"]], np.float32)
    n = len(spec["glyphs"])
    x0 = 8 if n == 1 else 0  # one glyph centred on patch boundaries, two glyphs in two cells
    for k, g in enumerate(spec["glyphs"]):
        alpha = np.kron(images[g], np.ones((2, 2), np.float32))[..., None]  # 8x8 -> 16x16
        x = x0 + 16 * k
        canvas[8:24, x:x + 16] = canvas[8:24, x:x + 16] * (1 - alpha) + fg * alpha
    return Image.fromarray(canvas.clip(0, 255).astype(np.uint8))


def _degrade(im: Image.Image, spec: dict) -> Image.Image:
    severe = spec["level"] == "severe"
    op = spec["op"]
    if op == "blur":
        return im.filter(ImageFilter.GaussianBlur(3.0 if severe else 0.8))
    if op == "dark":
        return Image.fromarray((np.asarray(im, np.float32) * (0.04 if severe else 0.5)).astype(np.uint8))
    if op == "noise":
        rng = np.random.default_rng(spec["seed"])
        sigma = 120.0 if severe else 20.0
        arr = np.asarray(im, np.float32) + rng.normal(0, sigma, (SIZE, SIZE, 3))
        return Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    if op == "rotate":
        im = im.rotate(90)
        return im.filter(ImageFilter.GaussianBlur(3.0)) if severe else im
    raise ValueError(f"unknown degradation {op!r}")


def spec_key(spec: dict) -> str:
    """Canonical string of a spec: two images are the same iff their keys are equal."""
    import json

    return json.dumps(spec, sort_keys=True, separators=(",", ":"))
