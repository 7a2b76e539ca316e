"""Arrow Flight (PyArrow) and Flight SQL (ADBC) clients against the real server, incl. the README's examples."""

import http.client
import json
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import adbc_driver_flightsql.dbapi as flight_sql
import adbc_driver_manager
import duckdb
import pyarrow as pa
import pyarrow.flight as fl
import pytest

from conftest import DATA_TABLES, readme_block

SCHEMA = pa.schema([("id", pa.int64()), ("name", pa.string())])
# For calls that wait on an ack: a missing ack fails the test instead of hanging it.
PATIENCE = fl.FlightCallOptions(timeout=20)


class Trailers(fl.ClientMiddlewareFactory):
    """Records the headers and trailers of every call, to read `x-arrowport-code`."""

    def __init__(self):
        self.seen = []

    def start_call(self, info):
        factory = self

        class Recorder(fl.ClientMiddleware):
            def received_headers(self, headers):
                factory.seen.append(dict(headers))

        return Recorder()

    def codes(self):
        return [code for headers in self.seen for code in headers.get("x-arrowport-code", [])]


def client(server, trailers=None):
    return fl.FlightClient(f"grpc://{server.addr}", middleware=[trailers] if trailers else [])


def rows(start, count):
    ids = list(range(start, start + count))
    return pa.record_batch({"id": ids, "name": [f"n{i}" for i in ids]}, schema=SCHEMA)


def metadata(request_id):
    return pa.py_buffer(json.dumps({"request_id": request_id}).encode())


def do_put(flight, stream, batches, schema=SCHEMA):
    """One DoPut of `(batch, app_metadata or None)` pairs; the acks as dicts. Raises the call's error."""
    writer, reader = flight.do_put(fl.FlightDescriptor.for_path(stream), schema, options=PATIENCE)
    try:
        for batch, meta in batches:
            if meta is None:
                writer.write_batch(batch)
            else:
                writer.write_with_metadata(batch, meta)
        writer.done_writing()
        acks = []
        while (ack := reader.read()) is not None:
            acks.append(json.loads(ack.to_pybytes()))
    finally:
        writer.close()
    return acks


def do_get(flight, stream):
    return flight.do_get(fl.Ticket(stream.encode())).read_all()


def sorted_table(table):
    return table.sort_by("id")


# --- Flight DoPut ---------------------------------------------------------------------------------


def test_do_put_acks_one_commit_with_the_highest_request_id(server):
    flight = client(server)
    # Out of order on purpose: the ack carries the highest id committed, not the last one sent.
    ids = [7, 3, 5]
    acks = do_put(flight, "events", [(rows(i * 10, 10), metadata(rid)) for i, rid in enumerate(ids)])
    assert acks == [{"rows_committed": 30, "batches_committed": 3, "rows_total": 30, "request_id": 7}]
    # A bare integer counts as a request_id too; without any, the ack has no request_id.
    acks = do_put(flight, "events", [(rows(30, 5), pa.py_buffer(b"11"))])
    assert acks == [{"rows_committed": 5, "batches_committed": 1, "rows_total": 5, "request_id": 11}]
    acks = do_put(flight, "events", [(rows(35, 5), None)])
    assert acks == [{"rows_committed": 5, "batches_committed": 1, "rows_total": 5}]
    assert sorted_table(do_get(flight, "events")).equals(pa.Table.from_batches([rows(0, 40)]))


def test_do_put_metadata_only_message_marks_the_position(server):
    flight = client(server)
    writer, reader = flight.do_put(fl.FlightDescriptor.for_path("events"), SCHEMA, options=PATIENCE)
    writer.write_with_metadata(rows(0, 4), metadata(1))
    writer.write_metadata(metadata(2))
    writer.done_writing()
    acks = []
    while (ack := reader.read()) is not None:
        acks.append(json.loads(ack.to_pybytes()))
    writer.close()
    assert acks == [{"rows_committed": 4, "batches_committed": 1, "rows_total": 4, "request_id": 2}]


def test_do_put_commits_at_the_flush_threshold(start_server):
    server = start_server("streams:\n  events:\n    flush: {rows: 100}\n")
    flight = client(server)
    batches = [(rows(i * 50, 50), metadata(i)) for i in range(10)]
    acks = do_put(flight, "events", batches)
    # 50-row batches, a commit at every 100 rows: five acks, each naming the last batch it made durable.
    assert len(acks) == 5
    assert [a["rows_committed"] for a in acks] == [100] * 5
    assert [a["batches_committed"] for a in acks] == [2] * 5
    totals = [a["rows_total"] for a in acks]
    assert totals == sorted(totals) and len(set(totals)) == len(totals)
    assert totals[-1] == 500
    assert [a["request_id"] for a in acks] == [1, 3, 5, 7, 9]

    expected = pa.Table.from_batches([rows(0, 500)])
    assert sorted_table(do_get(flight, "events")).equals(expected)
    back = server.read_back("SELECT id, name FROM events ORDER BY id")
    assert back.column("id").to_pylist() == expected.column("id").to_pylist()
    assert back.column("name").to_pylist() == expected.column("name").to_pylist()


def test_do_put_acks_arrive_while_the_call_is_open_and_are_durable(start_server):
    server = start_server("streams:\n  events:\n    flush: {rows: 100}\n")
    flight, other = client(server), client(server)
    writer, reader = flight.do_put(fl.FlightDescriptor.for_path("events"), SCHEMA, options=PATIENCE)
    writer.write_with_metadata(rows(0, 60), metadata(1))
    writer.write_with_metadata(rows(60, 60), metadata(2))
    first = json.loads(reader.read().to_pybytes())
    assert first == {"rows_committed": 120, "batches_committed": 2, "rows_total": 120, "request_id": 2}
    # Committed means visible to everyone, while the call goes on.
    assert other.get_flight_info(fl.FlightDescriptor.for_path("events")).total_records == 120
    writer.write_with_metadata(rows(120, 30), metadata(3))
    writer.done_writing()
    last = json.loads(reader.read().to_pybytes())
    assert reader.read() is None
    writer.close()
    assert last == {"rows_committed": 30, "batches_committed": 1, "rows_total": 150, "request_id": 3}
    assert do_get(other, "events").num_rows == 150


def test_do_put_commits_at_the_flush_interval(start_server):
    server = start_server("streams:\n  ticks:\n    flush: {interval_seconds: 1}\n")
    flight = client(server)
    writer, reader = flight.do_put(fl.FlightDescriptor.for_path("ticks"), SCHEMA, options=PATIENCE)
    started = time.monotonic()
    writer.write_with_metadata(rows(0, 3), metadata(1))
    ack = json.loads(reader.read().to_pybytes())  # no more data: only the interval can commit this
    assert 0.8 < time.monotonic() - started < 10
    assert ack == {"rows_committed": 3, "batches_committed": 1, "rows_total": 3, "request_id": 1}
    writer.done_writing()
    assert reader.read() is None
    writer.close()


def test_a_producer_that_dies_keeps_only_what_was_acknowledged(start_server):
    # A 1 s interval: had the server missed the disconnect, it would commit the pending 50 rows itself.
    server = start_server("streams:\n  events:\n    flush: {rows: 100, interval_seconds: 1}\n")
    producer = textwrap.dedent(
        f"""
        import json, os, sys, time
        import pyarrow as pa, pyarrow.flight as fl
        schema = pa.schema([("id", pa.int64()), ("name", pa.string())])
        def rows(start):
            ids = list(range(start, start + 50))
            return pa.record_batch({{"id": ids, "name": [str(i) for i in ids]}}, schema=schema)
        client = fl.FlightClient("grpc://{server.addr}")
        writer, reader = client.do_put(fl.FlightDescriptor.for_path("events"), schema)
        writer.write_batch(rows(0))
        writer.write_batch(rows(50))
        print(reader.read().to_pybytes().decode(), flush=True)
        writer.write_batch(rows(100))
        time.sleep(0.5)
        os._exit(3)
        """
    )
    result = subprocess.run([sys.executable, "-c", producer], capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    assert json.loads(result.stdout)["rows_total"] == 100
    time.sleep(2.5)
    flight = client(server)
    assert sorted(do_get(flight, "events").column("id").to_pylist()) == list(range(100))
    assert do_put(flight, "events", [(rows(500, 1), None)])[0]["rows_total"] == 1


# --- Flight: reading streams back ------------------------------------------------------------------


def test_list_flights_get_flight_info_get_schema_do_get(start_server):
    server = start_server("streams:\n  sensors:\n    target_table: sensor_readings\n  idle: {}\n")
    flight = client(server)
    events = pa.Table.from_batches([rows(0, 25)])
    readings = pa.table({"id": pa.array([1, 2], pa.int64()), "celsius": pa.array([20.5, 21.0])})
    do_put(flight, "events", [(b, None) for b in events.to_batches()])
    do_put(flight, "sensors", [(b, None) for b in readings.to_batches()], readings.schema)

    flights = {f.descriptor.path[0].decode(): f for f in flight.list_flights()}
    assert set(flights) == {"events", "sensors", "idle"}
    assert flights["events"].total_records == 25 and flights["events"].schema.equals(events.schema)
    assert flights["sensors"].total_records == 2 and flights["sensors"].schema.equals(readings.schema)
    assert flights["idle"].total_records == 0 and len(flights["idle"].schema) == 0

    info = flight.get_flight_info(fl.FlightDescriptor.for_path("sensors"))
    assert info.total_records == 2 and info.schema.equals(readings.schema)
    assert [e.ticket.ticket for e in info.endpoints] == [b"sensors"]
    assert flight.get_schema(fl.FlightDescriptor.for_path("sensors")).schema.equals(readings.schema)
    # The endpoint's ticket reads the stream's table (sensor_readings) back, values and all.
    assert sorted_table(flight.do_get(info.endpoints[0].ticket).read_all()).equals(readings)
    assert sorted_table(do_get(flight, "events")).equals(events)

    back = server.read_back("SELECT id, celsius FROM sensor_readings ORDER BY id")
    assert back.to_pylist() == readings.to_pylist()


def test_reading_an_unknown_stream_is_not_found(server):
    trailers = Trailers()
    flight = client(server, trailers)
    for call in (
        lambda: flight.get_flight_info(fl.FlightDescriptor.for_path("nothing")),
        lambda: flight.get_schema(fl.FlightDescriptor.for_path("nothing")),
        lambda: do_get(flight, "nothing"),
    ):
        with pytest.raises(pa.ArrowKeyError, match="not found.*stream \"nothing\" has no data yet"):
            call()
    assert trailers.codes() == ["no_data"] * 3


# --- Flight: bad input ------------------------------------------------------------------------------


def test_schema_mismatch_is_refused_and_nothing_is_written(server):
    trailers = Trailers()
    flight = client(server, trailers)
    first = pa.Table.from_batches([rows(0, 3)])
    do_put(flight, "events", [(b, None) for b in first.to_batches()])

    wrong_type = pa.table({"id": ["x", "y"], "name": ["a", "b"]})
    with pytest.raises(pa.ArrowInvalid, match=r"precondition failed.*schema mismatch.*id is BIGINT in the table but VARCHAR"):
        do_put(flight, "events", [(b, None) for b in wrong_type.to_batches()], wrong_type.schema)
    unknown_column = pa.table({"id": pa.array([9], pa.int64()), "extra": ["z"]})
    with pytest.raises(pa.ArrowInvalid, match=r"schema mismatch: column\(s\) not in the table: extra"):
        do_put(flight, "events", [(b, None) for b in unknown_column.to_batches()], unknown_column.schema)
    assert trailers.codes() == ["schema_mismatch", "schema_mismatch"]

    assert sorted_table(do_get(flight, "events")).equals(first)
    # The server keeps serving: the next good put lands.
    assert do_put(flight, "events", [(rows(3, 2), metadata(4))])[0] == {
        "rows_committed": 2, "batches_committed": 1, "rows_total": 2, "request_id": 4,
    }
    assert sorted_table(do_get(flight, "events")).equals(pa.Table.from_batches([rows(0, 5)]))


def test_bad_descriptors_are_invalid_argument(server):
    trailers = Trailers()
    flight = client(server, trailers)
    with pytest.raises(pa.ArrowInvalid, match="invalid argument.*a PATH descriptor names one stream"):
        writer, _ = flight.do_put(fl.FlightDescriptor.for_path("a", "b"), SCHEMA)
        writer.write_batch(rows(0, 1))
        writer.close()
    with pytest.raises(pa.ArrowInvalid, match="invalid argument.*invalid stream name"):
        do_put(flight, "no spaces", [(rows(0, 1), None)])
    assert "invalid_stream_name" in trailers.codes()
    assert do_put(flight, "events", [(rows(0, 1), None)])[0]["rows_total"] == 1


def test_unknown_stream_is_not_found_when_auto_create_is_off(start_server):
    server = start_server("auto_create: false\nstreams:\n  known: {}\n")
    trailers = Trailers()
    flight = client(server, trailers)
    with pytest.raises(pa.ArrowKeyError, match='not found.*unknown stream "nope".*auto_create is off'):
        do_put(flight, "nope", [(rows(0, 2), metadata(1))])
    assert trailers.codes() == ["unknown_stream"]
    assert do_put(flight, "known", [(rows(0, 2), metadata(1))])[0]["rows_total"] == 2
    assert {f.descriptor.path[0] for f in flight.list_flights()} == {b"known"}
    assert server.read_back(DATA_TABLES).column(0).to_pylist() == ["known"]


def test_a_batch_larger_than_the_memory_budget_is_refused_and_rolls_back(start_server):
    server = start_server("limits:\n  memory_budget_bytes: 64KiB\nstreams:\n  events:\n    flush: {rows: 100}\n")
    trailers = Trailers()
    flight = client(server, trailers)
    small = (rows(0, 100), metadata(1))
    too_big = (rows(100, 20_000), metadata(2))
    tail = (rows(20_100, 10), metadata(3))
    # Retrying cannot help (unlike a budget that is busy: RESOURCE_EXHAUSTED, overloaded).
    with pytest.raises(pa.ArrowInvalid, match="invalid argument.*more than the whole memory budget of 65536 bytes"):
        do_put(flight, "events", [small, too_big, tail])
    assert trailers.codes() == ["batch_too_large"]
    # The first 100 rows were committed (and acknowledged) before the oversized batch.
    assert sorted_table(do_get(flight, "events")).equals(pa.Table.from_batches([rows(0, 100)]))
    assert do_put(flight, "events", [tail])[0]["rows_total"] == 10


# --- Flight SQL through ADBC ----------------------------------------------------------------------


def connect(server):
    return flight_sql.connect(f"grpc://{server.addr}", autocommit=True)


def query(conn, sql):
    with conn.cursor() as cursor:  # a fresh cursor: see the README's note on adbc-driver-flightsql 1.13
        cursor.execute(sql)
        return cursor.fetch_arrow_table()


def ingest(conn, table_name, data, mode):
    with conn.cursor() as cursor:
        return cursor.adbc_ingest(table_name, data, mode=mode)


PEOPLE = pa.table({"id": pa.array([1, 2, 3], pa.int64()), "name": ["Ada", "Grace", "Edsger"]})
MORE = pa.table({"id": pa.array([4, 5], pa.int64()), "name": ["Barbara", "Donald"]})


def test_adbc_ingest_modes_land_exactly_what_was_sent(server):
    with connect(server) as conn:
        assert ingest(conn, "people", PEOPLE, "create") == 3
        assert query(conn, "SELECT * FROM people ORDER BY id").equals(PEOPLE)
        assert ingest(conn, "people", MORE, "append") == 2
        assert query(conn, "SELECT * FROM people ORDER BY id").equals(pa.concat_tables([PEOPLE, MORE]))
        # replace drops the table and recreates it from the new data's schema.
        replaced = pa.table({"id": pa.array([10], pa.int64()), "score": pa.array([0.5])})
        assert ingest(conn, "people", replaced, "replace") == 1
        assert query(conn, "SELECT * FROM people").equals(replaced)
        more_scores = pa.table({"id": pa.array([11, 12], pa.int64()), "score": pa.array([1.5, 2.5])})
        assert ingest(conn, "people", more_scores, "create_append") == 2
        assert query(conn, "SELECT * FROM people ORDER BY id").equals(pa.concat_tables([replaced, more_scores]))
        # create_append and replace also create a missing table.
        assert ingest(conn, "fresh", MORE, "create_append") == 2
        assert query(conn, "SELECT * FROM fresh ORDER BY id").equals(MORE)
        assert ingest(conn, "fresh2", PEOPLE, "replace") == 3
        assert query(conn, "SELECT * FROM fresh2 ORDER BY id").equals(PEOPLE)
    back = server.read_back("SELECT id, score FROM people ORDER BY id")
    assert back.to_pylist() == pa.concat_tables([replaced, more_scores]).to_pylist()


def test_adbc_ingest_create_on_existing_and_append_on_missing_fail(server):
    with connect(server) as conn:
        ingest(conn, "people", PEOPLE, "create")
        with pytest.raises(adbc_driver_manager.ProgrammingError, match='ALREADY_EXISTS.*table "people" already exists') as error:
            ingest(conn, "people", MORE, "create")
        assert (b"x-arrowport-code", b"table_exists") in error.value.details
        with pytest.raises(adbc_driver_manager.ProgrammingError, match='NOT_FOUND.*table "missing" does not exist') as error:
            ingest(conn, "missing", MORE, "append")
        assert (b"x-arrowport-code", b"table_not_found") in error.value.details
        assert query(conn, "SELECT * FROM people ORDER BY id").equals(PEOPLE)
        tables = query(conn, "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main' ORDER BY 1").column(0).to_pylist()
        assert tables == ["people"]


@pytest.mark.storage_kinds("duckdb", reason="a DuckLake has no PRIMARY KEY or UNIQUE constraints")
def test_adbc_ingest_into_a_table_with_a_primary_key_refuses_duplicates(start_server, tmp_path):
    # The user's own table, created before the server opens the file.
    with duckdb.connect(str(tmp_path / "arrowport.duckdb")) as db:
        db.execute("CREATE TABLE people (id BIGINT PRIMARY KEY, name VARCHAR)")
    server = start_server()
    with connect(server) as conn:
        ingest(conn, "people", PEOPLE, "append")
        clash = pa.table({"id": pa.array([4, 2], pa.int64()), "name": ["Barbara", "Grace again"]})
        with pytest.raises(adbc_driver_manager.Error, match=r"violates a constraint of the table: Duplicate key.*\(FailedPrecondition") as error:
            ingest(conn, "people", clash, "append")
        assert (b"x-arrowport-code", b"constraint_violation") in error.value.details
        assert query(conn, "SELECT * FROM people ORDER BY id").equals(PEOPLE)


def test_adbc_ingest_schema_mismatch_and_unsupported_options(server):
    with connect(server) as conn:
        ingest(conn, "people", PEOPLE, "create")
        with pytest.raises(adbc_driver_manager.OperationalError, match="schema mismatch.*id is BIGINT in the table but VARCHAR") as error:
            ingest(conn, "people", pa.table({"id": ["x"], "name": ["y"]}), "append")
        assert (b"x-arrowport-code", b"schema_mismatch") in error.value.details
        with conn.cursor() as cursor:
            with pytest.raises(adbc_driver_manager.ProgrammingError, match="INVALID_ARGUMENT.*temporary tables are not supported"):
                cursor.adbc_ingest("people", MORE, mode="append", temporary=True)
        with conn.cursor() as cursor:
            with pytest.raises(adbc_driver_manager.ProgrammingError, match='INVALID_ARGUMENT.*catalog "elsewhere" does not exist'):
                cursor.adbc_ingest("people", MORE, mode="append", catalog_name="elsewhere")
        with conn.cursor() as cursor:
            assert cursor.adbc_ingest("people", MORE, mode="append", catalog_name=server.catalog, db_schema_name="main") == 2
        assert query(conn, "SELECT * FROM people ORDER BY id").equals(pa.concat_tables([PEOPLE, MORE]))


def test_adbc_ingest_is_routed_like_a_stream(start_server):
    server = start_server("streams:\n  sensors:\n    target_table: sensor_readings\n")
    readings = pa.table({"id": pa.array([1, 2], pa.int64()), "celsius": pa.array([20.5, 21.0])})
    with connect(server) as conn:
        assert ingest(conn, "sensors", readings, "create_append") == 2
        assert query(conn, "SELECT * FROM sensor_readings ORDER BY id").equals(readings)
        tables = query(conn, "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main'").column(0).to_pylist()
        assert tables == ["sensor_readings"]
    assert sorted_table(do_get(client(server), "sensors")).equals(readings)


def test_adbc_queries_read_back(server):
    with connect(server) as conn:
        ingest(conn, "people", PEOPLE, "create")
        with conn.cursor() as cursor:
            cursor.execute("SELECT name FROM people WHERE id >= 2 ORDER BY id")
            assert cursor.fetchall() == [("Grace",), ("Edsger",)]
            cursor.execute("WITH t AS (SELECT count(*) AS n, sum(id) AS s FROM people) SELECT * FROM t")
            assert cursor.fetchall() == [(3, 6)]
            cursor.execute("SELECT * FROM people ORDER BY id")
            assert cursor.fetch_arrow_table().equals(PEOPLE)
        with conn.cursor() as cursor:
            with pytest.raises(adbc_driver_manager.ProgrammingError, match="INVALID_ARGUMENT.*Table with name nowhere does not exist") as error:
                cursor.execute("SELECT * FROM nowhere")
            assert (b"x-arrowport-code", b"invalid_query") in error.value.details


@pytest.mark.parametrize(
    "sql",
    [
        "DROP TABLE people",
        "INSERT INTO people VALUES (4, 'Barbara')",
        "DELETE FROM people",
        "COPY people TO 'people.csv'",
        "SET threads = 1",
        "ATTACH ':memory:' AS other",
        "CREATE TABLE people_copy AS SELECT * FROM people",
        "SELECT 1; DROP TABLE people",
    ],
)
def test_adbc_writes_through_execute_are_refused(server, sql):
    with connect(server) as conn:
        ingest(conn, "people", PEOPLE, "create")
        with conn.cursor() as cursor:
            with pytest.raises(adbc_driver_manager.ProgrammingError, match="INVALID_ARGUMENT.*query refused") as error:
                cursor.execute(sql)
                cursor.fetchall()
        assert (b"x-arrowport-code", b"invalid_query") in error.value.details
        assert query(conn, "SELECT * FROM people ORDER BY id").equals(PEOPLE)
        tables = query(conn, "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main'").column(0).to_pylist()
        assert tables == ["people"]
    assert not (server.workdir / "people.csv").exists()


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM read_text('/etc/hostname')",
        "SELECT * FROM read_csv('/etc/passwd', header = false)",
        "SELECT * FROM glob('/*')",
        "SELECT * FROM '/etc/passwd'",
        "SELECT * FROM duckdb_databases()",
        "SELECT * FROM information_schema.views",
    ],
)
def test_adbc_queries_cannot_read_the_servers_files_or_catalogs(server, sql):
    with connect(server) as conn:
        ingest(conn, "people", PEOPLE, "create")
        with conn.cursor() as cursor:
            with pytest.raises(adbc_driver_manager.ProgrammingError, match="INVALID_ARGUMENT") as error:
                cursor.execute(sql)
                cursor.fetchall()
        assert (b"x-arrowport-code", b"invalid_query") in error.value.details
        assert "root:" not in str(error.value)
        assert query(conn, "SELECT * FROM people ORDER BY id").equals(PEOPLE)


@pytest.mark.storage_kinds("ducklake", reason="only a lake opens a directory (its data path) to DuckDB's file access")
def test_adbc_queries_cannot_read_the_lakes_parquet_files_directly(server):
    many = pa.table({"id": pa.array(range(20_000), pa.int64()), "name": ["x"] * 20_000})
    with connect(server) as conn:
        # More rows than the lake inlines into its catalog (100): they go to a Parquet file.
        assert ingest(conn, "people", many, "create") == 20_000
        data = server.workdir / "lake"
        assert list(data.rglob("*.parquet")), "the rows were not written to a Parquet file"
        for sql in [
            f"SELECT count(*) FROM read_parquet('{data}/**/*.parquet')",
            f"SELECT * FROM glob('{data}/**')",
            f"SELECT count(*) FROM '{data}/**/*.parquet'",
        ]:
            with conn.cursor() as cursor, pytest.raises(adbc_driver_manager.ProgrammingError, match="INVALID_ARGUMENT") as error:
                cursor.execute(sql)
                cursor.fetchall()
            assert (b"x-arrowport-code", b"invalid_query") in error.value.details
        assert query(conn, "SELECT count(*) AS n FROM people").column("n").to_pylist() == [20_000]


def test_adbc_queries_cannot_list_or_scan_a_live_upload(server):
    """An HTTP upload held open in its data phase: no query lists its scan view or reads its rows."""
    big = pa.record_batch({"id": list(range(150_000)), "name": ["x"] * 150_000}, schema=SCHEMA)
    rest = rows(150_000, 1000)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, SCHEMA) as writer:
        writer.write_batch(big)
        head = sink.tell()
        writer.write_batch(rest)
    stream = sink.getvalue().to_pybytes()
    release = threading.Event()

    def body():
        yield stream[:head]
        release.wait(30)
        yield stream[head:]

    answer = {}

    def upload():
        connection = http.client.HTTPConnection(server.addr, timeout=60)
        connection.request("POST", "/ingest/live", body=body(), encode_chunked=True,
                           headers={"Content-Type": "application/vnd.apache.arrow.stream"})
        response = connection.getresponse()
        answer["status"], answer["body"] = response.status, json.loads(response.read())

    sender = threading.Thread(target=upload)
    sender.start()
    try:
        deadline = time.monotonic() + 20
        while metric(server, "arrowport_inflight_requests") < 1:
            assert time.monotonic() < deadline, "the upload never started"
            time.sleep(0.05)
        # Its first 150,000 rows (more than a chunk) went to DuckDB at once: give the server a moment to
        # start the load. (The Rust test of the same case waits for the scan view itself.)
        time.sleep(2)
        attempts = ["SELECT view_name FROM duckdb_views()", "SELECT * FROM duckdb_views"]
        attempts += [f"SELECT count(*) FROM arrowport_scratch.main.ingest_{n}" for n in range(4)]
        with connect(server) as conn:
            for sql in attempts:
                with conn.cursor() as cursor, pytest.raises(adbc_driver_manager.ProgrammingError, match="INVALID_ARGUMENT"):
                    cursor.execute(sql)
                    cursor.fetchall()
    finally:
        release.set()
        sender.join(60)
    assert answer["status"] == 200, answer
    assert answer["body"]["rows"] == 151_000
    back = server.read_back("SELECT count(*) AS n, sum(id) AS s FROM live")
    assert back.to_pylist() == [{"n": 151_000, "s": sum(range(151_000))}]


def metric(server, name):
    """One unlabelled sample of `/metrics`."""
    with urllib.request.urlopen(f"{server.url}/metrics") as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def test_adbc_query_timeout_is_deadline_exceeded(start_server):
    server = start_server("limits:\n  query_timeout_seconds: 1\n")
    with connect(server) as conn:
        started = time.monotonic()
        with conn.cursor() as cursor:
            with pytest.raises(adbc_driver_manager.OperationalError, match="TIMEOUT.*query cancelled after the limit of 1 s") as error:
                cursor.execute("SELECT count(*) FROM range(100000000000)")
                cursor.fetchall()
        assert time.monotonic() - started < 30
        assert (b"x-arrowport-code", b"query_timeout") in error.value.details
        with conn.cursor() as cursor:
            cursor.execute("SELECT 42 AS answer")
            assert cursor.fetchall() == [(42,)]


def test_adbc_metadata_lists_catalog_schema_and_tables(server):
    with connect(server) as conn:
        ingest(conn, "people", PEOPLE, "create")
        ingest(conn, "pets", MORE, "create")
        objects = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
        assert [o["catalog_name"] for o in objects] == [server.catalog]
        [schema] = objects[0]["catalog_db_schemas"]
        assert schema["db_schema_name"] == "main"
        assert sorted((t["table_name"], t["table_type"]) for t in schema["db_schema_tables"]) == [
            ("people", "BASE TABLE"),
            ("pets", "BASE TABLE"),
        ]
        assert conn.adbc_get_table_schema("people").equals(PEOPLE.schema)
        assert conn.adbc_get_table_types() == ["BASE TABLE"]
        assert conn.adbc_get_info()["vendor_name"] == "Arrowport"


def test_adbc_default_connection_warns_about_autocommit_and_still_works(server):
    with pytest.warns(Warning, match="Cannot disable autocommit"):
        conn = flight_sql.connect(f"grpc://{server.addr}")
    with conn:
        assert ingest(conn, "people", PEOPLE, "create") == 3
        assert query(conn, "SELECT * FROM people ORDER BY id").equals(PEOPLE)
        conn.commit()  # a no-op: each ingest committed on its own


def test_adbc_execute_after_ingest_on_the_same_cursor_is_a_driver_quirk(server):
    """Pins the adbc-driver-flightsql 1.13 behaviour the README tells users to work around."""
    with connect(server) as conn:
        with conn.cursor() as cursor:
            cursor.adbc_ingest("people", PEOPLE, mode="create")
            with pytest.raises(adbc_driver_manager.ProgrammingError, match="must set IngestTargetTable"):
                cursor.execute("SELECT * FROM people")
        assert query(conn, "SELECT count(*) AS n FROM people").column("n").to_pylist() == [3]


# --- The README's examples, as written -------------------------------------------------------------


def run_readme(marker, server, tmp_path):
    code = readme_block(marker).replace("localhost:8888", server.addr)
    # `-W error`: the examples must run without warnings (e.g. ADBC's autocommit warning).
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_readme_python_flight_example(server, tmp_path):
    lines = run_readme("python-flight", server, tmp_path)
    assert lines == [
        "{'rows_committed': 3, 'batches_committed': 3, 'rows_total': 3, 'request_id': 2}",
        "3 rows in events: ['event 0', 'event 1', 'event 2']",
    ]
    back = server.read_back("SELECT id, name FROM events ORDER BY id")
    assert back.to_pylist() == [{"id": i, "name": f"event {i}"} for i in range(3)]


def test_readme_python_adbc_example(server, tmp_path):
    lines = run_readme("python-adbc", server, tmp_path)
    assert lines == ["3 rows ingested", "[('Grace',), ('Edsger',)]"]
    back = server.read_back("SELECT id, name FROM people ORDER BY id")
    assert back.to_pylist() == PEOPLE.to_pylist()


# --- Retries with an idempotency key --------------------------------------------------------------


def test_a_producer_retrying_with_its_key_resends_without_duplicates(server):
    flight = client(server)
    keyed = fl.FlightCallOptions(timeout=20, headers=[(b"idempotency-key", b"sensor-17")])

    def put(batches):
        writer, reader = flight.do_put(fl.FlightDescriptor.for_path("readings"), SCHEMA, options=keyed)
        for batch, meta in batches:
            writer.write_with_metadata(batch, meta)
        writer.done_writing()
        acks = []
        while (ack := reader.read()) is not None:
            acks.append(json.loads(ack.to_pybytes()))
        writer.close()
        return acks

    sent = [(rows(i * 10, 10), metadata(i)) for i in range(6)]
    assert put(sent[:4])[-1]["request_id"] == 3
    # The producer does not know what landed: it resends everything.
    acks = put(sent)
    assert (acks[-1]["rows_total"], acks[-1]["request_id"]) == (20, 5)
    assert sorted_table(do_get(flight, "readings")).equals(pa.Table.from_batches([rows(0, 60)]))


def test_adbc_ingest_with_an_idempotency_key_is_written_once(server):
    options = {"adbc.flight.sql.rpc.call_header.idempotency-key": "nightly-load-2026-11-29"}
    with flight_sql.connect(f"grpc://{server.addr}", db_kwargs=options, autocommit=True) as conn:
        assert ingest(conn, "nightly", PEOPLE, "create_append") == 3
        assert ingest(conn, "nightly", PEOPLE, "create_append") == 3  # the replay answers the same count
        assert query(conn, "SELECT count(*) AS n FROM nightly").column("n").to_pylist() == [3]
