"""The README's "Train and export your own model" section, run as written on a generated folder.

The section's shell block and Python block run in a temporary directory that holds
`path/to/images` (colour images the test draws) and `path/to/new` (images to score), with `.venv`
pointing at the environment running this suite (the README's test install, which is the
section's `pip install -e '.[train]'` and more; so that one line is not re-run). The only change
to the text: the server gets a free port instead of 8000, and the client is pointed at it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import colour_folder
from tests.e2e.test_server import REPO
from tests.live import live_server

SECTION = "## Train and export your own model"


def section_blocks() -> tuple[list[str], str]:
    """The section's shell lines and its Python block."""
    text = (REPO / "README.md").read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    shell = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    python = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert shell and python, "the section lost its bash or python block"
    lines = [line for line in shell.group(1).splitlines() if line and not line.startswith("#")]
    return lines, python.group(1)


def run(command: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.timeout(900)
def test_train_your_own_as_written(tmp_path: Path) -> None:
    lines, python = section_blocks()
    install, train, export, serve = lines
    assert install == ".venv/bin/pip install -e '.[train]'"
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    colour_folder(tmp_path / "path" / "to" / "images", 16, seed=0)
    colour_folder(tmp_path / "path" / "to" / "new", 3, seed=1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAE_")}
    seconds = {}

    start = time.monotonic()
    run(train, tmp_path, env)
    seconds["train"] = time.monotonic() - start
    start = time.monotonic()
    exported = run(export, tmp_path, env)
    seconds["export"] = time.monotonic() - start
    assert "torchvision" not in exported.stderr  # quiet unless something is wrong
    manifest = (tmp_path / "models" / "mine" / "manifest.json").read_text()
    assert '"channels": 3' in manifest and '"likelihood": "gaussian"' in manifest

    argv = ["bash", "-c", f"{serve} --port {{port}}"]  # one command: bash execs it
    with live_server(argv=argv, environ=env, cwd=tmp_path) as server:
        script = python.replace("localhost:8000", server.url.removeprefix("http://"))
        start = time.monotonic()
        scored = subprocess.run(
            [str(tmp_path / ".venv" / "bin" / "python"), "-c", script],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        seconds["score"] = time.monotonic() - start
        assert scored.returncode == 0, scored.stderr
    printed = scored.stdout.splitlines()
    assert len(printed) == 2, scored.stdout
    # three scores, percentiles and verdicts; then the shapes of decode, reconstruct and sample
    assert printed[1] == "(3, 3, 8, 8) (3, 3, 8, 8) (4, 3, 8, 8)", printed
    print("README train section, seconds per step:", seconds)
