//! Writes the fuzz targets' seed corpora: `seeds DIR` fills `DIR/http_ipc/` and `DIR/flight_message/`
//! with real Arrow streams (see `arrowport_fuzz::http_seeds` and `flight_seeds`), each checked to decode.

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: seeds CORPUS_DIR");
        std::process::exit(2);
    };
    let targets: [(&str, arrowport_fuzz::Target, Vec<arrowport_fuzz::Seed>); 2] = [
        ("http_ipc", arrowport_fuzz::http_ipc, arrowport_fuzz::http_seeds()),
        ("flight_message", arrowport_fuzz::flight_message, arrowport_fuzz::flight_seeds()),
    ];
    for (target, decode, seeds) in targets {
        let target_dir = dir.join(target);
        std::fs::create_dir_all(&target_dir)?;
        let (count, bytes) = (seeds.len(), seeds.iter().map(|s| s.input.len()).sum::<usize>());
        for seed in seeds {
            let outcome = decode(&seed.input);
            assert!(
                outcome.error.is_none() && outcome.rows == seed.rows,
                "seed {target}/{} does not decode: {outcome:?}",
                seed.name
            );
            std::fs::write(target_dir.join(format!("seed-{}", seed.name)), &seed.input)?;
        }
        println!("seeds: {count} inputs ({bytes} bytes) in {}", target_dir.display());
    }
    Ok(())
}
