//! Arrowport's fuzz targets: the drivers and seeds they share with the ingester's regression test
//! (`drive.rs`), and how a target tells a bug from a panic the decoder is built to catch.
//!
//! `arrowport::ipc` runs arrow-ipc's decoding under `catch_unwind`: arrow-ipc still panics on some
//! malformed input, and the decoder turns those panics into `invalid_ipc` answers on purpose.
//! libfuzzer-sys aborts at every panic, caught or not; [`run`] aborts only when a panic escapes the
//! decoder, and prints each distinct caught one once (`note: caught panic`), so arrow-ipc's remaining
//! panics are listed without stopping the run. `ARROWPORT_FUZZ_ANY_PANIC=1` keeps libfuzzer-sys's
//! policy: every panic is a crash (to collect arrow-ipc's own panics as inputs).

use std::backtrace::Backtrace;
use std::cell::RefCell;
use std::collections::HashSet;
use std::panic::{AssertUnwindSafe, PanicHookInfo, catch_unwind};
use std::sync::Mutex;

mod drive;

pub use drive::*;

/// One panic seen while running an input.
struct Panic {
    location: String,
    message: String,
    backtrace: Backtrace,
}

thread_local! {
    /// The panics of the input being run, oldest first.
    static PANICS: RefCell<Vec<Panic>> = const { RefCell::new(Vec::new()) };
}

/// Locations of the caught panics already reported.
static REPORTED: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// Replaces libfuzzer-sys's abort-at-any-panic hook by one that records the panic (see the module doc);
/// for the targets' `init`.
pub fn install_panic_hook() {
    if std::env::var_os("ARROWPORT_FUZZ_ANY_PANIC").is_some_and(|v| !v.is_empty() && v != "0") {
        return;
    }
    std::panic::set_hook(Box::new(|info: &PanicHookInfo| {
        let panic = Panic {
            location: info.location().map_or_else(|| "?".to_owned(), |at| short_path(&at.to_string()).to_owned()),
            message: info.payload_as_str().unwrap_or("(no message)").to_owned(),
            // Captured only with RUST_BACKTRACE set: reproducing a crash, not fuzzing.
            backtrace: Backtrace::capture(),
        };
        PANICS.with_borrow_mut(|panics| panics.push(panic));
    }));
}

/// A source path without the registry's directories: `arrow-ipc-58.4.1/src/convert.rs:354:22`.
fn short_path(path: &str) -> &str {
    match path.split_once("/registry/src/") {
        Some((_, rest)) => rest.split_once('/').map_or(rest, |(_, crate_path)| crate_path),
        None => path,
    }
}

/// Runs one input through `target`; a panic that escapes it aborts the process (a crash for libFuzzer).
pub fn run(target: Target, input: &[u8]) {
    PANICS.with_borrow_mut(Vec::clear);
    let escaped = catch_unwind(AssertUnwindSafe(|| target(input))).is_err();
    let panics = PANICS.with_borrow_mut(std::mem::take);
    if escaped {
        let last = panics.last();
        eprintln!(
            "==arrowport-fuzz== panic escaped the decoder at {}: {}\n{}",
            last.map_or("?", |p| p.location.as_str()),
            last.map_or("?", |p| p.message.as_str()),
            last.map(|p| p.backtrace.to_string()).unwrap_or_default(),
        );
        std::process::abort();
    }
    if panics.is_empty() {
        return;
    }
    let mut reported = REPORTED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let reported = reported.get_or_insert_with(HashSet::new);
    for panic in panics {
        if reported.insert(panic.location.clone()) {
            eprintln!(
                "==arrowport-fuzz== note: caught panic (an invalid_ipc answer) at {}: {}",
                panic.location, panic.message
            );
        }
    }
}
