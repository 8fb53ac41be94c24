//! The instruction set tract's kernels use, chosen by measurement (issue 20).
//!
//! On CPUs with AVX-512, tract picks its 512-bit kernels; on some of them (measured: an AMD
//! EPYC, whose 512-bit units are double-pumped, and an Intel Xeon) its AVX2 kernels run
//! Inception V3 8-10% faster. tract reads the instruction set once per process
//! (`TRACT_CPU_ISA`, not scopable), so the two cannot be compared inside one process: each
//! candidate is timed in a child process (this same executable, re-run with
//! [`CHILD_ENV`] set: [`child_entry`] answers it), interleaved, and the winner is installed
//! for this process with `tract_data`'s `set_config_global` before tract first looks at the
//! CPU. The choice is cached with the other runtime settings.
//!
//! Only executables that call [`child_entry`] first thing in `main` compare (edge-agent,
//! edge-convert, edge-bench): any other (a test binary) would not answer the child's call.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tract_core::prelude::{IntoTValue, tvec};
use tract_linalg::multithread::{Executor, multithread_tract_scope};

use super::super::profile::median;
use super::super::{RuntimeSettings, pool, prepare};
use super::{MIN_GAIN, input_for};
use crate::bundle;

/// Set in a child's environment: the JSON of its [`ChildRequest`].
pub const CHILD_ENV: &str = "EDGE_RUNTIME_TIME_ISA";
/// Children per side, alternating (native, candidate, candidate, native).
const CHILDREN_PER_SIDE: usize = 2;
/// Timed inferences per child, after one warm-up.
const RUNS: usize = 3;

static CHILDREN_ANSWERED: AtomicBool = AtomicBool::new(false);

/// What a child times.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct ChildRequest {
    bundle: std::path::PathBuf,
    /// `TRACT_CPU_ISA` for the child; empty: what tract detects.
    isa: String,
    threads: usize,
    max_bundle_bytes: u64,
}

/// The outcome of comparing instruction sets, for the report and the cache.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IsaTrial {
    /// The `TRACT_CPU_ISA` edit tried against tract's detection.
    pub candidate: String,
    /// Median ms per inference, over every child of each side.
    pub native_ms: f64,
    pub candidate_ms: f64,
    pub kept: bool,
}

/// Call first thing in `main`. In a child started by the tuner it times the bundle it was
/// given, prints `{"ms": ...}` and exits; otherwise it returns, and marks this executable as
/// one whose children answer (see the module doc).
pub fn child_entry() {
    CHILDREN_ANSWERED.store(true, Ordering::Relaxed);
    let Some(request) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let code = match time_in_child(&request.to_string_lossy()) {
        Ok(ms) => {
            println!("{}", serde_json::json!({ "ms": ms }));
            0
        }
        Err(e) => {
            eprintln!("{CHILD_ENV}: {e}");
            1
        }
    };
    std::process::exit(code);
}

fn time_in_child(request: &str) -> Result<f64, String> {
    let request: ChildRequest = serde_json::from_str(request).map_err(|e| e.to_string())?;
    if !request.isa.is_empty() {
        install(&request.isa)?;
    }
    let loaded = bundle::load(&request.bundle, request.max_bundle_bytes).map_err(|e| e.to_string())?;
    let input = input_for(&loaded.model).map_err(|e| e.to_string())?;
    let plan = prepare(loaded.model, &RuntimeSettings::default()).map_err(|e| e.to_string())?;
    let threads = std::num::NonZeroUsize::new(request.threads).unwrap_or(std::num::NonZeroUsize::MIN);
    let executor = pool(threads).unwrap_or(Executor::SingleThread);
    let run = || -> Result<f64, String> {
        let start = Instant::now();
        multithread_tract_scope(executor.clone(), || plan.run(tvec![input.clone().into_tvalue()]))
            .map_err(|e| format!("{e:#}"))?;
        Ok(start.elapsed().as_secs_f64() * 1e3)
    };
    run()?;
    let mut times: Vec<f64> = (0..RUNS).map(|_| run()).collect::<Result<_, _>>()?;
    Ok(median(&mut times))
}

/// The `TRACT_CPU_ISA` edits worth timing on this CPU: without AVX-512 where tract would
/// use it.
pub fn candidates() -> Vec<String> {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx2") {
        return vec!["-avx512f".to_string()];
    }
    Vec::new()
}

/// Installs `isa` (a `TRACT_CPU_ISA` edit) for this process. Fails when tract already looked
/// at the CPU without it, or when another value was installed before.
pub fn install(isa: &str) -> Result<(), String> {
    tract_core::knobs::set_config_global("TRACT_CPU_ISA", isa).map_err(|e| format!("{e:#}"))?;
    let effective = tract_linalg::isa::native();
    let wanted_without_avx512 = isa.split(',').any(|t| t.trim() == "-avx512f");
    if wanted_without_avx512 && effective.has(tract_linalg::isa::Isa::X86_64Avx512f) {
        return Err(format!(
            "tract chose its kernels before the instruction-set choice ({isa}) could apply: \
             it applies from the next start"
        ));
    }
    Ok(())
}

/// Times tract's detected instruction set against each of [`candidates`] in child
/// processes, within `budget`; `None` when there is nothing to compare, this executable's
/// children would not answer, or the budget ran out.
pub fn compare(bundle: &Path, threads: usize, max_bundle_bytes: u64, budget: Duration) -> Option<IsaTrial> {
    let candidate = candidates().into_iter().next()?;
    if !CHILDREN_ANSWERED.load(Ordering::Relaxed) || std::env::var_os("TRACT_CPU_ISA").is_some() {
        return None;
    }
    let exe = std::env::current_exe().ok()?;
    let deadline = Instant::now() + budget;
    let time = |isa: &str| -> Option<f64> {
        if Instant::now() >= deadline {
            return None;
        }
        let request = ChildRequest {
            bundle: bundle.to_owned(),
            isa: isa.to_owned(),
            threads,
            max_bundle_bytes,
        };
        let mut child = Command::new(&exe)
            .env(CHILD_ENV, serde_json::to_string(&request).ok()?)
            .env_remove("TRACT_CPU_ISA")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        // Bounded by the budget: a child that hangs is killed, and nothing is chosen.
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    tracing::warn!(
                        isa,
                        "an instruction-set timing child ran out of the tuning budget"
                    );
                    return None;
                }
            }
        };
        if !status.success() {
            tracing::warn!(isa, %status, "an instruction-set timing child failed");
            return None;
        }
        let mut stdout = String::new();
        std::io::Read::read_to_string(&mut child.stdout.take()?, &mut stdout).ok()?;
        let answer: serde_json::Value = serde_json::from_str(&stdout).ok()?;
        answer["ms"].as_f64()
    };
    let (mut native, mut theirs) = (Vec::new(), Vec::new());
    for round in 0..CHILDREN_PER_SIDE {
        if round % 2 == 0 {
            native.push(time("")?);
            theirs.push(time(&candidate)?);
        } else {
            theirs.push(time(&candidate)?);
            native.push(time("")?);
        }
    }
    let (native_ms, candidate_ms) = (median(&mut native), median(&mut theirs));
    Some(IsaTrial {
        kept: candidate_ms <= native_ms * MIN_GAIN,
        candidate,
        native_ms,
        candidate_ms,
    })
}
