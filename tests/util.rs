//! Helpers shared by the end-to-end tests: locating the built binaries and the fixtures,
//! running commands, reading TensorFlow's reference outputs.

pub mod browser;
pub mod daemon;
pub mod lazyfs;
pub mod mlserver;
pub mod nginx;
pub mod pool;
pub mod proxy;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_owned)
        .unwrap_or_default()
}

/// A binary of this workspace, built by `cargo build --bins` (the README's test command
/// does that first) next to the test executable (or next to `edge-bench`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/e2e-<hash> -> target/<profile>/<name>;
    // target/<profile>/edge-bench -> target/<profile>/<name>
    let mut dir = exe.parent().expect("target dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().expect("target dir");
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: build the binaries first (cargo build --workspace --bins), as scripts/test.sh does",
        path.display()
    );
    path
}

/// A directory for files a test process keeps for its whole run (bundles converted once),
/// under the target directory: `<target>/<profile>/e2e-run/<pid>`. A `TempDir` held in a
/// static is never dropped, so each run used to leave its bundles in /tmp (11 GB after a
/// day of runs); here the directories of processes no longer alive are removed instead.
pub fn run_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        let mut target = exe.parent().expect("target dir");
        if target.file_name().is_some_and(|n| n == "deps") {
            target = target.parent().expect("target dir");
        }
        let root = target.join("e2e-run");
        if let Ok(entries) = std::fs::read_dir(&root) {
            for entry in entries.flatten() {
                let alive = entry
                    .file_name()
                    .to_str()
                    .and_then(|pid| pid.parse::<u32>().ok())
                    .is_some_and(|pid| Path::new("/proc").join(pid.to_string()).exists());
                if !alive {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let dir = root.join(std::process::id().to_string());
        std::fs::create_dir_all(&dir).expect("create the run directory");
        dir
    })
    .clone()
}

/// The fixture directory made by `scripts/fixtures.sh` (env `EDGE_FIXTURES`).
pub fn fixtures() -> PathBuf {
    let dir = std::env::var_os("EDGE_FIXTURES").map(PathBuf::from).unwrap_or_else(|| {
        panic!("EDGE_FIXTURES is not set: run the tests with scripts/test.sh, or export EDGE_FIXTURES=$(scripts/fixtures.sh)")
    });
    assert!(
        dir.join("fixtures.json").exists(),
        "{} holds no fixtures.json; rerun scripts/fixtures.sh",
        dir.display()
    );
    dir
}

/// `models/` of the shared folder beside the repository (or env `EDGE_SHARED_DIR`, as for
/// scripts/fixtures.sh): the real pretrained EfficientNet-Lite0, its labels and two photos.
pub fn shared_models() -> PathBuf {
    let dir = std::env::var_os("EDGE_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("../shared"))
        .join("models");
    assert!(
        dir.join("efficientnet_lite0.onnx").exists(),
        "{} has no efficientnet_lite0.onnx; set EDGE_SHARED_DIR",
        dir.display()
    );
    dir
}

/// Runs a command to completion, capturing its output.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a command failed the way users should see failures: a non-zero exit, an
/// `error:` paragraph, and no panic or backtrace.
pub fn assert_clean_failure(o: &Output, what: &str) -> String {
    assert_clean_exit(o, what, 1)
}

/// [`assert_clean_failure`] for a usage or configuration error: exit code 2.
pub fn assert_config_failure(o: &Output, what: &str) -> String {
    assert_clean_exit(o, what, 2)
}

fn assert_clean_exit(o: &Output, what: &str, code: i32) -> String {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "{what}: expected failure, got success\n{}",
        stdout(o)
    );
    assert_eq!(
        o.status.code(),
        Some(code),
        "{what}: exit code {:?}\n{err}",
        o.status.code()
    );
    assert!(err.contains("error:"), "{what}: no error message\n{err}");
    for bad in ["panicked", "RUST_BACKTRACE", "stack backtrace"] {
        assert!(
            !err.contains(bad),
            "{what}: stderr shows a panic/backtrace\n{err}"
        );
    }
    err
}

/// Reads a raw little-endian f32 file.
pub fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Indices of the `k` largest values, largest first.
pub fn top_k(v: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|a, b| v[*b].total_cmp(&v[*a]).then(a.cmp(b)));
    idx.truncate(k);
    idx
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Rewrites a bundle's manifest with `edit`, keeping the model entries, into `to`.
pub fn rewrite_manifest(from: &Path, to: &Path, edit: impl Fn(&mut serde_json::Value)) {
    rewrite_entries(from, to, |name, data| {
        if name == "manifest.json" {
            let mut v: serde_json::Value = serde_json::from_slice(data).unwrap();
            edit(&mut v);
            *data = serde_json::to_vec(&v).unwrap();
        }
    });
}

/// Copies a bundle (a tar) entry by entry into `to`, letting `edit` change each entry's bytes.
pub fn rewrite_entries(from: &Path, to: &Path, mut edit: impl FnMut(&str, &mut Vec<u8>)) {
    let bytes = std::fs::read(from).unwrap();
    let mut archive = tar::Archive::new(bytes.as_slice());
    let mut builder = tar::Builder::new(Vec::new());
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
        edit(&name, &mut data);
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, name, data.as_slice()).unwrap();
    }
    std::fs::write(to, builder.into_inner().unwrap()).unwrap();
}

/// A PNG that declares `width` x `height` RGB pixels but carries almost no data: a
/// decompression bomb's header, a few hundred bytes on disk.
pub fn png_bomb(width: u32, height: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut png, b"IHDR", &ihdr);
    // zlib stream of a few empty stored blocks' worth: enough to look like data.
    chunk(
        &mut png,
        b"IDAT",
        &[0x78, 0x9c, 0x63, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01],
    );
    chunk(&mut png, b"IEND", &[]);
    png
}

/// A JPEG whose frame header (SOF) is patched to declare `width` x `height`.
pub fn jpeg_with_declared_size(jpeg: &[u8], width: u16, height: u16) -> Vec<u8> {
    let mut out = jpeg.to_vec();
    let sof = (0..out.len() - 9)
        .find(|&i| out[i] == 0xFF && matches!(out[i + 1], 0xC0..=0xC2))
        .expect("JPEG has a SOF marker");
    // FF Cx, length (2), precision (1), height (2), width (2)
    out[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
    out[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// EfficientNet-Lite0 converted once per test run (shared by the tests that need a real,
/// valid bundle).
pub fn efficientnet_bundle() -> std::path::PathBuf {
    static BUNDLE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BUNDLE.get_or_init(|| convert_efficientnet(&run_dir())).clone()
}

fn convert_efficientnet(dir: &std::path::Path) -> std::path::PathBuf {
    let models = shared_models();
    let bundle = dir.join("efficientnet_lite0.bundle");
    let out = run(Command::new(bin("edge-convert"))
        .arg("convert")
        .arg(models.join("efficientnet_lite0.onnx"))
        .arg("-o")
        .arg(&bundle)
        .args(["--preset", "efficientnet-lite", "--labels"])
        .arg(models.join("imagenet_labels.txt")));
    assert!(out.status.success(), "convert failed:\n{}", stderr(&out));
    bundle
}

/// A test PKI generated now (no private key is ever committed): a CA, a server certificate
/// for `localhost` and 127.0.0.1, and a client certificate whose common name (and DNS name)
/// is `client_name`. Written to `dir` as ca.pem, server.pem, server.key, client.pem,
/// client.key (mode 644, so a broker that drops privileges can read them); returned in that
/// order.
pub fn test_pki(dir: &Path, client_name: &str) -> [PathBuf; 5] {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    use std::os::unix::fs::PermissionsExt;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "edge test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |names: Vec<String>, cn: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, &ca).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(vec!["localhost".into(), "127.0.0.1".into()], "localhost");
    let (client_cert, client_key) = leaf(vec![client_name.to_owned()], client_name);
    let files = [
        ("ca.pem", ca.pem()),
        ("server.pem", server_cert),
        ("server.key", server_key),
        ("client.pem", client_cert),
        ("client.key", client_key),
    ];
    files.map(|(name, pem)| {
        let p = dir.join(name);
        std::fs::write(&p, pem).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        p
    })
}
