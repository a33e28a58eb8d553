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
        description="onnxruntime intra-op threads per call (0: one per core); the server runs "
        "usable cores / threads calls at once, so 1 gives the best throughput on small CPUs",
    )
    max_rows: int = Field(
        default=8192,
        ge=1,
        le=1_000_000,
        description="per-request compute budget in network rows: images x draws for /elbo "
        "(the most of samples, k and the score's draws; one more for a map or a score of the "
        "reconstruction), images for /encode "
        "and /reconstruct, "
        "z rows for /decode, n for /sample, steps for /interpolate (422 above)",
    )
    max_upload_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024, description="request body limit in bytes (413 above)"
    )
    max_pixels: int = Field(
        default=4096 * 4096,
        ge=1,
        description="pixels (width x height) a request's images may declare in all, checked "
        "from their headers before decoding (413 above)",
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

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
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
        """The directory holding VAE_BUNDLE (absolute): POST /admin/reload loads bundles from it,
        by name, so a client can name a sibling bundle but no other path."""
        return self.bundle.absolute().parent.resolve()

    @property
    def log_level_number(self) -> int:
        """The `logging` module's number for `log_level`."""
        return logging.getLevelNamesMapping()[self.log_level.upper()]


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
