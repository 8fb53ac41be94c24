//! Enqueue rate on the normal disk: records per second, one durable commit per record (and
//! per group of 8), each engine against a plain appended file with fdatasync, in interleaved
//! rounds; the median round counts.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::Result;

use crate::store::{self, Engine, Rng};

/// One measured configuration: record size and records per durable transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Config {
    pub size: usize,
    pub group: usize,
}

pub const CONFIGS: [Config; 3] = [
    Config {
        size: 100 * 1024,
        group: 1,
    },
    Config {
        size: 2 * 1024,
        group: 1,
    },
    Config {
        size: 100 * 1024,
        group: 8,
    },
];

/// Median records/s per (config, engine), and every round's figure.
#[derive(Default)]
pub struct BenchResults {
    pub rounds: BTreeMap<(Config, &'static str), Vec<f64>>,
}

impl BenchResults {
    pub fn median(&self, config: Config, engine: Engine) -> Option<f64> {
        let mut v = self.rounds.get(&(config, engine.name()))?.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        Some(if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        })
    }
}

pub fn run(base: &Path, rounds: usize, records: usize, seed: u64) -> Result<BenchResults> {
    let mut res = BenchResults::default();
    let candidates = [Engine::File, Engine::Sled, Engine::Redb, Engine::Sqlite];
    for config in CONFIGS {
        let mut rng = Rng::new(seed ^ config.size as u64);
        let batch: Vec<(u64, Vec<u8>)> = (0..records as u64)
            .map(|seq| (seq, store::record_of_len(&mut rng, seq, config.size)))
            .collect();
        for round in 0..rounds {
            // Interleaved, and in a rotating order so no candidate always goes first.
            for i in 0..candidates.len() {
                let engine = candidates[(i + round) % candidates.len()];
                let dir = tempfile::Builder::new().prefix(engine.name()).tempdir_in(base)?;
                let mut s = store::open(engine, dir.path())?;
                let t = Instant::now();
                for chunk in batch.chunks(config.group) {
                    s.put(chunk)?;
                }
                let rate = records as f64 / t.elapsed().as_secs_f64();
                drop(s);
                drop(dir);
                res.rounds.entry((config, engine.name())).or_default().push(rate);
            }
        }
        eprintln!(
            "  {} KB x{}: {}",
            config.size / 1024,
            config.group,
            candidates
                .iter()
                .map(|e| format!("{} {:.0}/s", e.name(), res.median(config, *e).unwrap_or(0.0)))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(res)
}
