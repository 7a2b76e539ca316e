//! Hot reload: re-reads the base and streams files and puts a changed routing table in force.
//!
//! The files are compared by content on a short interval rather than by filesystem events: that one
//! mechanism sees in-place edits, editors that write a temporary file and rename it, and Kubernetes
//! ConfigMap volumes, where the kubelet swaps a `..data` symlink and the file's own inode never changes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arrowport_config::Config;
use arrowport_config::settings::{self, Overrides};

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
    /// A new routing table is in force.
    Applied { generation: u64 },
    /// The new files do not parse or validate; the old configuration stays.
    Refused,
}

impl Reloader {
    pub fn new(config_path: Option<PathBuf>, overrides: Overrides, app: Arc<App>, active: Config) -> Self {
        let mut reloader = Self { config_path, overrides, app, active, last_seen: Vec::new() };
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
        for key in restart_only_changes(&self.active, &loaded) {
            tracing::warn!(key, "Configuration change needs a restart to take effect; not applied.");
        }
        let routes = Routes::from_config(&loaded);
        self.active = loaded;
        match self.app.replace_routes(routes) {
            Some(generation) => {
                metrics.config_reloads.inc();
                tracing::info!(generation, hash = %self.app.routes().hash(), "Reloaded the configuration.");
                Reload::Applied { generation }
            }
            None => Reload::Equivalent,
        }
    }

    /// The current text of every file the configuration comes from (`None`: absent or unreadable).
    fn read_sources(&self) -> Vec<Option<String>> {
        let streams_path = self.overrides.streams_path.clone().or_else(|| self.active.streams_path.clone());
        [self.config_path.clone(), streams_path]
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
    keys
}
