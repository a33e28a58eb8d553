"""`vae score`: score an image archive with Ray Data, each image exactly as POST /elbo scores it.

    SOURCE --(Ray Data reader)--> rows (key, data, error) --(actor pool of Scorers: the server's
    Runtime on onnxruntime)--> Parquet, one row per input, plus run.json

Every image is scored as if it were sent alone to POST /elbo with the same options and seed
(`Runtime.evaluate(each_alone=True)`): its result never depends on what it was batched with, on
the number of actors or on the cluster. Decoding is the server's (service/imaging.py), the math is
the server's Runtime, the percentile and verdict the route's own `Verdict`: nothing is copied.
A file that cannot be scored becomes a row with its error; rows out = rows in, or the run fails.
Needs the `batch` extra (`pip install 'vae-server[batch]'`); never torch.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gzip
import hashlib
import io
import json
import logging
import math
import os
import re
import stat
import sys
import time
import weakref
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from pydantic import ValidationError

from service.bundle import Bundle, BundleError, Manifest, ScoreName, load_bundle
from service.imaging import ImageError, decode_image, fit_array, read_npy
from service.metrics import Metrics
from service.runtime import F32, NotFinite, Runtime, available_cpus, decodes_at_mu
from service.settings import Device, Settings
from service.verdict import ThresholdSource, Verdict, score_draws, threshold_for

log = logging.getLogger("service.batch")

Format = Literal["images", "parquet", "idx"]
# What flows from the readers to the scorers: one row per input, `data` empty where `error` is set.
ROWS = pa.schema([("key", pa.string()), ("data", pa.binary()), ("error", pa.string())])
RESULT_FIELDS = [
    ("elbo", pa.float64()),
    ("reconstruction", pa.float64()),
    ("kl", pa.float64()),
    ("samples", pa.int64()),
    ("iwae", pa.float64()),
    ("k", pa.int64()),
    ("anomaly_score", pa.float64()),
    ("percentile", pa.float64()),
    ("is_anomaly", pa.bool_()),
]
# CPU slots a reader task reserves. Reading is mostly waiting on storage, and the readers share
# the one slot the scorers leave free (see `connect`), so four of them run at once.
READ_CPUS = 0.25
# Rows per block into the scorers from sources whose one file holds many images (Parquet, IDX):
# a block goes to one actor, so one big row group or IDX file would keep all but one idle. 2,048
# (8 batches) took a 20,000-image Parquet file from 1,294 to 1,610 images/s with 2 actors.
ROWS_PER_BLOCK = 2048
# Most images per onnxruntime call: 256 takes a tenth less CPU per image than 64 (bench/batch.py's
# in-process loop); fewer when images x draws would pass VAE_MAX_ROWS, the server's budget per call.
BATCH_IMAGES = 256
NPY_MAGIC = b"\x93NUMPY"
IDX_NAME = re.compile(r"(-ubyte|\.idx\d?)(\.gz)?$")
# IDX type codes (LeCun's format), as numpy dtypes: big-endian, as the format stores them
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class SourceError(ValueError):
    """SOURCE cannot be read as a whole (missing, empty, no image column); stops before Ray."""


@dataclass(frozen=True)
class Options:
    """What every Scorer needs: the bundle, the device and /elbo's query options, resolved."""

    bundle: Path
    device: Device
    samples: int
    k: int | None
    score: ScoreName
    score_draws: int
    seed: int
    threshold: float | None
    threshold_source: ThresholdSource | None
    max_pixels: int
    strict_size: bool
    rows_per_image: int  # network rows an image needs (VAE_MAX_ROWS counts them)
    batch_size: int  # images per onnxruntime call
    mu: bool
    anomaly_map: bool  # each image's (H, W) map, as POST /elbo?map=array gives it


# ---- sources --------------------------------------------------------------------------------


def list_files(source: Path) -> tuple[list[Path], bool]:
    """SOURCE itself if a file, else the files below it as Ray Data lists a directory: sorted,
    without those whose path below SOURCE starts with '.' or '_' (hidden files, _SUCCESS
    markers). Also whether the tree holds no symbolic link (Ray's listing might follow one)."""
    if source.is_file():
        return [source], not source.is_symlink()
    if not source.is_dir():
        raise SourceError(f"{source} does not exist")
    files, plain = [], True
    for root, dirs, names in os.walk(source):
        plain = plain and not any((Path(root) / d).is_symlink() for d in dirs)
        for name in names:
            path = Path(root) / name
            if not path.relative_to(source).as_posix().startswith((".", "_")):
                files.append(path)
                plain = plain and not path.is_symlink()
    if not files:
        raise SourceError(f"{source} holds no files")
    return sorted(files), plain


def detect_format(files: list[Path]) -> Format:
    """Parquet if every file is *.parquet, IDX if every one is named like MNIST's, else images."""
    if all(f.suffix == ".parquet" for f in files):
        return "parquet"
    if all(IDX_NAME.search(f.name) for f in files):
        return "idx"
    return "images"


def file_problem(path: Path, max_bytes: int | None) -> str | None:
    """Why a file cannot be read (missing, not a regular file, unreadable, over `max_bytes`)."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            return "is not a regular file"  # a FIFO or device would block or never end
        with path.open("rb"):
            pass
    except OSError as exc:
        return f"cannot be read ({type(exc).__name__}: {exc.strerror or exc})"
    if max_bytes is not None and info.st_size > max_bytes:
        return f"is {info.st_size} bytes, over the limit of {max_bytes} (VAE_MAX_UPLOAD_BYTES)"
    return _compression_problem(path)


def _compression_problem(path: Path) -> str | None:
    """Why a file named as compressed (.gz, .bz2, .zst, .lz4, .br) does not decompress: Ray's
    reader decompresses such a file by its name, and one that fails fails its read task, and with
    it the job. Read through once here, in the driver."""
    try:
        codec = pa.Codec.detect(str(path)).name
    except (ValueError, TypeError):  # not a compressed file's name
        return None
    try:
        with pa.input_stream(str(path), compression=codec) as stream:
            while stream.read(1 << 20):
                pass
    except (OSError, pa.ArrowException) as exc:
        return f"is named as {codec} but does not decompress ({exc})"
    return None


def _rows(keys: list[str | None], data: list[bytes], errors: list[str | None]) -> pa.Table:
    return pa.table([keys, data, errors], schema=ROWS)


def _image_rows(batch: pa.Table) -> pa.Table:
    """read_binary_files' (bytes, path) -> rows keyed by path."""
    n = batch.num_rows
    return pa.table([batch["path"], batch["bytes"], pa.nulls(n, pa.string())], schema=ROWS)


def idx_images(data: bytes) -> np.ndarray[Any, Any]:
    """An IDX file (gzip or raw) -> its array `(N, H, W)`; ValueError naming what is wrong."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise ValueError(f"is not readable gzip ({exc})") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in IDX_DTYPES:
        raise ValueError(f"is not an IDX file: bad magic number {data[:4].hex() or '(empty)'}")
    dtype, ndim = np.dtype(IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"is truncated: its header needs {header} bytes, it has {len(data)}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if ndim != 3:
        raise ValueError(f"holds an array of shape {shape}; images are (N, height, width)")
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"is truncated or padded: {len(data)} bytes, its header needs {expected}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def npy_header(dtype: np.dtype[Any], shape: tuple[int, ...]) -> bytes:
    """The .npy header of an array of `dtype` and `shape` (the bytes before its data)."""
    buffer = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def _idx_rows(batch: pa.Table) -> pa.Table:
    """read_binary_files' IDX files -> one row per image (`path#i`) as a .npy body, which the
    server would take as `application/x-npy`; a broken file -> one row with its error."""
    keys: list[str | None] = []
    data: list[bytes] = []
    errors: list[str | None] = []
    for path, content in zip(batch["path"].to_pylist(), batch["bytes"].to_pylist(), strict=True):
        try:
            images = idx_images(content)
        except ValueError as exc:
            keys.append(path)
            data.append(b"")
            errors.append(f"IDX file {exc}")
            continue
        header = npy_header(images.dtype, images.shape[1:])
        keys += [f"{path}#{i}" for i in range(len(images))]
        data += [header + image.tobytes() for image in images]
        errors += [None] * len(images)
    return _rows(keys, data, errors)


def idx_count(path: Path) -> int:
    """Rows an IDX file becomes: its images, or 1 (its error) when it is broken. Parsed as the
    readers parse it, so the count cannot disagree with them (IDX files are MNIST-sized)."""
    try:
        return len(idx_images(path.read_bytes()))
    except (OSError, ValueError):
        return 1


def image_column(path: Path, name: str, key: str | None = None) -> pa.DataType:
    """The type of the image column; SourceError unless it holds bytes (or HF's {bytes, path}),
    the file is no Parquet file, or it lacks the key column."""
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(f"{path} is not a readable Parquet file ({exc})") from None
    for column in (name, key):
        if column is not None and column not in schema.names:
            raise SourceError(
                f"{path} has no column {column!r} (columns: {', '.join(schema.names)})"
            )
    kind = schema.field(name).type
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        kind = kind.field("bytes").type
    if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise SourceError(
            f"{path}: column {name!r} is {schema.field(name).type}; it must hold the image "
            "files' bytes (binary, or a struct with a 'bytes' field)"
        )
    return kind


def _parquet_rows(batch: pa.Table, image: str, key: str | None) -> pa.Table:
    """Parquet rows -> rows keyed by the key column, else by the image bytes' SHA-256."""
    column = batch[image]
    if pa.types.is_struct(column.type):
        column = pc.struct_field(column, "bytes")
    blobs = column.to_pylist()
    keys = (
        [None if k is None else str(k) for k in batch[key].to_pylist()]
        if key
        else [None if b is None else f"sha256:{hashlib.sha256(b).hexdigest()}" for b in blobs]
    )
    errors = [f"column {image!r} is null" if b is None else None for b in blobs]
    return _rows(keys, [b or b"" for b in blobs], errors)


def read_source(
    source: Path, fmt: Format, *, image: str, key: str | None, max_bytes: int
) -> tuple[ray.data.Dataset, int]:
    """SOURCE as a Dataset of ROWS, read by Ray Data's own readers, and its row count.

    Files that cannot be read (or, for images, are over `max_bytes`, the server's body limit)
    are found before Ray reads anything and become rows with their error: a reader task that
    failed on one would fail the job. A tree without them goes to Ray as one path, which Ray
    lists in its read tasks; else Ray gets the list of readable files (it plans each one in the
    driver: about a millisecond a file).
    """
    files, plain = list_files(source)
    if fmt == "parquet":
        for path in files:
            image_column(path, image, key)
        rows_in = sum(pq.read_metadata(path).num_rows for path in files)
        if rows_in == 0:
            raise SourceError(f"{source} holds no rows: nothing to score")
        columns = [image] + ([key] if key else [])
        table = ray.data.read_parquet([str(f) for f in files], num_cpus=READ_CPUS)
        table = table.select_columns(columns)  # pushed down into the reader
        to_rows = functools.partial(_parquet_rows, image=image, key=key)
        rows = table.map_batches(to_rows, batch_format="pyarrow", num_cpus=READ_CPUS)
        return rows.repartition(target_num_rows_per_block=ROWS_PER_BLOCK), rows_in
    problems = {str(f): file_problem(f, None if fmt == "idx" else max_bytes) for f in files}
    readable = [path for path, problem in problems.items() if problem is None]
    broken = {path: f"file {problem}" for path, problem in problems.items() if problem}
    parts = []
    if readable:
        paths = [str(source)] if plain and not broken else readable
        raw = ray.data.read_binary_files(paths, include_paths=True, num_cpus=READ_CPUS)
        if fmt == "idx":  # one file at a time: each expands into its images
            rows = raw.map_batches(
                _idx_rows, batch_size=1, batch_format="pyarrow", num_cpus=READ_CPUS
            )
            parts.append(rows.repartition(target_num_rows_per_block=ROWS_PER_BLOCK))
        else:
            parts.append(raw.map_batches(_image_rows, batch_format="pyarrow"))
    if broken:
        table = _rows(list(broken), [b""] * len(broken), list(broken.values()))
        parts.append(ray.data.from_arrow(table))
    if fmt == "images":
        rows_in = len(files)
    else:
        rows_in = sum(idx_count(Path(path)) for path in readable) + len(broken)
    return (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]), rows_in


# ---- scoring --------------------------------------------------------------------------------


def load_image(
    data: bytes,
    shape: tuple[int, int, int],
    *,
    max_pixels: int,
    strict: bool,
    background: float = 0.0,
) -> F32:
    """One input file -> `(C, H, W)` at the model's size, as the server reads an upload or a
    `.npy` body; ImageError names the problem."""
    if not data.startswith(NPY_MAGIC):
        return decode_image(
            data, shape, max_pixels=max_pixels, strict=strict, background=background
        )
    (array,) = read_npy(
        data, max_images=1, max_pixels=max_pixels, images_limit="vae score reads one per .npy file"
    )
    return fit_array(array, shape, strict=strict)


class Scorer:
    """One actor: the bundle loaded once, then batches of ROWS -> result rows (`schema`)."""

    def __init__(self, options: Options) -> None:
        self.options = options
        bundle: Bundle = load_bundle(options.bundle, device=options.device, threads=1)
        bundle.warm_up()
        rows = options.batch_size * options.rows_per_image
        self.runtime = Runtime(bundle, Metrics(), max_rows=rows)
        self.verdict = Verdict(
            options.seed,
            options.score,
            options.score_draws,
            options.threshold,
            options.threshold_source,
            bundle.manifest.score_table(options.score),
            heat=None,  # the map goes into its own column as an array, not into the rows
        )
        self.schema = result_schema(bundle.manifest, mu=options.mu, anomaly_map=options.anomaly_map)
        self.fields = pa.schema(list(self.schema)[1:-1])  # those scoring fills in
        # One event loop for the actor's life. asyncio.run per batch would cost a fifth of the
        # CPU: on the main thread it checks the SIGINT handler, and Python's signal module then
        # formats the finished task's repr, arrays and all, into an error it throws away.
        self.loop = asyncio.new_event_loop()
        weakref.finalize(self, self.loop.close)

    def __call__(self, batch: pa.Table) -> pa.Table:
        errors: list[str | None] = batch["error"].to_pylist()
        images: dict[int, F32] = {}
        manifest = self.runtime.manifest
        for i, data in enumerate(batch["data"].to_pylist()):
            if errors[i] is not None:
                continue
            try:
                images[i] = load_image(
                    data,
                    manifest.input_shape,
                    max_pixels=self.options.max_pixels,
                    strict=self.options.strict_size,
                    background=manifest.image.background,
                )
            except ImageError as exc:
                errors[i] = f"input {exc}"
            except Exception as exc:  # a decoder bug must not end the job: the row says what
                errors[i] = f"input could not be decoded ({type(exc).__name__}: {exc})"
        x = np.zeros((len(images), *manifest.input_shape), np.float32)  # (B, C, H, W)
        for row, image in enumerate(images.values()):
            x[row] = image
        scored, done, failed = self._score(list(images), x)
        errors = [failed.get(i, error) for i, error in enumerate(errors)]
        # each input's row in `scored`; null (every field null) where it failed
        where = dict(zip(done, range(len(done)), strict=True))
        rows = scored.take(pa.array([where.get(i) for i in range(len(errors))], pa.int64()))
        columns = [batch["key"], *rows.columns, pa.array(errors, pa.string())]
        return pa.Table.from_arrays(columns, schema=self.schema)

    def _score(self, index: list[int], x: F32) -> tuple[pa.Table, list[int], dict[int, str]]:
        """The result fields of the images at input positions `index`, the positions scored and
        why the others failed, `batch_size` images per onnxruntime call. An image the model
        cannot score (its decoder output not finite) is retried alone, so it fails by itself and
        the rest of its batch goes on."""
        size = self.options.batch_size
        if len(index) > size:
            chunks = range(0, len(index), size)
            return merge([self._score(index[i : i + size], x[i : i + size]) for i in chunks])
        try:
            return self._evaluate(x), index, {}
        except NotFinite as exc:
            if len(index) == 1:
                return self._evaluate(x[:0]), [], {index[0]: f"scoring failed: {exc}"}
        return merge([self._score([i], image[None]) for i, image in zip(index, x, strict=True)])

    def _evaluate(self, x: F32) -> pa.Table:
        """The result fields of images `x (B, C, H, W)`, as POST /elbo computes them for each."""
        o, fields = self.options, self.fields
        if len(x) == 0:
            return fields.empty_table()
        result = self.loop.run_until_complete(
            self.runtime.evaluate(
                x,
                samples=o.samples,
                k=o.k,
                score=o.score,
                score_draws=o.score_draws,
                seed=o.seed,
                anomaly_map=o.anomaly_map,
                each_alone=True,
            )
        )
        columns = self.verdict.columns(x, result, o.samples, o.k)
        columns["mu"] = result.mu
        columns["anomaly_map"] = result.anomaly_map
        arrays = [
            fixed_size_lists(columns[f.name], f.type)
            if pa.types.is_fixed_size_list(f.type)
            else pa.array(columns[f.name], f.type)
            for f in fields
        ]
        return pa.Table.from_arrays(arrays, schema=fields)


def merge(
    parts: list[tuple[pa.Table, list[int], dict[int, str]]],
) -> tuple[pa.Table, list[int], dict[int, str]]:
    """Scorer._score's answers for consecutive parts of a batch, as one."""
    return (
        pa.concat_tables([table for table, _, _ in parts]),
        [i for _, done, _ in parts for i in done],
        {i: error for _, _, failed in parts for i, error in failed.items()},
    )


def result_schema(manifest: Manifest, *, mu: bool, anomaly_map: bool) -> pa.Schema:
    """The output table's columns: key, POST /elbo's fields (+ mu, + the anomaly map), error."""
    _, h, w = manifest.input_shape
    fields = [("key", pa.string()), *RESULT_FIELDS]
    if mu:
        fields.append(("mu", pa.list_(pa.float32(), manifest.latent_dim)))
    if anomaly_map:  # (H, W) per image, nested as POST /elbo?map=array nests it
        fields.append(("anomaly_map", pa.list_(pa.list_(pa.float32(), w), h)))
    return pa.schema([*fields, ("error", pa.string())])


def fixed_size_lists(values: np.ndarray[Any, Any], kind: pa.DataType) -> pa.Array:
    """A numpy array `(B, *shape)` as an Arrow array of `kind` (fixed-size lists, nested as
    `shape`), without going through Python lists."""
    if pa.types.is_fixed_size_list(kind):
        inner = fixed_size_lists(values.reshape(-1, *values.shape[2:]), kind.value_type)
        return pa.FixedSizeListArray.from_arrays(inner, kind.list_size)
    return pa.array(values.reshape(-1).astype(kind.to_pandas_dtype()), kind)


# ---- the run --------------------------------------------------------------------------------


def resolve_options(args: argparse.Namespace, bundle: Bundle, settings: Settings) -> Options:
    """/elbo's query options, resolved against the bundle and the server's VAE_* settings as the
    route resolves them."""
    runtime = Runtime(bundle, Metrics(), max_rows=1)
    score: ScoreName = args.score or bundle.manifest.default_score
    try:
        draws = score_draws(runtime, score, args.samples, args.k)
    except ValueError as exc:
        raise SourceError(f"--score {score}: {exc}") from None
    threshold, source = threshold_for(runtime, settings, score, args.threshold)
    # network rows per image, as Runtime.evaluate counts them: its draws, and one at z = mu for
    # a map or a score of the reconstruction
    at_mu = decodes_at_mu(score, args.map)
    rows = max(args.samples, args.k or 0, draws, 1) + at_mu
    if rows > settings.max_rows:  # POST /elbo would refuse every image
        extra = ", + 1 for --map" if args.map else f", + 1 for {score}'s reconstruction"
        raise SourceError(
            f"each image needs {rows} network rows (the most of --samples, --k and the score's "
            f"draws{extra if at_mu else ''}), over the limit of {settings.max_rows} (VAE_MAX_ROWS)"
        )
    return Options(
        bundle=args.bundle.resolve(),
        device=args.device,
        samples=args.samples,
        k=args.k,
        score=score,
        score_draws=draws,
        seed=args.seed,
        threshold=threshold,
        threshold_source=source,
        max_pixels=settings.max_pixels,
        strict_size=settings.strict_size,
        rows_per_image=rows,
        batch_size=max(1, min(BATCH_IMAGES, settings.max_rows // rows)),
        mu=args.mu,
        anomaly_map=args.map,
    )


def connect(address: str | None, device: Device) -> tuple[int, bool]:
    """Join the cluster at `address` (or RAY_ADDRESS), or the Ray this process already runs, else
    start Ray here. Returns the most scorers that fit and whether Ray was started here (and so
    is to be shut down after).

    Ray Data's own tasks (listing, reading, writing) each take a CPU slot, and would wait forever
    behind scorers that hold every slot; so one slot is left to them. They wait on I/O, so a
    Ray started here gets one logical CPU more than the usable cores: one scorer per core.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    started = not (address or ray.is_initialized())
    if started:
        ray.init(num_cpus=available_cpus() + 1, include_dashboard=False, log_to_driver=False)
    elif not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    resources = ray.cluster_resources()  # type: ignore[no-untyped-call]
    if device == "cuda":
        return max(1, int(resources.get("GPU", 0))), started
    return max(1, int(resources.get("CPU", 2)) - 1), started


@dataclass(frozen=True)
class Report:
    """run.json: what was scored with what, and how it went."""

    bundle: dict[str, Any]
    source: str
    format: str
    options: dict[str, Any]
    rows_in: int
    rows_out: int
    failures: int
    actors: int
    started: str
    wall_s: float  # all of it, Ray's start included
    job_s: float  # the Ray Data job: read, score, write
    images_per_s: float  # rows_out / wall_s
    output: str


def count_output(directory: Path) -> tuple[int, int]:
    """(rows, rows with an error) of the Parquet files written to `directory`."""
    table = pq.read_table(directory, columns=["error"])
    return table.num_rows, table.num_rows - table["error"].null_count


def score(args: argparse.Namespace) -> Report:
    """Run the job; the Report is also written to OUT/run.json."""
    started, t0 = datetime.now(UTC).isoformat(timespec="seconds"), time.perf_counter()
    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SourceError(f"--out {out} is not an empty directory; name a new directory")
    try:
        out.mkdir(parents=True, exist_ok=True)  # now, not after the job: can it be written?
    except OSError as exc:
        raise SourceError(f"--out {out} cannot be made ({exc.strerror or exc})") from None
    device: Device = args.device
    # checksums and graphs checked before Ray starts, on the CPU: the driver may have no GPU
    bundle = load_bundle(args.bundle, device="cpu", threads=1)
    settings = Settings(bundle=args.bundle, device=device)
    options = resolve_options(args, bundle, settings)
    fmt = detect_format(list_files(args.source)[0]) if args.format == "auto" else args.format
    fits, started_here = connect(args.address, device)
    actors = args.actors or fits
    job = time.perf_counter()
    try:
        if actors > fits:
            raise SourceError(
                f"--actors {actors}: this Ray has room for {fits} (one CPU per scorer and one "
                "left for Ray Data's reads and writes; one GPU each with --device cuda)"
            )
        ds, rows_in = read_source(
            args.source,
            fmt,
            image=args.image_column,
            key=args.key_column,
            max_bytes=settings.max_upload_bytes,
        )
        scored = ds.map_batches(
            Scorer,
            fn_constructor_kwargs={"options": options},
            batch_size=options.batch_size,
            batch_format="pyarrow",
            # A pool of fixed size, each actor given a block only when free: an autoscaling pool
            # (min_size=1) left one of two actors 25-30 % of the work (their CPU time). A source
            # read as fewer blocks than actors leaves some idle (Ray warns, naming the operator).
            compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
            num_cpus=1 if device == "cpu" else 0,
            num_gpus=1 if device == "cuda" else 0,
        )
        scored.write_parquet(str(out / "scores"))
        job = time.perf_counter() - job
        log.debug("Ray Data's stats of the job:\n%s", scored.stats())
    finally:
        if started_here:
            ray.shutdown()
    rows_out, failures = count_output(out / "scores")
    wall = time.perf_counter() - t0
    m = bundle.manifest
    report = Report(
        bundle={
            "path": str(args.bundle.resolve()),
            "name": m.name,
            "version": m.version,
            "files": {name: entry.sha256 for name, entry in m.files.items()},
        },
        source=str(args.source.resolve()),
        format=fmt,
        options={k: v for k, v in asdict(options).items() if k not in ("bundle", "device")}
        | {"device": device},
        rows_in=rows_in,
        rows_out=rows_out,
        failures=failures,
        actors=actors,
        started=started,
        wall_s=round(wall, 3),
        job_s=round(job, 3),
        images_per_s=round(rows_out / wall, 1),
        output=str((out / "scores").resolve()),
    )
    (out / "run.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def build_parser() -> argparse.ArgumentParser:
    """`vae score`'s arguments; /elbo's query options keep their names and defaults."""
    parser = argparse.ArgumentParser(
        prog="vae score",
        description="Score every image of SOURCE for anomalies with Ray Data, as POST /elbo "
        "scores each image sent alone; writes OUT/scores/*.parquet (one row per input, with an "
        "error column) and OUT/run.json. Image limits come from the server's VAE_MAX_PIXELS, "
        "VAE_MAX_UPLOAD_BYTES and VAE_STRICT_SIZE.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "source",
        type=Path,
        metavar="SOURCE",
        help="a directory tree of image files (any format the server takes, .npy included; "
        "hidden files skipped), Parquet file(s) with an image-bytes column, or IDX file(s)",
    )
    parser.add_argument("--bundle", type=Path, required=True, help="bundle directory")
    parser.add_argument("--out", type=Path, required=True, help="new output directory")
    parser.add_argument(
        "--format",
        choices=["auto", "images", "parquet", "idx"],
        default="auto",
        help="auto: parquet if every file is *.parquet, idx if every one is *-ubyte[.gz]",
    )
    parser.add_argument(
        "--image-column",
        default="image",
        help="Parquet: column of image bytes (or HF's struct {bytes, path})",
    )
    parser.add_argument(
        "--key-column", help="Parquet: column that keys each row (default: the image's SHA-256)"
    )
    parser.add_argument("--samples", type=int, default=1, help="draws for the ELBO")
    parser.add_argument("--k", type=int, help="importance samples for the IWAE bound")
    parser.add_argument("--seed", type=int, default=0, help="seed of eps")
    parser.add_argument(
        "--score", choices=list(get_args(ScoreName)), help="default: the bundle's calibration's"
    )
    parser.add_argument("--threshold", type=float, help="anomaly threshold on the score")
    parser.add_argument("--mu", action="store_true", help="also write mu, the latent mean")
    parser.add_argument(
        "--map",
        action="store_true",
        help="also write each image's (H, W) anomaly map, as POST /elbo?map=array returns it",
    )
    parser.add_argument(
        "--address", help="Ray cluster to run on (default: $RAY_ADDRESS, else Ray started here)"
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one GPU per actor"
    )
    parser.add_argument(
        "--actors", type=int, help="scoring actors (default: one per CPU, or per GPU)"
    )
    parser.add_argument(
        "--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info"
    )
    return parser


def main(argv: list[str]) -> int:
    """`vae score`: run, print the summary line; 2 for bad input, 1 if rows were lost."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("samples", "k", "actors"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.threshold is not None and not math.isfinite(args.threshold):
        parser.error(f"--threshold must be a finite number, got {args.threshold}")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        report = score(args)
    except (SourceError, BundleError) as exc:
        print(f"vae score: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"vae score: invalid VAE_* settings:\n{exc}", file=sys.stderr)
        return 2
    log.info(
        "scored %d of %d inputs (%d failed) in %.1f s (job %.1f s), %.0f images/s with %d "
        "actors -> %s",
        report.rows_out - report.failures,
        report.rows_in,
        report.failures,
        report.wall_s,
        report.job_s,
        report.images_per_s,
        report.actors,
        report.output,
    )
    if report.rows_out != report.rows_in:
        print(
            f"vae score: {report.rows_in} inputs but {report.rows_out} rows written",
            file=sys.stderr,
        )
        return 1
    return 0
