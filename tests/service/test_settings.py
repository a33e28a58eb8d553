"""Settings come from VAE_* variables and fail fast on bad values."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import DEFAULT_BUNDLE, Settings, get_settings


def test_defaults() -> None:
    settings = Settings()
    assert settings.bundle == DEFAULT_BUNDLE
    assert (settings.bundle / "manifest.json").is_file()
    assert settings.device == "auto"
    assert settings.api_key is None
    assert settings.strict_size is False
    assert settings.max_rows == 8192


def test_few_settings() -> None:
    """Settings are what differs between deployments; tuning constants live in the code (issue
    16: at most 12)."""
    assert len(Settings.model_fields) <= 12


def test_reads_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "VAE_BUNDLE": "/srv/bundle",
        "VAE_DEVICE": "cpu",
        "VAE_THREADS": "2",
        "VAE_MAX_ROWS": "5",
        "VAE_MAX_UPLOAD_BYTES": "4096",
        "VAE_MAX_PIXELS": "1000",
        "VAE_STRICT_SIZE": "true",
        "VAE_ANOMALY_THRESHOLD": "123.5",
        "VAE_API_KEY": "s3cret",
        "VAE_LOG_LEVEL": "DEBUG",
    }.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.bundle == Path("/srv/bundle")
    assert (settings.device, settings.threads, settings.max_rows) == ("cpu", 2, 5)
    assert (settings.max_upload_bytes, settings.max_pixels) == (4096, 1000)
    assert settings.strict_size is True
    assert settings.anomaly_threshold == 123.5
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)
    assert settings.log_level == "debug"
    assert settings.log_level_number == 10


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("VAE_DEVICE", "tpu", "device"),
        ("VAE_THREADS", "-1", "threads"),
        ("VAE_MAX_ROWS", "0", "max_rows"),
        ("VAE_MAX_ROWS", "many", "max_rows"),
        ("VAE_MAX_UPLOAD_BYTES", "10", "max_upload_bytes"),
        ("VAE_STRICT_SIZE", "maybe", "strict_size"),
        ("VAE_ANOMALY_THRESHOLD", "nan", "anomaly_threshold"),
        ("VAE_API_KEY", "  ", "VAE_API_KEY is set but empty"),
        ("VAE_LOG_LEVEL", "loud", "log_level"),
    ],
)
def test_invalid_values_fail_fast(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=message):
        Settings()


def test_unknown_variables_are_reported() -> None:
    environ = {"VAE_MAX_IMAGE": "3", "VAE_DEVICE": "cpu", "PATH": "/bin"}
    assert Settings.unknown_env(environ) == ["VAE_MAX_IMAGE"]


def test_get_settings_is_cached() -> None:
    get_settings.cache_clear()
    try:
        assert get_settings() is get_settings()
    finally:
        get_settings.cache_clear()
