//! `edge-agent classify`: one-shot classification of image files with the shared runtime.

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;

use edge_runtime::preprocess::ImageLimits;
use edge_runtime::runtime::{Classifier, RuntimeOptions};

#[derive(Args, Debug)]
pub struct ClassifyArgs {
    /// JPEG or PNG files to classify.
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<PathBuf>,
    /// The edge bundle to classify with (written by edge-convert).
    #[arg(long, short, env = "EDGE_BUNDLE", value_name = "FILE")]
    bundle: PathBuf,
    /// How many classes to print per image.
    #[arg(long, short = 'k', default_value_t = 5)]
    top_k: usize,
    /// Print one JSON document instead of text: the model, the bundle load time and a
    /// `results` array with one object per image (its top classes or its error).
    #[arg(long)]
    json: bool,
    /// Threads tract uses per inference.
    #[arg(long, default_value = "1")]
    threads: NonZeroUsize,
    /// Largest image file accepted, in bytes.
    #[arg(long, default_value_t = ImageLimits::default().max_bytes)]
    max_image_bytes: usize,
    /// Largest decoded image accepted, in pixels (checked from the header before decoding).
    #[arg(long, default_value_t = ImageLimits::default().max_pixels)]
    max_pixels: u64,
    /// Decode JPEGs at full resolution even when a DCT-scaled decode would do.
    #[arg(long)]
    no_dct_scaling: bool,
}

pub fn run(args: &ClassifyArgs) -> Result<ExitCode> {
    let options = RuntimeOptions {
        threads: args.threads,
        image_limits: ImageLimits {
            max_bytes: args.max_image_bytes,
            max_pixels: args.max_pixels,
            ..ImageLimits::default()
        },
        dct_scaling: !args.no_dct_scaling,
        ..RuntimeOptions::default()
    };
    let start = Instant::now();
    let classifier = Classifier::load(&args.bundle, &options)
        .with_context(|| format!("cannot load bundle {}", args.bundle.display()))?;
    let load_ms = start.elapsed().as_secs_f64() * 1e3;
    let model = &classifier.manifest().model;
    let mut failed = 0;
    let mut results = Vec::new();
    for path in &args.images {
        let outcome = read_image(path, args.max_image_bytes).and_then(|bytes| {
            classifier
                .classify(&bytes, args.top_k)
                .map_err(|e| (e.code(), e.to_string()))
        });
        match outcome {
            Ok(c) => {
                if args.json {
                    results.push(json!({
                        "image": path,
                        "model": {"name": model.name, "version": model.version},
                        "top": c.top,
                        "timings_ms": {
                            "preprocess": c.preprocess.as_secs_f64() * 1e3,
                            "inference": c.inference.as_secs_f64() * 1e3,
                        },
                    }));
                } else {
                    println!("{}", path.display());
                    for p in &c.top {
                        println!("  {:.4}  {}", p.score, p.label);
                    }
                }
            }
            Err((code, message)) => {
                failed += 1;
                if args.json {
                    results.push(json!({"image": path, "error": {"code": code, "message": message}}));
                } else {
                    eprintln!("error: {}: {message} ({code})", path.display());
                }
            }
        }
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "model": {"name": model.name, "version": model.version},
                "load_ms": load_ms,
                "results": results,
            }))?
        );
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Reads an image file, refusing one larger than `max_bytes` before reading it.
fn read_image(path: &std::path::Path, max_bytes: usize) -> Result<Vec<u8>, (&'static str, String)> {
    let cannot = |e: std::io::Error| ("invalid_image", format!("cannot read {}: {e}", path.display()));
    let size = std::fs::metadata(path).map_err(cannot)?.len();
    if size > max_bytes as u64 {
        return Err((
            "too_large",
            format!("image is {size} bytes, the limit is {max_bytes}"),
        ));
    }
    std::fs::read(path).map_err(cannot)
}
