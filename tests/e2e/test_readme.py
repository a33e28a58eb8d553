"""Every curl example in the README works verbatim against a real server on the default model."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import DEFAULT_BUNDLE, REPO, LiveServerFactory

README = REPO / "README.md"


def readme_curls() -> list[str]:
    lines = README.read_text().splitlines()
    return [line for line in lines if line.startswith("curl ")]


@pytest.fixture(scope="module")
def base_url(live_server: LiveServerFactory) -> Iterator[str]:
    with live_server(DEFAULT_BUNDLE) as server:
        yield server.url


def test_the_readme_has_examples_for_every_endpoint() -> None:
    text = "\n".join(readme_curls())
    for path in (
        "/encode",
        "/elbo",
        "/reconstruct",
        "/sample",
        "/decode",
        "/interpolate",
        "/model",
        "/healthz",
        "/readyz",
        "/metrics",
        "/v2/",
    ):
        assert f"localhost:8000{path}" in text, path


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("command", readme_curls())
def test_readme_curl(command: str, base_url: str, tmp_path: Path) -> None:
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    host = base_url.removeprefix("http://")
    runnable = command.replace("localhost:8000", host).replace("curl ", "curl -sS --fail ", 1)
    proc = subprocess.run(["bash", "-c", runnable], cwd=tmp_path, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    out = re.search(r"-o (\S+)", command)
    if out:
        with Image.open(tmp_path / out.group(1)) as im:
            assert im.format == "PNG" and im.width >= 28
    else:
        assert proc.stdout, "no output"
