"""End to end: `vae score` on a local Ray (2 CPUs) over a folder with broken files mixed in, an
IDX file and a Parquet table, checked row for row against a real `vae serve` answering POST /elbo
for each image sent alone.

One Ray instance (2 scorers) serves the module, as a notebook's would (`vae score` uses the Ray
a process already runs); a few hundred small images keep the module under 2 minutes.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.e2e.test_server import png
from tests.live import live_server

ray = pytest.importorskip("ray", reason="the batch extra is not installed: pip install '.[batch]'")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from service import batch  # noqa: E402  (needs the batch extra, checked just above)
from service.imaging import FORMATS  # noqa: E402

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SEED = 7
UPLOAD_LIMIT = 64 * 1024
FIELDS = ["elbo", "reconstruction", "kl", "anomaly_score", "percentile"]
# Broken inputs and the error each must come back with (the folder's path is cut from the key).
BROKEN = {
    "broken/empty.png": "input is empty (0 bytes)",
    "broken/truncated.png": "input could not be decoded, truncated or corrupt? (OSError: image "
    "file is truncated)",
    "broken/notes.txt": f"input is not an image in a supported format ({', '.join(FORMATS)})",
    "broken/bomb.png": "input is 5000x5000 = 25000000 pixels, over the limit of 16777216 "
    "(VAE_MAX_PIXELS)",
    "broken/big.png": f"file is 100000 bytes, over the limit of {UPLOAD_LIMIT} "
    "(VAE_MAX_UPLOAD_BYTES)",
    "broken/three.npy": "input holds 3 images, over the limit of 1 "
    "(vae score reads one per .npy file)",
    "broken/dangling.png": "file cannot be read (FileNotFoundError: No such file or directory)",
    "broken/fifo.png": "file is not a regular file",
    # Ray's reader decompresses by the name: this one failed its read task, and the whole job
    "broken/readme.gz": "file is named as gzip but does not decompress (zlib inflate failed: "
    "incorrect header check)",
}


def digits(n: int) -> np.ndarray:
    """`n` 28x28 uint8 images: the examples' three digits shifted about, every fourth noisy."""
    base = np.load(REPO / "examples" / "digits.npy")
    rng = np.random.default_rng(0)
    images = []
    for i in range(n):
        image = np.roll(base[i % 3], (i // 3 % 5 - 2, i // 15 % 5 - 2), axis=(0, 1))
        if i % 4 == 3:
            image = np.maximum(image, rng.integers(0, 256, image.shape, dtype=np.uint8))
        images.append(image)
    return np.stack(images)


def encoded(image: np.ndarray, fmt: str, mode: str = "L", size: int = 28) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).convert(mode).resize((size, size)).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~240 images in every accepted kind (nested, resized, RGB, JPEG, BMP, .npy) plus BROKEN."""
    root = tmp_path_factory.mktemp("archive")
    images = digits(220)
    for i, image in enumerate(images[:180]):
        path = root / "png" / f"{i // 60}" / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png(image))
    kinds = [("JPEG", "L", 28, "jpg"), ("BMP", "L", 28, "bmp"), ("PNG", "RGB", 40, "png")]
    for i, image in enumerate(images[180:210]):
        fmt, mode, size, suffix = kinds[i % 3]
        (root / "other").mkdir(exist_ok=True)
        (root / "other" / f"{i:04d}.{suffix}").write_bytes(encoded(image, fmt, mode, size))
    for i, image in enumerate(images[210:]):
        np.save(root / "other" / f"{i:04d}.npy", image)
    (root / ".hidden.png").write_bytes(png(images[0]))  # skipped, not counted
    broken = root / "broken"
    broken.mkdir()
    (broken / "empty.png").write_bytes(b"")
    (broken / "truncated.png").write_bytes(png(images[1])[:100])
    (broken / "notes.txt").write_text("not an image\n")
    Image.new("L", (5000, 5000)).save(broken / "bomb.png")
    (broken / "big.png").write_bytes(np.random.default_rng(1).bytes(100_000))
    np.save(broken / "three.npy", images[:3])
    (broken / "dangling.png").symlink_to(broken / "missing.png")
    os.mkfifo(broken / "fifo.png")
    (broken / "readme.gz").write_text("plain text, not gzip\n")
    return root


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    # what `vae score` starts on 2 cores: a CPU slot per scorer and one for Ray Data's own tasks
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def score(
    source: Path, out: Path, *args: str, bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Run `vae score` (on the module's Ray); its run.json and its rows by key."""
    monkeypatch.setenv("VAE_MAX_UPLOAD_BYTES", str(UPLOAD_LIMIT))
    argv = [str(source), "--bundle", str(bundle), "--out", str(out)]
    assert batch.main([*argv, "--seed", str(SEED), *args]) == 0
    report = json.loads((out / "run.json").read_text())
    rows = pq.read_table(out / "scores").to_pylist()
    assert len(rows) == report["rows_out"] == report["rows_in"]
    return report, {row["key"]: row for row in rows}


@pytest.fixture(scope="module")
def folder_run(
    folder: Path, local_ray: None, default_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        out = tmp_path_factory.mktemp("scored") / "out"
        report, rows = score(
            folder, out, "--mu", "--map", bundle=default_bundle, monkeypatch=monkeypatch
        )
    return report, {str(Path(key).relative_to(folder)): row for key, row in rows.items()}


def test_every_file_is_a_row_and_broken_ones_say_why(
    folder_run: tuple[dict[str, Any], dict[str, dict[str, Any]]], default_bundle: Path
) -> None:
    report, rows = folder_run
    assert report["rows_in"] == report["rows_out"] == 220 + len(BROKEN)
    assert report["failures"] == len(BROKEN)
    assert report["format"] == "images" and report["actors"] == 2
    assert report["bundle"]["name"] == "mnist-vae"
    manifest = json.loads((default_bundle / "manifest.json").read_text())
    assert report["bundle"]["files"] == {n: f["sha256"] for n, f in manifest["files"].items()}
    assert {key: rows[key]["error"] for key in BROKEN} == BROKEN
    for key in BROKEN:
        assert rows[key]["elbo"] is None and rows[key]["anomaly_score"] is None
    good = [row for key, row in rows.items() if key not in BROKEN]
    assert all(row["error"] is None and np.isfinite(row["elbo"]) for row in good)
    assert all(len(row["mu"]) == manifest["latent_dim"] for row in good)
    assert all(np.shape(row["anomaly_map"]) == (28, 28) for row in good)
    assert all(rows[key]["anomaly_map"] is None for key in BROKEN)


@pytest.fixture(scope="module")
def server(folder_run: object, default_bundle: Path) -> Iterator[httpx.Client]:
    with live_server(default_bundle) as live, live.client(timeout=30.0) as client:
        yield client


def test_scores_equal_the_servers_for_each_image_alone(
    folder: Path,
    folder_run: tuple[dict[str, Any], dict[str, dict[str, Any]]],
    server: httpx.Client,
) -> None:
    report, rows = folder_run
    good = sorted(key for key in rows if key not in BROKEN)
    for key in good:
        data, params = (folder / key).read_bytes(), {"seed": SEED, "map": "array"}
        if key.endswith(".npy"):  # as the server takes arrays: the body itself
            headers = {"Content-Type": "application/x-npy"}
            response = server.post("/elbo", params=params, content=data, headers=headers)
        else:
            response = server.post("/elbo", params=params, files={"images": (key, data)})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["score"] == report["options"]["score"]
        assert body["threshold"] == report["options"]["threshold"]
        (expected,) = body["results"]
        row = rows[key]
        np.testing.assert_allclose(
            [row[f] for f in FIELDS], [expected[f] for f in FIELDS], rtol=1e-5, err_msg=key
        )
        assert row["is_anomaly"] == expected["is_anomaly"], key
        np.testing.assert_allclose(
            row["anomaly_map"], expected["anomaly_map"], rtol=1e-5, atol=1e-7, err_msg=key
        )
    mu = server.post("/encode", files={"images": ("a.png", (folder / good[0]).read_bytes())})
    expected_mu = mu.json()["results"][0]["mu"]
    np.testing.assert_allclose(rows[good[0]]["mu"], expected_mu, rtol=1e-5, atol=1e-6)


def idx(images: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, images.ndim]) + b"".join(d.to_bytes(4, "big") for d in images.shape)
    return header + images.tobytes()


def test_idx_files_score_as_their_pngs(
    folder_run: tuple[dict[str, Any], dict[str, dict[str, Any]]],
    default_bundle: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, pngs = folder_run
    images = digits(180)
    source = tmp_path / "idx"
    source.mkdir()
    (source / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx(images[:100])))
    (source / "more-images-idx3-ubyte").write_bytes(idx(images[100:180]))
    (source / "cut-images-idx3-ubyte").write_bytes(idx(images[:5])[:-10])
    (source / "t10k-labels-idx1-ubyte").write_bytes(idx(np.zeros(5, dtype=np.uint8)))
    report, rows = score(source, tmp_path / "out", bundle=default_bundle, monkeypatch=monkeypatch)
    assert report["format"] == "idx" and report["rows_in"] == 182 and report["failures"] == 2
    assert rows[str(source / "cut-images-idx3-ubyte")]["error"] == (
        "IDX file is truncated or padded: 3926 bytes, its header needs 3936"
    )
    assert rows[str(source / "t10k-labels-idx1-ubyte")]["error"] == (
        "IDX file holds an array of shape (5,); images are (N, height, width)"
    )
    for i in range(180):
        name = f"t10k-images-idx3-ubyte.gz#{i}" if i < 100 else f"more-images-idx3-ubyte#{i - 100}"
        row, same = rows[str(source / name)], pngs[f"png/{i // 60}/{i:04d}.png"]
        np.testing.assert_allclose(
            [row[f] for f in FIELDS], [same[f] for f in FIELDS], rtol=1e-5, err_msg=name
        )


# One small Parquet file is one block: one of the two scorers has nothing to do, and Ray says so.
@pytest.mark.filterwarnings("ignore:The minimum number of concurrent actors:UserWarning")
def test_parquet_rows_keep_their_keys(
    folder: Path,
    folder_run: tuple[dict[str, Any], dict[str, dict[str, Any]]],
    default_bundle: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, pngs = folder_run
    names = [f"png/0/{i:04d}.png" for i in range(20)]
    blobs: list[dict[str, Any] | None] = [
        {"bytes": (folder / name).read_bytes(), "path": name} for name in names
    ]
    table = pa.table({"id": list(range(21)), "image": [*blobs, None]})  # HF datasets' layout
    pq.write_table(table, tmp_path / "images.parquet")
    report, rows = score(
        tmp_path / "images.parquet",
        tmp_path / "out",
        "--key-column",
        "id",
        bundle=default_bundle,
        monkeypatch=monkeypatch,
    )
    assert report["format"] == "parquet" and report["rows_in"] == 21
    assert rows["20"]["error"] == "column 'image' is null"
    for i, name in enumerate(names):
        np.testing.assert_allclose(
            [rows[str(i)][f] for f in FIELDS], [pngs[name][f] for f in FIELDS], rtol=1e-5
        )
