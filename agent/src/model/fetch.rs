//! Bringing a candidate bundle to a staging file: a copy of a local path or an HTTP(S)
//! download, never more than `max_bytes`, within `timeout`, its sha256 checked on the way
//! (required for URLs: a download is only trusted for the bytes the operator named).
//!
//! Blocking; callers run it on a blocking thread.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::ReloadError;

/// Where a bundle comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Path(PathBuf),
    Url(String),
}

impl Source {
    /// `http://` and `https://` are URLs, `file://` and anything else a local path.
    pub fn parse(text: &str) -> Self {
        let lower = text.to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") {
            Source::Url(text.to_owned())
        } else {
            Source::Path(PathBuf::from(text.strip_prefix("file://").unwrap_or(text)))
        }
    }

    /// How logs and the status name it.
    pub fn display(&self) -> String {
        match self {
            Source::Path(p) => p.display().to_string(),
            Source::Url(u) => u.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct FetchLimits {
    pub max_bytes: u64,
    pub timeout: Duration,
}

/// A sha256 as the operator wrote it, checked to be 64 hex digits (case ignored).
pub fn parse_sha256(text: &str) -> Result<String, ReloadError> {
    let t = text.trim().to_ascii_lowercase();
    if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(t)
    } else {
        Err(ReloadError::InvalidCommand(format!(
            "sha256 {text:?} is not 64 hexadecimal digits"
        )))
    }
}

/// Copies or downloads `source` to `staging` (replaced if present, synced). `sha256` (from
/// [`parse_sha256`]) is required for URLs and checked for paths when given.
pub fn fetch(
    source: &Source,
    sha256: Option<&str>,
    staging: &Path,
    limits: FetchLimits,
) -> Result<(), ReloadError> {
    let name = source.display();
    let result = match source {
        Source::Path(path) => {
            let file = File::open(path).map_err(|e| ReloadError::Fetch {
                source_name: name.clone(),
                reason: e.to_string(),
            })?;
            copy_checked(&name, file, sha256, staging, limits.max_bytes, None)
        }
        Source::Url(url) => {
            let expected = sha256.ok_or(ReloadError::MissingChecksum)?;
            download(url, expected, staging, limits)
        }
    };
    if result.is_err() {
        let _ = std::fs::remove_file(staging);
    }
    result
}

fn download(url: &str, sha256: &str, staging: &Path, limits: FetchLimits) -> Result<(), ReloadError> {
    let fetch_error = |reason: String| ReloadError::Fetch {
        source_name: url.to_owned(),
        reason,
    };
    let timeout_error = || ReloadError::Timeout {
        source_name: url.to_owned(),
        secs: limits.timeout.as_secs(),
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(limits.timeout))
        .max_redirects(5)
        .build()
        .into();
    let response = agent.get(url).call().map_err(|e| match e {
        ureq::Error::Timeout(_) => timeout_error(),
        e => fetch_error(e.to_string()),
    })?;
    if let Some(len) = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limits.max_bytes
    {
        return Err(ReloadError::TooLarge {
            source_name: url.to_owned(),
            limit: limits.max_bytes,
        });
    }
    let reader = response.into_body().into_reader();
    copy_checked(
        url,
        reader,
        Some(sha256),
        staging,
        limits.max_bytes,
        Some(limits.timeout),
    )
}

/// Streams `reader` to `staging` through the hash, at most `max_bytes`.
fn copy_checked(
    name: &str,
    mut reader: impl Read,
    sha256: Option<&str>,
    staging: &Path,
    max_bytes: u64,
    timeout: Option<Duration>,
) -> Result<(), ReloadError> {
    let store = |source: std::io::Error| ReloadError::Store {
        path: staging.to_owned(),
        source,
    };
    let mut out = std::io::BufWriter::new(File::create(staging).map_err(store)?);
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // ureq reports a timeout while reading the body as an io error wrapping its own.
                let timed_out = e.kind() == std::io::ErrorKind::TimedOut
                    || e.get_ref()
                        .and_then(|inner| inner.downcast_ref::<ureq::Error>())
                        .is_some_and(|u| matches!(u, ureq::Error::Timeout(_)));
                return Err(match timeout {
                    Some(t) if timed_out => ReloadError::Timeout {
                        source_name: name.to_owned(),
                        secs: t.as_secs(),
                    },
                    _ => ReloadError::Fetch {
                        source_name: name.to_owned(),
                        reason: format!("reading failed after {total} bytes: {e}"),
                    },
                });
            }
        };
        total += n as u64;
        if total > max_bytes {
            return Err(ReloadError::TooLarge {
                source_name: name.to_owned(),
                limit: max_bytes,
            });
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(store)?;
    }
    let file = out.into_inner().map_err(|e| store(e.into_error()))?;
    file.sync_all().map_err(store)?;
    let actual: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if let Some(expected) = sha256
        && expected != actual
    {
        return Err(ReloadError::Checksum {
            source_name: name.to_owned(),
            expected: expected.to_owned(),
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn sources_are_urls_or_paths() {
        assert_eq!(
            Source::parse("https://h/m.bundle"),
            Source::Url("https://h/m.bundle".into())
        );
        assert_eq!(Source::parse("HTTP://h/m"), Source::Url("HTTP://h/m".into()));
        assert_eq!(Source::parse("file:///a/b"), Source::Path("/a/b".into()));
        assert_eq!(Source::parse("rel/b"), Source::Path("rel/b".into()));
    }

    #[test]
    fn sha256_must_be_64_hex_digits() {
        assert_eq!(parse_sha256(&EMPTY.to_uppercase()).unwrap(), EMPTY);
        assert!(parse_sha256("abc").is_err());
        assert!(parse_sha256(&format!("{}g", &EMPTY[1..])).is_err());
    }

    #[test]
    fn a_copy_is_hashed_and_limited() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::write(&src, b"").unwrap();
        let staging = dir.path().join("staging");
        let limits = FetchLimits {
            max_bytes: 4,
            timeout: Duration::from_secs(1),
        };
        fetch(&Source::Path(src.clone()), Some(EMPTY), &staging, limits).unwrap();
        assert!(staging.exists());
        let wrong = "0".repeat(64);
        let e = fetch(&Source::Path(src.clone()), Some(&wrong), &staging, limits).unwrap_err();
        assert_eq!(e.kind(), "checksum_mismatch");
        assert!(!staging.exists(), "a refused candidate leaves no staging file");
        std::fs::write(&src, b"12345").unwrap();
        let e = fetch(&Source::Path(src), None, &staging, limits).unwrap_err();
        assert_eq!(e.kind(), "too_large");
        let e = fetch(
            &Source::Url("http://127.0.0.1:1/x".into()),
            None,
            &staging,
            limits,
        )
        .unwrap_err();
        assert_eq!(e.kind(), "missing_checksum");
    }
}
