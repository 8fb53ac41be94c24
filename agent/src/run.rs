//! `edge-agent run`: flags, logging and the runtime around `edge_agent::daemon`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use tracing_subscriber::EnvFilter;

use edge_agent::config::{Config, LogFormat, MqttProtocol, Overrides};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Configuration file (TOML; every key documented in agent/examples/agent.toml).
    /// Without it: defaults and EDGE_AGENT_* environment variables.
    #[arg(long, short, env = "EDGE_AGENT_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// The edge bundle to serve [key model.bundle].
    #[arg(long, short, value_name = "FILE")]
    bundle: Option<PathBuf>,
    /// MQTT broker URL, e.g. mqtt://broker:1883; without one the embedded broker starts
    /// [key mqtt.broker].
    #[arg(long, value_name = "URL")]
    broker: Option<String>,
    /// MQTT protocol: v5 or v311 [key mqtt.protocol].
    #[arg(long, value_parser = edge_agent::daemon::parse_protocol)]
    protocol: Option<MqttProtocol>,
    /// This device's id in topics and replies [key device_id].
    #[arg(long, value_name = "ID")]
    device_id: Option<String>,
    /// Directory of the durable queue [key queue.dir].
    #[arg(long, value_name = "DIR")]
    queue_dir: Option<PathBuf>,
    /// Requests classified at once; 0: one per CPU core [key workers.count].
    #[arg(long)]
    workers: Option<usize>,
    /// Threads an inference running alone uses; 0: every core [key workers.threads].
    #[arg(long)]
    threads: Option<usize>,
    /// Address of the device page (/), /api/status, /metrics, /healthz, /readyz; "" disables
    /// [key http.listen].
    #[arg(long, value_name = "ADDR")]
    http_listen: Option<String>,
    /// Log format: human or json [key log.format].
    #[arg(long, value_parser = parse_log_format)]
    log_format: Option<LogFormat>,
    /// Print the effective configuration (TOML) and exit.
    #[arg(long)]
    print_config: bool,
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "human" => Ok(LogFormat::Human),
        "json" => Ok(LogFormat::Json),
        other => Err(format!("unknown log format `{other}` (human or json)")),
    }
}

pub fn run(args: RunArgs) -> Result<ExitCode> {
    let overrides = Overrides {
        device_id: args.device_id,
        bundle: args.bundle,
        broker: args.broker,
        protocol: args.protocol,
        queue_dir: args.queue_dir,
        workers: args.workers,
        threads: args.threads,
        http_listen: args.http_listen,
        log_format: args.log_format,
    };
    let config = Config::load(args.config.as_deref(), &overrides)?;
    if args.print_config {
        print!(
            "{}",
            toml::to_string(&config.redacted()).context("cannot print the configuration")?
        );
        return Ok(ExitCode::SUCCESS);
    }
    init_logging(&config)?;
    if let Some(warning) = args.config.as_deref().and_then(Config::exposed_secrets) {
        tracing::warn!("{warning}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .thread_name("edge-agent")
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(edge_agent::daemon::run(config));
    // A blocking call stuck on failed storage must not keep the process from exiting.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    result?;
    Ok(ExitCode::SUCCESS)
}

fn init_logging(config: &Config) -> Result<()> {
    init_logging_with(config.log.format, &config.log.level)
}

/// Logs to stderr, human or JSON, filtered by `RUST_LOG` or else `level`.
pub fn init_logging_with(format: LogFormat, level: &str) -> Result<()> {
    let mut filter = match std::env::var("RUST_LOG") {
        Ok(f) if !f.is_empty() => EnvFilter::try_new(f).context("invalid RUST_LOG")?,
        _ => EnvFilter::try_new(level)
            .map_err(|e| anyhow::anyhow!("invalid configuration: key `log.level`: {e}"))?,
    };
    // The embedded broker logs every connection at info; keep its warnings unless asked.
    if !filter.to_string().contains("rumqttd")
        && let Ok(directive) = "rumqttd=warn".parse()
    {
        filter = filter.add_directive(directive);
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}
