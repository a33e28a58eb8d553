"""The `vae` command."""

from __future__ import annotations

import os
import socket
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
    for command in ("serve", "train", "export", "evaluate", "calibrate"):
        assert command in out


def test_calibrate_reaches_the_model_tools(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    with pytest.raises(SystemExit) as info:
        cli.main(["calibrate", "--help"])
    assert info.value.code == 0
    assert "its manifest.json is rewritten" in " ".join(capsys.readouterr().out.split())


def test_serve_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--port" in out and "(default: 8000)" in out and "--workers" in out
    assert "(default: None)" not in out
    flat = " ".join(out.split())
    assert "(default: $VAE_BUNDLE, else the shipped MNIST bundle)" in flat
    for flag in ("--host", "--port", "--bundle", "--device", "--workers", "--log-level"):
        entry = flat.split(f" {flag} ", 1)[1].split(" --", 1)[0]
        assert entry.count("default") == 1, (flag, entry)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--port", "99999"], "argument --port: must be from 0 to 65535, got 99999"),
        (["--port", "-1"], "argument --port: must be from 0 to 65535, got -1"),
        (["--workers", "-1"], "argument --workers: must be from 0 to 1024, got -1"),
    ],
)
def test_serve_numbers_out_of_range_name_their_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:  # 99999 was an OverflowError traceback from the socket
        cli.main(["serve", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_a_port_in_use_is_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny_bundle: Path
) -> None:
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("uvicorn must not start"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["serve", "--bundle", str(tiny_bundle), "--port", str(port)]
        assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        f"vae serve: port {port} on 127.0.0.1 is already in use (another server?); stop it or "
        "choose another with --port\n"
    )


def test_a_file_as_the_bundle_is_named(
    capsys: pytest.CaptureFixture[str], tiny_bundle: Path
) -> None:
    assert cli.main(["serve", "--bundle", str(tiny_bundle / "encoder.onnx")]) == 2
    err = capsys.readouterr().err
    assert f"{tiny_bundle / 'encoder.onnx'} is a file; a bundle is a directory" in err
    assert err.rstrip().endswith("(set by --bundle)")


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
    # the connection limits (tests/e2e/test_connections.py), set on purpose
    assert kwargs["http"] == "service.connections:GuardedHttpToolsProtocol"
    assert (kwargs["timeout_keep_alive"], kwargs["limit_concurrency"]) == (5, 1000)
    assert os.environ["VAE_BUNDLE"] == str(tiny_bundle)  # so that every worker sees it


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (
            ["serve", "--bundle", "/no/such/bundle"],
            {},
            "bundle directory /no/such/bundle does not exist (set by --bundle)",
        ),
        (
            ["serve"],
            {"VAE_BUNDLE": "/no/such/bundle"},
            "bundle directory /no/such/bundle does not exist (set by VAE_BUNDLE)",
        ),
        (
            ["serve"],
            {"VAE_MAX_ROWS": "0"},
            "invalid settings:\n  VAE_MAX_ROWS=0: Input should be greater than or equal to 1",
        ),
        (
            ["serve", "--device", "cuda"],
            {},
            "CPUExecutionProvider); "
            "install onnxruntime-gpu on a machine with a GPU, or use device auto or cpu "
            "(set by --device)",
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


def test_score_without_ray(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "service.batch", None)  # as without the batch extra
    assert cli.main(["score", "images/", "--bundle", "b", "--out", "o"]) == 2
    assert "run: pip install 'vae-server[batch]'" in capsys.readouterr().err
    assert "score" in cli.build_parser().format_help()
