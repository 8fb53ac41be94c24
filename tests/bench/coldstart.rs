//! Benchmark 6: Cold start: a fresh process from start to ready to infer, with the bundle against
//! loading the source ONNX; its peak RSS against the model's weight bytes.

use std::ffi::OsStr;
use std::num::NonZeroUsize;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use edge_runtime::bundle;
use edge_runtime::runtime::{Classifier, RuntimeOptions, TuneOptions, Tuning};
use tract_core::ops::konst::Const;
use tract_onnx::prelude::*;

use crate::Ctx;
use crate::report::{Report, Target};
use crate::stats::{median, ms};

const S: &str = "cold start";

/// The child: load, get ready to infer, report.
pub fn child(bundle: Option<&Path>, onnx: Option<&Path>, cache: Option<&Path>) -> Result<()> {
    crate::alloc::stop_counting();
    let start = Instant::now();
    let parsed = match (bundle, onnx) {
        (Some(b), None) if cache.is_some() => {
            // As edge-agent loads: tuning on, the settings found in the cache.
            let c = Classifier::load(b, &tuned_options(cache))?;
            std::hint::black_box(&c);
            f64::NAN
        }
        (Some(b), None) => {
            let options = RuntimeOptions {
                threads: NonZeroUsize::MIN,
                ..RuntimeOptions::default()
            };
            let loaded = bundle::load(b, options.max_bundle_bytes)?;
            let parsed = ms(start.elapsed());
            let c = Classifier::from_model(loaded.manifest, loaded.model, &options)?;
            std::hint::black_box(&c);
            parsed
        }
        (None, Some(o)) => {
            let model = tract_onnx::onnx()
                .model_for_path(o)?
                .with_input_fact(0, f32::fact([1, 299, 299, 3]).into())?;
            let parsed = ms(start.elapsed());
            let plan = model.into_optimized()?.into_runnable()?;
            std::hint::black_box(&plan);
            parsed
        }
        _ => bail!("give --bundle or --onnx"),
    };
    let ready = ms(start.elapsed());
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let hwm_kb = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    println!(
        "{}",
        serde_json::json!({"parsed_ms": parsed, "ready_ms": ready, "peak_rss_kb": hwm_kb})
    );
    Ok(())
}

/// One thread, tuning on with its cache in `cache`.
fn tuned_options(cache: Option<&Path>) -> RuntimeOptions {
    RuntimeOptions {
        threads: NonZeroUsize::MIN,
        tuning: Tuning::Auto(TuneOptions {
            cache_dir: cache.map(Path::to_owned),
            ..TuneOptions::default()
        }),
        ..RuntimeOptions::default()
    }
}

/// Bytes of every constant (weights) in the bundle's graph.
fn weight_bytes(path: &Path) -> Result<u64> {
    let b = bundle::load(path, u64::MAX)?;
    Ok(b.model
        .nodes
        .iter()
        .filter_map(|n| n.op_as::<Const>())
        .map(|c| (c.val().len() * c.val().datum_type().size_of()) as u64)
        .sum())
}

/// Spawns a child: (wall ms from spawn to exit, peak RSS bytes, [parse ms, ready ms]).
fn spawn(args: &[&std::ffi::OsStr]) -> Result<(f64, f64, [f64; 2])> {
    let exe = std::env::current_exe()?;
    let start = Instant::now();
    let out = Command::new(exe).arg("load").args(args).output()?;
    let wall = ms(start.elapsed());
    if !out.status.success() {
        bail!(
            "cold-start child failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("child output")?;
    let field = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    Ok((
        wall,
        field("peak_rss_kb") * 1024.0,
        [field("parsed_ms"), field("ready_ms")],
    ))
}

pub fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    // The bundle made from the same ONNX the baseline loads.
    let bundle = ctx
        .candidates
        .iter()
        .find(|(name, _)| name.contains("NHWC"))
        .map(|(_, p)| p.clone())
        .context("no NHWC bundle")?;
    let weights = weight_bytes(&bundle)? as f64;
    // The agent's restarts: the tuner has run once and cached its choice beside the model.
    let cache = ctx.scratch.path().join("coldstart-tuning");
    std::fs::create_dir_all(&cache)?;
    let tuned = Classifier::load(&bundle, &tuned_options(Some(&cache)))?;
    let tuned_settings = tuned.settings().settings.to_string();
    drop(tuned);
    let plain_args = [OsStr::new("--bundle"), bundle.as_os_str()];
    let tuned_args = [
        OsStr::new("--bundle"),
        bundle.as_os_str(),
        OsStr::new("--tuning-cache"),
        cache.as_os_str(),
    ];
    let onnx_args = [OsStr::new("--onnx"), ctx.onnx_nhwc.as_os_str()];
    let (mut b, mut o, mut rss_b, mut rss_o) = (vec![], vec![], vec![], vec![]);
    let (mut t_tuned, mut rss_tuned) = (vec![], vec![]);
    let (mut phases_b, mut phases_o) = (vec![], vec![]);
    spawn(&plain_args)?; // page cache warm for all
    spawn(&tuned_args)?;
    spawn(&onnx_args)?;
    for _ in 0..ctx.rounds {
        let (t, r, p) = spawn(&plain_args)?;
        b.push(t);
        rss_b.push(r);
        phases_b.push(p);
        let (t, r, _) = spawn(&tuned_args)?;
        t_tuned.push(t);
        rss_tuned.push(r);
        let (t, r, p) = spawn(&onnx_args)?;
        o.push(t);
        rss_o.push(r);
        phases_o.push(p);
    }
    report.row(
        S,
        "process start to ready, bundle as edge-agent restarts (tuned settings from the cache)",
        median(&t_tuned),
        "ms",
        Some(("source ONNX", median(&o))),
        Target::RatioAtMost(1.0),
    );
    report.row(
        S,
        "peak RSS at ready, bundle as edge-agent restarts",
        median(&rss_tuned) / 1e6,
        "MB",
        Some(("2 x weight bytes", 2.0 * weights / 1e6)),
        Target::RatioAtMost(1.0),
    );
    report.row(
        S,
        "process start to ready, bundle with tract's defaults",
        median(&b),
        "ms",
        Some(("source ONNX", median(&o))),
        Target::RatioAtMost(0.5),
    );
    report.row(
        S,
        format!("peak RSS at ready, bundle (weights {:.1} MB)", weights / 1e6),
        median(&rss_b) / 1e6,
        "MB",
        Some(("2 x weight bytes", 2.0 * weights / 1e6)),
        Target::RatioAtMost(1.0),
    );
    report.row(
        S,
        "peak RSS at ready, source ONNX",
        median(&rss_o) / 1e6,
        "MB",
        Some(("weight bytes", weights / 1e6)),
        Target::None,
    );
    let phase = |v: &[[f64; 2]], i: usize| median(&v.iter().map(|p| p[i]).collect::<Vec<_>>());
    report.note(
        S,
        format!(
            "Where the time goes (in the child, median): bundle read and parsed {:.0} ms, ready {:.0} ms; \
             ONNX read and parsed {:.0} ms, ready {:.0} ms. The rest of the wall time is process start \
             and exit.",
            phase(&phases_b, 0),
            phase(&phases_b, 1),
            phase(&phases_o, 0),
            phase(&phases_o, 1)
        ),
    );
    report.note(
        S,
        format!(
            "A fresh `edge-bench load` process per measurement ({} rounds, alternating, page cache warm): \
             the bundle through `Classifier::load` (read, NNEF parse, optimise, plan) with tract's \
             defaults, and as edge-agent restarts (tuning on, the settings cached by an earlier \
             load: {}), against tract-onnx loading {} with the input shape fixed (parse, type, \
             optimise, plan); wall time from spawn to exit, peak RSS from the child's VmHWM.",
            ctx.rounds,
            tuned_settings,
            ctx.onnx_nhwc
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        ),
    );
    Ok(())
}
