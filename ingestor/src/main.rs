use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use arrowport::reload::Reloader;
use arrowport_cli::{self as cli, CompressionArg};
use arrowport_config::settings::{self, Overrides};
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;

/// Arrowport: land Apache Arrow streams in DuckDB.
#[derive(Parser)]
#[command(name = "arrowport", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the ingest server (HTTP and Arrow Flight on one port).
    Serve(ServeArgs),
    /// Send Arrow IPC, Parquet, CSV or JSON-lines files to a running server.
    Ingest(cli::ingest::IngestArgs),
    /// List a running server's streams, or what a config file would route.
    Streams(cli::streams::StreamsArgs),
    /// Check a base config or streams file: print every problem, exit non-zero if there is any.
    Validate(cli::validate::ValidateArgs),
    /// Tokens for access control (`auth.tokens_file`).
    #[command(subcommand)]
    Token(cli::token::TokenCommand),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Base config file (YAML). Without one, defaults apply.
    #[arg(long, env = "ARROWPORT_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 0.0.0.0].
    #[arg(long, env = "ARROWPORT_HOST")]
    host: Option<String>,
    /// Port to listen on, for HTTP and Flight; 0 picks a free one [default: 8888].
    #[arg(long, env = "ARROWPORT_PORT")]
    port: Option<u16>,
    /// Serve Arrow Flight on this port instead of sharing the HTTP port; 0 picks a free one.
    #[arg(long, env = "ARROWPORT_FLIGHT_PORT")]
    flight_port: Option<u16>,
    /// DuckDB database file [default: ./arrowport.duckdb].
    #[arg(long, env = "ARROWPORT_DB")]
    db: Option<PathBuf>,
    /// Streams file (only a `streams:` map), as rendered by the operator.
    #[arg(long, env = "ARROWPORT_STREAMS_PATH")]
    streams_path: Option<PathBuf>,
    /// Default compression for Arrow data Arrowport sends.
    #[arg(long, env = "ARROWPORT_COMPRESSION", value_enum)]
    compression: Option<CompressionArg>,
}

/// Only with glibc (see `arrowport::malloc`); elsewhere the system allocator serves as it is.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[global_allocator]
static ALLOCATOR: arrowport::malloc::LargeBuffersMapped = arrowport::malloc::LargeBuffersMapped;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .init();
    let outcome = match Cli::parse().command {
        Command::Serve(args) => serve(args),
        Command::Ingest(args) => cli::ingest::run(args).map_err(Into::into),
        Command::Streams(args) => cli::streams::run(args).map_err(Into::into),
        Command::Validate(args) => cli::validate::run(args).map_err(Into::into),
        Command::Token(command) => cli::token::run(command).map_err(Into::into),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Red only where stderr takes colours (a terminal, NO_COLOR unset).
            eprintln!("{} {error:#}", console::style("error:").for_stderr().red().bold());
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let overrides = Overrides {
        db_path: args.db,
        host: args.host,
        port: args.port,
        flight_port: args.flight_port,
        streams_path: args.streams_path,
        compression: args.compression.map(Into::into),
    };
    let config = settings::load(args.config.as_deref(), &overrides)?;
    let config_path = args.config.clone();
    arrowport::malloc::release_free_memory_every(Duration::from_secs(1)).context("cannot start a thread")?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        // Handlers first: a SIGTERM that arrives once we are listening must find them in place.
        let shutdown = shutdown_signal()?;
        let tokens = config.auth.tokens_file.as_deref().map(settings::load_tokens).transpose()?;
        let app = arrowport::app::App::open(&config)?;
        if let Some(tokens) = &tokens {
            app.replace_tokens(tokens);
            tracing::info!(
                tokens = tokens.tokens.len(),
                "Access control on: every request but health and metrics needs a token."
            );
        }
        let listener = TcpListener::bind((config.host.as_str(), config.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", config.host, config.port))?;
        let addr = listener.local_addr()?;
        let flight_listener = match config.flight_port {
            Some(port) => Some(
                TcpListener::bind((config.host.as_str(), port))
                    .await
                    .with_context(|| format!("cannot listen for Flight on {}:{port}", config.host))?,
            ),
            None => None,
        };
        let flight_addr = match &flight_listener {
            Some(listener) => listener.local_addr()?,
            None => addr,
        };
        let scheme = if config.tls.is_some() { "https" } else { "http" };
        let storage = app.database().storage().describe();
        tracing::info!(%addr, scheme, flight = %flight_addr, %storage, streams = config.streams.len(), "Listening.");
        let tls = match &config.tls {
            Some(tls) => Some(arrowport::transport::tls::Tls::start(tls, &app)?),
            None => None,
        };
        let reloader = tokio::spawn(Reloader::new(config_path, overrides, app.clone(), config, tokens).run());
        arrowport::transport::serve(listener, flight_listener, app, tls, shutdown).await;
        reloader.abort();
        tracing::info!("Stopped.");
        Ok(())
    })
}

/// Installs SIGINT and SIGTERM handlers; the future completes on either signal.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}
