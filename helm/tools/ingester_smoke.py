#!/usr/bin/env python3
"""Proves the chart and the ingester binary agree; run by .ci/helm-checks inside its venv.

For each ingester in rendered manifests: takes the base config ConfigMap (<statefulset>-config, key
config.yaml) exactly as the chart renders it, points its absolute paths (db_path, streams_path) into a temp
dir, writes an empty streams file there (what the streams ConfigMap holds before the operator writes it) and
runs `arrowport validate --config FILE`. With --serve it then starts `arrowport serve --config FILE --port P`
on a free loopback port, waits for GET /readyz to answer 200, sends SIGTERM and expects exit status 0.

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


def localize(config_text: str, workdir: Path) -> tuple[Path, dict[str, Any]]:
    config = yaml.safe_load(config_text)
    for key in ("db_path", "streams_path"):
        if not str(config.get(key, "")).startswith("/"):
            raise SystemExit(f"config.yaml: {key} is {config.get(key)!r}, expected an absolute path in the pod")
    config["db_path"] = str(workdir / "data" / Path(config["db_path"]).name)
    streams = workdir / "streams" / Path(config["streams_path"]).name
    config["streams_path"] = str(streams)
    config["host"] = "127.0.0.1"
    (workdir / "data").mkdir()
    streams.parent.mkdir()
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


def serve(binary: str, config: Path, workdir: Path) -> list[str]:
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
    if problems:
        sys.stderr.write(f"--- ingester log ({log_path}) ---\n{log_path.read_text(errors='replace')}\n---\n")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin", required=True, help="the arrowport binary")
    parser.add_argument("--serve", action="store_true", help="also start each ingester and stop it")
    parser.add_argument("manifests", type=Path)
    args = parser.parse_args()

    problems = []
    for sts, text in ingester_configs(args.manifests).items():
        with tempfile.TemporaryDirectory(prefix="arrowport-smoke-") as tmp:
            workdir = Path(tmp)
            config_path, _ = localize(text, workdir)
            print(f"  {args.manifests.name}: {sts}: arrowport validate --config <rendered config.yaml>")
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
            if args.serve:
                print(f"  {args.manifests.name}: {sts}: arrowport serve --config <rendered config.yaml> --port <free>")
                problems += [f"{sts}: {p}" for p in serve(args.bin, config_path, workdir)]
    for problem in problems:
        print(f"  FAIL {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
