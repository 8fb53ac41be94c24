//! The fuzz targets' bodies (fuzz/src/lib.rs, compiled here too) on their seeds, on every
//! input kept in `fuzz/regressions/<target>/` (crashes the fuzzer found, fixed since), and on
//! a few thousand seeded mutations of the seeds: the fuzz harness's checks run in every test
//! run, without the instrumented build. The long runs are `scripts/fuzz.sh` (fuzz/README.md).

#[path = "../../fuzz/src/lib.rs"]
mod harness;

use edge_e2e::workspace;

#[test]
fn every_fuzz_seed_goes_all_the_way_through() {
    for target in harness::TARGETS {
        let seeds = harness::seeds(target);
        assert!(!seeds.is_empty(), "{target} has no seeds");
        for (i, seed) in seeds.iter().enumerate() {
            assert_eq!(
                harness::run(target, seed),
                Some(true),
                "seed {i} of {target} is refused: the fuzzer would start from nowhere"
            );
        }
    }
}

#[test]
fn every_kept_fuzz_finding_stays_fixed() {
    let mut replayed = 0;
    for target in harness::TARGETS {
        let dir = workspace().join("fuzz/regressions").join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            let data = std::fs::read(&path).expect("a regression input reads");
            println!("{target}: {}", path.display());
            assert!(harness::run(target, &data).is_some());
            replayed += 1;
        }
    }
    println!("{replayed} kept fuzz findings replayed");
}

/// xorshift64*: reproducible mutations without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Byte flips, overwrites with boundary values, insertions, deletions and truncations.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut data = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(data.len());
        match rng.below(6) {
            0 if !data.is_empty() => data[at] ^= 1 << rng.below(8),
            1 if !data.is_empty() => data[at] = [0, 0x7f, 0x80, 0xff][rng.below(4)],
            2 => data.insert(at, rng.next() as u8),
            3 if !data.is_empty() => {
                data.remove(at);
            }
            4 => data.truncate(at),
            _ if data.len() > 4 => {
                let end = (at + 4).min(data.len());
                data[at..end].copy_from_slice(&u32::MAX.to_le_bytes()[..end - at]);
            }
            _ => {}
        }
    }
    data
}

#[test]
fn seeded_mutations_of_the_fuzz_seeds_are_refused_or_served_never_panic() {
    let mut rng = Rng(0x0fed_2026_1202);
    for target in harness::TARGETS {
        let seeds = harness::seeds(target);
        let (mut accepted, mut refused) = (0, 0);
        let rounds = if target == "bundle" { 300 } else { 1500 };
        for _ in 0..rounds {
            let seed = &seeds[rng.below(seeds.len())];
            let data = mutate(&mut rng, seed);
            match harness::run(target, &data) {
                Some(true) => accepted += 1,
                Some(false) => refused += 1,
                None => unreachable!("{target} is a target"),
            }
        }
        println!("{target}: {accepted} mutations served, {refused} refused");
        // Both outcomes occur: the mutations reach past the first check and into refusals.
        assert!(
            accepted > 0 && refused > 0,
            "{target}: {accepted} served, {refused} refused"
        );
    }
}

#[test]
fn a_bundle_declaring_a_huge_input_is_refused_before_anything_is_allocated() {
    // A shape like this made the smoke inference allocate width x height x 3 floats (and
    // overflowed computing the count); the manifest check now bounds it.
    let dir = tempfile::tempdir().expect("temp dir");
    let tiny = dir.path().join("tiny.bundle");
    std::fs::write(&tiny, harness::tiny_bundle()).expect("write the tiny bundle");
    for shape in [[1u64, 100_000, 100_000, 3], [1, 1 << 62, 1 << 62, 3]] {
        let huge = dir.path().join("huge.bundle");
        edge_e2e::rewrite_manifest(&tiny, &huge, |m| m["input"]["shape"] = serde_json::json!(shape));
        let bytes = std::fs::read(&huge).expect("read the rewritten bundle");
        let err = edge_runtime::bundle::from_bytes(&huge, &bytes)
            .err()
            .unwrap_or_else(|| panic!("a {shape:?} input loads"));
        let text = err.to_string();
        assert!(text.contains("elements"), "{shape:?}: {text}");
        assert_eq!(harness::run("bundle", &bytes), Some(false));
    }
}
