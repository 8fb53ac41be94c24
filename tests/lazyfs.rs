//! LazyFS, a FUSE file system that keeps written data in its own cache until fsync and drops
//! whatever was not synced on command: a simulated power cut (`../shared/tools/lazyfs`).
//!
//! [`binary`] builds it once per machine (cached under
//! `${EDGE_CACHE_DIR:-$HOME/.cache/edge-fleet}/lazyfs`); [`LazyFs::mount`] mounts a fresh
//! one over a temporary directory, [`LazyFs::clear_cache`] is the power cut, and dropping the
//! value unmounts it (also when the test panics).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// How long a mount may take to appear, and a clear-cache to be confirmed.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(20);
const CLEAR_TIMEOUT: Duration = Duration::from_secs(30);
/// What LazyFS writes to its `fifo_path_completed` once a clear-cache is applied
/// (src/lazyfs/src/main.cpp, after `command_fault_clear_cache` returned).
const CLEARED: &str = "finished::clear-cache";

/// The shared folder beside the repository (or `$EDGE_SHARED_DIR`).
pub fn shared_dir() -> PathBuf {
    std::env::var_os("EDGE_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace().join("../shared"))
}

/// `${EDGE_CACHE_DIR:-$HOME/.cache/edge-fleet}`: outside the repository.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("EDGE_CACHE_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME").context("neither EDGE_CACHE_DIR nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache/edge-fleet"))
}

/// Builds LazyFS once (`../shared/tools/lazyfs/build.sh`, which caches its build) and returns
/// the binary. Threads of one process share the first result; processes serialise on a
/// file lock beside the build directory, so concurrent test binaries never build it twice
/// at once.
pub fn binary() -> Result<PathBuf> {
    static BIN: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn build() -> Result<PathBuf> {
    let script = shared_dir().join("tools/lazyfs/build.sh");
    if !script.exists() {
        bail!(
            "{} not found: put the shared folder beside the repository or set EDGE_SHARED_DIR",
            script.display()
        );
    }
    let cache = cache_dir()?;
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let out = cache.join("lazyfs");
    let lock_path = cache.join("lazyfs.lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    // SAFETY: flock on a file descriptor we own; released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("locking {}", lock_path.display()));
    }
    let output = Command::new("bash")
        .arg(&script)
        .arg(&out)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    drop(lock);
    if !output.status.success() {
        bail!(
            "{} {} failed ({}):\n{}",
            script.display(),
            out.display(),
            output.status,
            tail(&String::from_utf8_lossy(&output.stderr), 40)
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let bin = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| PathBuf::from(l.trim()))
        .with_context(|| format!("{} printed no binary path", script.display()))?;
    if !bin.is_file() {
        bail!(
            "{} printed {}, which does not exist",
            script.display(),
            bin.display()
        );
    }
    Ok(bin)
}

/// A mounted LazyFS over a fresh temporary directory, unmounted on drop.
pub struct LazyFs {
    child: Child,
    mount: PathBuf,
    log: PathBuf,
    /// The command fifo, opened read-write so opening never blocks.
    faults: File,
    /// The notifier fifo LazyFS writes `finished::clear-cache` to (read-write too: it never
    /// reports end of file, and LazyFS's blocking open for writing returns at once).
    completed: File,
    pending: Vec<u8>,
    dir: Option<tempfile::TempDir>,
}

impl LazyFs {
    /// Builds LazyFS if needed, mounts it over a new temporary directory and waits until the
    /// mount is live.
    pub fn mount() -> Result<LazyFs> {
        let bin = binary()?;
        let dir = tempfile::Builder::new()
            // No '-' in the prefix: LazyFS ignores a --config-path argument containing "-o"
            // (any case) and falls back to config/default.toml (src/lazyfs/src/main.cpp), so
            // a random suffix starting with o or O made one mount in 31 fail.
            .prefix("edge_lazyfs_")
            .tempdir()
            .context("creating a temporary directory for LazyFS")?;
        let base = dir.path().canonicalize()?;
        let root = base.join("root");
        let mount = base.join("mnt");
        std::fs::create_dir(&root)?;
        std::fs::create_dir(&mount)?;
        let faults_path = base.join("faults.fifo");
        let completed_path = base.join("completed.fifo");
        mkfifo(&faults_path)?;
        mkfifo(&completed_path)?;
        let config = base.join("lazyfs.toml");
        if path_str(&config)?.to_ascii_lowercase().contains("-o") {
            bail!(
                "LazyFS cannot take a config path containing \"-o\": {} (set TMPDIR elsewhere)",
                config.display()
            );
        }
        std::fs::write(
            &config,
            format!(
                "[faults]\nfifo_path={:?}\nfifo_path_completed={:?}\n\
                 [cache]\napply_eviction=false\n\
                 [cache.simple]\ncustom_size=\"0.5gb\"\nblocks_per_page=1\n\
                 [filesystem]\nlog_all_operations=false\nlogfile=\"\"\n",
                path_str(&faults_path)?,
                path_str(&completed_path)?
            ),
        )?;
        let faults = fifo_rw(&faults_path)?;
        let completed = fifo_rw(&completed_path)?;
        let log = base.join("lazyfs.log");
        let out = File::create(&log)?;
        let err = out.try_clone()?;
        let child = Command::new(&bin)
            .arg(&mount)
            .arg("--config-path")
            .arg(&config)
            .args(["-o", "allow_other", "-o", "modules=subdir", "-o"])
            .arg(format!("subdir={}", path_str(&root)?))
            .arg("-f")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut fs = LazyFs {
            child,
            mount,
            log,
            faults,
            completed,
            pending: Vec::new(),
            dir: Some(dir),
        };
        fs.wait_mounted()?;
        Ok(fs)
    }

    /// The mount point: put the data under test here.
    pub fn path(&self) -> &Path {
        &self.mount
    }

    /// What LazyFS logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The power cut: LazyFS drops every byte not fsynced. Returns once LazyFS has confirmed
    /// it on its notifier fifo (`&mut self`: one command at a time, as LazyFS reads its fifo
    /// in 100-byte chunks). Freeze (SIGSTOP) the writers first, as a power cut would.
    pub fn clear_cache(&mut self) -> Result<()> {
        // Forget confirmations nobody waited for.
        self.pending.clear();
        while poll_readable(&self.completed, Duration::ZERO)? {
            self.read_completed()?;
        }
        self.pending.clear();
        self.faults
            .write_all(b"lazyfs::clear-cache\n")
            .context("writing to LazyFS's fault fifo")?;
        let deadline = Instant::now() + CLEAR_TIMEOUT;
        loop {
            if let Some(pos) = find(&self.pending, CLEARED.as_bytes()) {
                self.pending.drain(..pos + CLEARED.len());
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("LazyFS exited ({status}) during clear-cache:\n{}", self.log());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "LazyFS did not confirm clear-cache within {CLEAR_TIMEOUT:?}:\n{}",
                    tail(&self.log(), 20)
                );
            }
            if poll_readable(&self.completed, left.min(Duration::from_millis(200)))? {
                self.read_completed()?;
            }
        }
    }

    fn read_completed(&mut self) -> Result<()> {
        let mut buf = [0u8; 256];
        let n = self
            .completed
            .read(&mut buf)
            .context("reading LazyFS's notifier fifo")?;
        self.pending.extend_from_slice(&buf[..n]);
        Ok(())
    }

    fn wait_mounted(&mut self) -> Result<()> {
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        loop {
            if is_mounted(&self.mount)? {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "LazyFS exited ({status}) before mounting {}:\n{}",
                    self.mount.display(),
                    self.log()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "LazyFS did not mount {} within {MOUNT_TIMEOUT:?}:\n{}",
                    self.mount.display(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        let unmount = |lazy: bool| {
            let mut cmd = Command::new("fusermount3");
            cmd.arg(if lazy { "-uz" } else { "-u" }).arg(&self.mount);
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
            cmd.status().is_ok_and(|s| s.success())
        };
        if !unmount(false) {
            // Busy (a process still has a file open) or LazyFS already gone: detach it so
            // the mount point can be removed; nothing is left mounted.
            std::thread::sleep(Duration::from_millis(200));
            if !unmount(false) {
                unmount(true);
            }
        }
        // LazyFS exits by itself once unmounted; give it a moment, then kill it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Never delete through a mount that is still there.
        if is_mounted(&self.mount).unwrap_or(true)
            && let Some(dir) = self.dir.take()
        {
            let _ = dir.keep();
        }
    }
}

/// Whether `path` is a mount point, from /proc/self/mountinfo (field 5 is the mount point,
/// with spaces and the like octal-escaped).
pub fn is_mounted(path: &Path) -> Result<bool> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let want = path_str(path)?;
    Ok(info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| unescape_mountinfo(m) == want))
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

fn mkfifo(path: &Path) -> Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("mkfifo {}", path.display()));
    }
    Ok(())
}

fn fifo_rw(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

fn poll_readable(f: &File, timeout: Duration) -> Result<bool> {
    let mut pfd = libc::pollfd {
        fd: f.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e).context("poll");
    }
    Ok(n > 0 && pfd.revents & libc::POLLIN != 0)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}
