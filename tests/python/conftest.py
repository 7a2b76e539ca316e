"""Fixtures: the real `arrowport` binary serving fresh storage on an ephemeral loopback port.

Every test that starts a server (through `server`, `start_server` or `storage`) runs once per storage kind:
`duckdb` (a DuckDB file, `arrowport.duckdb` in the test's directory) and `ducklake` (a local lake: catalog
file `meta.ducklake` and Parquet files under `lake/` in the test's directory, the extensions from
`ARROWPORT_TEST_EXTENSIONS`, as `bash scripts/duckdb-extensions` prints it). A test of what only one kind
has says so with `@pytest.mark.storage_kinds("duckdb", reason=...)`: it is not collected for the other.
"""

import json
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
STORAGE_KINDS = ("duckdb", "ducklake")
# The data's own tables, for `Server.read_back` (a lake's DuckDB client also sees the lake's catalog tables).
DATA_TABLES = "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() AND schema_name = 'main'"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "storage_kinds(*kinds, reason): the test runs only on these storage kinds, for the reason given"
    )
    # Skips are loud: their reasons are listed at the end of every run, -q or not.
    if "s" not in config.option.reportchars and "a" not in config.option.reportchars:
        config.option.reportchars += "s"


def pytest_generate_tests(metafunc):
    if "storage" not in metafunc.fixturenames:
        return
    kinds = STORAGE_KINDS
    marker = metafunc.definition.get_closest_marker("storage_kinds")
    if marker is not None:
        assert marker.kwargs.get("reason"), f"{metafunc.definition.nodeid}: storage_kinds needs a reason"
        assert set(marker.args) <= set(STORAGE_KINDS), marker.args
        kinds = marker.args
    metafunc.parametrize("storage", kinds, indirect=True)


class Storage:
    """One storage kind in a test's directory: the config that selects it, and DuckDB's own view of it."""

    def __init__(self, kind: str, workdir: Path, extensions: str | None):
        self.kind = kind
        self.workdir = workdir
        self.extensions = extensions

    @property
    def catalog(self) -> str:
        """The catalog name the server gives its data (Flight SQL's catalog, `current_database()`)."""
        return "arrowport" if self.kind == "duckdb" else "lake"

    def config(self) -> str:
        """The YAML lines that select this storage (none for the default, a DuckDB file)."""
        if self.kind == "duckdb":
            return ""
        storage = {"kind": "ducklake", "catalog": str(self.workdir / "meta.ducklake"), "data_path": str(self.workdir / "lake")}
        return f"storage: {json.dumps(storage)}\nduckdb: {json.dumps({'extension_directory': self.extensions})}\n"

    def connect(self) -> duckdb.DuckDBPyConnection:
        """DuckDB's own Python client on what the server wrote (which must not be running: it holds the
        file), read-only, with the data as the default catalog, so `SELECT * FROM events` reads it."""
        if self.kind == "duckdb":
            return duckdb.connect(str(self.workdir / "arrowport.duckdb"), read_only=True)
        db = duckdb.connect(config={"autoinstall_known_extensions": "false", "autoload_known_extensions": "false"})
        for name in ("ducklake", "icu"):
            db.execute(f"LOAD '{self.extensions}/{name}.duckdb_extension'")
        catalog, data = self.workdir / "meta.ducklake", self.workdir / "lake"
        db.execute(f"ATTACH 'ducklake:{catalog}' AS lake (READ_ONLY, DATA_PATH '{data}/')")
        db.execute("USE lake")
        return db


@pytest.fixture
def storage(request, tmp_path) -> Storage:
    kind = request.param
    extensions = os.environ.get("ARROWPORT_TEST_EXTENSIONS")
    if kind == "ducklake" and not extensions:
        why = "ARROWPORT_TEST_EXTENSIONS is not set (bash scripts/duckdb-extensions prints the directory)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"{why}: CI runs every test on a DuckLake too (.ci/run sets it)", pytrace=False)
        pytest.skip(f"DuckLake variant: {why}")
    return Storage(kind, tmp_path, extensions)


class Server:
    def __init__(self, storage: Storage, *args: str):
        binary = os.environ.get("ARROWPORT_BIN")
        if not binary or not Path(binary).exists():
            raise RuntimeError("set ARROWPORT_BIN to the built arrowport binary (.ci/run does)")
        env = {k: v for k, v in os.environ.items() if not k.startswith("ARROWPORT_")}
        env["NO_COLOR"] = "1"
        self.storage = storage
        self.workdir = storage.workdir
        self.catalog = storage.catalog
        self.process = subprocess.Popen(
            [binary, "serve", "--host", "127.0.0.1", "--port", "0", *args],
            cwd=self.workdir,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        seen = []
        for line in self.process.stderr:
            match = re.search(r"addr=(\S+)", line)
            if match:
                self.addr = match.group(1)
                break
            seen.append(line)
        else:
            raise RuntimeError("arrowport exited before listening:\n" + "".join(seen))
        # Keep reading stderr so the server never blocks on a full pipe.
        threading.Thread(target=self.process.stderr.read, daemon=True).start()
        self.url = f"http://{self.addr}"

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)

    def read_back(self, sql: str) -> pa.Table:
        """Stops the server (cleanly: everything it acknowledged is committed) and runs `sql` on what it
        wrote with DuckDB's own Python client: the DuckDB file, or the lake attached as the default catalog."""
        if self.process.poll() is None:
            assert self.stop() == 0
        with self.storage.connect() as db:
            result = db.sql(sql).arrow()
            return result.read_all() if isinstance(result, pa.RecordBatchReader) else result


@pytest.fixture
def start_server(storage):
    """Starts servers on `storage` in the test's directory, each with a YAML config file (the test's own
    text, if any, plus the storage's lines); stops them (exit 0) after."""
    started = []

    def start(config: str | None = None, *args: str) -> Server:
        text = (config or "") + storage.config()
        if text:
            assert not (config and storage.config() and re.search(r"^(storage|duckdb):", config, re.M)), (
                "the storage fixture sets `storage:` and `duckdb:`; a test that needs its own uses the duckdb kind only"
            )
            path = storage.workdir / f"arrowport-{len(started)}.yaml"
            path.write_text(text)
            args = ("--config", path.name, *args)
        running = Server(storage, *args)
        started.append(running)
        return running

    yield start
    for running in started:
        if running.process.poll() is None:
            assert running.stop() == 0


@pytest.fixture
def server(start_server):
    return start_server()


def readme_block(marker: str) -> str:
    """The fenced code block that follows `<!-- test: marker -->` in the README."""
    text = README.read_text()
    match = re.search(rf"<!-- test: {re.escape(marker)} -->\s*```\w*\n(.*?)```", text, re.S)
    assert match, f"README has no block marked {marker}"
    return match.group(1)
