#!/usr/bin/env python3
"""Proves the chart and the ingester binary agree; run by .ci/helm-checks inside its venv.

For each ingester in rendered manifests: takes the base config ConfigMap (<statefulset>-config, key
config.yaml) exactly as the chart renders it, moves its absolute paths in the pod (db_path, streams_path, a
DuckLake's local catalog and data_path) under a temp dir, keeping them where they are relative to each
other, writes an empty streams file there (what the streams ConfigMap holds before the operator writes it)
and runs `arrowport validate --config FILE`. With --serve it then starts `arrowport serve --config FILE
--port P` on a free loopback port, waits for GET /readyz to answer 200, sends SIGTERM and expects exit
status 0; for a local DuckLake it also checks that the catalog file and the data directory were made where
the chart put them.

A DuckLake's `duckdb.extension_directory` is the image's directory; --extensions DIR stands in for it
(needed to serve a lake). A lake with a PostgreSQL catalog is only validated (it needs a server).
The listen address is rewritten to 127.0.0.1 so the test never listens beyond loopback.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

READY_TIMEOUT_S = 60
EXIT_TIMEOUT_S = 30


def ingester_configs(manifests: Path) -> dict[str, str]:
    """StatefulSet name -> config.yaml text of its base config ConfigMap."""
    docs = [d for d in yaml.safe_load_all(manifests.read_text()) if d]
    config_maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    configs = {}
    for sts in (d for d in docs if d["kind"] == "StatefulSet"):
        volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
        cm_name = volumes["config"]["configMap"]["name"]
        configs[sts["metadata"]["name"]] = config_maps[cm_name]["data"]["config.yaml"]
    if not configs:
        raise SystemExit(f"{manifests}: no ingester StatefulSet rendered")
    return configs


def is_lake(config: dict[str, Any]) -> bool:
    return (config.get("storage") or {}).get("kind") == "ducklake"


def is_postgres_lake(config: dict[str, Any]) -> bool:
    return is_lake(config) and str(config["storage"].get("catalog", "")).startswith("postgres:")


def localize(config_text: str, workdir: Path, extensions: Path | None) -> tuple[Path, dict[str, Any]]:
    """Writes the config with its paths in the pod moved under workdir/root (the volume's directories are
    made, as the pod has them mounted); returns its path and the config."""
    config = yaml.safe_load(config_text)
    root = workdir / "root"

    def moved(where: str, value: Any) -> str:
        if not str(value or "").startswith("/"):
            raise SystemExit(f"config.yaml: {where} is {value!r}, expected an absolute path in the pod")
        return str(root / str(value).lstrip("/"))

    keys = ["streams_path"] if is_lake(config) else ["db_path", "streams_path"]
    for key in keys:
        config[key] = moved(key, config.get(key))
    if is_lake(config):
        storage = config["storage"]
        storage["data_path"] = moved("storage.data_path", storage.get("data_path"))
        if not is_postgres_lake(config):
            storage["catalog"] = moved("storage.catalog", storage.get("catalog"))
        duckdb = config.get("duckdb") or {}
        if not str(duckdb.get("extension_directory") or "").startswith("/"):
            raise SystemExit("config.yaml: a DuckLake without an absolute duckdb.extension_directory")
        if extensions is not None:
            duckdb["extension_directory"] = str(extensions)
    elif "storage" in config or "duckdb" in config:
        raise SystemExit("config.yaml: storage or duckdb settings without storage.kind ducklake")
    # The Secret volumes: a tokens file (empty: the Secret is the operator's to fill), and the TLS files'
    # paths, which `validate` does not read.
    if (config.get("auth") or {}).get("tokens_file"):
        config["auth"]["tokens_file"] = moved("auth.tokens_file", config["auth"]["tokens_file"])
        Path(config["auth"]["tokens_file"]).parent.mkdir(parents=True, exist_ok=True)
        Path(config["auth"]["tokens_file"]).write_text("tokens: {}\n")
    for key, value in (config.get("tls") or {}).items():
        config["tls"][key] = moved(f"tls.{key}", value)
    config["host"] = "127.0.0.1"
    # The pod's volumes: the per-pod volume and, when mounted, the shared lake claim.
    for mount in ("var/lib/arrowport", "lake"):
        (root / mount).mkdir(parents=True, exist_ok=True)
    streams = Path(config["streams_path"])
    streams.parent.mkdir(parents=True, exist_ok=True)
    streams.write_text("")
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, config


def clean_env(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARROWPORT_")}
    env["TMPDIR"] = str(workdir / "tmp")
    (workdir / "tmp").mkdir(exist_ok=True)
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError):
        return None


def serve(binary: str, config: Path, workdir: Path, settings: dict[str, Any]) -> list[str]:
    port = free_port()
    log_path = workdir / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [binary, "serve", "--config", str(config), "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=clean_env(workdir), cwd=workdir,
        )
    problems = []
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            status = get_status(f"http://127.0.0.1:{port}/readyz")
            if status == 200:
                break
            time.sleep(0.2)
        if status != 200:
            exited = proc.poll()
            why = f"exited with {exited}" if exited is not None else f"last answer {status}"
            problems.append(f"serve: GET /readyz never answered 200 within {READY_TIMEOUT_S}s ({why})")
        else:
            print(f"    GET /readyz -> 200 on 127.0.0.1:{port}")
            for path in ("/healthz", "/metrics"):
                status = get_status(f"http://127.0.0.1:{port}{path}")
                print(f"    GET {path} -> {status}")
                if status != 200:
                    problems.append(f"serve: GET {path} answered {status}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                code = None
            if code != 0:
                problems.append(f"serve: after SIGTERM the exit status was {code}, expected 0 within {EXIT_TIMEOUT_S}s")
            else:
                print("    SIGTERM -> exit 0")
    if is_lake(settings) and not problems:
        storage = settings["storage"]
        made = [Path(storage["data_path"])]
        if not is_postgres_lake(settings):
            made.append(Path(storage["catalog"]))
        for path in made:
            shown = "/" + str(path.relative_to(workdir / "root"))
            if path.exists():
                print(f"    made {shown} ({'directory' if path.is_dir() else 'file'})")
            else:
                problems.append(f"serve: the lake's {shown} was not made")
    if problems:
        sys.stderr.write(f"--- ingester log ({log_path}) ---\n{log_path.read_text(errors='replace')}\n---\n")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin", required=True, help="the arrowport binary")
    parser.add_argument("--serve", action="store_true", help="also start each ingester and stop it")
    parser.add_argument(
        "--extensions", type=Path, help="directory of DuckDB extension files standing in for the image's"
    )
    parser.add_argument("manifests", type=Path)
    args = parser.parse_args()

    problems = []
    for sts, text in ingester_configs(args.manifests).items():
        with tempfile.TemporaryDirectory(prefix="arrowport-smoke-") as tmp:
            workdir = Path(tmp)
            config_path, settings = localize(text, workdir, args.extensions)
            kind = "DuckDB file"
            if is_lake(settings):
                kind = "DuckLake, PostgreSQL catalog" if is_postgres_lake(settings) else "DuckLake, local catalog"
            print(f"  {args.manifests.name}: {sts} ({kind}): arrowport validate --config <rendered config.yaml>")
            result = subprocess.run(
                [args.bin, "validate", "--config", str(config_path)],
                capture_output=True, text=True, env=clean_env(workdir), cwd=workdir,
            )
            if result.returncode != 0:
                problems.append(
                    f"{sts}: validate exited {result.returncode}:\n{result.stdout}{result.stderr}\n"
                    f"config:\n{config_path.read_text()}"
                )
                continue
            if not args.serve:
                continue
            if is_postgres_lake(settings):
                print(f"  {args.manifests.name}: {sts}: not served (its catalog is a PostgreSQL server)")
                continue
            if is_lake(settings) and args.extensions is None:
                problems.append(f"{sts}: a DuckLake is served only with --extensions DIR (the image's extensions)")
                continue
            print(f"  {args.manifests.name}: {sts}: arrowport serve --config <rendered config.yaml> --port <free>")
            problems += [f"{sts}: {p}" for p in serve(args.bin, config_path, workdir, settings)]
    for problem in problems:
        print(f"  FAIL {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
