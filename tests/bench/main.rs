//! `edge-bench`: the benchmark suite (issue 6). Run by `scripts/bench.sh`, which builds the
//! release binaries and the fixtures first; writes `BENCHMARKS.md`.
//!
//! Every figure is a ratio to a baseline measured in the same run (ONNX Runtime on the same
//! ONNX and thread count, a naive `image` pipeline, a plain fsync'd file, the source model,
//! raw tract), taken in interleaved rounds, median over rounds.

mod agent;
mod alloc;
mod coldstart;
mod inference;
mod ort;
mod peak;
mod pool;
mod preprocess;
mod queue;
mod report;
mod stats;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};

use report::Report;

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

#[derive(Parser)]
#[command(
    about = "Benchmarks of the edge agent against ONNX Runtime, raw tract, naive preprocessing and plain files",
    long_about = "Benchmarks of the edge agent against ONNX Runtime, raw tract, naive preprocessing \
                  and plain files; writes BENCHMARKS.md. Run it through scripts/bench.sh, which \
                  builds the release binaries and the fixtures and finds ONNX Runtime's Python."
)]
struct Args {
    /// Where to write the Markdown report.
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
    /// Interleaved rounds per comparison.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Only these sections (default: all).
    #[arg(long, value_delimiter = ',')]
    only: Vec<Section>,
    /// Python with onnxruntime and numpy (scripts/fixtures.sh's venv).
    #[arg(long, env = "EDGE_BENCH_PYTHON")]
    python: Option<PathBuf>,
    /// A directory on the disk the agent's queue would use (fsync must be real: not tmpfs).
    #[arg(long, env = "EDGE_BENCH_SCRATCH")]
    scratch: Option<PathBuf>,
    /// The command line recorded in the report.
    #[arg(long, default_value = "scripts/bench.sh")]
    command: String,
    #[command(subcommand)]
    child: Option<Child>,
}

#[derive(Subcommand)]
enum Child {
    /// (internal) Loads a model until ready to infer, prints timings and peak RSS as JSON.
    #[command(hide = true)]
    Load {
        #[arg(long)]
        bundle: Option<PathBuf>,
        #[arg(long)]
        onnx: Option<PathBuf>,
        /// With --bundle: load with tuning on and this cache directory (as edge-agent does).
        #[arg(long)]
        tuning_cache: Option<PathBuf>,
    },
    /// (profiling aid) Runs single-threaded inferences of a bundle on several threads at once,
    /// as the daemon's workers do, and prints images/s beside one thread's alone; tuning on,
    /// cached in --tuning-cache. Run it under `perf` to see what concurrency costs.
    #[command(hide = true)]
    Concurrent {
        #[arg(long)]
        bundle: PathBuf,
        #[arg(long)]
        tuning_cache: PathBuf,
        #[arg(long, default_value_t = 2)]
        workers: usize,
        #[arg(long, default_value_t = 16)]
        runs: usize,
        /// Each worker thread runs its own copy of the model (loaded once per worker, as
        /// separate processes would have it) instead of all sharing one.
        #[arg(long)]
        own_models: bool,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Section {
    Inference,
    Preprocess,
    Agent,
    Queue,
    ColdStart,
    Pool,
}

const SECTIONS: [(&str, &str); 7] = [
    ("machine", "Machine peak"),
    ("inference", "1. Local inference"),
    ("preprocess", "2. Preprocessing"),
    ("agent", "3-4. Agent overhead and sustained throughput"),
    ("queue", "5. Durable enqueue"),
    ("cold start", "6. Cold start and memory"),
    ("pool", "7. Pool"),
];

/// What every section needs.
pub struct Ctx {
    pub rounds: usize,
    pub python: PathBuf,
    pub scratch: tempfile::TempDir,
    pub fixtures: PathBuf,
    /// The Inception V3 bundle the runtime runs fastest (chosen by the inference section).
    pub bundle: PathBuf,
    /// Every source form converted, with its name.
    pub candidates: Vec<(String, PathBuf)>,
    pub onnx_nhwc: PathBuf,
    pub onnx_nchw: PathBuf,
    pub cpus: usize,
}

fn main() -> Result<()> {
    // A child the runtime tuner started to time an instruction set answers and exits here.
    edge_runtime::runtime::tune::isa::child_entry();
    let args = Args::parse();
    match args.child {
        Some(Child::Load {
            bundle,
            onnx,
            tuning_cache,
        }) => return coldstart::child(bundle.as_deref(), onnx.as_deref(), tuning_cache.as_deref()),
        Some(Child::Concurrent {
            bundle,
            tuning_cache,
            workers,
            runs,
            own_models,
        }) => return inference::concurrent(&bundle, &tuning_cache, workers, runs, own_models),
        None => {}
    }
    let python = match args.python {
        Some(p) => p,
        None => {
            bail!("set EDGE_BENCH_PYTHON (or --python) to a Python with onnxruntime; scripts/bench.sh does")
        }
    };
    let fixtures = edge_e2e::fixtures();
    let scratch_root = args
        .scratch
        .unwrap_or_else(|| edge_e2e::workspace().join("target"));
    std::fs::create_dir_all(&scratch_root)
        .with_context(|| format!("cannot create {}", scratch_root.display()))?;
    let scratch = tempfile::Builder::new()
        .prefix("edge-bench-")
        .tempdir_in(&scratch_root)
        .context("scratch directory")?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!("converting the Inception V3 source forms into bundles...");
    let candidates = inference::convert_candidates(&fixtures, scratch.path())?;
    let mut ctx = Ctx {
        rounds: args.rounds.max(1),
        python,
        bundle: candidates[0].1.clone(),
        candidates,
        onnx_nhwc: fixtures.join("inception_v3_seeded_nhwc.onnx"),
        onnx_nchw: fixtures.join("inception_v3_seeded_nchw.onnx"),
        fixtures,
        scratch,
        cpus,
    };
    let mut report = Report {
        machine: machine(cpus),
        ..Report::default()
    };
    let want = |s: Section| args.only.is_empty() || args.only.contains(&s);

    let peak = peak::measure(cpus, &mut report);
    if want(Section::Inference) {
        eprintln!("1. local inference");
        inference::run(&mut ctx, &peak, &mut report)?;
    }
    if want(Section::Preprocess) {
        eprintln!("2. preprocessing");
        preprocess::run(&ctx, &mut report)?;
    }
    if want(Section::Agent) {
        eprintln!("3-4. agent overhead and throughput");
        agent::run(&ctx, &mut report)?;
    }
    if want(Section::Queue) {
        eprintln!("5. durable enqueue");
        queue::run(&ctx, &mut report)?;
    }
    if want(Section::ColdStart) {
        eprintln!("6. cold start");
        coldstart::run(&ctx, &mut report)?;
    }
    if want(Section::Pool) {
        eprintln!("7. pool");
        pool::run(&ctx, &mut report)?;
    }
    let md = report.markdown(&args.command, &SECTIONS);
    std::fs::write(&args.out, md).with_context(|| format!("cannot write {}", args.out.display()))?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

/// CPU model, cores, memory, kernel, and the versions compared.
fn machine(cpus: usize) -> Vec<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| "unknown".into())
    };
    let flags = field("flags");
    let simd: Vec<&str> = ["avx2", "fma", "avx512f", "neon"]
        .into_iter()
        .filter(|f| flags.split_whitespace().any(|x| x == *f))
        .collect();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_owned())
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or("unknown".into(), |kb| format!("{:.1} GiB", kb / 1024.0 / 1024.0));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    vec![
        format!(
            "CPU: {} ({cpus} cores available), SIMD: {}",
            field("model name"),
            simd.join(", ")
        ),
        format!("Memory: {mem}; kernel {}", kernel.trim()),
        format!(
            "Date: {}; edge-agent {} (release build), tract {}",
            date(),
            env!("CARGO_PKG_VERSION"),
            edge_runtime::bundle::TRACT_VERSION
        ),
    ]
}

fn date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Runs `edge-convert convert` into `out`.
pub fn convert(source: &Path, out: &Path, extra: &[&str]) -> Result<()> {
    let o = Command::new(edge_e2e::bin("edge-convert"))
        .arg("convert")
        .arg(source)
        .arg("-o")
        .arg(out)
        .arg("-q")
        .args(extra)
        .output()
        .context("cannot run edge-convert")?;
    if !o.status.success() {
        bail!(
            "edge-convert {} failed: {}",
            source.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(())
}
