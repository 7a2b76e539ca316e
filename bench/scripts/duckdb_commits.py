"""DuckDB's own rate for commits of a given size, in-process: the ceiling for small requests.

Loads `--total` lineitem-like rows (the 16 column types arrowport-bench generates) into a fresh DuckDB file
as INSERT + COMMIT of `--rows` rows each, then CHECKPOINTs, and prints rows/s, CPU time and commit
latencies. Compare `--rows 32000` (what 32 producers of 1,000-row requests can have in flight) with
`--rows 2000000` (one bulk insert). `--blocked-by-checkpoint` instead logs `--total` rows without
checkpointing, then runs CHECKPOINT while another connection commits 1,000-row inserts, and prints how
long those commits waited. Run with the test venv's Python (DuckDB 1.5.5):

    ~/.cache/arrowport-venv/bin/python bench/scripts/duckdb_commits.py --rows 32000
"""

import argparse
import os
import resource
import tempfile
import threading
import time

import duckdb

LINEITEM = """
SELECT range AS l_orderkey, (range * 7) % 200000 AS l_partkey, (range * 13) % 10000 AS l_suppkey,
  (range % 7)::INT AS l_linenumber, (range % 50)::DECIMAL(15,2) AS l_quantity,
  (range * 1.7)::DECIMAL(15,2) AS l_extendedprice, ((range % 10) / 100)::DECIMAL(15,2) AS l_discount,
  ((range % 8) / 100)::DECIMAL(15,2) AS l_tax, ['A','N','R'][range % 3 + 1] AS l_returnflag,
  ['O','F'][range % 2 + 1] AS l_linestatus, DATE '1992-01-01' + (range % 2500)::INT AS l_shipdate,
  DATE '1992-01-01' + (range % 2400)::INT AS l_commitdate, DATE '1992-01-01' + (range % 2600)::INT AS l_receiptdate,
  ['DELIVER IN PERSON','COLLECT COD','NONE','TAKE BACK RETURN'][range % 4 + 1] AS l_shipinstruct,
  ['AIR','MAIL','SHIP','TRUCK','RAIL','FOB','REG AIR'][range % 7 + 1] AS l_shipmode,
  md5(range::VARCHAR)[:(10 + range % 30)::INT] AS l_comment
FROM range({rows})
"""


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32_000, help="rows per INSERT + COMMIT")
    parser.add_argument("--total", type=int, default=2_000_000, help="rows loaded in all")
    parser.add_argument("--threads", type=int, help="DuckDB threads (default: DuckDB's)")
    parser.add_argument("--checkpoint-threshold", default="64MiB", help="as Arrowport sets it by default")
    parser.add_argument("--blocked-by-checkpoint", action="store_true", help="measure commits during a CHECKPOINT")
    args = parser.parse_args()
    if args.blocked_by_checkpoint:
        args.checkpoint_threshold = "1TiB"

    batch = duckdb.connect().execute(LINEITEM.format(rows=args.rows)).arrow()
    batch = batch.read_all() if hasattr(batch, "read_all") else batch
    config = {"checkpoint_threshold": args.checkpoint_threshold}
    if args.threads:
        config["threads"] = args.threads
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "commits.duckdb")
        db = duckdb.connect(path, config=config)
        db.execute("CREATE TABLE lineitem AS SELECT * FROM batch LIMIT 0")
        started, cpu = time.time(), cpu_seconds()
        latencies, loaded = [], 0
        while loaded < args.total:
            sent = time.time()
            db.execute("BEGIN")
            db.execute("INSERT INTO lineitem SELECT * FROM batch")
            db.execute("COMMIT")
            latencies.append(time.time() - sent)
            loaded += args.rows
        if args.blocked_by_checkpoint:
            return commits_during_checkpoint(db, path, batch)
        db.execute("CHECKPOINT")
        elapsed, cpu = time.time() - started, cpu_seconds() - cpu
        latencies.sort()
        print(
            f"{args.rows} rows a commit: {loaded / elapsed / 1e6:.2f}M rows/s, {cpu:.2f} s CPU, "
            f"commit p50 {latencies[len(latencies) // 2] * 1e3:.0f} ms, max {latencies[-1] * 1e3:.0f} ms, "
            f"file {os.path.getsize(path) / 1e6:.0f} MB"
        )


def commits_during_checkpoint(db, path, batch):
    wal = os.path.getsize(path + ".wal") / 1e6
    commits, done = [], threading.Event()

    def commit_small_inserts():
        writer = db.cursor()
        writer.register("small", batch.slice(0, 1000))
        while not done.is_set():
            sent = time.time()
            writer.execute("INSERT INTO lineitem SELECT * FROM small")
            commits.append((sent, time.time() - sent))

    writer = threading.Thread(target=commit_small_inserts)
    writer.start()
    time.sleep(0.5)
    started = time.time()
    db.cursor().execute("CHECKPOINT")
    ended = time.time()
    time.sleep(0.5)
    done.set()
    writer.join()
    before = [waited for sent, waited in commits if sent < started]
    during = [waited for sent, waited in commits if started <= sent + waited and sent <= ended]
    print(
        f"CHECKPOINT of a {wal:.0f} MB WAL took {ended - started:.2f} s; commits overlapping it: "
        f"{len(during)}, the longest waited {max(during, default=0) * 1e3:.0f} ms "
        f"(before it: longest {max(before, default=0) * 1e3:.0f} ms)"
    )


if __name__ == "__main__":
    main()
