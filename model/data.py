"""Image data sets as float tensors in [0, 1]: IDX files, image folders, scikit-learn's digits."""

from __future__ import annotations

import gzip
import hashlib
import logging
import struct
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


class DataError(ValueError):
    """The data could not be read; the message names the file or flag."""


@dataclass
class Dataset:
    images: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    labels: torch.Tensor | None  # (N,) int64, or None when unlabelled
    source: str

    def __len__(self) -> int:
        return int(self.images.shape[0])


# IDX type codes (LeCun's format): ubyte, byte, short, int, float, double
_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file, gzip-compressed or raw, checking its magic number and length."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"IDX file not found: {path}")
    try:
        if path.suffix == ".gz":
            with gzip.open(path) as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file: bad magic number {raw[:4].hex() or '(empty)'}")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file {path} is truncated: header needs {header} bytes")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(
            f"IDX file {path} is truncated or padded: {len(raw)} bytes, expected {expected} "
            f"for shape {shape}"
        )
    arr: np.ndarray = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return arr


_IDX_NAMES = {"train": "train", "test": "t10k"}


def _find(directory: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise DataError(f"no {stem}[.gz] in {directory}")


def load_idx_dir(directory: Path, split: str = "train") -> Dataset:
    """MNIST-layout directory: {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"data directory not found: {directory}")
    prefix = _IDX_NAMES[split]
    images = read_idx(_find(directory, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"{directory}: images {images.shape} and labels {labels.shape} do not match"
        )
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)  # (N, 1, H, W)
    return Dataset(x, torch.from_numpy(labels.astype(np.int64)), f"idx:{directory}:{split}")


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
# An RGB image whose channels differ by at most this is grey (JPEG noise on a grey scan)
GREY_TOLERANCE = 2
MAX_PIXELS = 1 << 30  # per training image; Pillow's own decompression-bomb check still applies


def _is_colour(image: Any) -> bool:
    """Whether a Pillow image has colour: an RGB(A)/palette image whose channels differ."""
    if image.mode in GREY_MODES:
        return False
    rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    return bool(np.abs(rgb - rgb[..., :1]).max() > GREY_TOLERANCE)


def load_image_folder(
    directory: Path, channels: int | None = None, size: tuple[int, int] | None = None
) -> Dataset:
    """A folder of images; sub-folders, if any, are classes (sorted names -> 0, 1, ...).

    `channels` None: 3 when any image has colour, else 1. `size` (H, W) None: the images' own
    size, which must then be the same for all. Each file is decoded, converted and resized by the
    server's own decoder (service.imaging.decode_image), so training sees what serving will.
    """
    from PIL import Image, UnidentifiedImageError

    from service.imaging import ImageError, decode_image

    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"image folder not found: {directory}")
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    for p in files:
        if not p.is_file():  # a FIFO would block the read for ever, a device never end
            raise DataError(f"{p} is not a regular file; move it out of the image folder")
    if not files:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {directory}")
    classes = sorted(
        {p.parent.relative_to(directory).parts[0] for p in files if p.parent != directory}
    )

    def open_image(p: Path, decode: bool) -> Any:
        try:
            with Image.open(p) as opened:
                if decode:
                    opened.load()
                return opened.copy() if decode else opened
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"unreadable image {p}: {e}") from e

    # first pass: the size every image must share, and whether any has colour
    if size is None or channels is None:
        first: tuple[int, int, Path] | None = None
        colour = False
        for p in files:
            im = open_image(p, decode=channels is None and not colour)  # else the header only
            if size is None:
                if first is None:
                    first = (im.height, im.width, p)
                elif (im.height, im.width) != first[:2]:
                    raise DataError(
                        f"mixed image sizes: {p} is {im.height}x{im.width} but {first[2]} is "
                        f"{first[0]}x{first[1]}; pass --image-size HxW to resize them all"
                    )
            if channels is None and not colour:
                colour = _is_colour(im)
            if size is not None and (colour or channels is not None):
                break  # nothing more to learn
        if size is None:
            assert first is not None
            size = first[:2]
        if channels is None:
            channels = 3 if colour else 1
        log.info("%s: %d images, %dx%d, %d channel(s)", directory, len(files), *size, channels)
    arrays, labels = [], []
    for p in files:
        try:
            arrays.append(
                decode_image(p.read_bytes(), (channels, *size), max_pixels=MAX_PIXELS, strict=False)
            )
        except (ImageError, OSError) as e:
            raise DataError(f"unreadable image {p}: {e}") from e
        if classes:
            top = p.parent.relative_to(directory).parts
            labels.append(classes.index(top[0]) if top else -1)
    x = torch.from_numpy(np.stack(arrays))
    y = torch.tensor(labels, dtype=torch.int64) if classes else None
    return Dataset(x, y, f"folder:{directory}")


def fit(ds: Dataset, channels: int | None, size: tuple[int, int] | None) -> Dataset:
    """`ds` with `channels` and `size` (H, W), converted and resized as the server does."""
    from service.imaging import convert_channels, resize

    c, h, w = ds.images.shape[1:]
    channels, size = channels or c, size or (h, w)
    if (channels, *size) == (c, h, w):
        return ds
    arrays = [resize(convert_channels(a, channels), *size) for a in ds.images.numpy()]
    return Dataset(torch.from_numpy(np.stack(arrays)), ds.labels, ds.source)


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images), a tiny offline data set."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32)).unsqueeze(1)  # (N, 1, 8, 8)
    return Dataset(x, torch.from_numpy(d.target.astype(np.int64)), "sklearn:digits")


# Public mirrors and the MD5 of each .gz file, as torchvision checks them.
MIRRORS = {
    "mnist": [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ],
    "fashion-mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
}
MD5 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}


def download(name: str, root: Path, timeout: float = 30.0) -> Path:
    """Fetch MNIST or Fashion-MNIST into root/name, verifying each file's MD5."""
    if name not in MD5:
        raise DataError(f"unknown dataset {name!r}; choose from {sorted(MD5)}")
    target = Path(root) / name
    target.mkdir(parents=True, exist_ok=True)
    for fname, md5 in MD5[name].items():
        dest = target / fname
        if dest.is_file() and hashlib.md5(dest.read_bytes()).hexdigest() == md5:
            continue
        errors = []
        for mirror in MIRRORS[name]:
            try:
                with urllib.request.urlopen(mirror + fname, timeout=timeout) as r:
                    payload = r.read()
            except (urllib.error.URLError, OSError) as e:
                errors.append(f"{mirror}{fname}: {e}")
                continue
            if hashlib.md5(payload).hexdigest() != md5:
                errors.append(f"{mirror}{fname}: MD5 mismatch")
                continue
            tmp = dest.with_suffix(".part")
            tmp.write_bytes(payload)
            tmp.replace(dest)
            break
        else:
            raise DataError(
                f"could not download {name} file {fname} ({'; '.join(errors)}). Offline? Put the "
                f"four IDX .gz files in a directory and pass it with --data DIR"
            )
    return target


def load(
    source: str,
    split: str = "train",
    channels: int | None = None,
    size: tuple[int, int] | None = None,
    download_root: Path | None = None,
) -> Dataset:
    """`source` is a directory (IDX files or images), 'digits', or 'mnist'/'fashion-mnist'.

    `channels` (1 or 3) and `size` (H, W) convert the images; None keeps the data's own (for an
    image folder: 3 channels when any image has colour).
    """
    if source == "digits":
        return fit(load_digits(), channels, size)
    if source in MD5:
        root = download_root or Path("data")
        local = root / source
        if not all((local / f).is_file() for f in MD5[source]):
            download(source, root)
        return fit(load_idx_dir(local, split), channels, size)
    path = Path(source)
    if not path.exists():
        raise DataError(
            f"--data {source}: not found (give a directory of IDX files or images, "
            f"or one of: digits, {', '.join(MD5)})"
        )
    if any(path.glob("*-idx3-ubyte*")):
        return fit(load_idx_dir(path, split), channels, size)
    return load_image_folder(path, channels=channels, size=size)


def split_validation(ds: Dataset, val_size: int | float, seed: int) -> tuple[Dataset, Dataset]:
    """Hold out a random validation split: a count (an int) or a fraction (a float < 1)."""
    n = len(ds)
    if isinstance(val_size, float) and val_size < 1:
        n_val = min(max(1, round(val_size * n)), n - 1)
    else:
        n_val = int(val_size)
    if not 0 < n_val < n:
        raise DataError(
            f"--val-size {val_size:g} leaves no training or no validation images: the data has "
            f"{n}; give a fraction such as 0.1 or a count below {n}"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    tr, va = perm[n_val:], perm[:n_val]

    def take(idx: torch.Tensor) -> Dataset:
        y = ds.labels[idx] if ds.labels is not None else None
        return Dataset(ds.images[idx], y, ds.source)

    return take(tr), take(va)


def filter_classes(ds: Dataset, classes: list[int]) -> Dataset:
    """Keep only the images of the given labels (one-class training for anomaly detection)."""
    if ds.labels is None:
        raise DataError(f"--classes needs labelled data, but {ds.source} has no labels")
    keep = torch.isin(ds.labels, torch.tensor(classes))
    if not bool(keep.any()):
        raise DataError(f"no images of classes {classes} in {ds.source}")
    return Dataset(ds.images[keep], ds.labels[keep], ds.source)


# Grey images with at least this share of pixels within BINARY_MARGIN of 0 or 1 are ink on a
# plain background (MNIST 91 %, scikit-learn's digits 65 %; photographs far fewer): a Bernoulli
# likelihood suits them. Anything else gets a Gaussian.
BINARY_SHARE = 0.6
BINARY_MARGIN = 0.1


def suggest_likelihood(images: torch.Tensor) -> str:
    """'bernoulli' for binary-like grey images `(N, C, H, W)`, else 'gaussian'."""
    if images.shape[1] != 1:
        return "gaussian"
    x = images[:10_000]
    share = float(((x < BINARY_MARGIN) | (x > 1 - BINARY_MARGIN)).float().mean())
    return "bernoulli" if share >= BINARY_SHARE else "gaussian"


def binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Dynamic binarisation: each pixel ~ Bernoulli(intensity), drawn afresh on every call."""
    return torch.bernoulli(x, generator=generator)
