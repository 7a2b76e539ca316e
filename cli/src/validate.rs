//! `arrowport validate --config FILE`: every problem of a config or streams file, offline.

use std::path::PathBuf;

use arrowport_config::settings;

use super::Error;

#[derive(Debug, clap::Args)]
pub struct ValidateArgs {
    /// The base config or streams file to check; a streams file the config names is checked too.
    #[arg(long, short, value_name = "FILE")]
    pub config: PathBuf,
}

/// Prints `FILE: ok` on stdout, or each problem on stderr and fails with their count.
pub fn run(args: ValidateArgs) -> Result<(), Error> {
    let problems = settings::problems(&args.config)?;
    if problems.is_empty() {
        println!("{}: ok", args.config.display());
        return Ok(());
    }
    for problem in &problems {
        eprintln!("{problem}");
    }
    Err(Error::Invalid { file: args.config.display().to_string(), count: problems.len() })
}
