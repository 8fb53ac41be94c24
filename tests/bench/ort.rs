//! ONNX Runtime, the baseline: a Python process per session (scripts/bench_ort.py), driven
//! line by line so its runs interleave with ours.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use anyhow::{Context, Result, bail};

pub struct Ort {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub version: String,
}

impl Ort {
    /// Starts a session on `model` with `threads` intra-op threads; returns once warmed up.
    pub fn start(python: &Path, model: &Path, threads: usize) -> Result<Self> {
        let script = edge_e2e::workspace().join("scripts/bench_ort.py");
        let mut child = Command::new(python)
            .arg(&script)
            .arg(model)
            .arg(threads.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {} {}", python.display(), script.display()))?;
        let stdin = child.stdin.take().context("no stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("no stdout")?);
        let mut ort = Ort {
            child,
            stdin,
            stdout,
            version: String::new(),
        };
        let ready = ort.read()?;
        ort.version = ready["version"].as_str().unwrap_or("?").to_owned();
        Ok(ort)
    }

    fn read(&mut self) -> Result<serde_json::Value> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("ONNX Runtime process ended");
        }
        serde_json::from_str(&line).with_context(|| format!("bad line from bench_ort.py: {line}"))
    }

    /// Asks for `n` inferences without waiting (see [`Ort::collect`]).
    pub fn send(&mut self, n: usize) -> Result<()> {
        writeln!(self.stdin, "run {n}")?;
        self.stdin.flush()?;
        Ok(())
    }

    /// The per-inference milliseconds of the last `send`.
    pub fn collect(&mut self) -> Result<Vec<f64>> {
        let v = self.read()?;
        v["ms"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
            .context("bench_ort.py answered without times")
    }

    /// `n` inferences, one after the other: their milliseconds.
    pub fn run(&mut self, n: usize) -> Result<Vec<f64>> {
        self.send(n)?;
        self.collect()
    }
}

impl Drop for Ort {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        let _ = self.child.wait();
    }
}
