//! A full database volume, for real: the database lives on a small tmpfs that the test fills with a file.
//!
//! Mounting needs root (or CAP_SYS_ADMIN), as in CI; elsewhere these tests say loudly that they skipped.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use arrowport_config::Config;
use tonic::Code;

use crate::flight::{put, put_messages};
use crate::support::{TestServer, batch, error_code, ipc_stream, metric, wait_until};

/// A size-limited tmpfs, unmounted on drop (lazily if something still holds it open).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts one of `size` (as `mount -o size=` takes it), or says why it cannot and returns `None`.
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match mounted {
            Ok(output) if output.status.success() => Some(Self { dir }),
            Ok(output) => {
                let stderr = String::from_utf8_lossy(&output.stderr);
                eprintln!("SKIPPED: cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {}", stderr.trim());
                None
            }
            Err(error) => {
                eprintln!("SKIPPED: cannot run mount: {error}");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file until the volume is full, then gives back `leave` bytes of it.
    fn fill(&self, leave: u64) -> PathBuf {
        let path = self.path().join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 64 << 10];
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(error) if error.raw_os_error() == Some(28) => break, // ENOSPC
                Err(error) => panic!("filling the volume: {error}"),
            }
        }
        // A write may stop short of the last page: find the room a byte at a time.
        while file.write(&[0]).is_ok_and(|n| n == 1) {}
        let length = file.metadata().unwrap().len();
        file.set_len(length.saturating_sub(leave)).unwrap();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let path = self.dir.path();
        let unmounted = Command::new("umount").arg(path).status().is_ok_and(|status| status.success());
        if !unmounted {
            eprintln!("umount {} failed; unmounting lazily", path.display());
            let _ = Command::new("umount").arg("-l").arg(path).status();
        }
    }
}

/// A server on a database in `volume`, without periodic checkpoints.
async fn server_on(volume: &Tmpfs, mut config: Config) -> TestServer {
    config.db_path = volume.path().join("test.duckdb");
    config.duckdb.checkpoint_interval_seconds = 0;
    TestServer::with_config_at(config).await
}

/// `/readyz`'s status and body.
async fn readyz(server: &TestServer) -> (u16, String) {
    let response = server.client.get(format!("{}/readyz", server.url)).send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

async fn wait_for_readyz(server: &TestServer, status: u16) {
    wait_until(&format!("/readyz to answer {status}"), Duration::from_secs(30), || async {
        readyz(server).await.0 == status
    })
    .await;
}

/// Request `n` of 3,000 rows, ids from `n * 3000`.
fn three_thousand(n: usize) -> Vec<u8> {
    ipc_stream(&[batch(n as i64 * 3000, 3000)], None)
}

/// Sends request `n` of 3,000 rows; returns whether its commit checkpointed (the WAL shrank), and keeps in
/// `growth` the most a request that did not added to the WAL.
async fn send_and_checkpoint(server: &TestServer, n: usize, growth: &mut u64) -> bool {
    let wal = || server.app.database().sizes().log_bytes;
    let before = wal();
    server.ingest_ok("disk", three_thousand(n)).await;
    let after = wal();
    if after < before {
        return true;
    }
    *growth = (*growth).max(after - before);
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_volume_is_insufficient_storage_until_space_is_freed() {
    let Some(volume) = Tmpfs::mount("16m") else { return };
    let server = server_on(&volume, Config::default()).await;
    server.ingest_ok("disk", ipc_stream(&[batch(0, 1000)], None)).await;
    assert_eq!(readyz(&server).await, (200, "ready".to_owned()));

    let filler = volume.fill(0);
    // Large enough to need room in the WAL: a small one can still fit in its last, partly written page.
    let response = server.ingest("disk", ipc_stream(&[batch(1000, 20_000)], None)).await;
    assert_eq!(error_code(response).await, (507, "insufficient_storage".to_owned()));
    let (status, reason) = readyz(&server).await;
    assert_eq!(status, 503, "{reason}");
    assert!(reason.contains("volume is full") && reason.contains("No space left on device"), "{reason}");
    // A request of a chunk or more writes its rows into the file before the commit: refused as well.
    let response = server.ingest("disk", ipc_stream(&[batch(1000, 200_000)], None)).await;
    assert_eq!(error_code(response).await, (507, "insufficient_storage".to_owned()));
    let status = put(&server, put_messages("disk", &[batch(1000, 20_000)])).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(status.metadata().get("x-arrowport-code").unwrap(), "insufficient_storage");

    // What was committed is intact, nothing of the failed requests is visible, and the server serves.
    assert_eq!(server.count("disk"), Some(1000));
    assert_eq!(server.scalar::<i64>("SELECT sum(id) FROM disk"), (0..1000).sum::<i64>());
    let text = server.metrics().await;
    let outcome = r#"arrowport_requests_total{stream="disk",protocol="http",outcome="insufficient_storage"}"#;
    assert_eq!(metric(&text, outcome), Some(2.0));
    let free = metric(&text, "arrowport_storage_free_bytes ").unwrap();
    assert!(free < 1024.0 * 1024.0, "{free} bytes free");
    assert_eq!(metric(&text, "arrowport_storage_total_bytes "), Some(16.0 * 1024.0 * 1024.0));
    // Not ready for as long as the volume stays full.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(readyz(&server).await.0, 503);

    std::fs::remove_file(filler).unwrap();
    wait_for_readyz(&server, 200).await;
    server.ingest_ok("disk", ipc_stream(&[batch(1000, 20_000)], None)).await;
    assert_eq!(server.count("disk"), Some(21_000));
    let free = metric(&server.metrics().await, "arrowport_storage_free_bytes ").unwrap();
    assert!(free > 8.0 * 1024.0 * 1024.0, "{free} bytes free");
    server.stop().await;
}

/// When the commit that takes the WAL past `checkpoint_threshold` fits in the WAL but DuckDB's automatic
/// checkpoint after it does not fit in the file, DuckDB 1.5.5 keeps the commit (it says so) and
/// invalidates the database: every statement fails from then on, until the file is opened again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_invalidated_by_a_full_volume_is_reopened_once_space_is_freed() {
    if crate::support::skip_on_ducklake(
        "a_database_invalidated_by_a_full_volume_is_reopened_once_space_is_freed",
        "DuckDB-file checkpoints; the suite's own server here is a DuckDB file either way",
    ) {
        return;
    }
    let Some(volume) = Tmpfs::mount("16m") else { return };
    let mut config = Config::default();
    config.duckdb.checkpoint_threshold = arrowport_config::ByteSize::mib(1);
    // DuckDB checkpoints at the commit whose WAL size plus an estimate of the commit's own passes the
    // threshold: count the requests up to there on a database of its own, from empty, as below.
    let calibration = TestServer::with_config(config.clone()).await;
    let (mut first_checkpoint, mut growth) = (0, 0);
    while !send_and_checkpoint(&calibration, first_checkpoint, &mut growth).await {
        first_checkpoint += 1;
    }
    calibration.stop().await;
    let server = server_on(&volume, config).await;
    for n in 0..first_checkpoint {
        assert!(!send_and_checkpoint(&server, n, &mut growth).await, "no checkpoint before request {first_checkpoint}");
    }
    // Room for one more request's WAL entry, far too little for the checkpoint: until the first one the
    // file has no blocks to reuse, and it writes whole 256 KiB blocks. The next request takes the WAL past
    // the threshold: its commit is kept, its checkpoint fails.
    let filler = volume.fill(growth + (16 << 10));
    server.ingest_ok("disk", three_thousand(first_checkpoint)).await;
    let sent = first_checkpoint + 1;
    wait_for_readyz(&server, 503).await;
    let (_, reason) = readyz(&server).await;
    assert!(reason.contains("invalidated") && reason.contains("No space left on device"), "{reason}");
    assert!(reason.contains("Transaction COMMIT succeeded and is durable, but the autocheckpoint failed"), "{reason}");
    // Meanwhile every request fails for lack of space; reads fail as well.
    let response = server.ingest("disk", three_thousand(sent)).await;
    assert_eq!(error_code(response).await, (507, "insufficient_storage".to_owned()));
    let read =
        server.app.database().with_connection(|c| c.query_row("SELECT count(*) FROM disk", [], |r| r.get::<_, i64>(0)));
    assert!(read.is_err(), "an invalidated database reads nothing: {read:?}");

    std::fs::remove_file(filler).unwrap();
    wait_for_readyz(&server, 200).await;
    // Every acknowledged request is there, the one whose checkpoint failed included; nothing of the
    // refused one.
    let rows = sent as i64 * 3000;
    assert_eq!(server.count("disk"), Some(rows));
    assert_eq!(server.scalar::<i64>("SELECT sum(id) FROM disk"), (0..rows).sum::<i64>());
    server.ingest_ok("disk", three_thousand(sent)).await;
    assert_eq!(server.count("disk"), Some(rows + 3000));
    server.stop().await;
}
