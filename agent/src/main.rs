//! `edge-agent`: the device-side classifier of the Edge Fleet Agent.

mod classify;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Classify images on the device with an edge bundle (see edge-convert).
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Classify(args) => classify::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", edge_convert::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
