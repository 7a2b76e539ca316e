// Where the binaries find DuckDB at run time.
//
// By default DuckDB is not compiled: `libduckdb-sys` links the official prebuilt `libduckdb.so` found in
// `DUCKDB_LIB_DIR` (`scripts/duckdb-lib` installs it; `scripts/with-duckdb` sets the variable). The
// binaries look for it, in order, beside themselves, in `../lib` (the image's `/usr/local/lib`) and in
// the directory they were built against. The `bundled` feature compiles DuckDB into the binary instead.
// (The benchmark crate includes this file as its own build script.)

fn main() {
    println!("cargo:rerun-if-env-changed=DUCKDB_LIB_DIR");
    if std::env::var_os("CARGO_FEATURE_BUNDLED").is_some() {
        return;
    }
    let Some(dir) = std::env::var_os("DUCKDB_LIB_DIR") else {
        eprintln!(
            "error: DUCKDB_LIB_DIR is not set, so there is no DuckDB library to link.\n\
             Run cargo through scripts/with-duckdb (it installs DuckDB's prebuilt libduckdb.so once), e.g.\n  \
             scripts/with-duckdb cargo build\n\
             or set DUCKDB_LIB_DIR=$(bash scripts/duckdb-lib), or compile DuckDB in with --features bundled."
        );
        std::process::exit(1);
    };
    let dir = std::path::Path::new(&dir);
    if !dir.join("libduckdb.so").is_file() {
        eprintln!("error: DUCKDB_LIB_DIR={} holds no libduckdb.so", dir.display());
        std::process::exit(1);
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN:$ORIGIN/../lib:{}", dir.display());
}
