//! `edge-agent`: the device-side classifier of the Edge Fleet Agent.

mod classify;
mod fleet;
mod run;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Classify images on the device with an edge bundle (see edge-convert): once from files
/// (`classify`) or as a daemon taking requests over MQTT (`run`).
///
/// Exit codes: 0 success, 1 failure (or an image could not be classified), 2 usage error.
#[derive(Parser)]
#[command(name = "edge-agent", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Classify image files once and print the top classes.
    ///
    /// Example: edge-agent classify photo.jpg --bundle model.bundle --top-k 5
    Classify(classify::ClassifyArgs),
    /// Run the device daemon: take requests over MQTT, queue them durably, classify, reply.
    ///
    /// Without a broker configured it starts an embedded one on 127.0.0.1:1883. Example:
    /// edge-agent run --bundle model.bundle --queue-dir /tmp/q --device-id cam1
    Run(Box<run::RunArgs>),
    /// Run the overflow pool's gRPC server (TF Serving PredictionService, KServe v2
    /// GRPCInferenceService, grpc.health.v1) on one bundle.
    ///
    /// Example: edge-agent serve --bundle model.bundle --listen 0.0.0.0:9000
    Serve(Box<serve::ServeArgs>),
    /// List every device's retained status from the fleet's broker.
    ///
    /// Example: edge-agent fleet-status --broker mqtt://broker:1883 [--json]
    FleetStatus(fleet::FleetArgs),
}

fn main() -> ExitCode {
    // A child the runtime tuner started to time an instruction set answers and exits here.
    edge_runtime::runtime::tune::isa::child_entry();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Classify(args) => classify::run(&args),
        Command::Run(args) => run::run(*args),
        Command::Serve(args) => serve::run(*args),
        Command::FleetStatus(args) => fleet::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", edge_runtime::error_chain(e.as_ref()));
            // 2: the configuration is wrong (restarting will not help; the unit does not);
            // 1: a failure at run time.
            if e.chain().any(|c| c.is::<edge_agent::config::ConfigError>()) {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
