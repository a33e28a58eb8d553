"""Data loading: IDX, image folders, digits, splits, binarisation, and each bad-input case."""

from __future__ import annotations

import gzip
import os
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model import data as data_mod
from model.data import DataError


def _write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> Path:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload = header + arr.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def _idx_dir(tmp_path: Path, n: int = 6, gz: bool = False) -> Path:
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, gz)
    return tmp_path


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    arr = np.random.default_rng(1).integers(0, 256, (3, 4, 5)).astype(np.uint8)
    got = data_mod.read_idx(_write_idx(tmp_path / "a-idx3-ubyte", arr, gz))
    np.testing.assert_array_equal(got, arr)


def test_idx_dir_scales_to_unit_interval(tmp_path: Path) -> None:
    ds = data_mod.load_idx_dir(_idx_dir(tmp_path), "train")
    raw = data_mod.read_idx(tmp_path / "train-images-idx3-ubyte")
    assert ds.images.shape == (6, 1, 28, 28)
    torch.testing.assert_close(ds.images[:, 0], torch.from_numpy(raw / 255.0).float())
    assert ds.labels is not None and ds.labels.tolist() == [0, 1, 2, 3, 4, 5]


def test_real_mnist(mnist_dir: Path) -> None:
    train = data_mod.load_idx_dir(mnist_dir, "train")
    test = data_mod.load_idx_dir(mnist_dir, "test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    # figures from the data set's README
    assert abs(float(train.images.mean()) * 255 - 33.32) < 0.01
    assert test.labels is not None
    assert torch.bincount(test.labels).tolist() == [
        980,
        1135,
        1032,
        1010,
        982,
        892,
        958,
        1028,
        974,
        1009,
    ]


def test_wrong_magic_number(tmp_path: Path) -> None:
    p = tmp_path / "x-idx3-ubyte"
    p.write_bytes(b"\x12\x34\x08\x03" + b"\x00" * 20)
    with pytest.raises(
        DataError, match=r"x-idx3-ubyte is not an IDX file: bad magic number 12340803"
    ):
        data_mod.read_idx(p)


def test_truncated_idx(tmp_path: Path) -> None:
    p = _write_idx(tmp_path / "t-idx3-ubyte", np.zeros((4, 28, 28)))
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(
        DataError, match=r"t-idx3-ubyte is truncated or padded: 3142 bytes, expected 3152"
    ):
        data_mod.read_idx(p)


def test_truncated_gzip(tmp_path: Path) -> None:
    p = _write_idx(tmp_path / "t-idx3-ubyte", np.zeros((4, 28, 28)), gz=True)
    p.write_bytes(p.read_bytes()[:20])
    with pytest.raises(DataError, match=r"cannot read IDX file .*t-idx3-ubyte.gz"):
        data_mod.read_idx(p)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"--data .*nope: not found"):
        data_mod.load(str(tmp_path / "nope"))


def test_missing_labels_file(tmp_path: Path) -> None:
    _idx_dir(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="no train-labels-idx1-ubyte"):
        data_mod.load_idx_dir(tmp_path)


def _png(path: Path, size: tuple[int, int], value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, value).save(path)


def test_image_folder_with_classes(tmp_path: Path) -> None:
    _png(tmp_path / "cat" / "a.png", (8, 8), 255)
    _png(tmp_path / "dog" / "b.png", (8, 8), 0)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "dog" / "c.jpg", quality=100)
    ds = data_mod.load(str(tmp_path), channels=1)
    assert ds.images.shape == (3, 1, 8, 8)
    assert ds.labels is not None and ds.labels.tolist() == [0, 1, 1]
    assert float(ds.images[0].min()) == 1.0 and float(ds.images[1].max()) == 0.0
    rgb = data_mod.load_image_folder(tmp_path, channels=3)
    assert rgb.images.shape == (3, 3, 8, 8)
    assert float(rgb.images[2, 0].mean()) > 0.95 and float(rgb.images[2, 1].mean()) < 0.05


def test_image_folder_mixed_sizes(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", (8, 8))
    _png(tmp_path / "b.png", (9, 8))
    with pytest.raises(
        DataError,
        match=r"mixed image sizes: .*b.png is 8x9 but .*a.png is 8x8; pass --image-size HxW",
    ):
        data_mod.load(str(tmp_path))
    assert data_mod.load_image_folder(tmp_path, size=(4, 4)).images.shape == (2, 1, 4, 4)


def test_image_folder_channels_are_inferred(tmp_path: Path) -> None:
    grey_as_rgb = tmp_path / "grey"
    grey_as_rgb.mkdir()
    for i in range(3):  # RGB files of grey content, as scans often are: one channel
        Image.new("RGB", (8, 4), (40 * i, 40 * i, 40 * i)).save(grey_as_rgb / f"{i}.jpg")
    assert data_mod.load(str(grey_as_rgb)).images.shape == (3, 1, 4, 8)
    colour = tmp_path / "colour"
    colour.mkdir()
    _png(colour / "a.png", (8, 4), 200)
    Image.new("RGB", (8, 4), (255, 0, 0)).save(colour / "b.png")
    ds = data_mod.load(str(colour))
    assert ds.images.shape == (2, 3, 4, 8)  # one colour image makes the set RGB
    assert torch.allclose(ds.images[0], torch.full((3, 4, 8), 200 / 255))  # grey repeated
    # an explicit size resizes and an explicit channel count converts, as the server does
    small = data_mod.load(str(colour), channels=1, size=(2, 2))
    from service.imaging import LUMA

    assert small.images.shape == (2, 1, 2, 2)
    assert float(small.images[1].mean()) == pytest.approx(float(LUMA[0]), abs=1 / 255)


def test_idx_and_digits_take_a_size_and_channels() -> None:
    ds = data_mod.load("digits", channels=3, size=(16, 16))
    assert ds.images.shape == (1797, 3, 16, 16)
    assert torch.equal(ds.images[:, 0], ds.images[:, 2])


@pytest.mark.parametrize(
    "pixels, expected",
    [
        (torch.bernoulli(torch.full((50, 1, 8, 8), 0.3)), "bernoulli"),  # ink on paper
        (torch.rand(50, 1, 8, 8), "gaussian"),  # continuous tone
        (torch.bernoulli(torch.full((50, 3, 8, 8), 0.3)), "gaussian"),  # colour
    ],
)
def test_suggested_likelihood(pixels: torch.Tensor, expected: str) -> None:
    assert data_mod.suggest_likelihood(pixels) == expected
    assert data_mod.suggest_likelihood(data_mod.load_digits().images) == "bernoulli"


@pytest.mark.parametrize(
    "val_size, sizes", [(0.1, (18, 2)), (0.5, (10, 10)), (0.01, (19, 1)), (5.0, (15, 5))]
)
def test_validation_split_sizes(val_size: float, sizes: tuple[int, int]) -> None:
    ds = data_mod.Dataset(torch.rand(20, 1, 2, 2), None, "x")
    train, val = data_mod.split_validation(ds, val_size, 0)
    assert (len(train), len(val)) == sizes


def test_image_folder_unreadable_file(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", (8, 8))
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"unreadable image .*broken.png"):
        data_mod.load(str(tmp_path))


def test_image_folder_with_a_fifo_or_a_bomb_says_so(tmp_path: Path) -> None:
    # a FIFO named .png blocked the read for ever; a decompression bomb was a traceback
    _png(tmp_path / "a.png", (8, 8))
    os.mkfifo(tmp_path / "zz.png")
    with pytest.raises(DataError, match=r"zz.png is not a regular file; move it out"):
        data_mod.load_image_folder(tmp_path)
    (tmp_path / "zz.png").unlink()
    with Image.new("L", (1, 1)) as tiny:
        tiny.save(tmp_path / "bomb.png")
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 0  # every image is a bomb now: Pillow refuses it
    try:
        with pytest.raises(DataError, match=r"unreadable image .*could be decompression bomb"):
            data_mod.load_image_folder(tmp_path)
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def test_empty_image_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no images"):
        data_mod.load_image_folder(tmp_path)


def test_digits() -> None:
    ds = data_mod.load("digits")
    assert ds.images.shape == (1797, 1, 8, 8)
    assert float(ds.images.min()) == 0.0 and float(ds.images.max()) == 1.0


def test_filter_classes_and_split() -> None:
    ds = data_mod.filter_classes(data_mod.load_digits(), [3])
    assert ds.labels is not None and set(ds.labels.tolist()) == {3}
    tr, va = data_mod.split_validation(ds, 0.25, seed=0)
    assert len(tr) + len(va) == len(ds) and len(va) == round(0.25 * len(ds))
    # disjoint: no validation image is also a training image
    assert not (tr.images.flatten(1)[:, None] == va.images.flatten(1)[None]).all(-1).any()
    with pytest.raises(DataError, match="no images of classes"):
        data_mod.filter_classes(ds, [7])
    with pytest.raises(DataError, match=r"--val-size .* leaves no training or no validation"):
        data_mod.split_validation(ds, len(ds), seed=0)


def test_dynamic_binarisation_is_fresh_and_unbiased() -> None:
    x = torch.full((200, 1, 10, 10), 0.3)
    g = torch.Generator().manual_seed(0)
    a, b = data_mod.binarize(x, g), data_mod.binarize(x, g)
    assert set(a.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(a, b)
    assert abs(float(a.mean()) - 0.3) < 0.01


def test_download_offline_says_how_to_use_local_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # no network here: stand in for the mirrors refusing the connection
    def refuse(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("Network is unreachable")

    monkeypatch.setattr(data_mod.urllib.request, "urlopen", refuse)
    with pytest.raises(DataError, match=r"could not download mnist .*--data DIR"):
        data_mod.load("mnist", download_root=tmp_path)


def test_download_rejects_a_corrupt_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Reply:
        def __enter__(self) -> Reply:
            return self

        def __exit__(self, *a: object) -> None:
            return None

        def read(self) -> bytes:
            return b"tampered"

    monkeypatch.setattr(data_mod.urllib.request, "urlopen", lambda *a, **k: Reply())
    with pytest.raises(DataError, match="MD5 mismatch"):
        data_mod.download("fashion-mnist", tmp_path)
    assert not list((tmp_path / "fashion-mnist").iterdir())
