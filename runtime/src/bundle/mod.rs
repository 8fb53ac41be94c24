//! The edge bundle: one uncompressed tar file holding `manifest.json` (first entry) and a
//! tract NNEF model (`graph.nnef` plus one `.dat` per tensor), decluttered, input shape fixed.
//!
//! Uncompressed on purpose: inflating a gzipped NNEF took longer than optimising the model.
//! The manifest comes first so tools can read it without touching the weights, and tract's
//! NNEF reader ignores files it has no loader for, so the same bytes feed it directly.
//! Loading refuses, before tract sees them, entries that tract would load and our writer never
//! produces, and graphs or tensor headers tract mishandles (see [`guard`]).
//!
//! Compatibility: a loader refuses a bundle whose `format_version` is not
//! [`manifest::FORMAT_VERSION`] or whose `tract_version` is newer than the tract it links.

mod graph_text;
mod guard;
pub mod manifest;

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use tract_nnef::prelude::*;

pub use manifest::Manifest;

/// Name of the manifest entry; always the first entry of a bundle.
pub const MANIFEST_ENTRY: &str = "manifest.json";
/// Largest manifest we read (labels included); a bigger one is not a bundle of ours.
const MAX_MANIFEST_BYTES: u64 = 16 << 20;
/// Largest input tensor a bundle may declare (2^26 values, 256 MB of f32; Inception V3 takes
/// 268,203): the runtime allocates one of this size per inference.
const MAX_INPUT_ELEMENTS: usize = 1 << 26;
/// tract version this build links; written into bundles and compared on load.
pub const TRACT_VERSION: &str = "0.23.9";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    #[error("cannot read bundle {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not an edge bundle: {reason}")]
    NotABundle { path: PathBuf, reason: String },
    #[error(
        "{path} has bundle format version {found}, this build reads version {supported} only; \
         convert the model again with this version of edge-convert"
    )]
    UnsupportedFormat {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error(
        "{path} was written by tract {found}, newer than the tract {supported} this build uses; \
         upgrade the agent or convert the model with a matching edge-convert"
    )]
    NewerTract {
        path: PathBuf,
        found: String,
        supported: &'static str,
    },
    #[error("invalid manifest in {path}: {reason}")]
    InvalidManifest { path: PathBuf, reason: String },
    #[error("cannot load the model in {path}: {reason}")]
    Model { path: PathBuf, reason: String },
    #[error("{path} is {size} bytes, more than the limit of {limit} bytes")]
    TooLarge { path: PathBuf, size: u64, limit: u64 },
}

/// A bundle read into memory: its manifest and the (not yet optimised) typed model.
pub struct Bundle {
    pub manifest: Manifest,
    pub model: TypedModel,
}

/// Reads only the manifest (cheap: the first tar entry).
pub fn read_manifest(path: &Path) -> Result<Manifest, BundleError> {
    let file = std::fs::File::open(path).map_err(|source| io(path, source))?;
    read_manifest_from(path, file)
}

fn read_manifest_from(path: &Path, reader: impl Read) -> Result<Manifest, BundleError> {
    let not = |reason: String| BundleError::NotABundle {
        path: path.to_owned(),
        reason,
    };
    let mut archive = tar::Archive::new(reader);
    let mut entries = archive
        .entries()
        .map_err(|e| not(format!("not a tar archive ({e})")))?;
    let mut first = match entries.next() {
        Some(entry) => entry.map_err(|e| not(format!("not a tar archive ({e})")))?,
        None => return Err(not("empty archive".into())),
    };
    let name = first
        .path()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name != MANIFEST_ENTRY {
        return Err(not(format!("first entry is {name:?}, expected {MANIFEST_ENTRY}")));
    }
    if first.size() > MAX_MANIFEST_BYTES {
        return Err(not(format!(
            "manifest of {} bytes is implausibly large",
            first.size()
        )));
    }
    let mut text = Vec::with_capacity(first.size() as usize);
    first.read_to_end(&mut text).map_err(|source| io(path, source))?;
    parse_manifest(path, &text)
}

/// Parses and checks a manifest: version gates first (so a future manifest with new fields
/// gets the version message, not a field error), then the full schema.
pub fn parse_manifest(path: &Path, text: &[u8]) -> Result<Manifest, BundleError> {
    let invalid = |reason: String| BundleError::InvalidManifest {
        path: path.to_owned(),
        reason,
    };
    #[derive(serde::Deserialize)]
    struct Versions {
        format_version: u32,
        tract_version: String,
    }
    let versions: Versions = serde_json::from_slice(text).map_err(|e| invalid(e.to_string()))?;
    if versions.format_version != manifest::FORMAT_VERSION {
        return Err(BundleError::UnsupportedFormat {
            path: path.to_owned(),
            found: versions.format_version,
            supported: manifest::FORMAT_VERSION,
        });
    }
    if version_newer(&versions.tract_version, TRACT_VERSION).map_err(&invalid)? {
        return Err(BundleError::NewerTract {
            path: path.to_owned(),
            found: versions.tract_version,
            supported: TRACT_VERSION,
        });
    }
    let manifest: Manifest = serde_json::from_slice(text).map_err(|e| invalid(e.to_string()))?;
    manifest.validate().map_err(invalid)?;
    Ok(manifest)
}

/// Is dotted version `a` newer than `b`? Pre-release suffixes are ignored.
fn version_newer(a: &str, b: &str) -> Result<bool, String> {
    let parse = |v: &str| -> Result<Vec<u64>, String> {
        v.split(['-', '+'])
            .next()
            .unwrap_or_default()
            .split('.')
            .map(|p| p.parse::<u64>().map_err(|_| format!("bad tract_version {v:?}")))
            .collect()
    };
    Ok(parse(a)? > parse(b)?)
}

impl Manifest {
    /// Internal consistency of a manifest; the reason names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        if self.input.shape.len() != 4 || self.input.shape.contains(&0) {
            return Err(format!(
                "input.shape {:?} is not a 4-D image shape",
                self.input.shape
            ));
        }
        let elements = self.input.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        if elements.is_none_or(|n| n > MAX_INPUT_ELEMENTS) {
            return Err(format!(
                "input.shape {:?} has more than {MAX_INPUT_ELEMENTS} elements",
                self.input.shape
            ));
        }
        let channels = match self.input.layout {
            manifest::Layout::Nhwc => self.input.shape[3],
            manifest::Layout::Nchw => self.input.shape[1],
        };
        if channels != 3 {
            return Err(format!(
                "input.shape {:?} does not have 3 channels",
                self.input.shape
            ));
        }
        if self.input.dtype != "f32" {
            return Err(format!(
                "input.dtype {:?} is not supported (f32 only)",
                self.input.dtype
            ));
        }
        let p = &self.preprocessing;
        if !(p.scale.is_finite() && p.scale > 0.0) {
            return Err(format!("preprocessing.scale {} must be positive", p.scale));
        }
        if p.std.iter().any(|s| !(s.is_finite() && *s != 0.0)) || p.mean.iter().any(|m| !m.is_finite()) {
            return Err("preprocessing.mean/std must be finite, std non-zero".into());
        }
        if let manifest::ResizePolicy::CentralFraction { fraction }
        | manifest::ResizePolicy::SquareCenterCrop { fraction } = p.resize
            && !(fraction > 0.0 && fraction <= 1.0)
        {
            return Err(format!(
                "preprocessing.resize.fraction {fraction} must be in (0, 1]"
            ));
        }
        if self.output.classes == 0 {
            return Err("output.classes must be positive".into());
        }
        if !self.labels.is_empty() && self.labels.len() + self.output.label_offset > self.output.classes {
            return Err(format!(
                "{} labels at offset {} do not fit {} output classes",
                self.labels.len(),
                self.output.label_offset,
                self.output.classes
            ));
        }
        Ok(())
    }
}

/// Reads a bundle: manifest, version checks, then the NNEF model. `max_bytes` bounds the file.
pub fn load(path: &Path, max_bytes: u64) -> Result<Bundle, BundleError> {
    let size = std::fs::metadata(path).map_err(|source| io(path, source))?.len();
    if size > max_bytes {
        return Err(BundleError::TooLarge {
            path: path.to_owned(),
            size,
            limit: max_bytes,
        });
    }
    let manifest = read_manifest(path)?;
    let file = std::fs::File::open(path).map_err(|source| io(path, source))?;
    // The guard reads headers and seeks over the tensors: through a small buffer, as a large
    // one would be refilled at every entry (Inception V3: 382 MB read for a 96 MB bundle).
    check_archive(path, std::io::BufReader::with_capacity(16 << 10, &file))?;
    (&file).rewind().map_err(|source| io(path, source))?;
    // Streamed: tract copies each tensor out of the tar once, so the file is never held in
    // memory whole next to the weights.
    let model = parse_model(path, std::io::BufReader::with_capacity(1 << 20, &file))?;
    check_model_matches(path, &manifest, &model)?;
    Ok(Bundle { manifest, model })
}

/// Reads a bundle held in memory, with the checks of [`load`]; `name` is what errors call it.
pub fn from_bytes(name: &Path, bytes: &[u8]) -> Result<Bundle, BundleError> {
    let manifest = read_manifest_from(name, bytes)?;
    let model = read_model(name, bytes)?;
    check_model_matches(name, &manifest, &model)?;
    Ok(Bundle { manifest, model })
}

/// tract's NNEF framework: its operator registry takes a while to build, so once per process.
fn nnef() -> &'static tract_nnef::framework::Nnef {
    static NNEF: std::sync::OnceLock<tract_nnef::framework::Nnef> = std::sync::OnceLock::new();
    NNEF.get_or_init(|| {
        let mut nnef = tract_nnef::nnef();
        // Before tract's graph loader: see `graph_text`.
        nnef.resource_loaders.insert(0, Box::new(graph_text::GraphLoader));
        nnef
    })
}

/// Reads the NNEF model in a tar held in memory (a bundle or a bare NNEF tar): [`guard`]'s
/// checks of the tar first, then tract's parse from the start again.
fn read_model(path: &Path, bytes: &[u8]) -> Result<TypedModel, BundleError> {
    check_archive(path, std::io::Cursor::new(bytes))?;
    parse_model(path, std::io::Cursor::new(bytes))
}

/// [`guard`]'s checks of the tar, before tract reads any of it.
fn check_archive(path: &Path, reader: impl Read + Seek) -> Result<(), BundleError> {
    guard::check_archive(reader).map_err(|reason| BundleError::Model {
        path: path.to_owned(),
        reason,
    })
}

/// tract's parse of a tar [`check_archive`] accepted, [`guard`]'s checks of the parsed graph,
/// and tract's build.
fn parse_model(path: &Path, mut reader: impl Read) -> Result<TypedModel, BundleError> {
    let failed = |reason: String| BundleError::Model {
        path: path.to_owned(),
        reason,
    };
    let proto = nnef().proto_model_for_read(&mut reader);
    let body = graph_text::take_body();
    let mut proto = proto.map_err(|e| failed(format!("{e:#}")))?;
    if let Some(body) = body {
        // The split-off body belongs to the graph tract parsed with an empty one.
        if !proto.doc.graph_def.body.is_empty() {
            return Err(failed(
                "graph.nnef: the graph's body was not where it was looked for".into(),
            ));
        }
        proto.doc.graph_def.body = body.map_err(|e| failed(format!("{e:#}")))?;
    }
    guard::check_document(&proto.doc).map_err(failed)?;
    nnef()
        .model_for_proto_model(&proto)
        .map_err(|e| failed(format!("{e:#}")))
}

fn check_model_matches(path: &Path, manifest: &Manifest, model: &TypedModel) -> Result<(), BundleError> {
    let mismatch = |reason: String| BundleError::InvalidManifest {
        path: path.to_owned(),
        reason,
    };
    if model.inputs.len() != 1 || model.outputs.len() != 1 {
        return Err(mismatch(format!(
            "model has {} inputs and {} outputs, bundles hold one of each",
            model.inputs.len(),
            model.outputs.len()
        )));
    }
    let fact = model.input_fact(0).map_err(|e| mismatch(e.to_string()))?;
    let shape: Option<Vec<usize>> = fact.shape.as_concrete().map(|s| s.to_vec());
    if shape.as_deref() != Some(manifest.input.shape.as_slice()) {
        return Err(mismatch(format!(
            "input.shape {:?} does not match the model's input {:?}",
            manifest.input.shape, fact.shape
        )));
    }
    let out = model.output_fact(0).map_err(|e| mismatch(e.to_string()))?;
    let classes = out.shape.as_concrete().and_then(|s| s.last().copied());
    if classes != Some(manifest.output.classes) {
        return Err(mismatch(format!(
            "output.classes {} does not match the model's output {:?}",
            manifest.output.classes, out.shape
        )));
    }
    Ok(())
}

/// Serialises a decluttered model with a concrete input shape to an NNEF tar in memory.
pub fn nnef_tar(model: &TypedModel) -> Result<Vec<u8>, BundleError> {
    nnef()
        .write_to_tar(model, Vec::new())
        .map_err(|e| BundleError::Model {
            path: PathBuf::from("<memory>"),
            reason: format!("{e:#}"),
        })
}

/// Reads an NNEF tar (or a whole bundle) from memory into a typed model.
pub fn model_from_nnef(bytes: &[u8]) -> Result<TypedModel, BundleError> {
    read_model(Path::new("<memory>"), bytes)
}

/// Writes `manifest` and an NNEF tar (from [`nnef_tar`]) as a bundle at `path`, atomically:
/// a temporary file in the same directory, synced, then renamed.
pub fn write(path: &Path, manifest: &Manifest, nnef_tar: &[u8]) -> Result<(), BundleError> {
    manifest
        .validate()
        .map_err(|reason| BundleError::InvalidManifest {
            path: path.to_owned(),
            reason,
        })?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let file = std::fs::File::create(&tmp)?;
        let mut builder = tar::Builder::new(std::io::BufWriter::new(file));
        let json = serde_json::to_vec_pretty(manifest).map_err(std::io::Error::other)?;
        append(&mut builder, MANIFEST_ENTRY, &json)?;
        let mut nnef = tar::Archive::new(nnef_tar);
        for entry in nnef.entries()? {
            let mut entry = entry?;
            let name = entry.path()?.to_string_lossy().into_owned();
            let mut data = Vec::with_capacity(entry.size() as usize);
            entry.read_to_end(&mut data)?;
            append(&mut builder, &name, &data)?;
        }
        let mut out = builder.into_inner()?;
        out.flush()?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(source) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(path, source));
    }
    Ok(())
}

fn append<W: Write>(builder: &mut tar::Builder<W>, name: &str, data: &[u8]) -> std::io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_cksum();
    builder.append_data(&mut header, name, data)
}

fn io(path: &Path, source: std::io::Error) -> BundleError {
    BundleError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A tiny synthetic-weight model (sum over a 1x8x8x3 input, then a 3x2 dense layer: 2
/// classes), decluttered: for tests and the fuzz harness's seed bundle, never for serving.
#[doc(hidden)]
pub fn synthetic_tiny_model() -> TractResult<TypedModel> {
    use tract_nnef::internal::AxisOp;
    let mut model = TypedModel::default();
    let x = model.add_source("input", f32::fact([1, 8, 8, 3]))?;
    let w = model.add_const("w", tensor2(&[[0.5f32, -1.0], [2.0, 0.25], [1.0, 1.0]]))?;
    let pooled = model.wire_node(
        "mean",
        tract_core::ops::nn::Reduce::new(tvec![1, 2], tract_core::ops::nn::Reducer::Sum),
        &[x],
    )?;
    let flat = model.wire_node("flat", AxisOp::Rm(1), &pooled)?;
    let flat = model.wire_node("flat2", AxisOp::Rm(1), &flat)?;
    let logits = model.wire_node(
        "fc",
        tract_core::ops::einsum::EinSum::new("bk,kn->bn".parse()?, f32::datum_type()),
        &[flat[0], w],
    )?;
    model.select_output_outlets(&logits)?;
    model.into_decluttered()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_order() {
        assert!(version_newer("0.23.10", "0.23.9").unwrap());
        assert!(!version_newer("0.23.9", "0.23.9").unwrap());
        assert!(!version_newer("0.22.1", "0.23.9").unwrap());
        assert!(version_newer("1.0.0-pre", "0.23.9").unwrap());
        assert!(version_newer("x", "0.23.9").is_err());
    }

    #[test]
    fn tract_version_constant_matches_the_lockfile() {
        let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock")).unwrap();
        let locked = lock
            .split("[[package]]")
            .find(|p| p.contains("name = \"tract-nnef\""))
            .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = \"")))
            .map(|v| v.trim_end_matches('"').to_string());
        assert_eq!(locked.as_deref(), Some(TRACT_VERSION));
    }
}

#[cfg(test)]
mod roundtrip {
    use super::*;

    #[test]
    fn nnef_survives_a_roundtrip() {
        let model = synthetic_tiny_model().unwrap();
        let tar = nnef_tar(&model).unwrap();
        let mut archive = tar::Archive::new(tar.as_slice());
        for e in archive.entries().unwrap() {
            let mut e = e.unwrap();
            if e.path().unwrap().to_string_lossy() == "graph.nnef" {
                let mut s = String::new();
                e.read_to_string(&mut s).unwrap();
                println!("{s}");
            }
        }
        let back = model_from_nnef(&tar).unwrap();
        assert_eq!(
            back.input_fact(0).unwrap().shape.as_concrete(),
            Some(&[1usize, 8, 8, 3][..])
        );
    }
}
