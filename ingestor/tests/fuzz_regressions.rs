//! The fuzz targets' inputs, replayed without libFuzzer: every file under `fuzz/regressions/http_ipc/`
//! and `fuzz/regressions/flight_message/` (crashes the fuzzer found, minimised) must decode or fail
//! with an error — never panic, hang, or run memory up — and the seed streams the fuzzer starts from must
//! decode to their rows, so this never passes on nothing. The driving code is the fuzz crate's own
//! (`fuzz/src/drive.rs`).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::Duration;

#[path = "../fuzz/src/drive.rs"]
mod drive;

use drive::Target;

/// Longest one input may take here (a debug build: far slower than the fuzzer's 10 s in an optimised one).
const DEADLINE: Duration = Duration::from_secs(60);
/// Most memory one input may add to the process's peak (the fuzzer stops at allocations of 512 MiB).
const MEMORY_LIMIT_MIB: u64 = 512;
/// The peak is the process's: the tests of this file take turns.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The regression inputs of one target, by path (none if the target has no directory yet).
fn regressions(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions").join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut inputs: Vec<_> = entries
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.is_file())
        .map(|path| {
            let input = std::fs::read(&path).expect("a readable regression input");
            (path, input)
        })
        .collect();
    inputs.sort();
    inputs
}

/// Runs each input through `target`; fails naming every input that panicked, outlived [`DEADLINE`] or
/// raised the process's peak memory by more than [`MEMORY_LIMIT_MIB`].
fn replay(target: Target, inputs: &[(PathBuf, Vec<u8>)]) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut failed = Vec::new();
    for (path, input) in inputs {
        let name = path.display();
        let baseline = reset_peak_memory();
        let (done, finished) = mpsc::channel();
        let input = input.clone();
        // On a thread of its own, so that a hang fails the test instead of stalling it.
        std::thread::spawn(move || done.send(catch_unwind(AssertUnwindSafe(|| target(&input))).is_ok()));
        match finished.recv_timeout(DEADLINE) {
            Ok(true) => {}
            Ok(false) => failed.push(format!("{name}: panicked")),
            Err(_) => {
                // The input still runs (and holds its memory): nothing after it can be judged.
                failed.push(format!("{name}: still running after {DEADLINE:?}"));
                break;
            }
        }
        if let (Some(before), Some(peak)) = (baseline, peak_memory_mib())
            && peak.saturating_sub(before) > MEMORY_LIMIT_MIB
        {
            failed.push(format!("{name}: the peak memory rose by {} MiB", peak - before));
        }
    }
    assert!(failed.is_empty(), "{} of {} inputs failed: {failed:#?}", failed.len(), inputs.len());
}

/// Resets the process's peak resident memory (Linux's `clear_refs`) and returns it, in MiB; `None` where
/// that cannot be done (the memory check is then skipped).
fn reset_peak_memory() -> Option<u64> {
    std::fs::write("/proc/self/clear_refs", "5").ok()?;
    peak_memory_mib()
}

/// The process's peak resident memory since the last reset, in MiB.
fn peak_memory_mib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: u64 = line.trim_start_matches("VmHWM:").trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib >> 10)
}

#[test]
fn http_ipc_regressions_decode_or_fail_cleanly() {
    replay(drive::http_ipc, &regressions("http_ipc"));
}

#[test]
fn flight_message_regressions_decode_or_fail_cleanly() {
    replay(drive::flight_message, &regressions("flight_message"));
}

/// Every seed decodes to all its rows: the drivers reach the decoders, and the corpus is real Arrow.
fn seeds_decode(target: Target, seeds: Vec<drive::Seed>, kinds: usize) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    assert!(seeds.len() >= kinds, "{} seeds", seeds.len());
    for seed in seeds {
        let outcome = target(&seed.input);
        assert_eq!(outcome.error, None, "seed {}", seed.name);
        assert!(
            seed.rows >= 10 && outcome.rows == seed.rows,
            "seed {}: {outcome:?}, {} rows sent",
            seed.name,
            seed.rows
        );
        assert!(outcome.messages >= 3, "seed {}: a schema, dictionaries and batches, not {outcome:?}", seed.name);
    }
}

#[test]
fn http_ipc_seeds_decode() {
    // Streams and files, each declared and detected, in three compressions and two sizes; delta streams.
    seeds_decode(drive::http_ipc, drive::http_seeds(), 26);
}

#[test]
fn flight_message_seeds_decode() {
    // Three compressions, two sizes; deltas.
    seeds_decode(drive::flight_message, drive::flight_seeds(), 7);
}

#[test]
fn truncated_and_corrupted_seeds_decode_or_fail_cleanly() {
    // A cheap stand-in for the fuzzer between its runs: every seed cut short, and with one byte flipped
    // at a spread of places, decodes or fails cleanly.
    for (target, seeds) in
        [(drive::http_ipc as Target, drive::http_seeds()), (drive::flight_message, drive::flight_seeds())]
    {
        let mut inputs = Vec::new();
        for seed in seeds.iter().filter(|seed| seed.name.ends_with("small")) {
            let len = seed.input.len();
            for at in (0..len).step_by(len / 40 + 1) {
                inputs.push((PathBuf::from(format!("{} cut at {at}", seed.name)), seed.input[..at].to_vec()));
                let mut flipped = seed.input.clone();
                flipped[at] ^= 0x55;
                inputs.push((PathBuf::from(format!("{} flipped at {at}", seed.name)), flipped));
            }
        }
        replay(target, &inputs);
    }
}

#[test]
fn delta_dictionary_seeds_send_deltas() {
    use arrowport::transport::http::framing::{IpcDecoder, IpcFormat};
    use prost::Message;

    let is_delta = |header: &[u8]| {
        let message = arrow_ipc::root_as_message(header).expect("a message header");
        message.header_as_dictionary_batch().is_some_and(|dictionary| dictionary.isDelta())
    };
    for seed in drive::http_seeds().iter().filter(|seed| seed.name.starts_with("stream-deltas")) {
        let mut framing = IpcDecoder::new(IpcFormat::Stream, drive::MAX_MESSAGE_BYTES);
        framing.push(seed.input[3..].to_vec().into());
        let mut deltas = 0;
        while let Some(message) = framing.next_message().expect("a valid stream") {
            deltas += usize::from(is_delta(&message.header));
        }
        assert_eq!(deltas, 2, "seed {}", seed.name);
    }
    let flight = drive::flight_seeds().into_iter().find(|seed| seed.name == "doput-deltas").expect("a delta seed");
    let mut rest = flight.input.as_slice();
    let mut deltas = 0;
    while !rest.is_empty() {
        let data = arrow_flight::FlightData::decode_length_delimited(&mut rest).expect("a FlightData message");
        deltas += usize::from(is_delta(&data.data_header));
    }
    assert_eq!(deltas, 2);
}
