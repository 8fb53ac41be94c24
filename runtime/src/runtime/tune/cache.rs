//! The tuning cache: `edge-tuning.json`, entries keyed by bundle sha256, CPU, tract version,
//! thread count and search version, with the bundle file's identity (size, inode, mtime) so
//! an unchanged file is recognised without hashing it (see the parent module's doc).

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::{Measured, SEARCH_VERSION};
use crate::bundle::TRACT_VERSION;
use crate::runtime::RuntimeSettings;

/// Entries kept in one cache file (the oldest go first).
const MAX_ENTRIES: usize = 16;

/// What a cached choice holds for: it is valid only where all of it matches.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CacheKey {
    /// Architecture, CPU model name, instruction sets tract uses.
    pub cpu: String,
    pub tract: String,
    pub search: u32,
    pub threads: usize,
}

impl CacheKey {
    /// This machine, this build, `threads` threads.
    pub fn here(threads: usize) -> Self {
        CacheKey {
            cpu: cpu_description(),
            tract: TRACT_VERSION.to_string(),
            search: SEARCH_VERSION,
            threads,
        }
    }
}

/// The CPU as the cache keys it: architecture, model name, the instruction sets the standard
/// library detects that tract's kernels use, and any `TRACT_CPU_ISA` the operator set. It
/// does not ask tract, which would fix tract's instruction set for the process before the
/// tuner chose it (see `isa`).
pub fn cpu_description() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            let field = |name: &str| {
                info.lines()
                    .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            };
            field("model name").or_else(|| {
                Some(format!(
                    "implementer {} part {}",
                    field("CPU implementer")?,
                    field("CPU part")?
                ))
            })
        })
        .unwrap_or_else(|| "unknown".into());
    let mut features: Vec<&str> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        for (name, on) in [
            ("avx2", std::is_x86_feature_detected!("avx2")),
            ("fma", std::is_x86_feature_detected!("fma")),
            ("f16c", std::is_x86_feature_detected!("f16c")),
            ("avx512f", std::is_x86_feature_detected!("avx512f")),
            ("avx512vnni", std::is_x86_feature_detected!("avx512vnni")),
            ("avxvnni", std::is_x86_feature_detected!("avxvnni")),
        ] {
            if on {
                features.push(name);
            }
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        for (name, on) in [
            ("fp16", std::arch::is_aarch64_feature_detected!("fp16")),
            ("dotprod", std::arch::is_aarch64_feature_detected!("dotprod")),
            ("sve", std::arch::is_aarch64_feature_detected!("sve")),
            ("sve2", std::arch::is_aarch64_feature_detected!("sve2")),
        ] {
            if on {
                features.push(name);
            }
        }
    }
    let forced = std::env::var("TRACT_CPU_ISA")
        .map(|v| format!(" TRACT_CPU_ISA={v}"))
        .unwrap_or_default();
    format!(
        "{} {model} [{}]{forced}",
        std::env::consts::ARCH,
        features.join(",")
    )
}

/// A file's identity short of its content: equal ids mean an unchanged file (unless someone
/// rewrote it in place keeping size and mtime, which hashing would catch: see `find`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileId {
    pub len: u64,
    pub mtime_ns: Option<u64>,
    pub inode: Option<u64>,
}

impl FileId {
    pub fn of(path: &Path) -> std::io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .and_then(|d| u64::try_from(d.as_nanos()).ok());
        #[cfg(unix)]
        let inode = Some(std::os::unix::fs::MetadataExt::ino(&meta));
        #[cfg(not(unix))]
        let inode = None;
        Ok(FileId {
            len: meta.len(),
            mtime_ns,
            inode,
        })
    }

    /// Trusted as unchanged only when every part is known and equal.
    fn same_file(&self, other: &FileId) -> bool {
        self.len == other.len
            && self.mtime_ns.is_some()
            && self.inode.is_some()
            && self.mtime_ns == other.mtime_ns
            && self.inode == other.inode
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CacheEntry {
    pub bundle_sha256: String,
    pub file: FileId,
    pub key: CacheKey,
    pub settings: RuntimeSettings,
    pub measured: Measured,
    /// The instruction sets compared for this bundle on this CPU (`None`: nothing compared).
    #[serde(default)]
    pub isa: Option<super::IsaTrial>,
    pub at_unix_s: u64,
}

/// The cache file: entries for every bundle tuned in one directory.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CacheFile {
    pub format: u32,
    pub entries: Vec<CacheEntry>,
}

const CACHE_FORMAT: u32 = 1;

impl CacheFile {
    /// A missing file is an empty cache; an unreadable or foreign one is an error (the caller
    /// tunes again and overwrites it).
    pub fn read(path: &Path) -> Result<Self, String> {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(CacheFile::default()),
            Err(e) => return Err(e.to_string()),
        };
        let cache: CacheFile = serde_json::from_slice(&text).map_err(|e| e.to_string())?;
        if cache.format != CACHE_FORMAT {
            return Err(format!("format {} is not {CACHE_FORMAT}", cache.format));
        }
        Ok(cache)
    }

    /// Written whole to a temporary file, then renamed over the old one.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let mut cache = self.clone();
        cache.format = CACHE_FORMAT;
        let json = serde_json::to_vec_pretty(&cache).map_err(std::io::Error::other)?;
        let tmp = path.with_extension(format!("json.tmp-{}", std::process::id()));
        std::fs::write(&tmp, json)
            .and_then(|()| std::fs::rename(&tmp, path))
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })
    }

    /// The entry for the bundle `file` under `key`: by file identity first, else by its
    /// sha256 (`sha` is called at most once, only when needed).
    pub fn find(
        &self,
        key: &CacheKey,
        file: &FileId,
        sha: &mut dyn FnMut() -> std::io::Result<String>,
    ) -> std::io::Result<Option<usize>> {
        let candidates: Vec<usize> = (0..self.entries.len())
            .filter(|&i| self.entries[i].key == *key)
            .collect();
        if candidates.is_empty() {
            return Ok(None);
        }
        if let Some(&i) = candidates.iter().find(|&&i| self.entries[i].file.same_file(file)) {
            return Ok(Some(i));
        }
        let digest = sha()?;
        Ok(candidates
            .into_iter()
            .find(|&i| self.entries[i].bundle_sha256 == digest))
    }

    /// Adds `entry`, replacing one for the same bundle and key; the oldest entries go past
    /// [`MAX_ENTRIES`].
    pub fn insert(&mut self, entry: CacheEntry) {
        self.entries
            .retain(|e| !(e.key == entry.key && e.bundle_sha256 == entry.bundle_sha256));
        self.entries.push(entry);
        if self.entries.len() > MAX_ENTRIES {
            self.entries.sort_by_key(|e| e.at_unix_s);
            let excess = self.entries.len() - MAX_ENTRIES;
            self.entries.drain(..excess);
        }
    }
}

/// sha256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::tune::CACHE_FILE;

    fn key(cpu: &str, threads: usize) -> CacheKey {
        CacheKey {
            cpu: cpu.into(),
            tract: TRACT_VERSION.into(),
            search: SEARCH_VERSION,
            threads,
        }
    }

    fn file(len: u64, mtime: u64, inode: u64) -> FileId {
        FileId {
            len,
            mtime_ns: Some(mtime),
            inode: Some(inode),
        }
    }

    fn entry(sha: &str, file: FileId, key: CacheKey, at: u64) -> CacheEntry {
        CacheEntry {
            bundle_sha256: sha.into(),
            file,
            key,
            settings: RuntimeSettings::new([("TRACT_DISABLE_DIRECT_SPATIAL", "true")]).unwrap(),
            measured: Measured {
                threads: 1,
                default_ms: 10.0,
                chosen_ms: 9.0,
                tuning_ms: 100.0,
                trials: Vec::new(),
            },
            isa: None,
            at_unix_s: at,
        }
    }

    /// A `sha` callback that counts its calls.
    fn hashing(digest: &str, calls: &mut usize) -> impl FnMut() -> std::io::Result<String> {
        let digest = digest.to_string();
        move || {
            *calls += 1;
            Ok(digest.clone())
        }
    }

    #[test]
    fn an_unchanged_file_is_found_without_hashing() {
        let mut cache = CacheFile::default();
        cache.insert(entry("aa", file(10, 5, 7), key("cpu A", 1), 1));
        let mut calls = 0;
        let found = cache.find(&key("cpu A", 1), &file(10, 5, 7), &mut hashing("zz", &mut calls));
        assert_eq!(found.unwrap(), Some(0));
        assert_eq!(calls, 0, "no hash when size, mtime and inode match");
    }

    #[test]
    fn a_touched_file_is_hashed_and_found_by_content() {
        let mut cache = CacheFile::default();
        cache.insert(entry("aa", file(10, 5, 7), key("cpu A", 1), 1));
        let mut calls = 0;
        // Copied elsewhere (new inode and mtime), same bytes.
        let found = cache.find(&key("cpu A", 1), &file(10, 6, 8), &mut hashing("aa", &mut calls));
        assert_eq!((found.unwrap(), calls), (Some(0), 1));
    }

    #[test]
    fn other_bytes_cpu_threads_or_search_miss() {
        let mut cache = CacheFile::default();
        cache.insert(entry("aa", file(10, 5, 7), key("cpu A", 1), 1));
        let mut calls = 0;
        let changed = cache.find(&key("cpu A", 1), &file(10, 6, 7), &mut hashing("bb", &mut calls));
        assert_eq!(changed.unwrap(), None, "rewritten bundle");
        for other in [
            key("cpu B", 1),
            key("cpu A", 2),
            CacheKey {
                search: SEARCH_VERSION + 1,
                ..key("cpu A", 1)
            },
        ] {
            let found = cache.find(&other, &file(10, 5, 7), &mut hashing("aa", &mut calls));
            assert_eq!(found.unwrap(), None, "{other:?}");
        }
        // An unknown inode or mtime is never trusted as the same file.
        let unknown = FileId {
            inode: None,
            ..file(10, 5, 7)
        };
        assert!(!unknown.same_file(&unknown));
    }

    #[test]
    fn insert_replaces_the_same_bundle_and_drops_the_oldest() {
        let mut cache = CacheFile::default();
        cache.insert(entry("aa", file(10, 5, 7), key("cpu A", 1), 1));
        cache.insert(entry("aa", file(10, 9, 7), key("cpu A", 1), 2));
        cache.insert(entry("aa", file(10, 9, 7), key("cpu B", 1), 3));
        assert_eq!(cache.entries.len(), 2);
        for i in 0..MAX_ENTRIES as u64 {
            cache.insert(entry(&format!("x{i}"), file(1, 1, 1), key("cpu A", 1), 10 + i));
        }
        assert_eq!(cache.entries.len(), MAX_ENTRIES);
        assert!(cache.entries.iter().all(|e| e.bundle_sha256 != "aa"));
    }

    #[test]
    fn cache_file_roundtrips_and_refuses_foreign_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CACHE_FILE);
        assert_eq!(CacheFile::read(&path).unwrap(), CacheFile::default());
        let mut cache = CacheFile::default();
        cache.insert(entry("aa", file(10, 5, 7), key("cpu A", 1), 1));
        cache.write(&path).unwrap();
        let back = CacheFile::read(&path).unwrap();
        assert_eq!(back.entries, cache.entries);
        std::fs::write(&path, b"{\"format\": 99, \"entries\": []}").unwrap();
        assert!(CacheFile::read(&path).unwrap_err().contains("99"));
        std::fs::write(&path, b"garbage").unwrap();
        assert!(CacheFile::read(&path).is_err());
    }

    #[test]
    fn sha256_of_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"abc").unwrap();
        assert_eq!(
            sha256_file(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn the_cpu_key_names_the_architecture_and_isa() {
        let cpu = cpu_description();
        assert!(cpu.starts_with(std::env::consts::ARCH), "{cpu}");
        assert!(cpu.contains('['), "{cpu}");
    }
}
