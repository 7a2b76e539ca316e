//! Hot reload through the real binary: ConfigMap symlink swaps, in-place edits, rename-over writes,
//! refused configurations.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::Duration;

use arrowport_api::{IngestReport, StreamsReport};
use futures::StreamExt;

use crate::support::*;

/// How quickly a change must be in force.
const RELOAD_DEADLINE: Duration = Duration::from_secs(2);

async fn streams(server: &Process) -> StreamsReport {
    reqwest::get(format!("{}/streams", server.url)).await.unwrap().json().await.unwrap()
}

async fn ingest(server: &Process, stream: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/ingest/{stream}", server.url))
        .header("content-type", STREAM_TYPE)
        .body(ipc_stream(&[batch(0, 10)], None))
        .send()
        .await
        .unwrap()
}

async fn table_of(server: &Process, stream: &str) -> String {
    let response = ingest(server, stream).await;
    assert_eq!(response.status(), 200);
    response.json::<IngestReport>().await.unwrap().table
}

async fn scrape(server: &Process, prefix: &str) -> Option<f64> {
    let text = reqwest::get(format!("{}/metrics", server.url)).await.unwrap().text().await.unwrap();
    metric(&text, prefix)
}

async fn wait_for_generation(server: &Process, generation: u64) -> Duration {
    wait_until(&format!("generation {generation}"), Duration::from_secs(10), || async {
        streams(server).await.generation == generation
    })
    .await
}

/// Lays out a directory as the kubelet mounts a ConfigMap: `streams.yaml -> ..data/streams.yaml`,
/// `..data -> ..<version>`.
fn configmap_version(mount: &Path, version: &str, streams_yaml: &str) {
    let dir = mount.join(format!("..{version}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("streams.yaml"), streams_yaml).unwrap();
    // The kubelet's atomic update: a new symlink under a temporary name, renamed over `..data`.
    let tmp = mount.join("..data_tmp");
    symlink(format!("..{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, mount.join("..data")).unwrap();
    if !mount.join("streams.yaml").exists() {
        symlink("..data/streams.yaml", mount.join("streams.yaml")).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_swap_reroutes_while_an_upload_in_flight_keeps_its_table() {
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("streams");
    std::fs::create_dir(&mount).unwrap();
    configmap_version(&mount, "2026_01_01", "streams:\n  sensors: {target_table: readings_v1}\n");
    let base = format!("db_path: swap.duckdb\nstreams_path: {}\n", mount.join("streams.yaml").display());
    std::fs::write(dir.path().join("config.yaml"), base).unwrap();
    let mut server = Process::serve(dir.path(), &["--config", "config.yaml", "--port", "0"], &[]);
    assert_eq!(streams(&server).await.generation, 1);

    // A long upload starts under the first routing and waits half-way.
    let body = ipc_stream(&[batch(0, 5000), batch(5000, 5000)], None);
    let (first, second) = body.split_at(body.len() / 2);
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let pieces = futures::stream::iter([(first.to_vec(), None), (second.to_vec(), Some(released))]).then(
        |(piece, gate)| async move {
            if let Some(gate) = gate {
                let _ = gate.await;
            }
            Ok::<_, std::io::Error>(piece)
        },
    );
    let upload = tokio::spawn(
        reqwest::Client::new()
            .post(format!("{}/ingest/sensors", server.url))
            .header("content-type", STREAM_TYPE)
            .body(reqwest::Body::wrap_stream(pieces))
            .send(),
    );
    wait_until("the upload to be in flight", Duration::from_secs(10), || async {
        scrape(&server, "arrowport_inflight_requests ").await == Some(1.0)
    })
    .await;

    configmap_version(&mount, "2026_01_02", "streams:\n  sensors: {target_table: readings_v2}\n");
    std::fs::remove_dir_all(mount.join("..2026_01_01")).unwrap();
    let took = wait_for_generation(&server, 2).await;
    assert!(took < RELOAD_DEADLINE, "the swap took {took:?} to apply");
    assert_eq!(table_of(&server, "sensors").await, "readings_v2");

    release.send(()).unwrap();
    let response = upload.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    let report: IngestReport = response.json().await.unwrap();
    assert_eq!((report.table.as_str(), report.rows), ("readings_v1", 10_000));
    assert_eq!(scrape(&server, "arrowport_config_reloads_total ").await, Some(1.0));
    server.terminate();
    assert!(server.wait().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_edits_and_rename_over_writes_reload() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, "streams:\n  a: {target_table: first}\n").unwrap();
    let mut server =
        Process::serve(dir.path(), &["--config", "config.yaml", "--port", "0", "--db", "edit.duckdb"], &[]);
    assert_eq!(table_of(&server, "a").await, "first");

    // An editor writing in place.
    std::fs::write(&config, "streams:\n  a: {target_table: second}\n").unwrap();
    assert!(wait_for_generation(&server, 2).await < RELOAD_DEADLINE);
    assert_eq!(table_of(&server, "a").await, "second");

    // An editor writing a temporary file and renaming it over the original.
    let tmp = dir.path().join(".config.yaml.swp");
    std::fs::write(&tmp, "auto_create: false\nstreams:\n  a: {target_table: third}\n").unwrap();
    std::fs::rename(&tmp, &config).unwrap();
    assert!(wait_for_generation(&server, 3).await < RELOAD_DEADLINE);
    assert_eq!(table_of(&server, "a").await, "third");
    assert_eq!(ingest(&server, "not_configured").await.status(), 404, "auto_create: false applies live");

    // Comments and reformatting route the same way: no new generation.
    std::fs::write(&config, "# reformatted\nauto_create: false\nstreams: {a: {target_table: third}}\n").unwrap();
    std::fs::write(dir.path().join("marker"), "").unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(streams(&server).await.generation, 3);
    server.terminate();
    assert!(server.wait().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_configuration_is_refused_and_the_old_one_stays() {
    let dir = tempfile::tempdir().unwrap();
    let streams_file = dir.path().join("streams.yaml");
    std::fs::write(&streams_file, "streams:\n  a: {target_table: kept}\n").unwrap();
    let mut server =
        Process::serve(dir.path(), &["--streams-path", "streams.yaml", "--port", "0", "--db", "broken.duckdb"], &[]);
    for broken in [
        "streams:\n  a: {target_tabel: typo}\n",
        "streams: [not, a, map\n",
        "streams:\n  a: {target_table: 'bad name'}\n",
    ] {
        let failures = scrape(&server, "arrowport_config_reload_failures_total ").await.unwrap_or(0.0);
        std::fs::write(&streams_file, broken).unwrap();
        wait_until("the reload to be refused", Duration::from_secs(10), || async {
            scrape(&server, "arrowport_config_reload_failures_total ").await == Some(failures + 1.0)
        })
        .await;
        assert_eq!(streams(&server).await.generation, 1);
        assert_eq!(table_of(&server, "a").await, "kept");
        let ready = reqwest::get(format!("{}/readyz", server.url)).await.unwrap();
        assert_eq!(ready.status(), 200, "a refused reload does not make the server unready");
    }
    std::fs::write(&streams_file, "streams:\n  a: {target_table: fixed}\n").unwrap();
    wait_for_generation(&server, 2).await;
    assert_eq!(table_of(&server, "a").await, "fixed");
    server.terminate();
    assert!(server.wait().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_endpoint_lists_configured_and_auto_created_streams() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.yaml"),
        "compression: {algorithm: zstd}\nstreams:\n  sensors: {target_table: readings, schema_policy: evolve, compression: {algorithm: lz4}}\n",
    )
    .unwrap();
    let mut server =
        Process::serve(dir.path(), &["--config", "config.yaml", "--port", "0", "--db", "list.duckdb"], &[]);
    assert_eq!(ingest(&server, "adhoc").await.status(), 200);
    let report = streams(&server).await;
    assert_eq!((report.generation, report.hash.len()), (1, 16));
    let names: Vec<&str> = report.streams.iter().map(|s| s.stream.as_str()).collect();
    assert_eq!(names, ["adhoc", "sensors"]);
    let adhoc = &report.streams[0];
    assert!(!adhoc.configured && adhoc.routable);
    assert_eq!((adhoc.stats.rows, adhoc.stats.requests, adhoc.table.as_str()), (10, 1, "adhoc"));
    assert!(adhoc.compression_ratio.unwrap() > 0.0 && adhoc.stats.last_write.is_some());
    // The global level is left out (the default would have it, as 3).
    assert_eq!(adhoc.compression.level, None, "auto-created streams advertise the global compression");
    let sensors = &report.streams[1];
    assert!(sensors.configured && sensors.stats.last_write.is_none());
    assert_eq!((sensors.table.as_str(), sensors.schema_policy.as_str()), ("readings", "evolve"));
    assert_eq!(sensors.compression.algorithm.as_str(), "lz4");
    server.terminate();
    assert!(server.wait().success());
}
