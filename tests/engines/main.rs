//! `edge-queue-engines`: which storage engine should hold the agent's durable request queue
//! (issue 15)? Each candidate (sled, redb, SQLite) is used the way the queue must use it, one
//! record per durable transaction, and measured twice: under simulated power cuts on LazyFS
//! (tests/lazyfs.rs), and for enqueue rate on the normal disk against a plain fsync'd file.
//! `scripts/queue-engines.sh` builds it in release and writes `docs/queue-engines.md`.

mod bench;
mod powercut;
mod store;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use bench::{BenchResults, CONFIGS, Config};
use powercut::CutResults;
use store::Engine;

#[derive(Parser)]
#[command(
    about = "Power-cut survival (LazyFS) and enqueue rate of the queue's candidate storage engines",
    long_about = "Power-cut survival (LazyFS) and enqueue rate of the queue's candidate storage \
                  engines; writes a Markdown report. Run it through scripts/queue-engines.sh."
)]
struct Args {
    /// Where to write the Markdown report (stdout if not given).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Power cuts per engine.
    #[arg(long, default_value_t = 20)]
    cuts: usize,
    /// Seed for record sizes and contents and for the moments of the cuts.
    #[arg(long, default_value_t = 15)]
    seed: u64,
    /// Interleaved benchmark rounds (the median counts).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Records per benchmark round.
    #[arg(long, default_value_t = 96)]
    records: usize,
    /// Engines to evaluate.
    #[arg(long, value_delimiter = ',', default_values = ["sled", "redb", "sqlite"])]
    engines: Vec<Engine>,
    /// A directory on the disk for the benchmark (fsync must be real: not tmpfs, not LazyFS);
    /// default: `queue-engines-tmp` in the cargo target directory.
    #[arg(long)]
    scratch: Option<PathBuf>,
    /// Skip the benchmark (power cuts only).
    #[arg(long)]
    no_bench: bool,
    /// Skip the power cuts (benchmark only).
    #[arg(long)]
    no_cuts: bool,
    /// The command line recorded in the report.
    #[arg(long, default_value = "scripts/queue-engines.sh")]
    command: String,
    #[command(subcommand)]
    child: Option<Child>,
}

#[derive(Subcommand)]
enum Child {
    /// (internal) Commit records one per durable transaction until killed.
    #[command(hide = true)]
    Writer {
        #[arg(long)]
        engine: Engine,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        start: u64,
        #[arg(long)]
        seed: u64,
    },
    /// (internal) Reopen a store and validate every record.
    #[command(hide = true)]
    Check {
        #[arg(long)]
        engine: Engine,
        #[arg(long)]
        dir: PathBuf,
    },
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let args = Args::parse();
    match args.child {
        Some(Child::Writer {
            engine,
            dir,
            start,
            seed,
        }) => return powercut::writer(engine, &dir, start, seed),
        Some(Child::Check { engine, dir }) => return powercut::check(engine, &dir),
        None => {}
    }
    let exe = std::env::current_exe().context("locating this executable")?;
    let started = Instant::now();
    let mut cuts = Vec::new();
    if !args.no_cuts {
        for &engine in &args.engines {
            eprintln!("power cuts: {} ({} cuts)", engine.name(), args.cuts);
            cuts.push((engine, powercut::run(&exe, engine, args.cuts, args.seed)?));
        }
    }
    let mut bench = None;
    let mut scratch_fs = String::new();
    if !args.no_bench {
        let base = match &args.scratch {
            Some(p) => p.clone(),
            None => target_dir(&exe)?.join("queue-engines-tmp"),
        };
        std::fs::create_dir_all(&base)?;
        scratch_fs = fs_type(&base).unwrap_or_else(|| "unknown".into());
        eprintln!(
            "enqueue rate in {} ({scratch_fs}): {} rounds x {} records",
            base.display(),
            args.rounds,
            args.records
        );
        bench = Some(bench::run(&base, args.rounds, args.records, args.seed)?);
        let _ = std::fs::remove_dir(&base);
    }
    let md = report(
        &args,
        &cuts,
        bench.as_ref(),
        &scratch_fs,
        started.elapsed().as_secs(),
    );
    match &args.out {
        Some(p) => {
            std::fs::write(p, md).with_context(|| format!("writing {}", p.display()))?;
            eprintln!("wrote {}", p.display());
        }
        None => print!("{md}"),
    }
    Ok(())
}

/// target/<profile>/edge-queue-engines -> target
fn target_dir(exe: &Path) -> Result<PathBuf> {
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_owned)
        .context("no target directory above this executable")
}

/// The file system type holding `path` (the longest mount point above it).
fn fs_type(path: &Path) -> Option<String> {
    let path = path.canonicalize().ok()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines()
        .filter_map(|l| {
            let mount = l.split(' ').nth(4)?;
            let fstype = l.split(" - ").nth(1)?.split(' ').next()?;
            path.starts_with(mount).then(|| (mount.len(), fstype.to_owned()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, t)| t)
}

fn cpu() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let n = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{model}, {n} cores available")
}

fn now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Versions from Cargo.lock (what this binary was built with).
fn locked_version(name: &str) -> String {
    let lock = std::fs::read_to_string(edge_e2e::workspace().join("Cargo.lock")).unwrap_or_default();
    let mut lines = lock.lines();
    while let Some(l) = lines.next() {
        if l == format!("name = \"{name}\"")
            && let Some(v) = lines.next().and_then(|v| v.strip_prefix("version = "))
        {
            return v.trim_matches('"').to_owned();
        }
    }
    "?".into()
}

/// "12 ms (median), 40 ms at most (n = 20)"
fn median_max(times: &[std::time::Duration]) -> String {
    let mut t = times.to_vec();
    t.sort();
    match (t.get(t.len() / 2), t.last()) {
        (Some(median), Some(max)) => format!(
            "{:.0} ms (median), {:.0} ms at most (n = {})",
            median.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3,
            t.len()
        ),
        _ => "- (never)".into(),
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split(' ').take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

fn rate(b: Option<&BenchResults>, config: Config, engine: Engine) -> Option<f64> {
    b.and_then(|b| b.median(config, engine))
}

fn fmt_rate(r: Option<f64>) -> String {
    r.map_or("-".into(), |r| format!("{r:.0}/s"))
}

fn fmt_ratio(r: Option<f64>, base: Option<f64>) -> String {
    match (r, base) {
        (Some(r), Some(b)) if b > 0.0 => format!("{:.2}", r / b),
        _ => "-".into(),
    }
}

fn report(
    args: &Args,
    cuts: &[(Engine, CutResults)],
    bench: Option<&BenchResults>,
    scratch_fs: &str,
    secs: u64,
) -> String {
    let mut md = String::new();
    let w = &mut md;
    let _ = writeln!(w, "# Queue storage engines under power cuts (issue 15)\n");
    let _ = writeln!(
        w,
        "Generated by `{}` (`edge-queue-engines`, tests/engines/) on {}; {}; {} s in all. \
         Do not edit by hand: rerun the script.\n",
        args.command,
        now(),
        cpu(),
        secs
    );
    let _ = writeln!(
        w,
        "Each candidate is used the way the agent's durable queue must use it: one record per \
         transaction, and a record counts as acknowledged only once its commit has returned \
         (that is when the agent may send its PUBACK).\n"
    );
    let _ = writeln!(
        w,
        "Load average when it started: {} (`/proc/loadavg`; the rates are ratios to a baseline \
         measured in the same rounds, but other work on the machine still blurs them).\n",
        load_average()
    );
    let _ = writeln!(w, "## Results\n");
    let f100 = CONFIGS[0];
    let f2 = CONFIGS[1];
    let g8 = CONFIGS[2];
    let _ = writeln!(
        w,
        "| engine | cuts | survived | acknowledged lost | corrupt | reopen failures | 100 KB rate | ratio vs file | 2 KB rate | ratio | group of 8 rate |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|---|---|---|---|---|");
    let base100 = rate(bench, f100, Engine::File);
    let base2 = rate(bench, f2, Engine::File);
    for &engine in &args.engines {
        let c = cuts.iter().find(|(e, _)| *e == engine).map(|(_, c)| c);
        let cell = |f: &dyn Fn(&CutResults) -> String| c.map_or("-".into(), f);
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            engine.name(),
            cell(&|c| c.cuts.to_string()),
            cell(&|c| c.survived.to_string()),
            cell(&|c| format!("{} of {}", c.lost.len(), c.acknowledged)),
            cell(&|c| c.corrupt.len().to_string()),
            cell(&|c| c.reopen_failures.to_string()),
            fmt_rate(rate(bench, f100, engine)),
            fmt_ratio(rate(bench, f100, engine), base100),
            fmt_rate(rate(bench, f2, engine)),
            fmt_ratio(rate(bench, f2, engine), base2),
            fmt_rate(rate(bench, g8, engine)),
        );
    }
    if bench.is_some() {
        let _ = writeln!(
            w,
            "| file (baseline) | - | - | - | - | - | {} | 1.00 | {} | 1.00 | {} |",
            fmt_rate(base100),
            fmt_rate(base2),
            fmt_rate(rate(bench, g8, Engine::File)),
        );
    }
    let _ = writeln!(
        w,
        "\n- **cuts**: power cuts made (a run stops at the first failure to reopen: a device \
         cannot start afresh by itself). **survived**: the store reopened within {} s, the \
         engine's own check passed, and every record acknowledged so far was present and intact. \
         **acknowledged lost**: acknowledged records missing after a cut, of all acknowledged. \
         **corrupt**: records present whose self-check failed. **reopen failures**: the store \
         could not be opened and listed (an error, or a hang killed after {} s).",
        powercut::CHECK_TIMEOUT.as_secs(),
        powercut::CHECK_TIMEOUT.as_secs()
    );
    let _ = writeln!(
        w,
        "- **rates**: records per second on the normal disk ({scratch_fs}, a directory in the \
         cargo target dir), each record its own durable commit, median of {} interleaved rounds \
         of {} records, a fresh store per round, opening not timed; **ratio**: engine / the plain \
         file (append + `fdatasync` per record) in the same rounds. **group of 8**: 100 KB \
         records, 8 per durable transaction.",
        args.rounds, args.records
    );
    if !cuts.is_empty() {
        let _ = writeln!(w, "\n## Power-cut runs\n");
        let _ = writeln!(
            w,
            "On a fresh LazyFS mount per engine (`../shared/tools/lazyfs`, tests/lazyfs.rs: \
             FUSE, unsynced data kept in LazyFS's cache; `lazyfs::clear-cache` drops it, \
             confirmed on its notifier fifo). A writer process opens the store and commits \
             records of 2 KB to 100 KB (seeded sizes and bytes; key = sequence number; the \
             value holds its key, its length and a SHA-256), one per durable transaction, \
             printing `committed <seq>` only after the commit returned. After a seeded-random \
             20-400 ms (seed {}; from the moment the writer has opened the store, or for one cut in \
             four from its start, so that cuts also land while it opens and recovers the store) \
             the writer is frozen with SIGSTOP, LazyFS drops everything \
             unsynced, the writer is SIGKILLed; a checker process reopens the store, runs the \
             engine's own check and validates every record (timeout {} s); the next writer \
             continues on the same store with new sequence numbers.\n",
            args.seed,
            powercut::CHECK_TIMEOUT.as_secs()
        );
        for (engine, c) in cuts {
            let reopen = format!(
                "the checker reopened the store in {}; the writer opened it in {} and \
                 committed its first record {} after its start",
                median_max(&c.reopen_times),
                median_max(&c.writer_open_times),
                median_max(&c.first_commit_times)
            );
            let _ = writeln!(
                w,
                "- **{}**: {} cuts in {:.0} s ({} timed from the writer's start), {reopen}; {} \
                 records acknowledged (per run: {}).",
                engine.name(),
                c.cuts,
                c.elapsed.as_secs_f64(),
                c.during_open_or_writes,
                c.acknowledged,
                c.per_cut
                    .iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            if c.errors.is_empty() {
                let _ = writeln!(w, "  No error, nothing lost.");
            }
            for e in c.errors.iter().take(20) {
                let _ = writeln!(w, "  - `{}`", e.replace('`', "'"));
            }
            if c.errors.len() > 20 {
                let _ = writeln!(w, "  - ... {} more", c.errors.len() - 20);
            }
        }
    }
    if args.engines.contains(&Engine::Sled) {
        let _ = writeln!(
            w,
            "\n## Why sled loses acknowledged records\n\n\
             Read in sled {}'s source (not measured here): without its `io_uring` feature, \
             `src/pagecache/iobuf.rs` makes each log write durable with \
             `sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER)` on Linux, falling back to \
             `fsync` only when that call is missing (ENOSYS). `sync_file_range` starts and \
             waits for the write-back of those pages but, as its manual page says, gives no \
             durability guarantee: it does not write the file's metadata (the size of a log \
             file that grew) and does not flush the disk's write cache. So `Db::flush()` \
             returns before anything is durable, which is also why sled looks faster than a \
             plain file with `fdatasync` above. Its log file is `fsync`ed by a \
             background thread every `flush_every_ms` (500 ms by default), and FUSE has no \
             `sync_file_range`: under LazyFS every record acknowledged since that thread's \
             last `fsync` is lost at a cut (the writer runs here last 20-400 ms, mostly less \
             than the first period). On a real disk the same records are lost when the power \
             goes before the next `fsync`.",
            locked_version("sled")
        );
    }
    let _ = writeln!(w, "\n## Engine settings\n");
    for engine in args.engines.iter().copied().chain([Engine::File]) {
        let version = match engine {
            Engine::Sled => format!("sled {}", locked_version("sled")),
            Engine::Redb => format!("redb {}", locked_version("redb")),
            Engine::Sqlite => format!(
                "rusqlite {} (libsqlite3-sys {}, bundled SQLite {})",
                locked_version("rusqlite"),
                locked_version("libsqlite3-sys"),
                rusqlite::version()
            ),
            Engine::File => "plain file".into(),
        };
        let _ = writeln!(w, "- **{}** ({version}): {}.", engine.name(), engine.settings());
    }
    let _ = writeln!(
        w,
        "\nReproduce: `{}` (options: `edge-queue-engines --help`, e.g. `--cuts 40 --seed 7`).",
        args.command
    );
    md
}
