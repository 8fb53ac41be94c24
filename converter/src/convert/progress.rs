//! Progress reporting for long converter steps: a spinner on a terminal, one line per
//! finished step otherwise (CI logs).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Clone, Copy)]
pub struct Progress {
    terminal: bool,
    quiet: bool,
}

impl Progress {
    pub fn new(quiet: bool) -> Self {
        Progress {
            terminal: std::io::stderr().is_terminal(),
            quiet,
        }
    }

    /// Runs `f` as a named step, showing a spinner while it runs and its duration after.
    pub fn step<T>(&self, what: &str, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let bar = (self.terminal && !self.quiet).then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.set_message(what.to_string());
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        });
        let out = f();
        let took = start.elapsed().as_secs_f64();
        match bar {
            Some(bar) => bar.finish_with_message(format!("{what} ({took:.2} s)")),
            None if !self.quiet => eprintln!("{what} ({took:.2} s)"),
            None => {}
        }
        out
    }
}
