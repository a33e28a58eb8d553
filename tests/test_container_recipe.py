"""The Dockerfile's recipe, replayed without a Docker engine.

The default image's build stage is staged (its COPY lines), its RUN lines run into a fresh venv,
and the runtime stage's ENTRYPOINT, ENV and HEALTHCHECK are run from that venv on a loopback port.
So a missing file in a COPY, a broken install script, a server that never gets ready or a
healthcheck that cannot pass fails here, as it would in `docker build` / `docker run`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import live
from tests.conftest import LiveServerFactory

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
SHIPPED_BUNDLE = ROOT / "service" / "bundles" / "mnist"
READY_TIMEOUT_S = 90.0


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, arguments)

    def args(self, keyword: str) -> list[str]:
        return [a for k, a in self.instructions if k == keyword]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for args in self.args("ENV"):
            for pair in shlex.split(args):
                key, sep, value = pair.partition("=")
                assert sep, f"ENV {args!r}: only the KEY=value form is supported here"
                out[key] = value
        return out


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages in order, each with its instructions; continuation lines joined, comments dropped."""
    stages: list[Stage] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending = ""
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            base, _, name = re.sub(r"\s+as\s+", " AS ", args, flags=re.IGNORECASE).partition(" AS ")
            stages.append(Stage(name.strip() or str(len(stages)), base.split()[-1]))
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append((keyword, args))
    return stages


def exec_form(args: str) -> list[str]:
    argv = json.loads(args)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), args
    return argv


def with_option(argv: list[str], flag: str, value: str) -> list[str]:
    assert flag in argv, f"{flag} not in {argv}"
    i = argv.index(flag)
    return [*argv[: i + 1], value, *argv[i + 2 :]]


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment, less what would leak it into another venv, plus `extra`."""
    drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("VAE_")}
    return {**env, **(extra or {})}


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    parsed = parse_dockerfile(DOCKERFILE.read_text())
    by_name = {s.name: s for s in parsed}
    # `docker build .` builds the last stage: that is the image compose and users run.
    assert parsed[-1].name == "runtime", f"the last (default) stage is {parsed[-1].name!r}"
    return by_name


@pytest.fixture(scope="module")
def serving_venv(stages: dict[str, Stage], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Replay the stage whose /opt/venv the runtime image copies: its COPYs, then its RUNs."""
    copies = [a.split() for a in stages["runtime"].args("COPY") if a.startswith("--from=")]
    venv_sources = [c[0].removeprefix("--from=") for c in copies if c[-1] == "/opt/venv"]
    assert len(venv_sources) == 1, f"runtime stage copies /opt/venv from {venv_sources}"
    build = stages[venv_sources[0]]
    workdirs = build.args("WORKDIR")
    assert workdirs, f"stage {build.name} has no WORKDIR"

    tmp = tmp_path_factory.mktemp("recipe")
    context, venv = tmp / "context", tmp / "venv"
    context.mkdir()
    for args in build.args("COPY"):
        *sources, dest = shlex.split(args)
        assert not any(s.startswith("--") for s in sources), f"COPY {args}: flags unsupported"
        target = context / dest
        for source in sources:
            path = ROOT / source
            assert path.exists(), f"COPY {source}: not in the build context"
            if path.is_dir():
                ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
                shutil.copytree(path, target, dirs_exist_ok=True, ignore=ignore)
            else:
                into = target / path.name if dest.endswith("/") else target
                into.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, into)

    runs = build.args("RUN")
    assert runs, f"stage {build.name} runs nothing"
    # The pip cache is allowed (the image turns it off with PIP_NO_CACHE_DIR); the interpreter is
    # this one, a 3.11 like the image's.
    env = clean_env({"PYTHON": sys.executable})
    for command in runs:
        done = subprocess.run(
            ["/bin/sh", "-c", command.replace("/opt/venv", str(venv))],
            cwd=context,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, (
            f"RUN {command} exited {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        )
    return venv


@pytest.fixture
def server(
    stages: dict[str, Stage], serving_venv: Path, bundle: Path, live_server: LiveServerFactory
) -> Iterator[tuple[str, dict[str, str]]]:
    """The runtime image's ENTRYPOINT and ENV, run from the replayed venv on a loopback port."""
    runtime = stages["runtime"]
    (entrypoint,) = runtime.args("ENTRYPOINT")
    argv = with_option(exec_form(entrypoint), "--host", "127.0.0.1")
    argv = with_option(argv, "--port", "{port}")
    image_env = {k: v for k, v in runtime.env().items() if k.startswith("VAE_")}
    env = clean_env(
        {
            **image_env,
            "VAE_BUNDLE": str(bundle),
            "PATH": f"{serving_venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        }
    )
    with live_server(argv=argv, environ=env, timeout=READY_TIMEOUT_S) as running:
        yield running.url, env


@pytest.mark.timeout(900)
def test_serving_install_has_no_torch(serving_venv: Path) -> None:
    python = serving_venv / "bin" / "python"
    done = subprocess.run(
        [str(python), "-c", "import torch"], env=clean_env(), capture_output=True, text=True
    )
    assert done.returncode != 0, "torch is importable from the serving install"
    assert "No module named 'torch'" in done.stderr, done.stderr


@pytest.mark.timeout(900)
def test_entrypoint_gets_ready_and_healthcheck_passes(
    stages: dict[str, Stage], server: tuple[str, dict[str, str]]
) -> None:
    base, env = server
    with urllib.request.urlopen(f"{base}/healthz", timeout=5) as response:
        assert response.status == 200

    (healthcheck,) = stages["runtime"].args("HEALTHCHECK")
    _, sep, command = healthcheck.partition("CMD ")
    assert sep, f"HEALTHCHECK {healthcheck!r} has no CMD"
    port = base.rsplit(":", 1)[1]
    argv = [a.replace(":8000/", f":{port}/") for a in exec_form(command)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"HEALTHCHECK {argv} exited {done.returncode}: {done.stderr}"

    # ... and it fails when nothing answers.
    argv = [a.replace(f":{port}/", f":{live.free_port()}/") for a in argv]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0, f"HEALTHCHECK {argv} passed with no server"
