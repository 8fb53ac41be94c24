//! The process signals every long-running command stops on: SIGTERM (the service manager,
//! Kubernetes) and SIGINT (a terminal). Used by the device daemon, the pool server and the
//! fleet dashboard.

use anyhow::{Context, Result};
use tracing::info;

/// Waits for SIGTERM or SIGINT.
pub async fn wait_for_signal() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM"),
        _ = int.recv() => info!("SIGINT"),
    }
    Ok(())
}
