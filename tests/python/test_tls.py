"""TLS and mutual TLS with real clients: curl and urllib over HTTPS (HTTP/1.1 and HTTP/2), pyarrow Flight
over grpc+tls:// with the test CA, ADBC over TLS, client certificates accepted and refused, a certificate
rotated mid-run (a Secret volume's `..data` swap, as cert-manager's renewals arrive), and broken or
expired replacements that keep the old certificate. Certificates are made here with `cryptography`."""

import datetime
import hashlib
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import adbc_driver_flightsql.dbapi as flight_sql
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TABLE = pa.table({"id": [1, 2, 3], "name": ["a", "b", "c"]})
NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


class Issuer:
    """A CA that signs server and client certificates."""

    def __init__(self, name: str):
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY)
            .not_valid_after(NOW + 30 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, name: str, server: bool, not_before=None, not_after=None) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM)."""
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or NOW - DAY)
            .not_valid_after(not_after or NOW + 30 * DAY)
        )
        if server:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
            usage = ExtendedKeyUsageOID.SERVER_AUTH
        else:
            usage = ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem


class SecretVolume:
    """A directory laid out as the kubelet mounts a Secret: `tls.crt -> ..data/tls.crt`, `..data` swapped."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir()
        self.versions = 0

    def publish(self, files: dict[str, bytes]) -> None:
        self.versions += 1
        version = self.root / f"..v{self.versions}"
        version.mkdir()
        for name, content in files.items():
            (version / name).write_bytes(content)
        tmp = self.root / "..data_tmp"
        os.symlink(version.name, tmp)
        os.replace(tmp, self.root / "..data")
        for name in files:
            if not (self.root / name).is_symlink():
                os.symlink(f"..data/{name}", self.root / name)

    def path(self, name: str) -> Path:
        return self.root / name


@pytest.fixture
def ca():
    return Issuer("arrowport test CA")


@pytest.fixture
def certs(tmp_path, ca):
    """The server's Secret volume with a first certificate, and the CA file clients trust."""
    volume = SecretVolume(tmp_path / "tls")
    cert, key = ca.issue("first", server=True)
    volume.publish({"tls.crt": cert, "tls.key": key, "ca.crt": ca.pem()})
    return volume


def tls_config(volume: SecretVolume, client_ca: bool = False, extra: str = "") -> str:
    text = f"tls:\n  cert: {volume.path('tls.crt')}\n  key: {volume.path('tls.key')}\n"
    if client_ca:
        text += f"  client_ca: {volume.path('ca.crt')}\n"
    return text + extra


def ipc_body(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def port(server) -> str:
    return server.addr.rsplit(":", 1)[1]


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "--silent", "--show-error", *args], capture_output=True, text=True, timeout=30)


def served_name(server, ca_file: Path) -> str:
    """The subject common name of the certificate a new handshake gets."""
    context = ssl.create_default_context(cafile=str(ca_file))
    with socket.create_connection(("127.0.0.1", int(port(server)))) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            subject = dict(pair[0] for pair in tls.getpeercert()["subject"])
            return subject["commonName"]


def metric(server, ca_file: Path, name: str) -> float:
    context = ssl.create_default_context(cafile=str(ca_file))
    with urllib.request.urlopen(f"https://127.0.0.1:{port(server)}/metrics", context=context) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    raise AssertionError(f"no metric {name}")


def wait_for(what: str, check, seconds: float = 10) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < seconds, f"timed out waiting for {what}"
        time.sleep(0.05)
    return time.monotonic() - started


def test_https_with_curl_and_urllib_over_http1_and_http2(start_server, certs, tmp_path):
    server = start_server(tls_config(certs))
    base = f"https://127.0.0.1:{port(server)}"
    ca_file = str(certs.path("ca.crt"))
    body = tmp_path / "events.arrows"
    body.write_bytes(ipc_body(TABLE))
    for version in ["--http1.1", "--http2"]:
        done = curl(
            version, "--cacert", ca_file, "--fail-with-body", "-w", "\n%{http_version}",
            "-H", "Content-Type: application/vnd.apache.arrow.stream", "--data-binary", f"@{body}", f"{base}/ingest/events",
        )
        report, http_version = done.stdout.rsplit("\n", 1)
        assert done.returncode == 0, done.stderr
        assert json.loads(report)["rows"] == 3
        assert http_version == ("1.1" if version == "--http1.1" else "2")
    context = ssl.create_default_context(cafile=ca_file)
    with urllib.request.urlopen(f"{base}/readyz", context=context) as response:
        assert response.read() == b"ready"
    # A client that does not trust the server's CA, and cleartext on the TLS port, are refused; the server
    # goes on serving.
    assert curl(f"{base}/healthz").returncode != 0
    assert curl(f"http://127.0.0.1:{port(server)}/healthz", "--max-time", "5").returncode != 0
    assert curl("--cacert", ca_file, f"{base}/healthz").stdout == "ok"
    assert metric(server, certs.path("ca.crt"), "arrowport_tls_handshake_failures_total") >= 1


def test_pyarrow_flight_and_adbc_over_grpc_tls(start_server, certs, ca):
    server = start_server(tls_config(certs))
    uri = f"grpc+tls://127.0.0.1:{port(server)}"
    client = flight.FlightClient(uri, tls_root_certs=ca.pem())
    writer, _ = client.do_put(flight.FlightDescriptor.for_path("events"), TABLE.schema)
    writer.write_table(TABLE)
    writer.close()
    assert client.do_get(flight.Ticket(b"events")).read_all().num_rows == 3
    # Without the CA, the client refuses the server's certificate.
    with pytest.raises(flight.FlightUnavailableError):
        flight.FlightClient(uri).do_get(flight.Ticket(b"events")).read_all()

    options = {"adbc.flight.sql.client_option.tls_root_certs": ca.pem().decode()}
    with flight_sql.connect(uri, db_kwargs=options, autocommit=True) as conn:
        with conn.cursor() as cursor:
            assert cursor.adbc_ingest("people", TABLE, mode="create_append") == 3
        with conn.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM people")
            assert cursor.fetchall() == [(3,)]


def test_a_refused_upload_over_http2_gets_its_answer_not_a_stream_reset(start_server, certs, tmp_path):
    """401 and 403 come before the handler reads the body: the server reads (up to 1 MiB of) it first, or
    curl over HTTP/2 fails with 'Stream error in the HTTP/2 framing layer' instead of seeing the answer."""
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(f"tokens:\n  analyst: {{sha256: {hashlib.sha256(b'analyst-token').hexdigest()}, query: true}}\n")
    server = start_server(tls_config(certs, extra=f"auth: {{tokens_file: {tokens}}}\n"))
    body = tmp_path / "events.arrows"
    body.write_bytes(ipc_body(pa.table({"id": list(range(100_000))})))  # about 800 KB
    for token, expected in [("analyst-token", "403"), ("wrong", "401")] * 3:
        done = curl(
            "--http2", "--cacert", str(certs.path("ca.crt")), "-w", "\n%{http_code}", "-H", f"Authorization: Bearer {token}",
            "-H", "Content-Type: application/vnd.apache.arrow.stream", "--data-binary", f"@{body}",
            f"https://127.0.0.1:{port(server)}/ingest/events",
        )
        assert (done.returncode, done.stdout[-3:]) == (0, expected), done.stderr


def test_mutual_tls_client_certificates_name_token_entries(start_server, certs, ca, tmp_path):
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("tokens:\n  producer: {write: [events]}\n  analyst: {query: true}\n")
    server = start_server(tls_config(certs, client_ca=True, extra=f"auth: {{tokens_file: {tokens}}}\n"))
    base = f"https://127.0.0.1:{port(server)}"
    ca_file = str(certs.path("ca.crt"))
    body = tmp_path / "events.arrows"
    body.write_bytes(ipc_body(TABLE))

    def client_files(name: str, issuer: Issuer, **validity) -> tuple[str, str]:
        cert, key = issuer.issue(name, server=False, **validity)
        (tmp_path / f"{name}.crt").write_bytes(cert)
        (tmp_path / f"{name}.key").write_bytes(key)
        return str(tmp_path / f"{name}.crt"), str(tmp_path / f"{name}.key")

    def post(cert_and_key) -> subprocess.CompletedProcess:
        tls_args = ["--cert", cert_and_key[0], "--key", cert_and_key[1]] if cert_and_key else []
        return curl(
            "--cacert", ca_file, *tls_args, "-w", "\n%{http_code}", "-H", "Content-Type: application/vnd.apache.arrow.stream",
            "--data-binary", f"@{body}", f"{base}/ingest/events",
        )

    producer = client_files("producer", ca)
    done = post(producer)
    assert done.stdout.endswith("\n200"), done.stdout + done.stderr
    # Signed by the CA but naming no entry: authenticated by TLS, unknown to access control.
    done = post(client_files("stranger", ca))
    assert done.stdout.endswith("\n401"), done.stdout
    # Refused in the handshake: no certificate, another CA's, an expired one.
    assert post(None).returncode != 0
    assert post(client_files("producer-elsewhere", Issuer("another CA"))).returncode != 0
    expired = client_files("producer-expired", ca, not_before=NOW - 10 * DAY, not_after=NOW - DAY)
    assert post(expired).returncode != 0
    # The analyst's certificate may query, not write.
    analyst = client_files("analyst", ca)
    done = post(analyst)
    assert done.stdout.endswith("\n403"), done.stdout

    # pyarrow Flight and ADBC with client certificates.
    uri = f"grpc+tls://127.0.0.1:{port(server)}"
    as_producer = flight.FlightClient(
        uri, tls_root_certs=ca.pem(), cert_chain=Path(producer[0]).read_bytes(), private_key=Path(producer[1]).read_bytes()
    )
    writer, _ = as_producer.do_put(flight.FlightDescriptor.for_path("events"), TABLE.schema)
    writer.write_table(TABLE)
    writer.close()
    with pytest.raises(flight.FlightUnauthorizedError):
        as_producer.do_get(flight.Ticket(b"events")).read_all()
    options = {
        "adbc.flight.sql.client_option.tls_root_certs": ca.pem().decode(),
        "adbc.flight.sql.client_option.mtls_cert_chain": Path(analyst[0]).read_text(),
        "adbc.flight.sql.client_option.mtls_private_key": Path(analyst[1]).read_text(),
    }
    with flight_sql.connect(uri, db_kwargs=options, autocommit=True) as conn:
        with conn.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM events")
            assert cursor.fetchall() == [(6,)]
    # Over Flight too: no certificate, another CA's, an expired one are refused in the handshake, while the
    # producer's connection goes on writing.
    elsewhere = client_files("analyst-elsewhere", Issuer("another CA"))
    for cert_and_key in [None, elsewhere, expired]:
        identity = {} if cert_and_key is None else {
            "cert_chain": Path(cert_and_key[0]).read_bytes(), "private_key": Path(cert_and_key[1]).read_bytes()
        }
        refused = flight.FlightClient(uri, tls_root_certs=ca.pem(), **identity)
        with pytest.raises(flight.FlightUnavailableError):
            refused.do_get(flight.Ticket(b"events")).read_all()
        writer, _ = as_producer.do_put(flight.FlightDescriptor.for_path("events"), TABLE.schema)
        writer.write_table(TABLE)
        writer.close()


def test_a_rotated_certificate_is_served_to_new_connections_while_open_ones_carry_on(start_server, certs, ca):
    server = start_server(tls_config(certs))
    ca_file = certs.path("ca.crt")
    assert served_name(server, ca_file) == "first"
    # A DoPut opened under the first certificate stays open across the rotation.
    client = flight.FlightClient(f"grpc+tls://127.0.0.1:{port(server)}", tls_root_certs=ca.pem())
    writer, _ = client.do_put(flight.FlightDescriptor.for_path("events"), TABLE.schema)
    writer.write_table(TABLE)

    cert, key = ca.issue("second", server=True)
    certs.publish({"tls.crt": cert, "tls.key": key, "ca.crt": ca.pem()})
    took = wait_for("the second certificate", lambda: served_name(server, ca_file) == "second")
    assert took < 2, f"the rotation took {took:.2f} s"
    assert metric(server, ca_file, "arrowport_tls_certificate_reloads_total") == 1

    writer.write_table(TABLE)
    writer.close()
    assert client.do_get(flight.Ticket(b"events")).read_all().num_rows == 6

    # A broken certificate, and an expired one, are refused: the second stays in force.
    certs.publish({"tls.crt": b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n", "tls.key": key, "ca.crt": ca.pem()})
    wait_for("the refused broken certificate", lambda: metric(server, ca_file, "arrowport_tls_certificate_reload_failures_total") == 1)
    expired, expired_key = ca.issue("expired", server=True, not_before=NOW - 10 * DAY, not_after=NOW - DAY)
    certs.publish({"tls.crt": expired, "tls.key": expired_key, "ca.crt": ca.pem()})
    wait_for("the refused expired certificate", lambda: metric(server, ca_file, "arrowport_tls_certificate_reload_failures_total") == 2)
    assert served_name(server, ca_file) == "second"
    expiry = metric(server, ca_file, "arrowport_tls_certificate_expiry_timestamp_seconds")
    assert abs(expiry - (NOW + 30 * DAY).timestamp()) < 5


def test_an_expired_certificate_stops_the_start_with_a_clear_error(tmp_path, ca):
    volume = SecretVolume(tmp_path / "tls")
    cert, key = ca.issue("old", server=True, not_before=NOW - 10 * DAY, not_after=NOW - DAY)
    volume.publish({"tls.crt": cert, "tls.key": key})
    config = tmp_path / "config.yaml"
    config.write_text(tls_config(volume))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARROWPORT_")}
    done = subprocess.run(
        [os.environ["ARROWPORT_BIN"], "serve", "--config", str(config), "--port", "0", "--db", str(tmp_path / "db.duckdb")],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert done.returncode != 0
    assert "the certificate is valid only from" in done.stderr, done.stderr


def test_the_client_commands_over_https_with_a_client_certificate(start_server, certs, ca, tmp_path):
    server = start_server(tls_config(certs, client_ca=True))
    cert, key = ca.issue("producer", server=False)
    (tmp_path / "client.crt").write_bytes(cert)
    (tmp_path / "client.key").write_bytes(key)
    body = tmp_path / "events.arrows"
    body.write_bytes(ipc_body(TABLE))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARROWPORT_")}
    env["NO_COLOR"] = "1"

    def arrowport(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([os.environ["ARROWPORT_BIN"], *args], capture_output=True, text=True, timeout=60, env=env)

    server_args = ["--server", f"https://127.0.0.1:{port(server)}", "--ca-file", str(certs.path("ca.crt"))]
    identity = ["--client-cert", str(tmp_path / "client.crt"), "--client-key", str(tmp_path / "client.key")]
    for transport in ["--http", "--flight"]:
        done = arrowport("ingest", "events", str(body), transport, *server_args, *identity)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("events: 3 rows committed"), done.stdout
    done = arrowport("streams", "--output", "json", *server_args, *identity)
    assert json.loads(done.stdout)["streams"][0]["rows"] == 6
    # Without the CA the server is not trusted; without a certificate the server refuses the client.
    assert arrowport("streams", "--server", f"https://127.0.0.1:{port(server)}", *identity).returncode == 1
    assert arrowport("streams", *server_args).returncode == 1


def test_a_rotated_client_ca_is_in_force_for_new_connections(start_server, certs, ca, tmp_path):
    server = start_server(tls_config(certs, client_ca=True))
    server_ca = tmp_path / "server-ca.crt"
    server_ca.write_bytes(ca.pem())
    new_ca = Issuer("next client CA")

    def get(issuer: Issuer, name: str) -> subprocess.CompletedProcess:
        cert, key = issuer.issue(name, server=False)
        (tmp_path / f"{name}.crt").write_bytes(cert)
        (tmp_path / f"{name}.key").write_bytes(key)
        return curl("--cacert", str(server_ca), "--cert", str(tmp_path / f"{name}.crt"), "--key", str(tmp_path / f"{name}.key"),
                    f"https://127.0.0.1:{port(server)}/healthz")

    assert get(ca, "old-client").stdout == "ok"
    assert get(new_ca, "new-client").returncode != 0
    # The Secret's ca.crt now holds the next CA; the server certificate stays.
    certs.publish({"tls.crt": certs.path("tls.crt").read_bytes(), "tls.key": certs.path("tls.key").read_bytes(), "ca.crt": new_ca.pem()})
    wait_for("the new client CA", lambda: get(new_ca, "new-client").stdout == "ok")
    assert get(ca, "old-client-2").returncode != 0
