"""An out-of-distribution battery for MNIST models, from the literature's families of OOD sets.

Nalisnick et al. 2019 (constant images, noise, other data sets with simpler statistics), Serrà et
al. 2020 (constant and noise images; input complexity), Hendrycks et al. 2019 (Gaussian, uniform,
Rademacher noise, blobs), Ren et al. 2019 (background statistics): every set is made here from
MNIST's *test* images, fonts and random draws, 28x28 uint8, white-on-black like MNIST. The
exporter's validation outliers (model/calibrate.py) are made from the *training* split, with
their own seeds; the families that both use are marked in BENCHMARKS.md.
"""

from __future__ import annotations

import string
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SIZE = 28
Digits = tuple[np.ndarray, np.ndarray]  # uint8 images (N, 28, 28), labels (N,)
Generator = Callable[[Digits, np.random.Generator, int], np.ndarray]


def _u8(a: np.ndarray) -> np.ndarray:
    return np.asarray(np.clip(np.round(a), 0, 255), dtype=np.uint8)


def constant(digits: Digits, rng: np.random.Generator, n: int) -> np.ndarray:
    """Images of one grey level each, 0 to 255 (0 is MNIST's blank)."""
    return _u8(np.broadcast_to(rng.uniform(0, 255, (n, 1, 1)), (n, SIZE, SIZE)))


def near_blank(digits: Digits, rng: np.random.Generator, n: int) -> np.ndarray:
    """Black images with a few (1-8) bright pixels or faint noise of at most 30 grey levels."""
    out = np.zeros((n, SIZE, SIZE))
    for img in out[: n // 2]:
        k = rng.integers(1, 9)
        img[rng.integers(0, SIZE, k), rng.integers(0, SIZE, k)] = rng.uniform(128, 255, k)
    out[n // 2 :] = rng.uniform(0, 30, (n - n // 2, SIZE, SIZE))
    return _u8(out)


def uniform_noise(digits: Digits, rng: np.random.Generator, n: int) -> np.ndarray:
    """Independent uniform pixels."""
    return _u8(rng.uniform(0, 256, (n, SIZE, SIZE)) - 0.5)


def gaussian_noise(digits: Digits, rng: np.random.Generator, n: int) -> np.ndarray:
    """Gaussian pixels around a random mean grey, sd 20-80, clipped."""
    mean = rng.uniform(30, 225, (n, 1, 1))
    return _u8(mean + rng.uniform(20, 80, (n, 1, 1)) * rng.standard_normal((n, SIZE, SIZE)))


def sparse_noise(digits: Digits, rng: np.random.Generator, n: int) -> np.ndarray:
    """Salt noise: 5-20 % of pixels white, the rest black (Rademacher-like, MNIST's ink level)."""
    p = rng.uniform(0.05, 0.2, (n, 1, 1))
    return _u8(255 * (rng.uniform(size=(n, SIZE, SIZE)) < p))


def blobs(digits: Digits, rng: np.random.Generator, n: int) -> np.ndarray:
    """Smoothed binary noise (Hendrycks et al. 2019's blobs)."""
    out = []
    for _ in range(n):
        a = (rng.uniform(size=(SIZE, SIZE)) < 0.3).astype(np.uint8) * 255
        im = Image.fromarray(a).filter(ImageFilter.GaussianBlur(1.5))
        out.append(np.asarray(im, dtype=np.float64) * 2.0)
    return _u8(np.stack(out))


def _canvas_draw(rng: np.random.Generator, n: int, draw: Callable[..., None]) -> np.ndarray:
    out = []
    for _ in range(n):
        im = Image.new("L", (SIZE, SIZE), 0)
        draw(ImageDraw.Draw(im), rng)
        out.append(np.asarray(im.filter(ImageFilter.GaussianBlur(0.5))))
    return np.stack(out)


def _glyph(chars: str) -> Generator:
    def make(digits: Digits, rng: np.random.Generator, n: int) -> np.ndarray:
        fonts = {s: ImageFont.load_default(size=s) for s in (16, 18, 20, 22)}

        def draw(d: ImageDraw.ImageDraw, r: np.random.Generator) -> None:
            font = fonts[int(r.choice(list(fonts)))]
            ch = chars[int(r.integers(len(chars)))]
            d.text((14, 14), ch, fill=255, font=font, anchor="mm", stroke_width=1)

        return _canvas_draw(rng, n, draw)

    return make


def shapes(digits: Digits, rng: np.random.Generator, n: int) -> np.ndarray:
    """Outlined or filled rectangles, ellipses and triangles, 2-3 px strokes."""

    def draw(d: ImageDraw.ImageDraw, r: np.random.Generator) -> None:
        x0, y0 = r.integers(2, 10, 2)
        x1, y1 = r.integers(18, 26, 2)
        kind, fill, width = int(r.integers(3)), r.uniform() < 0.3, int(r.integers(2, 4))
        box = (int(x0), int(y0), int(x1), int(y1))
        if kind == 0:
            d.rectangle(box, outline=255, fill=255 if fill else None, width=width)
        elif kind == 1:
            d.ellipse(box, outline=255, fill=255 if fill else None, width=width)
        else:
            pts = [(int(x0), int(y1)), (int(x1), int(y1)), (int((x0 + x1) // 2), int(y0))]
            d.polygon(pts, outline=255, fill=255 if fill else None, width=width)

    return _canvas_draw(rng, n, draw)


def lines(digits: Digits, rng: np.random.Generator, n: int) -> np.ndarray:
    """One to four random straight strokes."""

    def draw(d: ImageDraw.ImageDraw, r: np.random.Generator) -> None:
        for _ in range(int(r.integers(1, 5))):
            p = r.integers(3, 25, 4)
            d.line([(int(p[0]), int(p[1])), (int(p[2]), int(p[3]))], fill=255, width=2)

    return _canvas_draw(rng, n, draw)


def gratings(digits: Digits, rng: np.random.Generator, n: int) -> np.ndarray:
    """Sinusoidal stripes and checkerboards of random period and angle."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    out = []
    for _ in range(n):
        theta, period = rng.uniform(0, np.pi), rng.uniform(3, 10)
        u = np.cos(theta) * xx + np.sin(theta) * yy
        g = np.sin(2 * np.pi * u / period)
        if rng.uniform() < 0.5:
            v = -np.sin(theta) * xx + np.cos(theta) * yy
            g = np.sign(g * np.sin(2 * np.pi * v / period))
        out.append(127.5 + 127.5 * g)
    return _u8(np.stack(out))


def _digits(
    fn: Callable[[np.ndarray, np.random.Generator], np.ndarray], exclude: tuple[int, ...] = ()
) -> Generator:
    """Transformed test digits; `exclude`: labels the transform maps to a digit (a flipped 8)."""

    def make(digits: Digits, rng: np.random.Generator, n: int) -> np.ndarray:
        images, labels = digits
        pool = np.flatnonzero(~np.isin(labels, exclude))
        picked = images[rng.choice(pool, n, replace=False)]
        return _u8(fn(picked.astype(np.float64), rng))

    return make


def _pixel_shuffle(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    flat = x.reshape(len(x), -1)
    return np.stack([rng.permutation(row) for row in flat]).reshape(x.shape)


def _blurred(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.stack(
        [np.asarray(Image.fromarray(_u8(img)).filter(ImageFilter.GaussianBlur(2.5))) for img in x]
    ).astype(np.float64)


def _mix(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.maximum(x, x[rng.permutation(len(x))])


def _rot90(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.rot90(x, 1, axes=(1, 2))


def _vflip(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return x[:, ::-1]


def _scaled_down(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros_like(x)
    for i, img in enumerate(x):
        small = np.asarray(Image.fromarray(_u8(img)).resize((12, 12), Image.Resampling.BILINEAR))
        oy, ox = rng.integers(0, SIZE - 12, 2)
        out[i, oy : oy + 12, ox : ox + 12] = small
    return out


def _inverted(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 255.0 - x


BATTERY: dict[str, Generator] = {
    "constant": constant,
    "near_blank": near_blank,
    "uniform_noise": uniform_noise,
    "gaussian_noise": gaussian_noise,
    "sparse_noise": sparse_noise,
    "blobs": blobs,
    "letters": _glyph(string.ascii_letters),
    "symbols": _glyph("#$%&@*+=?!<>{}[]~^"),
    "shapes": shapes,
    "lines": lines,
    "gratings": gratings,
    "digits_rot90": _digits(_rot90, exclude=(0, 1, 8)),
    "digits_vflip": _digits(_vflip, exclude=(0, 1, 3, 8)),
    "digits_inverted": _digits(_inverted),
    "digits_blurred": _digits(_blurred),
    "digits_pixel_shuffled": _digits(_pixel_shuffle),
    "digits_overlaid": _digits(_mix),
    "digits_small": _digits(_scaled_down),
}


def battery(images: np.ndarray, labels: np.ndarray, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Every set of BATTERY, `n` images each, `(n, 28, 28)` uint8, from MNIST test images."""
    return {
        name: make((images, labels), np.random.default_rng([seed, i]), n)
        for i, (name, make) in enumerate(BATTERY.items())
    }
