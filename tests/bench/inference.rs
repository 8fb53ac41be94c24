//! Benchmark 1: Local inference, batch 1, 1 thread and every core: our bundle through our runtime
//! against ONNX Runtime on the same ONNX with the same thread count, and against the
//! machine's peak FLOP/s.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use edge_convert::bundle;
use edge_convert::runtime::{Classifier, RuntimeOptions, Tensor};
use tract_core::ops::Cost;

use crate::Ctx;
use crate::ort::Ort;
use crate::peak::Peak;
use crate::report::{Report, Target};
use crate::stats::{median, ms};

const S: &str = "inference";

/// Each source form of the seeded Inception V3 converted to a bundle.
pub fn convert_candidates(fixtures: &Path, dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let labels = fixtures.join("inception_v3_seeded_labels.txt");
    let labels = labels.to_string_lossy();
    let sources = [
        ("ONNX, NHWC", "inception_v3_seeded_nhwc.onnx"),
        ("ONNX, NCHW", "inception_v3_seeded_nchw.onnx"),
        ("TensorFlow frozen GraphDef", "inception_v3_seeded_frozen.pb"),
        ("TensorFlow SavedModel", "inception_v3_seeded"),
    ];
    let mut out = Vec::new();
    for (i, (name, file)) in sources.iter().enumerate() {
        let bundle = dir.join(format!("candidate-{i}.bundle"));
        crate::convert(
            &fixtures.join(file),
            &bundle,
            &["--preset", "inception", "--labels", &labels],
        )?;
        out.push(((*name).to_owned(), bundle));
    }
    Ok(out)
}

pub fn classifier(bundle: &Path, threads: usize) -> Result<Classifier> {
    let options = RuntimeOptions {
        threads: NonZeroUsize::new(threads).unwrap_or(NonZeroUsize::MIN),
        ..RuntimeOptions::default()
    };
    Classifier::load(bundle, &options).with_context(|| format!("cannot load {}", bundle.display()))
}

/// A fixed pseudo-random input of the classifier's input shape.
pub fn input(c: &Classifier) -> Tensor {
    let shape = c.manifest().input.shape.clone();
    let n: usize = shape.iter().product();
    let mut x = 0x2545_f491_u32;
    let data: Vec<f32> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_shape(&shape, &data).unwrap_or_else(|_| Tensor::from(0f32))
}

/// `n` inferences one after the other: milliseconds each.
pub fn time_runs(c: &Classifier, x: &Tensor, n: usize) -> Result<Vec<f64>> {
    (0..n)
        .map(|_| {
            let start = Instant::now();
            c.infer(x.clone())?;
            Ok(ms(start.elapsed()))
        })
        .collect()
}

/// Multiply-adds of one inference, from tract's cost model of the bundle's graph.
pub fn multiply_adds(bundle_path: &Path) -> Result<f64> {
    let b = bundle::load(bundle_path, u64::MAX)?;
    let model = b.model;
    let mut total = 0f64;
    for node in &model.nodes {
        let inputs = model.node_input_facts(node.id)?;
        for (cost, n) in node.op.cost(&inputs)? {
            if let Cost::FMA(_) = cost {
                total += n.to_i64().unwrap_or(0) as f64;
            }
        }
    }
    Ok(total)
}

pub fn run(ctx: &mut Ctx, peak: &Peak, report: &mut Report) -> Result<()> {
    // Pick the source form the runtime runs fastest (1 thread, a few runs each).
    let mut best: Option<(f64, usize)> = None;
    let mut tried = Vec::new();
    for (i, (name, path)) in ctx.candidates.iter().enumerate() {
        let c = classifier(path, 1)?;
        let x = input(&c);
        time_runs(&c, &x, 1)?;
        let t = median(&time_runs(&c, &x, 3)?);
        tried.push(format!("{name} {t:.0} ms"));
        if best.is_none_or(|(b, _)| t < b) {
            best = Some((t, i));
        }
    }
    let (_, chosen) = best.context("no candidate bundle")?;
    ctx.bundle = ctx.candidates[chosen].1.clone();
    let chosen_name = ctx.candidates[chosen].0.clone();
    report.note(
        S,
        format!(
            "Source forms converted by edge-convert and timed at 1 thread (3 runs each): {}; the \
             fastest, **{chosen_name}**, is the bundle every later section uses.",
            tried.join(", ")
        ),
    );

    let macs = multiply_adds(&ctx.bundle)?;
    report.note(
        S,
        format!(
            "Inception V3 at 299x299: {:.2} G multiply-adds per image (tract's cost model of the bundle).",
            macs / 1e9
        ),
    );

    let threads = [1, ctx.cpus];
    for &t in threads.iter().take(if ctx.cpus > 1 { 2 } else { 1 }) {
        let ours = classifier(&ctx.bundle, t)?;
        let x = input(&ours);
        time_runs(&ours, &x, 2)?;
        // ONNX Runtime on each ONNX form; the faster one is the baseline.
        let mut orts = Vec::new();
        for (form, path) in [("NHWC", &ctx.onnx_nhwc), ("NCHW", &ctx.onnx_nchw)] {
            let mut o = Ort::start(&ctx.python, path, t)?;
            let quick = median(&o.run(3)?);
            orts.push((quick, form, o));
        }
        orts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (_, form, mut ort) = orts.swap_remove(0);
        drop(orts);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..ctx.rounds {
            a.push(median(&time_runs(&ours, &x, 3)?));
            b.push(median(&ort.run(3)?));
        }
        let (ours_ms, ort_ms) = (median(&a), median(&b));
        let limit = if t == 1 { 1.25 } else { 1.4 };
        report.row(
            S,
            format!("Inception V3 batch 1, {t} thread(s)"),
            ours_ms,
            "ms",
            Some((
                &format!("ONNX Runtime {} on the {form} ONNX", ort.version),
                ort_ms,
            )),
            Target::RatioAtMost(limit),
        );
        let peak_flops = if t == 1 { peak.one } else { peak.all };
        if peak_flops > 0.0 {
            let floor = 2.0 * macs / peak_flops * 1e3;
            report.row(
                S,
                format!("fraction of peak, {t} thread(s) (peak floor {floor:.0} ms)"),
                floor / ours_ms * 100.0,
                "%",
                Some(("ONNX Runtime", floor / ort_ms * 100.0)),
                Target::None,
            );
        }
    }
    report.note(
        S,
        format!(
            "{} interleaved rounds of 3 inferences each side, after warm-up; median of the round medians. \
             The input is a fixed pseudo-random tensor. ONNX Runtime: Python, CPU provider, \
             intra-op threads = our threads, all graph optimisations.",
            ctx.rounds
        ),
    );
    Ok(())
}
