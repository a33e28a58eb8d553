"""Load a model bundle (docs/BUNDLE.md): validate the manifest, verify the files, open sessions."""

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import numpy as np
import onnxruntime as ort
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from service.memory import trim_heaps
from service.objective import Mixture
from service.settings import Device

log = logging.getLogger(__name__)

# 1: P(z) = N(0, I); 2 adds a mixture prior (its parameters in prior.npz). The exporter writes 1
# for bundles with N(0, I), so that servers before 2 still read them.
SCHEMA_VERSIONS = (1, 2)
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
PRIOR_FILE = "prior.npz"
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# Rows per decoder call: bounds the memory of IWAE with large k; normal requests fit in one call.
MAX_DECODE_ROWS = 8192

Array = np.ndarray[Any, np.dtype[np.float32]]


# The anomaly scores this server computes (service/objective.py); a manifest naming another is
# refused with a message naming it.
ScoreName = Literal[
    "neg_elbo",
    "neg_iwae",
    "recon_error",
    "blur_recon_rel",
    "blur_recon_contrast",
    "blur_recon_energy",
]
SCORE_NAMES: tuple[str, ...] = get_args(ScoreName)


def _known_score(name: object) -> object:
    if isinstance(name, str) and name not in SCORE_NAMES:
        raise ValueError(
            f"unknown anomaly score {name!r}: this server knows {', '.join(SCORE_NAMES)} "
            "(was the bundle exported by a newer version?)"
        )
    return name


KnownScore = Annotated[ScoreName, BeforeValidator(_known_score)]


class BundleError(RuntimeError):
    """The bundle cannot be served; the message names the file and what is wrong with it."""


class ImageShape(BaseModel):
    """The model's input image layout."""

    channels: Literal[1, 3]
    height: int = Field(ge=1, le=4096)
    width: int = Field(ge=1, le=4096)
    background: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="grey level of the training images' background (MNIST: 0, black); "
        "transparent pixels of an upload are composited onto it",
    )


class FileEntry(BaseModel):
    """Checksum and size of one ONNX file."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=1)


class PriorSpec(BaseModel):
    """A mixture-of-Gaussians prior P(z); its parameters are arrays in `file` (docs/BUNDLE.md)."""

    model_config = ConfigDict(extra="allow")

    kind: Literal["mixture"]
    components: int = Field(ge=1, le=65536)
    file: Literal["prior.npz"] = "prior.npz"


class ScoreCalibration(BaseModel):
    """Quantiles of one anomaly score on held-out normal data."""

    model_config = ConfigDict(extra="allow")

    samples: int | None = Field(default=None, ge=1)
    k: int | None = Field(default=None, ge=1)
    seed: int | None = None
    percentiles: list[float]
    values: list[float]

    @model_validator(mode="after")
    def _check_table(self) -> "ScoreCalibration":
        if len(self.percentiles) != len(self.values):
            raise ValueError(
                f"percentiles ({len(self.percentiles)}) and values ({len(self.values)}) "
                "differ in length"
            )
        for name, column in (("percentiles", self.percentiles), ("values", self.values)):
            if any(b < a for a, b in pairwise(column)):
                raise ValueError(f"{name} must be ascending")
        return self

    @property
    def usable(self) -> bool:
        """Whether the table has points to interpolate in."""
        return len(self.values) > 0


class FalsePositiveRate(BaseModel):
    """The default threshold's false-positive rate on held-out normal images not in the tables."""

    model_config = ConfigDict(extra="allow")

    score: KnownScore
    threshold: float
    rate: float = Field(ge=0.0, le=1.0)
    images: int = Field(ge=1)


class Calibration(BaseModel):
    """Anomaly-score calibration written by the exporter (bundles before 2.1 have no
    false_positive_rate or selection)."""

    model_config = ConfigDict(extra="allow")

    data: str | None = None
    default_score: KnownScore = "neg_elbo"
    threshold_percentile: float = Field(default=99.0, ge=0.0, le=100.0)
    false_positive_rate: FalsePositiveRate | None = None
    selection: dict[str, Any] | None = Field(
        default=None, description="how the default score was chosen, and the figures"
    )
    scores: dict[KnownScore, ScoreCalibration] = {}


class Manifest(BaseModel):
    """`manifest.json`, schema version 1 or 2."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    schema_version: Literal[1, 2]
    name: str
    version: str
    created: str | None = None
    image: ImageShape
    latent_dim: int = Field(ge=1, le=65536)
    likelihood: Literal["bernoulli", "gaussian"]
    sigma: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    decoder_output: Literal["logits", "mean"]
    architecture: str | None = None
    config: dict[str, Any] = {}
    data: dict[str, Any] = {}
    training: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    files: dict[str, FileEntry]
    prior: PriorSpec | None = Field(
        default=None, description="P(z) when it is not N(0, I) (schema 2)"
    )
    calibration: Calibration | None = None

    @model_validator(mode="after")
    def _check_consistency(self) -> "Manifest":
        if self.likelihood == "gaussian" and self.sigma is None:
            raise ValueError("sigma must be a positive number when likelihood is gaussian")
        expected = "logits" if self.likelihood == "bernoulli" else "mean"
        if self.decoder_output != expected:
            raise ValueError(
                f"decoder_output must be {expected!r} for likelihood {self.likelihood!r}"
            )
        for name in self.file_names:
            if name not in self.files:
                raise ValueError(f"files has no entry for {name}")
        if (self.prior is not None) != (self.schema_version == 2):
            raise ValueError("a mixture prior comes with schema_version 2, and only with it")
        return self

    @property
    def file_names(self) -> tuple[str, ...]:
        """The files the bundle holds besides manifest.json."""
        return (ENCODER_FILE, DECODER_FILE, *((PRIOR_FILE,) if self.prior else ()))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """`(C, H, W)` of one image."""
        return (self.image.channels, self.image.height, self.image.width)

    @property
    def default_score(self) -> ScoreName:
        """The anomaly score used when a request names none."""
        return self.calibration.default_score if self.calibration else "neg_elbo"

    def score_table(self, score: ScoreName) -> ScoreCalibration | None:
        """The calibration of `score`, if the bundle has one."""
        return self.calibration.scores.get(score) if self.calibration else None


def read_manifest(path: Path) -> Manifest:
    """Parse and validate `path/manifest.json`; BundleError names what is wrong."""
    file = path / "manifest.json"
    if path.is_file():
        raise BundleError(
            f"{path} is a file; a bundle is a directory holding manifest.json, encoder.onnx and "
            "decoder.onnx, and prior.npz for a mixture prior (vae export writes one)"
        )
    if not path.is_dir():
        raise BundleError(f"bundle directory {path} does not exist")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{file} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{file} is not readable JSON: {exc}") from None
    if isinstance(raw, dict) and raw.get("schema_version") not in SCHEMA_VERSIONS:
        raise BundleError(
            f"{file}: schema_version {raw.get('schema_version')!r} is not supported "
            f"(this server reads {' and '.join(map(str, SCHEMA_VERSIONS))})"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or '(root)'}: {err['msg']}" for err in exc.errors()
        )
        raise BundleError(f"{file} is invalid: {problems}") from None


def verify_file(path: Path, entry: FileEntry) -> None:
    """Check size and SHA-256 of one bundle file against the manifest."""
    if not path.is_file():
        raise BundleError(f"{path} is missing")
    size = path.stat().st_size
    if size != entry.bytes:
        raise BundleError(f"{path} has {size} bytes, the manifest says {entry.bytes} (corrupt?)")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != entry.sha256:
        raise BundleError(f"{path} fails its SHA-256 check against manifest.json (corrupt?)")


def select_providers(device: Device, available: Sequence[str] | None = None) -> list[str]:
    """Execution providers for `device`, CPU always last as the fallback."""
    available = list(ort.get_available_providers() if available is None else available)
    if device == "cuda" and CUDA not in available:
        raise BundleError(
            f"device cuda asked for, but onnxruntime has no {CUDA} (available: "
            f"{', '.join(available)}); install onnxruntime-gpu on a machine with a GPU, or use "
            "device auto or cpu"
        )
    if device in ("cuda", "auto") and CUDA in available:
        return [CUDA, CPU]
    return [CPU]


def _check_io(
    path: Path, args: Sequence[ort.NodeArg], kind: str, expected: dict[str, tuple[int, ...]]
) -> None:
    """Names, dtype and static dims of a session's inputs or outputs; axis 0 is the batch."""
    found = {arg.name: arg for arg in args}
    if set(found) != set(expected):
        raise BundleError(f"{path}: {kind} are {sorted(found)}, expected {sorted(expected)}")
    for name, dims in expected.items():
        arg = found[name]
        if arg.type != "tensor(float)":
            raise BundleError(f"{path}: {kind[:-1]} {name!r} is {arg.type}, expected tensor(float)")
        shape = list(arg.shape)
        static_ok = len(shape) == len(dims) + 1 and all(
            not isinstance(have, int) or have == want
            for have, want in zip(shape[1:], dims, strict=True)
        )
        if not static_ok:
            raise BundleError(
                f"{path}: {kind[:-1]} {name!r} has shape {shape}, expected [batch, "
                f"{', '.join(map(str, dims))}]"
            )
        if isinstance(shape[0], int):
            raise BundleError(
                f"{path}: {kind[:-1]} {name!r} has a fixed batch of {shape[0]}; "
                "the batch axis must be dynamic"
            )


def read_prior(path: Path, spec: PriorSpec, latent_dim: int) -> Mixture:
    """The mixture's arrays from `path` (prior.npz): `logits (K,)`, `means (K, D)` and
    `logvars (K, D)`, finite float32; BundleError names what is wrong."""
    shapes = {
        "logits": (spec.components,),
        "means": (spec.components, latent_dim),
        "logvars": (spec.components, latent_dim),
    }
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError("it is one .npy array")
        with npz:
            arrays = {name: np.asarray(npz[name]) for name in shapes if name in npz.files}
            names = set(npz.files)
    except Exception as exc:  # numpy and zipfile raise many types for a bad file
        raise BundleError(f"{path} is not a readable .npz of arrays: {exc}") from None
    if names != set(shapes):
        raise BundleError(f"{path} holds {sorted(names)}, expected {sorted(shapes)}")
    for name, shape in shapes.items():
        array = arrays[name]
        if array.shape != shape or array.dtype != np.float32:
            raise BundleError(
                f"{path}: {name} is {array.dtype} {array.shape}, expected float32 {shape} "
                f"({spec.components} components of latent_dim {latent_dim})"
            )
        if not np.isfinite(array).all():
            raise BundleError(f"{path}: {name} is not finite everywhere")
    return Mixture(**arrays)


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: manifest plus one onnxruntime session per network, created once, and the
    prior's arrays when it is a mixture (None: N(0, I))."""

    path: Path
    manifest: Manifest
    encoder: ort.InferenceSession
    decoder: ort.InferenceSession
    prior: Mixture | None = None

    @property
    def providers(self) -> list[str]:
        """The providers onnxruntime actually assigned."""
        return list(self.encoder.get_providers())

    def encode(self, x: Array) -> tuple[Array, Array]:
        """`x (B, C, H, W)` in [0, 1] -> `mu, logvar (B, D)`, one batched call."""
        mu, logvar = self.encoder.run(["mu", "logvar"], {"x": x})
        return np.asarray(mu, dtype=np.float32), np.asarray(logvar, dtype=np.float32)

    def decode(self, z: Array) -> Array:
        """`z (N, D)` -> decoder output `(N, C, H, W)` (logits or mean), in as few calls as fit."""
        name = self.manifest.decoder_output
        if len(z) <= MAX_DECODE_ROWS:
            return np.asarray(self.decoder.run([name], {"z": z})[0], dtype=np.float32)
        chunks = [
            self.decoder.run([name], {"z": z[i : i + MAX_DECODE_ROWS]})[0]
            for i in range(0, len(z), MAX_DECODE_ROWS)
        ]
        return np.concatenate(chunks).astype(np.float32, copy=False)

    def release_memory(self) -> None:
        """Give back what large calls left in onnxruntime's arenas (which otherwise keep their
        peak for good), then trim the C heaps: one one-row call per network that shrinks its
        arena, freeing every region no call is using."""
        options = ort.RunOptions()
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        c, h, w = self.manifest.input_shape
        (mu,) = self.encoder.run(["mu"], {"x": np.zeros((1, c, h, w), np.float32)}, options)
        self.decoder.run([self.manifest.decoder_output], {"z": mu}, options)
        trim_heaps()

    def warm_up(self) -> None:
        """Run each network once so the first request does not pay for lazy initialisation."""
        c, h, w = self.manifest.input_shape
        mu, _ = self.encode(np.zeros((2, c, h, w), dtype=np.float32))
        self.decode(mu)


def _session(path: Path, options: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad models
        raise BundleError(f"{path} cannot be loaded by onnxruntime: {exc}") from None


def load_bundle(path: Path, *, device: Device = "auto", threads: int = 1) -> Bundle:
    """Validate and open the bundle at `path`; any problem raises BundleError naming the file."""
    manifest = read_manifest(path)
    for name in manifest.file_names:
        verify_file(path / name, manifest.files[name])
    prior = None
    if manifest.prior is not None:
        prior = read_prior(path / PRIOR_FILE, manifest.prior, manifest.latent_dim)
    providers = select_providers(device)

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: provider fallbacks are reported by us
    encoder = _session(path / ENCODER_FILE, options, providers)
    decoder = _session(path / DECODER_FILE, options, providers)
    active = encoder.get_providers()[0]
    if providers[0] == CUDA and active != CUDA:
        if device == "cuda":
            raise BundleError(
                f"VAE_DEVICE=cuda but onnxruntime could not start {CUDA} for "
                f"{path / ENCODER_FILE} (CUDA/cuDNN libraries missing?); set VAE_DEVICE=auto or cpu"
            )
        log.warning("%s is available but failed to start; serving on %s", CUDA, active)

    c, h, w = manifest.input_shape
    d = manifest.latent_dim
    _check_io(path / ENCODER_FILE, encoder.get_inputs(), "inputs", {"x": (c, h, w)})
    _check_io(path / ENCODER_FILE, encoder.get_outputs(), "outputs", {"mu": (d,), "logvar": (d,)})
    _check_io(path / DECODER_FILE, decoder.get_inputs(), "inputs", {"z": (d,)})
    _check_io(
        path / DECODER_FILE, decoder.get_outputs(), "outputs", {manifest.decoder_output: (c, h, w)}
    )
    log.info("loaded bundle %s %s from %s on %s", manifest.name, manifest.version, path, active)
    return Bundle(path=path, manifest=manifest, encoder=encoder, decoder=decoder, prior=prior)
