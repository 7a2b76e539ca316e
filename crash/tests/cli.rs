//! The command line, without a server run (`.ci/run` runs the crash test itself as a step of its own,
//! with the binary this test makes cargo build).

use std::process::Command;

fn crash(args: &[&str]) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_arrowport-crash")).args(args).output().expect("runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    (output.status.code().expect("an exit code"), text)
}

#[test]
fn help_names_the_run_s_knobs() {
    let (code, text) = crash(&["--help"]);
    assert_eq!(code, 0, "{text}");
    for flag in ["--kills", "--seconds-between", "--seed", "--json", "--server", "--journal"] {
        assert!(text.contains(flag), "{flag} missing from --help:\n{text}");
    }
}

#[test]
fn bad_ranges_are_refused_before_anything_starts() {
    let (code, text) = crash(&["--seconds-between", "3..1"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("expected MIN..MAX"), "{text}");
    let (code, text) = crash(&["--large-rows", "0..10"]);
    assert_eq!(code, 2, "{text}");
}

#[test]
fn a_server_that_does_not_come_up_fails_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().to_str().unwrap();
    let (code, text) = crash(&["--server", "/bin/false", "--kills", "1", "--seed", "5", "--dir", dir]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("the server exited before listening"), "{text}");
    assert!(text.contains("--seed 5"), "{text}");
}
