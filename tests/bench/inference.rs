//! Benchmark 1: Local inference, batch 1, 1 thread and every core: our bundle through our runtime
//! against ONNX Runtime on the same ONNX with the same thread count, and against the
//! machine's peak FLOP/s.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use edge_runtime::bundle;
use edge_runtime::runtime::{Classifier, Profile, RuntimeOptions, Tensor, TuneOptions, Tuning};
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

/// The bundle under the runtime settings the tuner picks on this machine for `threads`
/// threads (as edge-agent runs it), cached in the bench's scratch directory.
pub fn tuned_classifier(ctx: &Ctx, bundle: &Path, threads: usize) -> Result<Classifier> {
    tuned_classifier_in(ctx.scratch.path(), bundle, threads)
}

/// [`tuned_classifier`] with its tuning cache in `cache_dir`.
fn tuned_classifier_in(cache_dir: &Path, bundle: &Path, threads: usize) -> Result<Classifier> {
    let options = RuntimeOptions {
        threads: NonZeroUsize::new(threads).unwrap_or(NonZeroUsize::MIN),
        tuning: Tuning::Auto(TuneOptions {
            budget: std::time::Duration::from_secs(120),
            cache_dir: Some(cache_dir.to_owned()),
        }),
        ..RuntimeOptions::default()
    };
    Classifier::load(bundle, &options).with_context(|| format!("cannot load {}", bundle.display()))
}

/// Per-operator profile, tract's defaults against the tuned settings (1 thread), interleaved.
fn profile_before_after(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let tuned = tuned_classifier(ctx, &ctx.bundle, 1)?;
    let s = tuned.settings();
    let m = s.measured.as_ref();
    let trials: Vec<String> = m
        .map(|m| {
            m.trials
                .iter()
                .map(|t| match (t.ratio, &t.skipped) {
                    (Some(r), _) => {
                        format!("{} {:.2}x{}", t.settings, r, if t.kept { " (kept)" } else { "" })
                    }
                    (None, Some(why)) => format!("{} not timed: {why}", t.settings),
                    (None, None) => t.settings.to_string(),
                })
                .collect()
        })
        .unwrap_or_default();
    report.note(
        S,
        format!(
            "Runtime settings the tuner chose here (1 thread, as edge-agent would on first load; \
             every later row runs with them): **{}**; tract's defaults {:.0} ms, chosen {:.0} ms, \
             tuning took {:.1} s. Candidates (time relative to the best so far, interleaved \
             medians): {}.",
            s.settings,
            m.map_or(f64::NAN, |m| m.default_ms),
            m.map_or(f64::NAN, |m| m.chosen_ms),
            m.map_or(f64::NAN, |m| m.tuning_ms / 1e3),
            trials.join("; ")
        ),
    );
    let plain = classifier(&ctx.bundle, 1)?;
    let x = input(&plain);
    let (mut before, mut after): (Vec<Profile>, Vec<Profile>) = (Vec::new(), Vec::new());
    for _ in 0..ctx.rounds.max(1) {
        before.push(plain.profile(&x, 3)?);
        after.push(tuned.profile(&x, 3)?);
    }
    let pick = |v: &[Profile]| -> Profile {
        // The round with the median total stands for the rest.
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.nodes_ms.total_cmp(&b.nodes_ms));
        v.swap_remove(v.len() / 2)
    };
    let (before, after) = (pick(&before), pick(&after));
    let mut kinds: Vec<String> = before.ops.iter().map(|o| o.op.clone()).collect();
    for o in &after.ops {
        if !kinds.contains(&o.op) {
            kinds.push(o.op.clone());
        }
    }
    let cell = |p: &Profile, op: &str| -> [String; 3] {
        match p.ops.iter().find(|o| o.op == op) {
            Some(o) => [
                format!("{} / {:.1}", o.nodes, o.ms),
                format!("{:.1} %", o.share * 100.0),
                if o.gflops > 0.0 {
                    format!("{:.0}", o.gflops)
                } else {
                    "—".into()
                },
            ],
            None => ["—".into(), "—".into(), "—".into()],
        }
    };
    let mut rows: Vec<Vec<String>> = kinds
        .iter()
        .map(|k| {
            let mut r = vec![k.clone()];
            r.extend(cell(&before, k));
            r.extend(cell(&after, k));
            r
        })
        .collect();
    let total = |p: &Profile| {
        [
            format!("{} / {:.1}", p.nodes.len(), p.nodes_ms),
            "100 %".into(),
            format!("{:.0}", 2.0 * p.multiply_adds as f64 / p.nodes_ms / 1e6),
        ]
    };
    let mut r = vec!["**all nodes**".to_string()];
    r.extend(total(&before));
    r.extend(total(&after));
    rows.push(r);
    report.table(
        S,
        &format!(
            "Per-operator profile of the bundle at 1 thread (`edge-convert profile`: every node timed \
             with `SimpleState::run_plan_with_eval`, median of 3 runs, the median of {} interleaved \
             rounds), tract's defaults (before) against the tuned settings (after); GFLOP/s from \
             tract's cost model:",
            ctx.rounds.max(1)
        ),
        &[
            "operator",
            "before: nodes / ms",
            "share",
            "GFLOP/s",
            "after: nodes / ms",
            "share",
            "GFLOP/s",
        ],
        &rows,
    );
    Ok(())
}

/// A fixed pseudo-random input of the classifier's input shape (the one tuning and profiling
/// run on).
pub fn input(c: &Classifier) -> Tensor {
    edge_runtime::runtime::tune::pseudo_random(&c.manifest().input.shape)
}

/// The `concurrent` profiling aid: `workers` threads each running `runs` single-threaded
/// inferences at once, against one thread alone, in rounds; with `own_models`, each thread
/// runs a copy of the model of its own.
pub fn concurrent(
    bundle: &Path,
    tuning_cache: &Path,
    workers: usize,
    runs: usize,
    own_models: bool,
) -> Result<()> {
    let c = tuned_classifier_in(tuning_cache, bundle, 1)?;
    let copies: Vec<Classifier> = match own_models {
        true => (0..workers)
            .map(|_| tuned_classifier_in(tuning_cache, bundle, 1))
            .collect::<Result<_>>()?,
        false => Vec::new(),
    };
    let x = input(&c);
    time_runs(&c, &x, 2)?;
    for _ in 0..3 {
        let alone = crate::stats::median(&time_runs(&c, &x, runs)?);
        let together = match own_models {
            true => rate_each(&copies, &x, runs)?,
            false => rate_at_once(&c, &x, workers, runs)?,
        };
        println!(
            "alone {alone:.1} ms ({:.2} images/s); {workers} at once{} {together:.2} images/s ({:.1} ms each)",
            1000.0 / alone,
            if own_models { " (own models)" } else { "" },
            workers as f64 * 1000.0 / together
        );
    }
    Ok(())
}

/// One thread per classifier, each running `n` inferences at once: images per second overall.
fn rate_each(classifiers: &[Classifier], x: &Tensor, n: usize) -> Result<f64> {
    let start = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = classifiers
            .iter()
            .map(|c| s.spawn(|| time_runs(c, x, n)))
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .map_err(|_| anyhow::anyhow!("bench thread panicked"))?
                .map(drop)
        })
    })?;
    Ok((classifiers.len() * n) as f64 / start.elapsed().as_secs_f64())
}

/// `threads` threads each running `n` inferences of `c` at once: images per second overall.
pub fn rate_at_once(c: &Classifier, x: &Tensor, threads: usize, n: usize) -> Result<f64> {
    let start = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads).map(|_| s.spawn(|| time_runs(c, x, n))).collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .map_err(|_| anyhow::anyhow!("bench thread panicked"))?
                .map(drop)
        })
    })?;
    Ok((threads * n) as f64 / start.elapsed().as_secs_f64())
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
    // As edge-agent does at its first start, the instruction set tract's kernels use is chosen
    // (in child processes) before anything in this process runs tract, which then keeps it
    // for the process: tuned on the SavedModel form (the last candidate), every row after
    // runs with it.
    if let Some((_, bundle)) = ctx.candidates.last() {
        let bundle = bundle.clone();
        let tuned = tuned_classifier(ctx, &bundle, 1)?;
        let s = tuned.settings();
        let isa = match &s.isa {
            Some(t) => format!(
                "tract's own choice {:.0} ms against `TRACT_CPU_ISA={}` {:.0} ms (each in child \
                 processes): {}",
                t.native_ms,
                t.candidate,
                t.candidate_ms,
                if t.kept { "the latter kept" } else { "tract's kept" }
            ),
            None => "nothing to compare on this CPU (no AVX-512)".into(),
        };
        let note = s.note.as_deref().map(|n| format!(" ({n})")).unwrap_or_default();
        report.note(S, format!("Instruction set chosen by the tuner: {isa}{note}."));
    }
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

    profile_before_after(ctx, report)?;

    let threads = [1, ctx.cpus];
    for &t in threads.iter().take(if ctx.cpus > 1 { 2 } else { 1 }) {
        let ours = tuned_classifier(ctx, &ctx.bundle, t)?;
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
