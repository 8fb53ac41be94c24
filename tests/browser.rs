//! A real browser for the page tests: Debian's `chromium`, headless. `dump_dom` returns the
//! DOM after the page loaded (scripts run), `screenshot` writes a PNG test artefact under
//! `<target>/e2e-artefacts/pages/`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::daemon::wait_timeout;

/// `chromium` on PATH (CI installs the Debian package; by hand: `apt-get install chromium`).
pub fn chromium() -> PathBuf {
    for name in ["chromium", "chromium-browser"] {
        if let Some(path) = std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
        {
            return path;
        }
    }
    panic!("chromium not found on PATH: install it (apt-get install chromium), as .ci/run does");
}

/// Where the page screenshots go: `$CARGO_TARGET_DIR` (or the workspace's `target`)
/// `/e2e-artefacts/pages`.
pub fn artefact_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace().join("target"));
    let dir = target.join("e2e-artefacts").join("pages");
    std::fs::create_dir_all(&dir).expect("artefact dir");
    dir
}

fn headless(extra: &[String], url: &str) -> String {
    let profile = tempfile::tempdir().expect("browser profile dir");
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
        ])
        .args(["--no-first-run", "--disable-extensions", "--hide-scrollbars"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let mut out = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let status = wait_timeout(&mut child, Duration::from_secs(60));
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("chromium did not finish loading {url} within 60 s");
    }
    reader.join().unwrap_or_default()
}

/// The DOM of `url` as the browser built it, scripts run (`--dump-dom`; it needs
/// JavaScript, so what a page does without it is checked on the served HTML instead).
pub fn dump_dom(url: &str) -> String {
    let dom = headless(&["--dump-dom".to_owned()], url);
    assert!(
        dom.contains("</html>"),
        "chromium returned no DOM for {url}: {dom:?}"
    );
    dom
}

/// A screenshot of `url` at `width`x`height`, saved as `<artefact_dir>/<name>.png`.
pub fn screenshot(url: &str, name: &str, width: u32, height: u32) -> PathBuf {
    let path = artefact_dir().join(format!("{name}.png"));
    let _ = std::fs::remove_file(&path);
    headless(
        &[
            format!("--screenshot={}", path.display()),
            format!("--window-size={width},{height}"),
        ],
        url,
    );
    let png = std::fs::read(&path).unwrap_or_default();
    assert!(
        png.starts_with(b"\x89PNG"),
        "no screenshot of {url} at {}",
        path.display()
    );
    path
}
