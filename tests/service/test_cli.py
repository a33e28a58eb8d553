"""The `vae` command."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import onnxruntime
import pytest

from service import cli


@pytest.fixture(autouse=True)
def restore_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """`vae serve` exports its flags as VAE_* variables; undo that after each test."""
    for name in cli.SERVE_ENV.values():
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("serve", "train", "export", "evaluate"):
        assert command in out


def test_serve_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--port" in out and "(default: 8000)" in out and "--workers" in out


def test_serve_runs_uvicorn_with_the_factory(
    monkeypatch: pytest.MonkeyPatch, tiny_bundle: Path
) -> None:
    calls: list[tuple[Any, dict[str, Any]]] = []
    monkeypatch.setattr("uvicorn.run", lambda *args, **kwargs: calls.append((args, kwargs)))
    code = cli.main(
        [
            "serve",
            "--bundle",
            str(tiny_bundle),
            "--port",
            "8123",
            "--device",
            "cpu",
            "--log-level",
            "warning",
        ]
    )
    assert code == 0
    ((args, kwargs),) = calls
    assert args == ("service.main:create_app",)
    assert kwargs["factory"] is True and kwargs["port"] == 8123 and kwargs["log_level"] == "warning"
    assert os.environ["VAE_BUNDLE"] == str(tiny_bundle)  # so that every worker sees it


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (
            ["serve", "--bundle", "/no/such/bundle"],
            {},
            "bundle directory /no/such/bundle does not exist",
        ),
        (["serve"], {"VAE_MAX_IMAGES": "0"}, "invalid settings"),
        (
            ["serve", "--device", "cuda"],
            {},
            "VAE_DEVICE=cuda but onnxruntime has no CUDAExecutionProvider",
        ),
    ],
)
def test_serve_fails_fast(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tiny_bundle: Path,
    argv: list[str],
    env: dict[str, str],
    message: str,
) -> None:
    if "cuda" in argv and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA")
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("uvicorn must not start"))
    monkeypatch.setenv("VAE_BUNDLE", str(tiny_bundle))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_model_commands_are_delegated(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    class FakeModelCli:
        @staticmethod
        def main(argv: list[str]) -> int:
            seen.append(argv)
            return 0

    monkeypatch.setitem(sys.modules, "model.cli", FakeModelCli)
    assert cli.main(["train", "--epochs", "1"]) == 0
    assert seen == [["train", "--epochs", "1"]]


def test_model_commands_without_torch(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "model.cli", None)  # import fails as without the train extra
    assert cli.main(["export", "ckpt.pt"]) == 2
    assert "pip install 'vae-server[train]'" in capsys.readouterr().err
