//! `edge-agent serve`: flags and runtime around `edge_agent::pool`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use edge_agent::pool::ServeConfig;
use edge_agent::pool::engine::Batching;
use edge_runtime::runtime::{TuneOptions, Tuning};

/// `--tuning`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum TuningArg {
    Auto,
    Off,
}

/// Every flag also reads an EDGE_POOL_* environment variable (shown below), so a Kubernetes
/// Deployment can configure the pool from a ConfigMap.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The edge bundle to serve.
    #[arg(long, short, env = "EDGE_POOL_BUNDLE", value_name = "FILE")]
    bundle: PathBuf,
    /// gRPC address (TF Serving's port is 9000 in the seed deployment).
    #[arg(long, env = "EDGE_POOL_LISTEN", default_value = "0.0.0.0:9000")]
    listen: SocketAddr,
    /// Address of /metrics, /healthz, /readyz; "" disables.
    #[arg(long, env = "EDGE_POOL_HTTP_LISTEN", default_value = "0.0.0.0:9464")]
    http_listen: String,
    /// Model name clients must use (model_spec.name / model_name); default: the bundle's
    /// (use `inception` for clients of the TF Serving Inception example).
    #[arg(long, env = "EDGE_POOL_MODEL_NAME")]
    model_name: Option<String>,
    /// Classes returned per image by the image signatures.
    #[arg(long, env = "EDGE_POOL_TOP_K", default_value_t = 5)]
    top_k: usize,
    /// Inferences run at once (default: the number of CPUs).
    #[arg(long, env = "EDGE_POOL_WORKERS")]
    workers: Option<usize>,
    /// tract threads an inference running alone uses (default: the number of CPUs); under
    /// load each inference runs on one thread (see --fixed-threads).
    #[arg(long, env = "EDGE_POOL_THREADS")]
    threads: Option<usize>,
    /// Always use --threads threads per inference instead of adapting to the load.
    #[arg(long, env = "EDGE_POOL_FIXED_THREADS")]
    fixed_threads: bool,
    /// How the runtime settings are chosen: `auto` measures them on this machine at load,
    /// as the device agent does (the runtime's own convolution kernels or tract's, the
    /// instruction set, tract's knobs; about 5-15 s the first time, bounded by
    /// --tuning-budget-secs) and caches the choice in edge-tuning.json in --tuning-cache;
    /// `off` runs tract's defaults.
    #[arg(long, env = "EDGE_POOL_TUNING", value_enum, default_value = "auto")]
    tuning: TuningArg,
    /// Longest time spent tuning when --tuning auto has no cached choice.
    #[arg(long, env = "EDGE_POOL_TUNING_BUDGET_SECS", default_value_t = 30)]
    tuning_budget_secs: u64,
    /// Directory of the tuning cache (default: the bundle's). When it cannot be written
    /// (a read-only model volume), each start tunes again and logs a warning.
    #[arg(long, env = "EDGE_POOL_TUNING_CACHE", value_name = "DIR")]
    tuning_cache: Option<PathBuf>,
    /// Requests held at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "EDGE_POOL_MAX_CONCURRENT_REQUESTS", default_value_t = 64)]
    max_concurrent_requests: usize,
    /// Images or tensors accepted in one request.
    #[arg(long, env = "EDGE_POOL_MAX_BATCH_ITEMS", default_value_t = 64)]
    max_batch_items: usize,
    /// Dynamic batching: items grouped per turn of an inference slot; 0 turns batching off
    /// (the default: bundles run batch 1, so grouping only adds the wait below).
    #[arg(long, env = "EDGE_POOL_MAX_BATCH_SIZE", default_value_t = 0)]
    max_batch_size: usize,
    /// Dynamic batching: longest wait for a group to fill, in milliseconds.
    #[arg(long, env = "EDGE_POOL_MAX_QUEUE_DELAY_MS", default_value_t = 2)]
    max_queue_delay_ms: u64,
    /// Largest gRPC message, in bytes, both ways.
    #[arg(long, env = "EDGE_POOL_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024 * 1024)]
    max_message_bytes: usize,
    /// Largest encoded image, in bytes.
    #[arg(long, env = "EDGE_POOL_MAX_IMAGE_BYTES", default_value_t = 16 * 1024 * 1024)]
    max_image_bytes: usize,
    /// After SIGTERM: seconds of NOT_SERVING health while still serving, so load balancers
    /// and readiness probes stop sending before the listener closes.
    #[arg(long, env = "EDGE_POOL_DRAIN_DELAY_SECS", default_value_t = 5)]
    drain_delay_secs: u64,
    /// After the listener closes: seconds to finish requests in flight.
    #[arg(long, env = "EDGE_POOL_DRAIN_TIMEOUT_SECS", default_value_t = 20)]
    drain_timeout_secs: u64,
    /// PEM certificate chain: serve gRPC over TLS (with --tls-key).
    #[arg(long, env = "EDGE_POOL_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "EDGE_POOL_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA: require client certificates it signed (mTLS).
    #[arg(long, env = "EDGE_POOL_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Log format: human or json.
    #[arg(long, env = "EDGE_POOL_LOG_FORMAT", default_value = "human")]
    log_format: String,
}

pub fn run(args: ServeArgs) -> Result<ExitCode> {
    let http_listen = match args.http_listen.as_str() {
        "" => None,
        s => Some(
            s.parse()
                .with_context(|| format!("invalid --http-listen `{s}`"))?,
        ),
    };
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let positive = |name: &str, v: usize| {
        if v == 0 {
            anyhow::bail!("--{name} must be positive")
        }
        Ok(v)
    };
    let config = ServeConfig {
        bundle: args.bundle,
        listen: args.listen,
        http_listen,
        model_name: args.model_name,
        top_k: positive("top-k", args.top_k)?,
        workers: positive("workers", args.workers.unwrap_or(cpus))?,
        threads: positive("threads", args.threads.unwrap_or(cpus))?,
        adaptive: !args.fixed_threads,
        tuning: match args.tuning {
            TuningArg::Off => Tuning::Off,
            TuningArg::Auto => Tuning::Auto(TuneOptions {
                budget: Duration::from_secs(args.tuning_budget_secs),
                cache_dir: args.tuning_cache,
            }),
        },
        max_concurrent_requests: positive("max-concurrent-requests", args.max_concurrent_requests)?,
        max_batch_items: positive("max-batch-items", args.max_batch_items)?,
        batching: (args.max_batch_size > 0).then(|| Batching {
            max_batch_size: args.max_batch_size,
            max_queue_delay: Duration::from_millis(args.max_queue_delay_ms),
        }),
        max_message_bytes: positive("max-message-bytes", args.max_message_bytes)?,
        max_image_bytes: positive("max-image-bytes", args.max_image_bytes)?,
        drain_delay: Duration::from_secs(args.drain_delay_secs),
        drain_timeout: Duration::from_secs(args.drain_timeout_secs),
        tls: args.tls_cert.zip(args.tls_key),
        tls_client_ca: args.tls_client_ca,
    };
    let format = match args.log_format.as_str() {
        "human" => edge_agent::config::LogFormat::Human,
        "json" => edge_agent::config::LogFormat::Json,
        other => anyhow::bail!("unknown --log-format `{other}` (human or json)"),
    };
    crate::run::init_logging_with(format, "info")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("edge-pool")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(edge_agent::pool::run(config))?;
    Ok(ExitCode::SUCCESS)
}
