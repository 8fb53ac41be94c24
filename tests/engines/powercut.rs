//! The power-cut test: a writer child commits self-checking records one per durable
//! transaction on a LazyFS mount and prints `committed <seq>` after each commit; at a
//! seeded-random moment it is frozen, LazyFS drops what was not synced, the writer is killed,
//! and a checker child reopens the store and validates every record.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use edge_e2e::lazyfs::LazyFs;

use crate::store::{self, Engine, Rng};

/// How long a checker may take to reopen and list the store before it counts as a hang.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// Sequence numbers of writer run `n` start at `(n + 1) * SEQ_STRIDE`.
const SEQ_STRIDE: u64 = 1_000_000;

#[derive(Default, Debug)]
pub struct CutResults {
    pub cuts: usize,
    pub survived: usize,
    pub acknowledged: usize,
    pub lost: BTreeSet<u64>,
    pub corrupt: BTreeSet<u64>,
    pub reopen_failures: usize,
    /// Error texts and notes, in order.
    pub errors: Vec<String>,
    /// Records acknowledged per writer run.
    pub per_cut: Vec<usize>,
    pub elapsed: Duration,
    /// Cuts timed from the writer's start (they may land while it opens the store).
    pub during_open_or_writes: usize,
    /// How long the checker took to open the store after each cut.
    pub reopen_times: Vec<Duration>,
    /// How long each writer took to open the store, and to its first commit (from its start).
    pub writer_open_times: Vec<Duration>,
    pub first_commit_times: Vec<Duration>,
}

/// Hidden `writer` subcommand: commit records from `start` on until killed.
pub fn writer(engine: Engine, dir: &Path, start: u64, seed: u64) -> Result<()> {
    let t = Instant::now();
    let mut store = store::open(engine, dir)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "opened {}", t.elapsed().as_micros())?;
    out.flush()?;
    for seq in start.. {
        let value = store::record(seed, seq);
        store
            .put(&[(seq, value)])
            .with_context(|| format!("committing record {seq}"))?;
        writeln!(out, "committed {seq} {}", t.elapsed().as_micros())?;
        out.flush()?;
    }
    Ok(())
}

/// Hidden `check` subcommand: reopen, run the engine's check, list and validate every record.
pub fn check(engine: Engine, dir: &Path) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let t = Instant::now();
    let mut store = store::open(engine, dir)?;
    writeln!(out, "opened {}", t.elapsed().as_micros())?;
    out.flush()?;
    if let Some(problem) = store.integrity()? {
        writeln!(out, "integrity {}", problem.replace('\n', " "))?;
    }
    let mut lines = Vec::new();
    store.scan(&mut |key, value| match store::validate(key, value) {
        Ok(()) => lines.push(format!("ok {key}")),
        Err(why) => lines.push(format!("bad {key} {why}")),
    })?;
    for l in lines {
        writeln!(out, "{l}")?;
    }
    writeln!(out, "end")?;
    Ok(())
}

fn read_lines(r: impl Read + Send + 'static) -> JoinHandle<Vec<String>> {
    // (the checker's output, read whole)
    std::thread::spawn(move || BufReader::new(r).lines().map_while(|l| l.ok()).collect())
}

fn read_all(mut r: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

fn signal(child: &Child, sig: libc::c_int) -> Result<()> {
    let pid = libc::pid_t::try_from(child.id())?;
    // SAFETY: signalling our own child, which has not been reaped yet.
    if unsafe { libc::kill(pid, sig) } != 0 {
        return Err(std::io::Error::last_os_error()).context("kill");
    }
    Ok(())
}

fn spawn(exe: &Path, args: &[String]) -> Result<Child> {
    Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {} {}", exe.display(), args.join(" ")))
}

struct Checked {
    present: BTreeSet<u64>,
    bad: Vec<(u64, String)>,
    integrity: Vec<String>,
    /// How long opening (recovering) the store took.
    open: Duration,
}

/// Runs the checker; `Err` text is the reopen failure (an error or a hang).
fn run_checker(exe: &Path, engine: Engine, dir: &Path) -> Result<Checked, String> {
    let args = vec![
        "check".to_owned(),
        "--engine".to_owned(),
        engine.name().to_owned(),
        "--dir".to_owned(),
        dir.display().to_string(),
    ];
    let mut child = spawn(exe, &args).map_err(|e| format!("{e:#}"))?;
    let out = read_lines(child.stdout.take().ok_or("no stdout")?);
    let err = read_all(child.stderr.take().ok_or("no stderr")?);
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if started.elapsed() >= CHECK_TIMEOUT => break None,
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("waiting for the checker: {e}")),
        }
    };
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let lines = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    let stderr = stderr.trim();
    let Some(status) = status else {
        let stage = if lines.iter().any(|l| l.starts_with("opened")) {
            "opened, but listing the records did not finish"
        } else {
            "never reopened"
        };
        let mut msg = format!("hang: {stage} within {CHECK_TIMEOUT:?} (killed)");
        if !stderr.is_empty() {
            msg.push_str(&format!("; stderr: {}", one_line(stderr)));
        }
        return Err(msg);
    };
    if !status.success() || lines.last().map(String::as_str) != Some("end") {
        return Err(format!(
            "reopen failed ({status}): {}",
            one_line(if stderr.is_empty() { "no output" } else { stderr })
        ));
    }
    let mut c = Checked {
        present: BTreeSet::new(),
        bad: Vec::new(),
        integrity: Vec::new(),
        open: Duration::ZERO,
    };
    for l in &lines {
        if let Some(us) = l.strip_prefix("opened ") {
            c.open = Duration::from_micros(us.parse().unwrap_or(0));
        } else if let Some(k) = l.strip_prefix("ok ") {
            c.present
                .insert(k.parse().map_err(|_| format!("checker said {l:?}"))?);
        } else if let Some(rest) = l.strip_prefix("bad ") {
            let (k, why) = rest.split_once(' ').unwrap_or((rest, ""));
            let k = k.parse().map_err(|_| format!("checker said {l:?}"))?;
            c.bad.push((k, why.to_owned()));
        } else if let Some(rest) = l.strip_prefix("integrity ") {
            c.integrity.push(rest.to_owned());
        }
    }
    Ok(c)
}

fn one_line(s: &str) -> String {
    let s: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let s = s.join(" | ");
    if s.len() > 600 {
        let mut end = 600;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    } else {
        s
    }
}

/// `cuts` power cuts against one engine on a fresh LazyFS mount.
pub fn run(exe: &Path, engine: Engine, cuts: usize, seed: u64) -> Result<CutResults> {
    let started = Instant::now();
    let mut fs = LazyFs::mount()?;
    let dir = fs.path().join(engine.name());
    std::fs::create_dir(&dir)?;
    let mut rng = Rng::new(seed ^ (engine as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
    let mut res = CutResults::default();
    let mut acked = BTreeSet::new();
    for cut in 0..cuts {
        let start = (cut as u64 + 1) * SEQ_STRIDE;
        let args = vec![
            "writer".to_owned(),
            "--engine".to_owned(),
            engine.name().to_owned(),
            "--dir".to_owned(),
            dir.display().to_string(),
            "--start".to_owned(),
            start.to_string(),
            "--seed".to_owned(),
            seed.to_string(),
        ];
        let mut child = spawn(exe, &args)?;
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let stdout = child.stdout.take().context("no stdout")?;
        let out = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let err = read_all(child.stderr.take().context("no stderr")?);
        let mut lines = Vec::new();
        // One cut in four is timed from the writer's start, so it may land while the store is
        // still being opened (recovered); the others from the moment it has opened, so the
        // writer always commits some records first.
        let from_start = rng.range(0, 3) == 0;
        if from_start {
            res.during_open_or_writes += 1;
        } else {
            let deadline = Instant::now() + CHECK_TIMEOUT;
            while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                let opened = line.starts_with("opened");
                lines.push(line);
                if opened {
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(rng.range(20, 400)));
        let exited = child.try_wait()?;
        if exited.is_none() {
            // The power cut: nothing more reaches the file system, unsynced data is dropped,
            // the process is gone.
            signal(&child, libc::SIGSTOP)?;
            fs.clear_cache()?;
            signal(&child, libc::SIGKILL)?;
        }
        let status = child.wait()?;
        let _ = out.join();
        lines.extend(rx.try_iter());
        let stderr = err.join().unwrap_or_default();
        let committed: Vec<u64> = lines
            .iter()
            .filter_map(|l| l.strip_prefix("committed "))
            .filter_map(|n| n.split(' ').next()?.parse().ok())
            .collect();
        let micros = |prefix: &str| {
            lines.iter().find_map(|l| {
                let us = l.strip_prefix(prefix)?.split(' ').next_back()?;
                us.parse().ok().map(Duration::from_micros)
            })
        };
        if let Some(t) = micros("opened ") {
            res.writer_open_times.push(t);
        }
        if let Some(t) = micros("committed ") {
            res.first_commit_times.push(t);
        }
        res.acknowledged += committed.len();
        res.per_cut.push(committed.len());
        acked.extend(committed);
        if exited.is_some() {
            // The writer died by itself (it could not open or commit): the device is down.
            res.reopen_failures += 1;
            res.errors.push(format!(
                "run {cut}: the writer exited ({status}) before the cut: {}",
                one_line(&stderr)
            ));
            break;
        }
        res.cuts += 1;
        match run_checker(exe, engine, &dir) {
            Err(e) => {
                res.reopen_failures += 1;
                res.errors.push(format!("cut {}: {e}", cut + 1));
                break;
            }
            Ok(c) => {
                res.reopen_times.push(c.open);
                let lost: Vec<u64> = acked
                    .iter()
                    .filter(|k| !c.present.contains(k) && !res.lost.contains(k))
                    .copied()
                    .collect();
                let new_bad: Vec<&(u64, String)> =
                    c.bad.iter().filter(|(k, _)| !res.corrupt.contains(k)).collect();
                if !lost.is_empty() {
                    res.errors.push(format!(
                        "cut {}: {} acknowledged records missing (e.g. {:?})",
                        cut + 1,
                        lost.len(),
                        &lost[..lost.len().min(5)]
                    ));
                }
                for (k, why) in &new_bad {
                    res.errors
                        .push(format!("cut {}: record {k} corrupt: {why}", cut + 1));
                }
                for i in &c.integrity {
                    res.errors.push(format!("cut {}: engine check: {i}", cut + 1));
                }
                if lost.is_empty() && new_bad.is_empty() && c.integrity.is_empty() {
                    res.survived += 1;
                }
                res.lost.extend(lost);
                res.corrupt.extend(new_bad.iter().map(|(k, _)| *k));
            }
        }
        eprintln!(
            "  {} cut {}/{cuts}: {} acknowledged this run, {} lost so far, {} corrupt",
            engine.name(),
            cut + 1,
            res.per_cut.last().copied().unwrap_or(0),
            res.lost.len(),
            res.corrupt.len()
        );
    }
    res.elapsed = started.elapsed();
    drop(fs);
    Ok(res)
}
