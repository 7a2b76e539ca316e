"""Real pyarrow producers against the real server, including the README's examples as written."""

import json
import subprocess
import sys
import urllib.error
import urllib.request

import pyarrow as pa
import pytest

from conftest import DATA_TABLES, readme_block

STREAM = "application/vnd.apache.arrow.stream"


def post(server, stream, body, headers=None):
    request = urllib.request.Request(
        f"{server.url}/ingest/{stream}",
        data=body,
        headers={"Content-Type": STREAM, **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def ipc_stream(table, compression=None):
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table, max_chunksize=1000)
    return sink.getvalue().to_pybytes()


def test_readme_python_example(server, tmp_path):
    code = readme_block("python-http").replace("localhost:8888", server.addr)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["stream"] == "events" and report["rows"] == 3


def test_readme_curl_example(server, tmp_path):
    table = pa.table({"id": [1, 2], "name": ["a", "b"]})
    (tmp_path / "events.arrows").write_bytes(ipc_stream(table))
    command = readme_block("curl").strip().replace("localhost:8888", server.addr)
    result = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["rows"] == 2


@pytest.mark.parametrize("compression", [None, "zstd", "lz4"])
def test_pyarrow_stream_with_buffer_compression(server, compression):
    table = pa.table({"id": pa.array(range(5000), pa.int64()), "v": pa.array([i / 3 for i in range(5000)])})
    status, report = post(server, f"compressed_{compression}", ipc_stream(table, compression))
    assert status == 200, report
    assert (report["rows"], report["batches"]) == (5000, 5)


def test_pyarrow_file_format(server):
    table = pa.table({"id": [1, 2, 3]})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    status, report = post(server, "as_file", sink.getvalue().to_pybytes(), {"Content-Type": "application/vnd.apache.arrow.file"})
    assert status == 200 and report["rows"] == 3, report


def test_pyarrow_types(server):
    table = pa.table(
        {
            "ts": pa.array([0, None], pa.timestamp("ns", tz="UTC")),
            "day": pa.array([19000, None], pa.date32()),
            "tags": pa.array([["a", "b"], None], pa.list_(pa.string())),
            "color": pa.array(["red", "red"]).dictionary_encode(),
            "big": pa.array(["x", None], pa.large_string()),
            "view": pa.array(["y", "z"], pa.string_view()),
            "amount": pa.array([1, None], pa.decimal128(12, 3)),
            "point": pa.array([{"x": 1.0, "y": 2.0}, None]),
            "attrs": pa.array([[("k", 1)], []], pa.map_(pa.string(), pa.int32())),
        }
    )
    status, report = post(server, "typed", ipc_stream(table))
    assert status == 200, report
    assert report["rows"] == 2
    # Read it back with DuckDB's own Python client, as a data engineer would.
    back = server.read_back("SELECT * FROM typed ORDER BY view")
    assert back.column("day").to_pylist()[0].isoformat() == "2022-01-08"
    assert back.column("tags").to_pylist() == [["a", "b"], None]
    assert back.column("color").to_pylist() == ["red", "red"]
    assert back.column("view").to_pylist() == ["y", "z"]
    assert str(back.column("amount").to_pylist()[0]) == "1.000"
    assert back.column("point").to_pylist()[0] == {"x": 1.0, "y": 2.0}
    assert back.column("attrs").to_pylist() == [[("k", 1)], []]


def test_a_fixed_size_list_lands_in_a_duckdb_file_and_is_refused_with_a_422_by_a_lake(server):
    """DuckLake cannot store a fixed-size ARRAY: refused whole, naming the storage kind; a file stores it."""
    table = pa.table({"id": [1, 2], "pair": pa.array([[1, 2], [3, 4]], pa.list_(pa.int32(), 2))})
    status, report = post(server, "pairs", ipc_stream(table))
    if server.storage.kind == "duckdb":
        assert status == 200, report
        back = server.read_back("SELECT * FROM pairs ORDER BY id")
        assert back.column("pair").to_pylist() == [[1, 2], [3, 4]]
        return
    assert (status, report["error"]["code"]) == (422, "unsupported_type"), report
    assert "fixed-size ARRAY (Arrow FixedSizeList) columns (INTEGER[2]) cannot be stored in a DuckLake" in report["error"]["message"]
    # Nothing of it was written, and the server goes on serving.
    status, report = post(server, "others", ipc_stream(pa.table({"id": [1]})))
    assert (status, report["rows"]) == (200, 1)
    assert server.read_back(DATA_TABLES).column(0).to_pylist() == ["others"]


def test_bad_input_gets_json_errors_and_server_keeps_serving(server):
    status, body = post(server, "bad", b"definitely not arrow")
    assert status == 400 and body["error"]["code"] == "invalid_ipc"
    table = pa.table({"id": [1]})
    status, body = post(server, "bad", ipc_stream(table)[:-20])
    assert status == 400 and body["error"]["code"] == "invalid_ipc"
    status, body = post(server, "bad", ipc_stream(table))
    assert status == 200 and body["rows"] == 1


def test_a_retry_with_an_idempotency_key_is_answered_and_not_written_twice(server):
    body = ipc_stream(pa.table({"id": list(range(50))}))
    key = {"Idempotency-Key": "4b0c6f3e-retry-1"}
    status, first = post(server, "retried", body, key)
    assert (status, first["rows"], first.get("replayed")) == (200, 50, None)
    status, again = post(server, "retried", body, key)
    assert (status, again["rows"], again["replayed"]) == (200, 50, True)
    status, _ = post(server, "retried", body)  # no key: written again
    assert status == 200
    with urllib.request.urlopen(f"{server.url}/streams") as response:
        streams = {s["stream"]: s for s in json.loads(response.read())["streams"]}
    assert streams["retried"]["rows"] == 100


def test_what_arrowport_wrote_reads_back_in_duckdbs_own_client(server):
    """A DuckDB file opened, or a lake attached, by DuckDB's Python client holds exactly what was sent."""
    table = pa.table({"id": list(range(1000)), "name": [f"n{i}" for i in range(1000)]})
    status, report = post(server, "events", ipc_stream(table))
    assert (status, report["rows"]) == (200, 1000)
    assert server.read_back("SELECT * FROM events ORDER BY id").equals(table)
