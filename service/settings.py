"""Server configuration from `VAE_*` environment variables, validated once at start-up."""

import logging
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Device = Literal["auto", "cpu", "cuda"]
LogLevel = Literal["critical", "error", "warning", "info", "debug"]
# The default MNIST bundle ships inside the package, so `vae serve` works from any directory.
DEFAULT_BUNDLE = Path(__file__).resolve().parent / "bundles" / "mnist"


class Settings(BaseSettings):
    """Everything the server reads from its environment; invalid values stop start-up."""

    model_config = SettingsConfigDict(env_prefix="VAE_", extra="forbid", frozen=True)

    bundle: Path = Field(
        default=DEFAULT_BUNDLE,
        description="bundle directory (manifest.json, encoder/decoder.onnx); default: the MNIST "
        "bundle shipped in the package",
    )
    device: Device = Field(default="auto", description="auto: CUDA when available, else CPU")
    threads: int = Field(
        default=1,
        ge=0,
        le=256,
        description="onnxruntime intra-op threads per call (0: one per core); concurrent requests "
        "already run in parallel on the threadpool, so 1 gives the best throughput on small CPUs",
    )
    max_images: int = Field(default=64, ge=1, le=4096, description="images (or z rows) per request")
    max_upload_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024, description="request body limit in bytes (413 above)"
    )
    max_pixels: int = Field(
        default=4096 * 4096,
        ge=1,
        description="pixels (width x height) a request's images may declare in all, checked "
        "from their headers before decoding (413 above)",
    )
    max_sample_n: int = Field(default=256, ge=1, le=65536, description="largest n for GET /sample")
    max_k: int = Field(
        default=1000, ge=1, le=100_000, description="largest importance samples k for /elbo"
    )
    max_samples: int = Field(
        default=100, ge=1, le=100_000, description="largest ELBO samples for /elbo"
    )
    max_map_pixels: int = Field(
        default=512 * 512,
        ge=1,
        le=1 << 26,
        description="largest images x height x width of one /elbo request asking for map",
    )
    strict_size: bool = Field(
        default=False, description="reject images whose size differs from the model"
    )
    anomaly_threshold: float | None = Field(
        default=None,
        allow_inf_nan=False,
        description="threshold on the default anomaly score; default: the manifest calibration",
    )
    api_key: SecretStr | None = Field(
        default=None,
        description="when set, model endpoints need X-API-Key or Authorization: Bearer",
    )
    log_level: LogLevel = "info"
    # on by default, measured with bench/serving.py: with no added wait (max_batch_delay_ms=0) it
    # costs nothing at concurrency 1 and saves onnxruntime calls under load
    batching: bool = Field(
        default=True,
        description="gather concurrent requests' rows into one onnxruntime call per network",
    )
    max_batch_size: int = Field(
        default=64, ge=1, le=65536, description="most rows in one micro-batch (VAE_BATCHING)"
    )
    max_batch_delay_ms: float = Field(
        default=0.0,
        ge=0.0,
        le=1000.0,
        allow_inf_nan=False,
        description="longest the first request of a micro-batch waits for more rows; 0: batch "
        "only what queued while the workers were busy (no added latency when idle)",
    )
    inline_max_rows: int = Field(
        default=16,
        ge=0,
        le=65536,
        description="a request needing at most this many network rows (images x draws) runs "
        "on the event loop when no other request's work is out in worker threads, and uploads "
        "of at most this many small images are decoded there: cheaper than a thread hop for "
        "small work; 0: never",
    )
    compute_slots: int = Field(
        default=0,
        ge=0,
        le=4096,
        description="requests computing in worker threads at once (all offloaded work without "
        "VAE_BATCHING; with it, requests of a full micro-batch or more); the rest wait their turn "
        "on the event loop. 0: the usable cores divided by VAE_THREADS",
    )
    max_queue: int = Field(
        default=256,
        ge=1,
        le=1_000_000,
        description="requests waiting per network for a micro-batch; 503 + Retry-After above",
    )
    models_root: Path | None = Field(
        default=None,
        description="directory POST /admin/reload loads bundles from, by name relative to it; "
        "default: the directory holding VAE_BUNDLE",
    )
    admin_open: bool = Field(
        default=False,
        description="allow /admin without VAE_API_KEY (only on a trusted network)",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default=[],
        description="comma-separated browser origins allowed by CORS ('*' for any); empty: off",
    )
    shutdown_delay_s: float = Field(
        default=0.0,
        ge=0.0,
        le=300.0,
        allow_inf_nan=False,
        description="on SIGTERM, seconds to keep serving with /readyz at 503 before draining, so "
        "load balancers stop sending traffic first",
    )
    gc_thresholds: Annotated[tuple[int, int, int], NoDecode] = Field(
        default=(20_000, 20, 20),
        description="Python's garbage-collector thresholds while serving, comma-separated "
        "(gc.set_threshold; Python's own: 700,10,10). Fewer young collections leave less of the "
        "in-flight requests' garbage to the full collections, whose 50-60 ms pauses made the "
        "p99 at concurrency 32 (BENCHMARKS.md section 3)",
    )
    shutdown_timeout_s: int = Field(
        default=30,
        ge=0,
        le=3600,
        description="longest uvicorn waits for in-flight requests after SIGTERM, in whole "
        "seconds (vae serve; 0: no limit)",
    )

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @field_validator("gc_thresholds", mode="before")
    @classmethod
    def _split_thresholds(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(","))
        return value

    @field_validator("gc_thresholds")
    @classmethod
    def _positive_thresholds(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if min(value) < 1:
            raise ValueError(
                f"VAE_GC_THRESHOLDS must be three integers >= 1 (0 would turn collection off); "
                f"got {value}"
            )
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_log_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("api_key")
    @classmethod
    def _non_empty_api_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("VAE_API_KEY is set but empty; unset it to disable authentication")
        return value

    @classmethod
    def unknown_env(cls, environ: Mapping[str, str]) -> list[str]:
        """`VAE_*` variables in `environ` that name no setting (likely typos)."""
        prefix = cls.model_config.get("env_prefix", "")
        return sorted(
            name
            for name in environ
            if name.upper().startswith(prefix)
            and name[len(prefix) :].lower() not in cls.model_fields
        )

    @property
    def models_directory(self) -> Path:
        """VAE_MODELS_ROOT, or the directory holding VAE_BUNDLE; absolute."""
        return (self.models_root or self.bundle.absolute().parent).resolve()

    @property
    def log_level_number(self) -> int:
        """The `logging` module's number for `log_level`."""
        return logging.getLevelNamesMapping()[self.log_level.upper()]


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
