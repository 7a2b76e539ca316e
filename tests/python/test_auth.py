"""Access control with real clients sending their real credentials: HTTP with urllib, pyarrow.flight
with `FlightCallOptions(headers=...)` and `authenticate_basic_token`, ADBC with
`adbc.flight.sql.authorization_header` and with a username and password (the Flight SQL handshake)."""

import hashlib
import json
import urllib.error
import urllib.request

import adbc_driver_flightsql.dbapi as flight_sql
import adbc_driver_manager
import pyarrow as pa
import pyarrow.flight as flight
import pytest

LOADER = "loader-token-4b1d"
READER = "reader-token-9e22"
TABLE = pa.table({"id": [1, 2, 3], "name": ["a", "b", "c"]})


def sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@pytest.fixture
def guarded(start_server, tmp_path):
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(
        "tokens:\n"
        f"  loader: {{sha256: {sha256(LOADER)}, write: [events, 'sensors.*']}}\n"
        f"  reader: {{sha256: {sha256(READER)}, query: true}}\n"
    )
    return start_server(f"auth: {{tokens_file: {tokens}}}\n")


def ipc_body(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def post(server, stream: str, headers: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{server.url}/ingest/{stream}",
        data=ipc_body(TABLE),
        headers={"Content-Type": "application/vnd.apache.arrow.stream", **headers},
    )
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_http_bearer_tokens_and_their_grants(guarded):
    assert post(guarded, "events", {})[0] == 401
    status, body = post(guarded, "events", {"Authorization": "Bearer wrong"})
    assert (status, body["error"]["code"]) == (401, "unauthenticated")
    status, body = post(guarded, "orders", {"Authorization": f"Bearer {LOADER}"})
    assert (status, body["error"]["code"]) == (403, "permission_denied")
    status, body = post(guarded, "sensors.north", {"Authorization": f"Bearer {LOADER}"})
    assert (status, body["rows"]) == (200, 3)
    with urllib.request.urlopen(f"{guarded.url}/healthz") as response:
        assert response.status == 200


def put(client: flight.FlightClient, stream: str, options: flight.FlightCallOptions) -> None:
    writer, _ = client.do_put(flight.FlightDescriptor.for_path(stream), TABLE.schema, options=options)
    writer.write_table(TABLE)
    writer.close()


def test_pyarrow_flight_headers_and_basic_token_authentication(guarded):
    client = flight.FlightClient(f"grpc://{guarded.addr}")
    with pytest.raises(flight.FlightUnauthenticatedError):
        put(client, "events", flight.FlightCallOptions())
    with pytest.raises(flight.FlightUnauthenticatedError):
        put(client, "events", flight.FlightCallOptions(headers=[(b"authorization", b"Bearer wrong")]))
    loader = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {LOADER}".encode())])
    with pytest.raises(flight.FlightUnauthorizedError):
        put(client, "orders", loader)
    put(client, "events", loader)
    with pytest.raises(flight.FlightUnauthorizedError):
        client.do_get(flight.Ticket(b"events"), options=loader).read_all()
    with pytest.raises(flight.FlightUnauthorizedError):
        list(client.list_flights(options=loader))

    # authenticate_basic_token: the Flight handshake with a user name and the token as the password;
    # the server answers the bearer header to send from then on.
    header = client.authenticate_basic_token("reader", READER)
    assert header == (b"authorization", f"Bearer {READER}".encode())
    reader = flight.FlightCallOptions(headers=[header])
    assert client.do_get(flight.Ticket(b"events"), options=reader).read_all().num_rows == 3
    assert [info.descriptor.path for info in client.list_flights(options=reader)] == [[b"events"]]
    with pytest.raises(flight.FlightUnauthenticatedError):
        client.authenticate_basic_token("reader", "wrong")


def test_adbc_with_an_authorization_header_and_with_username_password(guarded):
    uri = f"grpc://{guarded.addr}"
    loader = {"adbc.flight.sql.authorization_header": f"Bearer {LOADER}"}
    with flight_sql.connect(uri, db_kwargs=loader, autocommit=True) as conn:
        with conn.cursor() as cursor:
            assert cursor.adbc_ingest("events", TABLE, mode="create_append") == 3
        with conn.cursor() as cursor:
            with pytest.raises(adbc_driver_manager.Error, match="PERMISSION_DENIED|PermissionDenied|Unauthorized"):
                cursor.adbc_ingest("orders", TABLE, mode="create_append")
        with conn.cursor() as cursor:
            with pytest.raises(adbc_driver_manager.Error, match="PERMISSION_DENIED|PermissionDenied|Unauthorized"):
                cursor.execute("SELECT count(*) FROM events")
    # Username and password: the driver's handshake, then the bearer token it was handed.
    reader = {"username": "reader", "password": READER}
    with flight_sql.connect(uri, db_kwargs=reader, autocommit=True) as conn:
        with conn.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM events")
            assert cursor.fetchall() == [(3,)]
    with pytest.raises(adbc_driver_manager.Error, match="UNAUTHENTICATED|Unauthenticated"):
        with flight_sql.connect(uri, db_kwargs={"username": "reader", "password": "wrong"}, autocommit=True) as conn:
            with conn.cursor() as cursor:
                cursor.execute("SELECT 1")
