//! `edge-fuzz-seeds DIR`: writes each fuzz target's seeds (fuzz/src/lib.rs) to
//! `DIR/<target>/seed-N`, the starting corpus `scripts/fuzz.sh` gives cargo-fuzz.

// Only the seeds are used here; the targets run in cargo-fuzz and the regression test.
#[allow(dead_code)]
#[path = "../fuzz/src/lib.rs"]
mod harness;

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: edge-fuzz-seeds DIR (writes DIR/<target>/seed-N for each fuzz target)");
        return ExitCode::from(2);
    };
    for target in harness::TARGETS {
        let target_dir = dir.join(target);
        for (i, seed) in harness::seeds(target).iter().enumerate() {
            let path = target_dir.join(format!("seed-{i}"));
            if let Err(e) = std::fs::create_dir_all(&target_dir).and_then(|()| std::fs::write(&path, seed)) {
                eprintln!("edge-fuzz-seeds: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
