"""service/batch.py without starting Ray: sources, IDX parsing, decoding, the Scorer itself, and
`Runtime.evaluate(each_alone=True)`, which makes every image's result independent of its batch.
tests/e2e/test_batch.py runs the whole job on a local Ray."""

from __future__ import annotations

import asyncio
import gzip
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

pytest.importorskip("ray", reason="the batch extra is not installed: pip install '.[batch]'")
import pyarrow as pa

from service import batch
from service.bundle import load_bundle
from service.imaging import ImageError
from service.metrics import Metrics
from service.runtime import NotFinite, Runtime
from service.settings import Settings

SHAPE = (1, 28, 28)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def idx(array: np.ndarray, code: int = 0x08) -> bytes:
    dims = b"".join(d.to_bytes(4, "big") for d in array.shape)
    return bytes([0, 0, code, array.ndim]) + dims + array.tobytes()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)


def test_each_alone_gives_every_image_its_result_alone(bundle: Path, images: np.ndarray) -> None:
    runtime = Runtime(load_bundle(bundle, device="cpu"), Metrics(), max_rows=1024)
    x = images[:, None].astype(np.float32) / 255.0
    options = {"samples": 3, "k": 5, "score": "neg_elbo", "score_draws": 3, "seed": 11}
    together = asyncio.run(runtime.evaluate(x, **options, each_alone=True))  # type: ignore[arg-type]
    for i in range(len(x)):
        alone = asyncio.run(runtime.evaluate(x[i : i + 1], **options))  # type: ignore[arg-type]
        assert together.iwae is not None and alone.iwae is not None
        got = [together.terms.elbo[i], together.iwae[i], together.score[i]]
        want = [alone.terms.elbo[0], alone.iwae[0], alone.score[0]]
        np.testing.assert_allclose(got, want, rtol=1e-5)
        np.testing.assert_allclose(together.mu[i], alone.mu[0], rtol=1e-5, atol=1e-6)
    batched = asyncio.run(runtime.evaluate(x, **options))  # type: ignore[arg-type]
    assert not np.allclose(batched.terms.elbo[1:], together.terms.elbo[1:])  # draws differ


def test_idx_images_reads_raw_and_gzip(images: np.ndarray) -> None:
    np.testing.assert_array_equal(batch.idx_images(idx(images)), images)
    np.testing.assert_array_equal(batch.idx_images(gzip.compress(idx(images))), images)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "is not an IDX file: bad magic number (empty)"),
        (b"\x89PNG\r\n", "is not an IDX file: bad magic number 89504e47"),
        (b"\0\0\x08\x03\0\0", "is truncated: its header needs 16 bytes, it has 6"),
        (idx(np.zeros((2, 3, 3), np.uint8))[:-1], "is truncated or padded: 33 bytes, its header"),
        (idx(np.zeros(4, np.uint8)), "holds an array of shape (4,); images are (N, height,"),
        (b"\x1f\x8b\x08\0garbage", "is not readable gzip"),
    ],
)
def test_idx_images_names_what_is_wrong(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        batch.idx_images(data)


def test_idx_rows_are_npy_bodies_the_server_reads(images: np.ndarray) -> None:
    table = pa.table({"path": ["a-ubyte", "b-ubyte"], "bytes": [idx(images[:2]), b"junk"]})
    rows = batch._idx_rows(table).to_pylist()
    assert [row["key"] for row in rows] == ["a-ubyte#0", "a-ubyte#1", "b-ubyte"]
    assert rows[2]["error"] == "IDX file is not an IDX file: bad magic number 6a756e6b"
    for row, image in zip(rows[:2], images, strict=False):
        decoded = batch.load_image(row["data"], SHAPE, max_pixels=784, strict=True)
        np.testing.assert_array_equal(decoded[0], image / np.float32(255.0))


def test_load_image_reads_npy_and_encoded_files_alike(images: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, images[0])
    from_npy = batch.load_image(buffer.getvalue(), SHAPE, max_pixels=784, strict=True)
    from_png = batch.load_image(png(images[0]), SHAPE, max_pixels=784, strict=True)
    np.testing.assert_array_equal(from_npy, from_png)
    small = io.BytesIO()
    np.save(small, images[0, :14, :14])
    with pytest.raises(
        ImageError, match=r"^is 14x14; the model takes 28x28 \(VAE_STRICT_SIZE is on\)$"
    ):
        batch.load_image(small.getvalue(), SHAPE, max_pixels=784, strict=True)
    assert batch.load_image(small.getvalue(), SHAPE, max_pixels=784, strict=False).shape == SHAPE


def test_list_files_lists_as_ray_does(tmp_path: Path) -> None:
    for name in ["b.png", "a/c.png", "a/.d.png", ".git/x", "_SUCCESS", "a/_e.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    files, plain = batch.list_files(tmp_path)
    assert [f.relative_to(tmp_path).as_posix() for f in files] == [
        "a/.d.png",
        "a/_e.png",
        "a/c.png",
        "b.png",
    ]
    assert plain
    (tmp_path / "link.png").symlink_to(tmp_path / "b.png")
    assert not batch.list_files(tmp_path)[1]
    with pytest.raises(batch.SourceError, match="does not exist"):
        batch.list_files(tmp_path / "missing")


@pytest.mark.parametrize(
    "names, fmt",
    [
        (["a.parquet", "b.parquet"], "parquet"),
        (["t10k-images-idx3-ubyte.gz", "x-images-idx3-ubyte", "y.idx3"], "idx"),
        (["a.png", "b.parquet"], "images"),
        (["a.png", "t10k-images-idx3-ubyte"], "images"),
    ],
)
def test_detect_format(names: list[str], fmt: str) -> None:
    assert batch.detect_format([Path(name) for name in names]) == fmt


def test_file_problems(tmp_path: Path) -> None:
    (tmp_path / "ok.png").write_bytes(b"x" * 10)
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    assert batch.file_problem(tmp_path / "ok.png", 10) is None
    assert batch.file_problem(tmp_path / "ok.png", 9) == (
        "is 10 bytes, over the limit of 9 (VAE_MAX_UPLOAD_BYTES)"
    )
    assert batch.file_problem(tmp_path / "fifo", None) == "is not a regular file"
    assert batch.file_problem(tmp_path / "dangling", None) == (
        "cannot be read (FileNotFoundError: No such file or directory)"
    )
    packed = gzip.compress(np.random.default_rng(0).bytes(100_000))
    (tmp_path / "ok.png.gz").write_bytes(packed)
    (tmp_path / "cut.idx.gz").write_bytes(packed[: len(packed) // 2])
    assert batch.file_problem(tmp_path / "ok.png.gz", None) is None
    assert batch.file_problem(tmp_path / "cut.idx.gz", None) == (
        "is named as gzip but does not decompress (Truncated compressed stream)"
    )


def scorer_options(bundle: Path, **changes: Any) -> batch.Options:
    """vae score's defaults for `bundle` (seed 0, the calibration's score), with `changes`."""
    argv = [".", "--bundle", str(bundle), "--out", "."]
    args = batch.build_parser().parse_args(argv)
    vars(args).update(changes)
    loaded = load_bundle(bundle, device="cpu")
    return batch.resolve_options(args, loaded, Settings(bundle=bundle))


def test_scorer_turns_bad_rows_into_errors_and_keeps_order(
    bundle: Path, images: np.ndarray
) -> None:
    scorer = batch.Scorer(scorer_options(bundle, mu=True, map=True))
    rows = batch._rows(
        ["good0", "empty", "listed", "good1"],
        [png(images[0]), b"", b"", png(images[1])],
        [None, None, "file is not a regular file", None],
    )
    table = scorer(rows)
    assert table.schema == scorer.schema
    out = table.to_pylist()
    assert [row["key"] for row in out] == ["good0", "empty", "listed", "good1"]
    assert [row["error"] for row in out] == [
        None,
        "input is empty (0 bytes)",
        "file is not a regular file",
        None,
    ]
    assert out[1]["elbo"] is None and out[2]["mu"] is None and out[1]["anomaly_map"] is None
    assert np.isfinite(out[0]["elbo"]) and len(out[3]["mu"]) == scorer.runtime.manifest.latent_dim


def test_scorer_writes_each_images_map_and_mu_as_evaluate_gives_them_alone(
    bundle: Path, images: np.ndarray
) -> None:
    scorer = batch.Scorer(scorer_options(bundle, mu=True, map=True, seed=5))
    table = scorer(
        batch._rows([str(i) for i in range(4)], [png(im) for im in images[:4]], [None] * 4)
    )
    maps = table["anomaly_map"].to_pylist()
    runtime = Runtime(load_bundle(bundle, device="cpu"), Metrics(), max_rows=1024)
    o = scorer.options
    for i, image in enumerate(images[:4]):
        x = image[None, None].astype(np.float32) / np.float32(255.0)
        alone = asyncio.run(
            runtime.evaluate(
                x,
                samples=1,
                k=None,
                score=o.score,
                score_draws=o.score_draws,
                seed=5,
                anomaly_map=True,
            )
        )
        assert alone.anomaly_map is not None
        assert np.asarray(maps[i]).shape == (28, 28)
        np.testing.assert_allclose(maps[i], alone.anomaly_map[0], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(table["mu"][i].as_py(), alone.mu[0], rtol=1e-5, atol=1e-6)
        assert table["anomaly_score"][i].as_py() == pytest.approx(alone.score[0], rel=1e-6)
    assert table.schema.field("anomaly_map").type == pa.list_(pa.list_(pa.float32(), 28), 28)


def test_an_image_the_model_cannot_score_fails_alone(
    bundle: Path, images: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    scorer = batch.Scorer(scorer_options(bundle, map=True))
    evaluate = scorer._evaluate

    def fussy(x: np.ndarray) -> pa.Table:  # as Runtime.evaluate fails on a non-finite decoder
        if (x == 1.0).all(axis=(1, 2, 3)).any():
            raise NotFinite("the decoder output is not finite for rows [0]")
        return evaluate(x)

    monkeypatch.setattr(scorer, "_evaluate", fussy)
    white = np.full((28, 28), 255, np.uint8)
    blobs = [png(images[0]), png(white), b"", png(images[1])]
    out = scorer(batch._rows(["a", "white", "empty", "b"], blobs, [None] * 4)).to_pylist()
    assert [row["error"] for row in out] == [
        None,
        "scoring failed: the decoder output is not finite for rows [0]",
        "input is empty (0 bytes)",
        None,
    ]
    alone = scorer(batch._rows(["a", "b"], [blobs[0], blobs[3]], [None] * 2)).to_pylist()
    assert [out[0], out[3]] == alone


def test_draws_over_the_servers_row_budget_are_refused_and_bound_the_batch(
    bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAE_MAX_ROWS", "1000")
    assert scorer_options(bundle).batch_size == batch.BATCH_IMAGES
    draws_only = {"score": "neg_elbo"}
    assert scorer_options(bundle, k=100, **draws_only).batch_size == 10  # 10 images x 100 draws
    # a map, or a score of the reconstruction (the shipped default), decodes one more row per
    # image at z = mu: both share it
    assert scorer_options(bundle, k=99, map=True, **draws_only).batch_size == 10
    assert scorer_options(bundle, k=99).batch_size == 10
    assert scorer_options(bundle, k=99, map=True).batch_size == 10
    with pytest.raises(
        batch.SourceError,
        match=(
            r"^each image needs 1001 network rows \(the most of --samples, --k and the score's "
            r"draws\), over the limit of 1000 \(VAE_MAX_ROWS\)$"
        ),
    ):
        scorer_options(bundle, k=1001, **draws_only)
    with pytest.raises(
        batch.SourceError,
        match=(
            r"^each image needs 1001 network rows \(the most of --samples, --k and the score's "
            r"draws, \+ 1 for --map\), over the limit of 1000 \(VAE_MAX_ROWS\)$"
        ),
    ):
        scorer_options(bundle, k=1000, map=True)
    with pytest.raises(
        batch.SourceError,
        match=(
            r"^each image needs 1001 network rows \(the most of --samples, --k and the score's "
            r"draws, \+ 1 for recon_error's reconstruction\), over the limit of 1000 "
            r"\(VAE_MAX_ROWS\)$"
        ),
    ):
        scorer_options(bundle, k=1000, score="recon_error")
    big = batch.Scorer(scorer_options(bundle, k=99, map=True))  # 10 images x 100 rows a call
    images = np.random.default_rng(2).integers(0, 256, (12, 28, 28), dtype=np.uint8)
    out = big(batch._rows([str(i) for i in range(12)], [png(im) for im in images], [None] * 12))
    assert out["error"].null_count == 12 and out["anomaly_map"].null_count == 0


def test_a_parquet_source_is_checked_before_the_job(tmp_path: Path) -> None:
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"image": [b"x"], "id": ["a"]}), good)
    assert batch.image_column(good, "image", "id") == pa.binary()
    with pytest.raises(batch.SourceError, match=r"has no column 'nope' \(columns: image, id\)"):
        batch.image_column(good, "image", "nope")
    (tmp_path / "fake.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(batch.SourceError, match="is not a readable Parquet file"):
        batch.image_column(tmp_path / "fake.parquet", "image")


def test_bad_output_and_threshold_are_refused_up_front(
    tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "file").write_text("")
    argv = [str(tmp_path / "a.png"), "--bundle", str(bundle), "--out"]
    assert batch.main([*argv, str(tmp_path / "file" / "out")]) == 2
    assert "cannot be made (Not a directory)" in capsys.readouterr().err
    assert batch.main([*argv, str(tmp_path / "file")]) == 2
    assert "is not an empty directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        batch.main([*argv, str(tmp_path / "new"), "--threshold", "nan"])
    assert exit_info.value.code == 2
    assert "--threshold must be a finite number, got nan" in capsys.readouterr().err
