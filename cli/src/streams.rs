//! `arrowport streams`: what a running server routes and has ingested (its `GET /streams`), or what a
//! config file would route (`--config`, offline).

use std::path::{Path, PathBuf};

use arrowport_api::StreamsReport;
use arrowport_config::settings::{self, Overrides};
use arrowport_config::{Compression, FlushPolicy, SchemaPolicy};
use indicatif::HumanBytes;
use serde::Serialize;

use super::http_client::HttpServer;
use super::tls::{Tls, TlsArgs};
use super::token::TokenArgs;
use super::{DEFAULT_SERVER, Error, Output};

#[derive(Debug, clap::Args)]
pub struct StreamsArgs {
    /// Arrowport server to ask.
    #[arg(long, env = "ARROWPORT_SERVER", default_value = DEFAULT_SERVER)]
    pub server: String,
    /// List what this base config (with the streams file it names) or streams file would route,
    /// without contacting a server.
    #[arg(long, short, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t)]
    pub output: Output,
    #[command(flatten)]
    pub token: TokenArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
}

pub fn run(args: StreamsArgs) -> Result<(), Error> {
    match &args.config {
        Some(path) => print_config(path, args.output),
        None => print_server(&args.server, args.token.token()?.as_deref(), &args.tls.load()?, args.output),
    }
}

fn print_server(server: &str, token: Option<&str>, tls: &Tls, output: Output) -> Result<(), Error> {
    let http = HttpServer::new(server, token, tls)?;
    // The JSON is printed as the server sent it, fields this client does not know included.
    let json: serde_json::Value = super::runtime()?.block_on(http.streams())?;
    if output == Output::Json {
        println!("{json:#}");
        return Ok(());
    }
    let report: StreamsReport = serde_json::from_value(json)
        .map_err(|error| Error::Protocol { url: server.to_owned(), message: error.to_string() })?;
    let rows = report
        .streams
        .iter()
        .map(|stream| {
            vec![
                stream.stream.clone(),
                stream.table.clone(),
                stream.stats.rows.to_string(),
                HumanBytes(stream.stats.bytes_decoded).to_string(),
                compression(&stream.compression),
                stream.schema_policy.as_str().to_owned(),
                stream.stats.last_write.clone().unwrap_or_else(|| "-".to_owned()),
            ]
        })
        .collect();
    print!("{}", table(&["STREAM", "TABLE", "ROWS", "BYTES", "COMPRESSION", "POLICY", "LAST WRITE"], rows, &[2, 3]));
    println!("{}", others(report.auto_create, &report.compression));
    Ok(())
}

/// What `--config --output json` prints.
#[derive(Serialize)]
struct Routing {
    auto_create: bool,
    compression: Compression,
    streams: Vec<Routed>,
}

#[derive(Serialize)]
struct Routed {
    stream: String,
    table: String,
    compression: Compression,
    schema_policy: SchemaPolicy,
    chunk_size: usize,
    flush: FlushPolicy,
}

fn print_config(path: &Path, output: Output) -> Result<(), Error> {
    let config = settings::load(Some(path), &Overrides::default())?;
    // Loading validated every configured name, so each resolves.
    let streams: Vec<Routed> = config
        .streams
        .keys()
        .filter_map(|name| settings::route(&config.streams, config.auto_create, config.compression, name).ok())
        .map(|route| Routed {
            stream: route.stream,
            table: route.table,
            compression: route.compression,
            schema_policy: route.policy,
            chunk_size: route.chunk_size,
            flush: route.flush,
        })
        .collect();
    if output == Output::Json {
        let routing = Routing { auto_create: config.auto_create, compression: config.compression, streams };
        println!("{:#}", serde_json::json!(routing));
        return Ok(());
    }
    let rows = streams
        .iter()
        .map(|stream| {
            vec![
                stream.stream.clone(),
                stream.table.clone(),
                compression(&stream.compression),
                stream.schema_policy.as_str().to_owned(),
            ]
        })
        .collect();
    print!("{}", table(&["STREAM", "TABLE", "COMPRESSION", "POLICY"], rows, &[]));
    println!("{}", others(config.auto_create, &config.compression));
    Ok(())
}

/// `zstd(3)`, `lz4`, `none`.
fn compression(compression: &Compression) -> String {
    match compression.level {
        Some(level) => format!("{}({level})", compression.algorithm.as_str()),
        None => compression.algorithm.as_str().to_owned(),
    }
}

/// The line under the table: what happens to a stream the table does not list.
fn others(auto_create: bool, default: &Compression) -> String {
    if auto_create {
        format!(
            "Other streams: a table named after the stream, created on first write; compression {}.",
            compression(default)
        )
    } else {
        "Other streams: refused (auto_create is off).".to_owned()
    }
}

/// Columns padded to their widest cell, two spaces apart; `right` columns (numbers) aligned right.
/// The header is bold where stdout takes colours.
fn table(header: &[&str], rows: Vec<Vec<String>>, right: &[usize]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|title| title.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(
                |(i, (cell, width))| {
                    if right.contains(&i) { format!("{cell:>width$}") } else { format!("{cell:<width$}") }
                },
            )
            .collect();
        padded.join("  ").trim_end().to_owned()
    };
    let bold = console::Style::new().bold();
    let mut text = format!("{}\n", bold.apply_to(line(header.iter().map(|title| (*title).to_owned()).collect())));
    for row in rows {
        text += &line(row);
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up() {
        console::set_colors_enabled(false);
        let text = table(
            &["STREAM", "ROWS"],
            vec![vec!["a".into(), "5".into()], vec!["longer_name".into(), "12345".into()]],
            &[1],
        );
        assert_eq!(text, "STREAM        ROWS\na                5\nlonger_name  12345\n");
    }
}
