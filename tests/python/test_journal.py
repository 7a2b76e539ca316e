"""The journal (`journal.enabled`): small requests answered once durable on disk, written to their tables
after, read back at once through the server, and never lost or doubled by a kill. Both storage kinds."""

import json
import signal
import urllib.request

import adbc_driver_flightsql.dbapi as flight_sql
import pyarrow as pa
import pytest

from test_http import ipc_stream, post

# A linger far longer than any test: a row the server reads back was written because a read waited for
# it, not because time passed.
JOURNAL = "journal: {enabled: true, linger_ms: 600000}\n"


def batch(first, rows=100):
    return ipc_stream(pa.table({"id": pa.array(range(first, first + rows), pa.int64())}))


def count(server, table):
    with flight_sql.connect(f"grpc://{server.addr}", autocommit=True) as conn, conn.cursor() as cursor:
        cursor.execute(f"SELECT count(*), count(DISTINCT id) FROM {table}")
        return cursor.fetchone()


def metric(server, name):
    with urllib.request.urlopen(f"{server.url}/metrics") as response:
        text = response.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_small_requests_are_answered_from_the_journal_and_read_back_at_once(start_server):
    server = start_server(JOURNAL)
    status, first = post(server, "events", batch(0))
    # The first request creates the table: committed before it is answered.
    assert (status, first["rows"], first.get("journaled")) == (200, 100, None)
    for n in range(1, 6):
        status, report = post(server, "events", batch(n * 100))
        assert (status, report["rows"], report.get("journaled")) == (200, 100, True)
    assert metric(server, "arrowport_journaled_requests_total") == 5
    assert metric(server, "arrowport_journal_unwritten_requests") == 5, "still waiting for the linger time"
    # A query waits for every journaled request answered before it.
    assert count(server, "events") == (600, 600)
    assert metric(server, "arrowport_journal_unwritten_requests") == 0
    assert server.read_back("SELECT count(*), count(DISTINCT id) FROM events").to_pylist() == [
        {"count_star()": 600, "count(DISTINCT id)": 600}
    ]


def test_journaled_requests_of_a_killed_server_are_written_once_at_the_next_start(start_server, storage):
    server = start_server(JOURNAL)
    assert post(server, "events", batch(0))[0] == 200
    for n in range(1, 21):
        status, report = post(server, "events", batch(n * 100))
        assert (status, report.get("journaled")) == (200, True)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(timeout=30)
    # Answered, not yet in the table: only the journal holds them.
    db = storage.connect()
    in_table = db.execute("SELECT count(*) FROM events").fetchone()
    db.close()  # before the next start: it holds the file (or the lake's catalog)
    assert in_table == (100,)
    again = start_server(JOURNAL)
    assert count(again, "events") == (2100, 2100)
    # Killed again after they were written: the journal still holds them, and must not write them twice.
    again.process.send_signal(signal.SIGKILL)
    again.process.wait(timeout=30)
    third = start_server(JOURNAL)
    assert third.read_back("SELECT count(*), count(DISTINCT id) FROM events").to_pylist() == [
        {"count_star()": 2100, "count(DISTINCT id)": 2100}
    ]


def test_a_retry_of_a_journaled_request_with_its_idempotency_key_is_answered_not_written_again(start_server):
    server = start_server(JOURNAL)
    assert post(server, "events", batch(0))[0] == 200
    key = {"Idempotency-Key": "journaled-1"}
    status, first = post(server, "events", batch(100), key)
    assert (status, first.get("journaled")) == (200, True)
    status, again = post(server, "events", batch(100), key)
    assert (status, again["rows"], again["replayed"]) == (200, 100, True)
    assert count(server, "events") == (200, 200)


@pytest.mark.storage_kinds("duckdb", reason="a DuckLake table has no primary key")
def test_requests_to_a_table_with_constraints_are_committed_before_they_are_answered(start_server, storage):
    import duckdb

    with duckdb.connect(str(storage.workdir / "arrowport.duckdb")) as db:
        db.execute("CREATE TABLE keyed (id BIGINT PRIMARY KEY)")
    server = start_server(JOURNAL)
    for n in range(3):
        status, report = post(server, "keyed", batch(n * 100))
        assert (status, report.get("journaled")) == (200, None)
    # Had it been journaled, this duplicate would have been answered 200 and failed later.
    status, report = post(server, "keyed", batch(0))
    assert (status, report["error"]["code"]) == (409, "constraint_violation"), json.dumps(report)
    assert count(server, "keyed") == (300, 300)


def test_a_replace_writes_what_was_journaled_first_and_old_schemas_are_then_refused_not_journaled(start_server):
    server = start_server(JOURNAL)
    assert post(server, "events", batch(0))[0] == 200
    status, report = post(server, "events", batch(100))
    assert (status, report.get("journaled")) == (200, True)
    names = pa.table({"name": ["Ada", "Grace"]})
    with flight_sql.connect(f"grpc://{server.addr}", autocommit=True) as conn, conn.cursor() as cursor:
        assert cursor.adbc_ingest("events", names, mode="replace") == 2
    # The table has other columns now: a request of the old schema must get the error, not a 200 from
    # the journal for rows that could never be written.
    status, report = post(server, "events", batch(200))
    assert (status, report["error"]["code"]) == (422, "schema_mismatch"), json.dumps(report)
    assert server.read_back("SELECT name FROM events ORDER BY name").to_pylist() == [{"name": "Ada"}, {"name": "Grace"}]
