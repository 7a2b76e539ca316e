"""The client side of image/boot: talks to the ingester running inside the image, over loopback.

    python image/boot_client.py http://127.0.0.1:PORT STREAM

Waits for /readyz, sends three rows with HTTP (an Arrow IPC stream, zstd buffers), checks that
GET /streams counts them, and reads the table back with Flight DoGet (same port). Exits non-zero with a
message on the first thing that is not as expected. Needs pyarrow (the project's venv has it).
"""

import json
import sys
import time
import urllib.error
import urllib.request

import pyarrow as pa
import pyarrow.flight as flight


def get(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read()


def main(base, stream):
    deadline = time.monotonic() + 60
    while True:
        try:
            status, _ = get(f"{base}/readyz")
            if status == 200:
                break
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.monotonic() > deadline:
            sys.exit(f"boot_client: {base}/readyz did not answer 200 within 60 s")
        time.sleep(0.2)
    print("  /readyz: 200")

    table = pa.table({"id": pa.array([1, 2, 3], pa.int64()), "name": ["a", "b", "c"]})
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    request = urllib.request.Request(
        f"{base}/ingest/{stream}",
        data=sink.getvalue().to_pybytes(),
        headers={"Content-Type": "application/vnd.apache.arrow.stream"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        report = json.loads(response.read())
    if report.get("rows") != 3:
        sys.exit(f"boot_client: POST /ingest/{stream} answered {report}")
    print(f"  POST /ingest/{stream}: {report}")

    _, body = get(f"{base}/streams")
    streams = {s["stream"]: s for s in json.loads(body)["streams"]}
    if streams.get(stream, {}).get("rows") != 3:
        sys.exit(f"boot_client: GET /streams does not count 3 rows for {stream}: {streams.get(stream)}")
    print(f"  GET /streams: {stream} has {streams[stream]['rows']} rows")

    client = flight.FlightClient(base.replace("http://", "grpc://"))
    back = client.do_get(flight.Ticket(stream.encode())).read_all()
    rows = sorted(zip(back.column("id").to_pylist(), back.column("name").to_pylist()))
    if rows != [(1, "a"), (2, "b"), (3, "c")]:
        sys.exit(f"boot_client: Flight DoGet {stream} returned {rows}")
    print(f"  Flight DoGet {stream}: the same 3 rows")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
