//! Several ingester processes writing one DuckLake through a PostgreSQL catalog and a shared data
//! directory. Needs a PostgreSQL server: `ARROWPORT_TEST_POSTGRES` is a libpq connection string to it
//! (`.ci/run` starts one with `scripts/test-postgres`) and `ARROWPORT_TEST_EXTENSIONS` the extension
//! directory; without them the tests say so and skip.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use arrowport::app::App;
use arrowport_config::{Config, DuckLakeConfig, StorageConfig};

use crate::support::{Process, STREAM_TYPE, batch, ipc_stream, metric};

/// The PostgreSQL server and extension directory, or `None` after saying why the test skips.
fn environment(test: &str) -> Option<(String, String)> {
    match (std::env::var("ARROWPORT_TEST_POSTGRES"), std::env::var("ARROWPORT_TEST_EXTENSIONS")) {
        (Ok(postgres), Ok(extensions)) => Some((postgres, extensions)),
        _ => {
            eprintln!(
                "SKIPPED {test}: set ARROWPORT_TEST_POSTGRES (a libpq connection string; bash scripts/test-postgres \
                 start DIR) and ARROWPORT_TEST_EXTENSIONS (bash scripts/duckdb-extensions)"
            );
            None
        }
    }
}

/// A fresh database on the server for one lake's catalog; returns its connection string.
fn fresh_catalog(postgres: &str, name: &str) -> String {
    let admin = postgres.replace("dbname=lake", "dbname=postgres");
    for statement in [format!("DROP DATABASE IF EXISTS {name}"), format!("CREATE DATABASE {name}")] {
        let status = Command::new("psql").arg(&admin).arg("-qc").arg(&statement).status().expect("psql runs");
        assert!(status.success(), "{statement}");
    }
    postgres.replace("dbname=lake", &format!("dbname={name}"))
}

fn lake_config(catalog: &str, data: &Path, extensions: &str, maintenance_seconds: u64) -> Config {
    let mut lake = DuckLakeConfig::new(format!("postgres:{catalog}"), data);
    lake.maintenance_interval_seconds = maintenance_seconds;
    let mut config = Config { storage: StorageConfig::Ducklake(lake), ..Config::default() };
    config.duckdb.extension_directory = Some(extensions.into());
    config
}

/// Starts `count` ingesters on one lake; each has its own config file (and working directory).
fn ingesters(dir: &Path, config: &Config, count: usize) -> Vec<Process> {
    (0..count)
        .map(|i| {
            let home = dir.join(format!("ingester-{i}"));
            std::fs::create_dir_all(&home).unwrap();
            let yaml = serde_json::to_string(config).unwrap(); // JSON is YAML
            std::fs::write(home.join("config.yaml"), yaml).unwrap();
            Process::serve(&home, &["--config", "config.yaml", "--host", "127.0.0.1", "--port", "0"], &[])
        })
        .collect()
}

async fn several_ingesters_write_one_lake_exactly_once(count: usize) {
    let test = format!("{count}_ingesters_write_one_lake");
    let Some((postgres, extensions)) = environment(&test) else { return };
    let dir = tempfile::tempdir().unwrap();
    let catalog = fresh_catalog(&postgres, &format!("lake_{count}_{}", std::process::id()));
    let config = lake_config(&catalog, &dir.path().join("data"), &extensions, 1);
    let mut servers = ingesters(dir.path(), &config, count);
    let client = reqwest::Client::new();
    // Eight producers spread over the ingesters: each writes its own id range to a shared stream and to
    // a stream of its own, which every ingester races to create at the same moment.
    let producers = (0..8).map(|producer| {
        let (client, url) = (client.clone(), servers[producer % count].url.clone());
        async move {
            let mut acked = 0;
            for request in 0..10 {
                let start = (producer * 10 + request) as i64 * 1000;
                let stream = if request % 2 == 0 { "shared".to_owned() } else { format!("new_{}", request % 3) };
                // As a producer should: a request that fails is retried with its idempotency key, so it
                // lands once whatever happened to the first try. (Several writers on one DuckLake can lose
                // a commit to another's concurrent change: DuckLake then fails it, rarely, with a 500.)
                let key = format!("p{producer}-r{request}");
                let mut answer = None;
                for _ in 0..5 {
                    let response = client
                        .post(format!("{url}/ingest/{stream}"))
                        .header("content-type", STREAM_TYPE)
                        .header("idempotency-key", &key)
                        .body(ipc_stream(&[batch(start, 100)], None))
                        .send()
                        .await
                        .unwrap();
                    let status = response.status();
                    let text = response.text().await.unwrap();
                    if status == 200 {
                        answer = None;
                        break;
                    }
                    eprintln!("{key}: {status} {text}; retrying with the key");
                    answer = Some((status, text));
                }
                assert!(answer.is_none(), "{key} never committed: {answer:?}");
                acked += 100;
            }
            acked
        }
    });
    let acked: i64 = futures::future::join_all(producers).await.into_iter().sum();
    // Maintenance runs every second on one of them: the others skip their turn.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut turns = Vec::new();
    for server in &servers {
        let text = client.get(format!("{}/metrics", server.url)).send().await.unwrap().text().await.unwrap();
        let ran = metric(&text, r#"arrowport_checkpoints_total{outcome="ok"} "#).unwrap_or(0.0);
        let skipped = metric(&text, r#"arrowport_checkpoints_total{outcome="skipped"} "#).unwrap_or(0.0);
        turns.push((ran, skipped));
    }
    for server in &mut servers {
        server.terminate();
    }
    for server in servers {
        assert!(server.wait().success());
    }
    let maintainers = turns.iter().filter(|(ran, _)| *ran > 0.0).count();
    assert_eq!(maintainers, 1, "exactly one ingester maintained the lake: {turns:?}");
    // A reader of its own on the same lake sees every acknowledged row exactly once.
    let reader = App::open(&config).unwrap();
    let (rows, distinct): (i64, i64) = reader
        .database()
        .with_connection(|c| {
            c.query_row(
                "SELECT count(*), count(DISTINCT id) FROM (SELECT id FROM shared UNION ALL SELECT id FROM new_0 \
                 UNION ALL SELECT id FROM new_1 UNION ALL SELECT id FROM new_2)",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
        })
        .unwrap();
    assert_eq!((rows, distinct), (acked, acked));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ingesters_write_one_lake_exactly_once() {
    several_ingesters_write_one_lake_exactly_once(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_ingesters_write_one_lake_exactly_once() {
    several_ingesters_write_one_lake_exactly_once(4).await;
}
