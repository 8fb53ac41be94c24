//! `edge-convert`: turn an exported image classifier (ONNX, TensorFlow frozen GraphDef,
//! TensorFlow SavedModel) into an edge bundle, and inspect or verify models and bundles.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

use edge_convert::convert::{self, ConvertOptions, InputOverrides, Progress};
use edge_runtime::bundle::manifest::{
    ChannelOrder, Layout, OutputKind, Preprocessing, ResizeFilter, ResizePolicy,
};
use edge_runtime::runtime::{self, Classifier, RuntimeOptions, RuntimeSettings, TuneOptions, Tuning};

/// Convert exported image classifiers into edge bundles for edge-agent.
///
/// A bundle is one file: the tract NNEF model with its input shape fixed, plus a manifest
/// saying how to preprocess images and read the outputs. Exit codes: 0 success, 1 failure,
/// 2 usage error.
#[derive(Parser)]
#[command(name = "edge-convert", version, about, long_about)]
struct Cli {
    /// Print nothing but the result (no step timings).
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert a model into a verified edge bundle.
    ///
    /// SOURCE is an ONNX file, a TensorFlow frozen GraphDef (.pb), or a TensorFlow SavedModel
    /// directory (the version directory holding saved_model.pb, or its parent as TF Serving
    /// lays it out, in which case the highest version is taken). Example:
    ///
    ///   edge-convert convert inception.onnx -o inception.bundle --preset inception --labels labels.txt
    Convert(ConvertArgs),
    /// Show a model's or bundle's inputs, outputs, operators, parameters and cost.
    Inspect {
        /// A source model or a bundle.
        model: PathBuf,
        #[command(flatten)]
        input: InputArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run a bundle on sample inputs, optionally against its source model.
    ///
    /// With --against, exits 1 when the largest absolute difference between the bundle's and
    /// the source's outputs exceeds the tolerance.
    Verify {
        bundle: PathBuf,
        /// The source model to compare with.
        #[arg(long)]
        against: Option<PathBuf>,
        /// Number of sample inputs.
        #[arg(long, default_value_t = 3)]
        samples: usize,
        /// Largest accepted absolute difference.
        #[arg(long, default_value_t = 1e-4)]
        tolerance: f32,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Time every node of a bundle's optimised plan: per operator kind and the slowest nodes,
    /// with their share of the time and GFLOP/s from tract's cost model.
    ///
    /// The bundle runs through the same runtime as edge-agent, under the runtime settings
    /// it would use (see --tuning), on a fixed pseudo-random input; each figure is the median
    /// of --runs inferences after one warm-up. Example:
    ///
    ///   edge-convert profile inception.bundle --threads 2 --runs 9
    Profile(ProfileArgs),
}

#[derive(Args)]
struct ProfileArgs {
    /// The edge bundle.
    bundle: PathBuf,
    /// Threads per inference.
    #[arg(long, default_value = "1")]
    threads: NonZeroUsize,
    /// Timed inferences (each figure is their median).
    #[arg(long, default_value = "5")]
    runs: NonZeroUsize,
    /// How many of the slowest nodes to list.
    #[arg(long, default_value_t = 15)]
    top: usize,
    /// How the runtime settings (tract knobs) are chosen: `auto` as edge-agent does
    /// (measured on this machine once and cached in edge-tuning.json beside the bundle),
    /// `off` for tract's defaults.
    #[arg(long, value_enum, default_value = "auto")]
    tuning: TuningArg,
    /// Longest time spent tuning, when --tuning auto has no cached choice.
    #[arg(long, default_value_t = 30)]
    tuning_budget_secs: u64,
    /// Run with this tract knob instead (repeatable; overrides --tuning), e.g.
    /// --setting TRACT_DISABLE_DIRECT_SPATIAL=true. Only knobs tract reads while it
    /// optimises a model are accepted.
    #[arg(long = "setting", value_name = "KNOB=VALUE")]
    settings: Vec<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum TuningArg {
    Auto,
    Off,
}

#[derive(Args)]
struct ConvertArgs {
    /// The source model.
    source: PathBuf,
    /// Where to write the bundle.
    #[arg(short, long, value_name = "BUNDLE")]
    output: PathBuf,
    #[command(flatten)]
    input: InputArgs,
    #[command(flatten)]
    pre: PreprocessArgs,
    /// Labels file: one class name per line.
    #[arg(long, value_name = "FILE")]
    labels: Option<PathBuf>,
    /// Output index of the first label (1 when class 0 is background, as in TF-slim Inception's
    /// 1001 classes). Default: 1 if there is exactly one more class than labels, else 0.
    #[arg(long)]
    label_offset: Option<usize>,
    /// What the output holds. Default: detected (probabilities if outputs sum to 1).
    #[arg(long, value_enum)]
    output_kind: Option<KindArg>,
    /// Model name recorded in the bundle. Default: from the source file or directory name.
    #[arg(long)]
    name: Option<String>,
    /// Model version recorded in the bundle.
    #[arg(long = "model-version", default_value = "1")]
    model_version: String,
    /// Sample inputs used to check the bundle against the source.
    #[arg(long, default_value_t = 3)]
    samples: usize,
    /// Largest accepted absolute difference between bundle and source outputs.
    #[arg(long, default_value_t = 1e-4)]
    tolerance: f32,
    /// Keep the graph as the source has it: no rewrites for speed (today: average pools moved
    /// after the 1x1 convolution that follows them). For comparing; the default is faster.
    #[arg(long)]
    no_rewrites: bool,
}

#[derive(Args)]
struct InputArgs {
    /// Fixed input shape, batch first, e.g. 1,299,299,3. Default: the model's, batch 1.
    #[arg(long, value_delimiter = ',', value_name = "N,D,D,D")]
    input_shape: Option<Vec<usize>>,
    /// Input layout. Default: detected from the 3-channel axis.
    #[arg(long, value_enum)]
    layout: Option<LayoutArg>,
    /// SavedModel signature to convert. Default: serving_default (or the only one).
    #[arg(long)]
    signature: Option<String>,
    /// TensorFlow graph: the input node. Default: the single float placeholder.
    #[arg(long)]
    input_name: Option<String>,
    /// TensorFlow graph: the output node. Default: the single sink.
    #[arg(long)]
    output_name: Option<String>,
}

#[derive(Args)]
struct PreprocessArgs {
    /// Preprocessing preset; individual flags below override its fields. Default: what the
    /// source decodes in-graph, else inception.
    #[arg(long, value_enum)]
    preset: Option<Preset>,
    /// How the image is brought to the input size.
    #[arg(long, value_enum)]
    resize: Option<ResizeArg>,
    /// Crop fraction for --resize central-fraction / square-crop (e.g. 0.875).
    #[arg(long)]
    crop_fraction: Option<f32>,
    /// Resampling filter.
    #[arg(long, value_enum)]
    filter: Option<FilterArg>,
    /// Multiplier applied to 0..255 pixels before mean/std.
    #[arg(long)]
    scale: Option<f32>,
    /// Per-channel mean (after --scale), e.g. 0.485,0.456,0.406 or one value for all.
    #[arg(long, value_delimiter = ',')]
    mean: Option<Vec<f32>>,
    /// Per-channel standard deviation (after --scale).
    #[arg(long, value_delimiter = ',')]
    std: Option<Vec<f32>>,
    /// Channel order the model expects.
    #[arg(long, value_enum)]
    channel_order: Option<OrderArg>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Preset {
    /// Full-image resize (bilinear), x/127.5 - 1 (Inception, TF-slim).
    Inception,
    /// Square centre crop 0.875, bilinear, ImageNet mean/std on x/255 (torchvision).
    Imagenet,
    /// Square centre crop 0.875, bicubic, (x - 127)/128 (EfficientNet-Lite).
    EfficientnetLite,
}

#[derive(Clone, Copy, ValueEnum)]
enum ResizeArg {
    Stretch,
    CentralFraction,
    SquareCrop,
}

#[derive(Clone, Copy, ValueEnum)]
enum FilterArg {
    Nearest,
    Bilinear,
    Bicubic,
    Lanczos3,
    /// TensorFlow 1 ResizeBilinear (no antialiasing), as TF Serving exports decode.
    TfLegacyBilinear,
}

#[derive(Clone, Copy, ValueEnum)]
enum OrderArg {
    Rgb,
    Bgr,
}

#[derive(Clone, Copy, ValueEnum)]
enum LayoutArg {
    Nhwc,
    Nchw,
}

#[derive(Clone, Copy, ValueEnum)]
enum KindArg {
    Probabilities,
    Logits,
}

impl InputArgs {
    fn overrides(&self) -> InputOverrides {
        InputOverrides {
            shape: self.input_shape.clone(),
            layout: self.layout.map(|l| match l {
                LayoutArg::Nhwc => Layout::Nhwc,
                LayoutArg::Nchw => Layout::Nchw,
            }),
            signature: self.signature.clone(),
            input_name: self.input_name.clone(),
            output_name: self.output_name.clone(),
            preprocessing_given: false,
        }
    }
}

impl PreprocessArgs {
    fn any_field(&self) -> bool {
        self.resize.is_some()
            || self.crop_fraction.is_some()
            || self.filter.is_some()
            || self.scale.is_some()
            || self.mean.is_some()
            || self.std.is_some()
            || self.channel_order.is_some()
    }

    /// Explicit preprocessing, or None to let the source (or the default preset) decide.
    fn build(&self) -> Result<Option<Preprocessing>> {
        if self.preset.is_none() && !self.any_field() {
            return Ok(None);
        }
        let mut p = match self.preset.unwrap_or(Preset::Inception) {
            Preset::Inception => Preprocessing::inception(),
            Preset::Imagenet => Preprocessing::imagenet(),
            Preset::EfficientnetLite => Preprocessing::efficientnet_lite(),
        };
        let fraction = self.crop_fraction.or(match p.resize {
            ResizePolicy::CentralFraction { fraction } | ResizePolicy::SquareCenterCrop { fraction } => {
                Some(fraction)
            }
            ResizePolicy::Stretch => None,
        });
        if let Some(resize) = self.resize {
            p.resize = match resize {
                ResizeArg::Stretch => ResizePolicy::Stretch,
                ResizeArg::CentralFraction => ResizePolicy::CentralFraction {
                    fraction: fraction.unwrap_or(0.875),
                },
                ResizeArg::SquareCrop => ResizePolicy::SquareCenterCrop {
                    fraction: fraction.unwrap_or(0.875),
                },
            };
        } else if let Some(f) = self.crop_fraction {
            p.resize = match p.resize {
                ResizePolicy::CentralFraction { .. } => ResizePolicy::CentralFraction { fraction: f },
                _ => ResizePolicy::SquareCenterCrop { fraction: f },
            };
        }
        if let Some(f) = self.filter {
            p.filter = match f {
                FilterArg::Nearest => ResizeFilter::Nearest,
                FilterArg::Bilinear => ResizeFilter::Bilinear,
                FilterArg::Bicubic => ResizeFilter::Bicubic,
                FilterArg::Lanczos3 => ResizeFilter::Lanczos3,
                FilterArg::TfLegacyBilinear => ResizeFilter::TfLegacyBilinear,
            };
        }
        if let Some(s) = self.scale {
            p.scale = s;
        }
        if let Some(m) = &self.mean {
            p.mean = three("--mean", m)?;
        }
        if let Some(s) = &self.std {
            p.std = three("--std", s)?;
        }
        if let Some(o) = self.channel_order {
            p.channel_order = match o {
                OrderArg::Rgb => ChannelOrder::Rgb,
                OrderArg::Bgr => ChannelOrder::Bgr,
            };
        }
        Ok(Some(p))
    }
}

fn three(flag: &str, v: &[f32]) -> Result<[f32; 3]> {
    match v {
        [x] => Ok([*x; 3]),
        [a, b, c] => Ok([*a, *b, *c]),
        _ => bail!(
            "{flag} takes one value or three (one per channel), got {}",
            v.len()
        ),
    }
}

fn read_labels(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read labels file {}", path.display()))?;
    let labels: Vec<String> = text
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    if labels.is_empty() {
        bail!("labels file {} has no labels", path.display());
    }
    Ok(labels)
}

fn main() -> ExitCode {
    // A child the runtime tuner started to time an instruction set answers and exits here.
    edge_runtime::runtime::tune::isa::child_entry();
    let cli = Cli::parse();
    // tract may panic on malformed models; the converter turns those into errors, so keep
    // the default hook from printing a backtrace note on top.
    std::panic::set_hook(Box::new(|_| {}));
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", edge_runtime::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let progress = Progress::new(cli.quiet);
    match cli.command {
        Command::Convert(args) => {
            let preprocessing = args.pre.build()?;
            let mut input = args.input.overrides();
            input.preprocessing_given = preprocessing.is_some();
            let options = ConvertOptions {
                input,
                preprocessing,
                labels: args.labels.as_deref().map(read_labels).transpose()?,
                label_offset: args.label_offset,
                output_kind: args.output_kind.map(|k| match k {
                    KindArg::Probabilities => OutputKind::Probabilities,
                    KindArg::Logits => OutputKind::Logits,
                }),
                name: args.name,
                version: args.model_version,
                samples: args.samples,
                tolerance: args.tolerance,
                rewrites: !args.no_rewrites,
            };
            let converted = convert::convert(&args.source, &args.output, &options, &progress)
                .with_context(|| format!("cannot convert {}", args.source.display()))?;
            for note in &converted.notes {
                eprintln!("note: {note}");
            }
            let m = &converted.manifest;
            let v = m.verification.as_ref();
            println!(
                "wrote {} ({} {} from {:?} {}, input {:?} {:?}, {} classes, max abs diff vs source {:.3e} over {} samples)",
                args.output.display(),
                m.model.name,
                m.model.version,
                m.source.format,
                m.source.file,
                m.input.shape,
                m.input.layout,
                m.output.classes,
                v.map(|v| v.max_abs_diff).unwrap_or(f32::NAN),
                v.map(|v| v.samples).unwrap_or(0),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect { model, input, json } => {
            let report = convert::inspect::inspect(&model, &input.overrides())
                .with_context(|| format!("cannot inspect {}", model.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{} {}", report.kind, model.display());
                report.inputs.iter().for_each(|i| println!("input   {i}"));
                report.outputs.iter().for_each(|o| println!("output  {o}"));
                println!(
                    "parameters    {} ({:.1} MB)",
                    report.parameters,
                    report.weight_bytes as f64 / 1e6
                );
                println!(
                    "multiply-adds {} ({:.2} G)",
                    report.multiply_adds,
                    report.multiply_adds as f64 / 1e9
                );
                println!("operators:");
                let mut ops: Vec<_> = report.ops.iter().collect();
                ops.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
                for (op, n) in ops {
                    println!("  {n:>5} {op}");
                }
                if let Some(m) = &report.manifest {
                    println!("manifest:\n{}", serde_json::to_string_pretty(&without_labels(m))?);
                }
                report.notes.iter().for_each(|n| println!("note: {n}"));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify {
            bundle,
            against,
            samples,
            tolerance,
            json,
        } => {
            let report = convert::verify(&bundle, against.as_deref(), samples, tolerance, &progress)
                .with_context(|| format!("cannot verify {}", bundle.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else if report.against.is_some() {
                println!(
                    "{}: max abs diff {:.3e} over {} samples (tolerance {:.1e}): {}",
                    bundle.display(),
                    report.max_abs_diff,
                    report.samples,
                    report.tolerance,
                    if report.passed { "ok" } else { "MISMATCH" }
                );
            } else {
                println!(
                    "{}: ran {} samples, outputs {}",
                    bundle.display(),
                    report.samples,
                    if report.passed {
                        "finite probability distributions: ok"
                    } else {
                        "NOT valid probabilities"
                    }
                );
            }
            Ok(if report.passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Profile(args) => {
            profile(&args)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn profile(args: &ProfileArgs) -> Result<()> {
    let tuning = if !args.settings.is_empty() {
        let pairs = args
            .settings
            .iter()
            .map(|s| RuntimeSettings::parse_pair(s))
            .collect::<Result<Vec<_>, _>>()?;
        Tuning::Fixed(RuntimeSettings::new(pairs)?)
    } else {
        match args.tuning {
            TuningArg::Off => Tuning::Off,
            TuningArg::Auto => Tuning::Auto(TuneOptions {
                budget: Duration::from_secs(args.tuning_budget_secs),
                cache_dir: None,
            }),
        }
    };
    let options = RuntimeOptions {
        threads: args.threads,
        adaptive: false,
        tuning,
        ..RuntimeOptions::default()
    };
    let classifier = Classifier::load(&args.bundle, &options)
        .with_context(|| format!("cannot load {}", args.bundle.display()))?;
    let input = runtime::tune::pseudo_random(&classifier.manifest().input.shape);
    let profile = classifier
        .profile(&input, args.runs.get())
        .with_context(|| format!("cannot profile {}", args.bundle.display()))?;
    let settings = classifier.settings();
    let cpu = runtime::tune::cpu_description();
    if args.json {
        let doc = serde_json::json!({
            "bundle": args.bundle,
            "model": classifier.manifest().model,
            "threads": args.threads.get(),
            "cpu": cpu,
            "tract": edge_runtime::bundle::TRACT_VERSION,
            "settings": settings,
            "profile": profile,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    let m = &classifier.manifest().model;
    println!(
        "{} ({} {}): {} thread(s), median of {} runs, tract {}, {cpu}",
        args.bundle.display(),
        m.name,
        m.version,
        args.threads,
        profile.runs,
        edge_runtime::bundle::TRACT_VERSION,
    );
    println!(
        "runtime settings: {} ({})",
        settings.settings,
        describe_origin(settings)
    );
    if let Some(note) = &settings.note {
        println!("note: {note}");
    }
    println!(
        "inference {:.1} ms (nodes {:.1} ms, between nodes {:.1} ms), {:.2} G multiply-adds, {:.1} GFLOP/s",
        profile.total_ms,
        profile.nodes_ms,
        profile.nodes.iter().map(|n| n.before_ms).sum::<f64>(),
        profile.multiply_adds as f64 / 1e9,
        gflops(profile.multiply_adds, profile.nodes_ms),
    );
    println!();
    println!(
        "{:<24} {:>5} {:>9} {:>7} {:>8}",
        "operator", "nodes", "ms", "share", "GFLOP/s"
    );
    for o in &profile.ops {
        println!(
            "{:<24} {:>5} {:>9.2} {:>6.1}% {:>8}",
            o.op,
            o.nodes,
            o.ms,
            o.share * 100.0,
            gflops_text(o.gflops)
        );
    }
    println!();
    println!("slowest nodes:");
    println!(
        "{:>5} {:<20} {:>8} {:>7} {:>8}  name (output)",
        "id", "operator", "ms", "share", "GFLOP/s"
    );
    for n in profile.top_nodes(args.top) {
        println!(
            "{:>5} {:<20} {:>8.2} {:>6.1}% {:>8}  {} ({})",
            n.id,
            n.op,
            n.ms,
            n.share * 100.0,
            gflops_text(n.gflops),
            n.name,
            n.output
        );
        if !n.info.is_empty() {
            println!("{:>5} {}", "", n.info);
        }
    }
    Ok(())
}

fn describe_origin(s: &runtime::SettingsReport) -> String {
    use runtime::tune::Origin;
    let measured = s.measured.as_ref().map(|m| {
        format!(
            "{:.1} ms with tract's defaults, {:.1} ms chosen, at {} thread(s); tuning took {:.1} s",
            m.default_ms,
            m.chosen_ms,
            m.threads,
            m.tuning_ms / 1e3
        )
    });
    let cache = s
        .cache
        .as_ref()
        .map(|c| format!("; cache {}", c.display()))
        .unwrap_or_default();
    let isa = s
        .isa
        .as_ref()
        .map(|t| {
            format!(
                "; instruction sets: tract's detection {:.1} ms, TRACT_CPU_ISA={} {:.1} ms: {}",
                t.native_ms,
                t.candidate,
                t.candidate_ms,
                if t.kept { "kept" } else { "not kept" }
            )
        })
        .unwrap_or_default();
    let origin: String = match s.origin {
        Origin::Default => "tract's defaults, tuning off".into(),
        Origin::Given => "given with --setting".into(),
        Origin::Cached => format!(
            "measured earlier on this CPU: {}{cache}",
            measured.unwrap_or_default()
        ),
        Origin::Tuned => format!("measured now: {}{cache}", measured.unwrap_or_default()),
    };
    format!("{origin}{isa}")
}

fn gflops(multiply_adds: u64, ms: f64) -> f64 {
    if ms > 0.0 {
        2.0 * multiply_adds as f64 / ms / 1e6
    } else {
        0.0
    }
}

fn gflops_text(g: f64) -> String {
    if g > 0.0 { format!("{g:.1}") } else { "-".into() }
}

/// The manifest as JSON with the label list shortened to its length.
fn without_labels(m: &edge_runtime::bundle::Manifest) -> serde_json::Value {
    let mut v = serde_json::to_value(m).unwrap_or_default();
    if let Some(obj) = v.as_object_mut() {
        let n = m.labels.len();
        let first: Vec<_> = m.labels.iter().take(3).cloned().collect();
        obj.insert(
            "labels".into(),
            serde_json::json!(format!("{n} labels: {} ...", first.join(", "))),
        );
    }
    v
}
