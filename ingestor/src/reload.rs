//! Hot reload: re-reads the base and streams files and puts a changed routing table in force.
//!
//! The files are compared by content on a short interval rather than by filesystem events: that one
//! mechanism sees in-place edits, editors that write a temporary file and rename it, and Kubernetes
//! ConfigMap volumes, where the kubelet swaps a `..data` symlink and the file's own inode never changes.
//! The tokens file (`auth.tokens_file`, in Kubernetes a Secret volume) is watched the same way.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arrowport_config::settings::{self, Overrides};
use arrowport_config::{Config, TokensFile};

use crate::app::App;
use crate::routing::Routes;

/// How often the files are compared.
pub const RELOAD_INTERVAL: Duration = Duration::from_millis(500);

/// Re-reads configuration and applies what can change while running.
pub struct Reloader {
    config_path: Option<PathBuf>,
    overrides: Overrides,
    app: Arc<App>,
    /// The configuration in force (as loaded, before anything was refused).
    active: Config,
    /// The tokens file named at start, and its entries in force (whether access control is on, and
    /// from which file, only changes with a restart).
    tokens: Option<(PathBuf, TokensFile)>,
    /// The files' contents when last looked at, so unchanged files cost one read and a compare.
    last_seen: Vec<Option<String>>,
}

/// What one look at the files did.
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    /// The files are as they were.
    Unchanged,
    /// The files changed but route the same way (formatting, comments).
    Equivalent,
    /// A new routing table is in force (and the tokens file's new entries, if it changed too).
    Applied { generation: u64 },
    /// The routes are the same; the tokens file's new entries are in force.
    TokensApplied,
    /// The new files do not parse or validate; the old configuration stays.
    Refused,
}

impl Reloader {
    /// Watches the files `active` was loaded from; `tokens` are the entries of its tokens file, in force.
    pub fn new(
        config_path: Option<PathBuf>,
        overrides: Overrides,
        app: Arc<App>,
        active: Config,
        tokens: Option<TokensFile>,
    ) -> Self {
        let tokens = active.auth.tokens_file.clone().zip(tokens);
        let mut reloader = Self { config_path, overrides, app, active, tokens, last_seen: Vec::new() };
        reloader.last_seen = reloader.read_sources();
        reloader
    }

    /// Runs [`check`](Self::check) every [`RELOAD_INTERVAL`] until the task is dropped.
    pub async fn run(mut self) {
        let mut ticks = tokio::time::interval(RELOAD_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            self.check();
        }
    }

    /// Compares the files with what was last seen and applies a valid change.
    pub fn check(&mut self) -> Reload {
        let seen = self.read_sources();
        if seen == self.last_seen {
            return Reload::Unchanged;
        }
        self.last_seen = seen;
        let metrics = &self.app.telemetry().metrics;
        let loaded = match settings::load(self.config_path.as_deref(), &self.overrides) {
            Ok(config) => config,
            Err(error) => {
                metrics.config_reload_failures.inc();
                tracing::error!(%error, "Refused the new configuration; the previous one stays in force.");
                return Reload::Refused;
            }
        };
        let tokens = match &self.tokens {
            Some((path, _)) => match settings::load_tokens(path) {
                Ok(tokens) => Some(tokens),
                Err(error) => {
                    metrics.config_reload_failures.inc();
                    tracing::error!(%error, "Refused the new tokens file; the tokens in force stay.");
                    return Reload::Refused;
                }
            },
            None => None,
        };
        for key in restart_only_changes(&self.active, &loaded) {
            tracing::warn!(key, "Configuration change needs a restart to take effect; not applied.");
        }
        let routes = Routes::from_config(&loaded);
        self.active = loaded;
        let tokens_changed = match (&mut self.tokens, tokens) {
            (Some((_, active)), Some(tokens)) if *active != tokens => {
                self.app.replace_tokens(&tokens);
                tracing::info!(tokens = tokens.tokens.len(), "Reloaded the tokens file.");
                *active = tokens;
                true
            }
            _ => false,
        };
        match self.app.replace_routes(routes) {
            Some(generation) => {
                metrics.config_reloads.inc();
                tracing::info!(generation, hash = %self.app.routes().hash(), "Reloaded the configuration.");
                Reload::Applied { generation }
            }
            None if tokens_changed => {
                metrics.config_reloads.inc();
                Reload::TokensApplied
            }
            None => Reload::Equivalent,
        }
    }

    /// The current text of every file the configuration comes from (`None`: absent or unreadable).
    fn read_sources(&self) -> Vec<Option<String>> {
        let streams_path = self.overrides.streams_path.clone().or_else(|| self.active.streams_path.clone());
        let tokens_path = self.tokens.as_ref().map(|(path, _)| path.clone());
        [self.config_path.clone(), streams_path, tokens_path]
            .into_iter()
            .map(|path| path.and_then(|p| std::fs::read_to_string(p).ok()))
            .collect()
    }
}

/// Keys whose new value differs but only applies at start.
fn restart_only_changes(active: &Config, new: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut check = |key, changed: bool| {
        if changed {
            keys.push(key);
        }
    };
    check("db_path", active.db_path != new.db_path);
    check("host", active.host != new.host);
    check("port", active.port != new.port);
    check("flight_port", active.flight_port != new.flight_port);
    check("duckdb_extensions", active.duckdb_extensions != new.duckdb_extensions);
    check("limits", active.limits != new.limits);
    check("auth.tokens_file", active.auth != new.auth);
    check("tls", active.tls != new.tls);
    keys
}
