"""Fixtures: the real `arrowport` binary serving a fresh database on an ephemeral loopback port."""

import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


class Server:
    def __init__(self, workdir: Path, *args: str):
        binary = os.environ.get("ARROWPORT_BIN")
        if not binary or not Path(binary).exists():
            raise RuntimeError("set ARROWPORT_BIN to the built arrowport binary (.ci/run does)")
        env = {k: v for k, v in os.environ.items() if not k.startswith("ARROWPORT_")}
        env["NO_COLOR"] = "1"
        self.workdir = workdir
        self.process = subprocess.Popen(
            [binary, "serve", "--host", "127.0.0.1", "--port", "0", *args],
            cwd=workdir,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for line in self.process.stderr:
            match = re.search(r"addr=(\S+)", line)
            if match:
                self.addr = match.group(1)
                break
        else:
            raise RuntimeError("arrowport exited before listening")
        # Keep reading stderr so the server never blocks on a full pipe.
        threading.Thread(target=self.process.stderr.read, daemon=True).start()
        self.url = f"http://{self.addr}"

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)


@pytest.fixture
def server(tmp_path):
    running = Server(tmp_path)
    yield running
    if running.process.poll() is None:
        assert running.stop() == 0


@pytest.fixture
def start_server(tmp_path):
    """Starts servers in `tmp_path`, each optionally with a YAML config file; stops them (exit 0) after."""
    started = []

    def start(config: str | None = None, *args: str) -> Server:
        if config is not None:
            path = tmp_path / f"arrowport-{len(started)}.yaml"
            path.write_text(config)
            args = ("--config", path.name, *args)
        running = Server(tmp_path, *args)
        started.append(running)
        return running

    yield start
    for running in started:
        if running.process.poll() is None:
            assert running.stop() == 0


def readme_block(marker: str) -> str:
    """The fenced code block that follows `<!-- test: marker -->` in the README."""
    text = README.read_text()
    match = re.search(rf"<!-- test: {re.escape(marker)} -->\s*```\w*\n(.*?)```", text, re.S)
    assert match, f"README has no block marked {marker}"
    return match.group(1)
