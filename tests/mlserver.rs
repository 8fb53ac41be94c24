//! Seldon MLServer (from PyPI, installed by scripts/clients.sh; env `EDGE_MLSERVER_PYTHON`,
//! the Python of its venv) as a third-party KServe v2 pool: each instance serves the models it
//! is given from its own temp dir, gRPC and HTTP on free loopback ports, in one process
//! (`parallel_workers = 0`), metrics off.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::daemon::{free_port, http_get};

/// The Python of MLServer's venv (`EDGE_MLSERVER_PYTHON`); its `mlserver` command is beside it.
pub fn python() -> PathBuf {
    let python = std::env::var_os("EDGE_MLSERVER_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        panic!(
            "EDGE_MLSERVER_PYTHON is not set: run the tests with scripts/test.sh, or `eval export $(scripts/clients.sh)`"
        )
    });
    assert!(
        python.exists(),
        "{} does not exist; rerun scripts/clients.sh",
        python.display()
    );
    python
}

/// A running MLServer.
pub struct MlServer {
    pub grpc_port: u16,
    pub http_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl MlServer {
    /// Serves `models` (MLServer model settings, each with its `name`), importing model
    /// classes from `pythonpath`; returns once every model is ready.
    pub fn start(pythonpath: &Path, models: &[serde_json::Value]) -> Self {
        let python = python();
        let mlserver = python.with_file_name("mlserver");
        let dir = tempfile::tempdir().expect("temp dir");
        let (grpc_port, http_port) = (free_port(), free_port());
        let settings = serde_json::json!({
            "host": "127.0.0.1",
            "http_port": http_port,
            "grpc_port": grpc_port,
            "metrics_endpoint": null,
            "parallel_workers": 0,
            "debug": false,
        });
        let write = |path: PathBuf, v: &serde_json::Value| {
            std::fs::write(&path, v.to_string()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        };
        write(dir.path().join("settings.json"), &settings);
        let mut names = Vec::new();
        for m in models {
            let name = m["name"].as_str().expect("model settings have a name").to_owned();
            let d = dir.path().join(&name);
            std::fs::create_dir(&d).expect("model dir");
            write(d.join("model-settings.json"), m);
            names.push(name);
        }
        let log = std::fs::File::create(dir.path().join("mlserver.log")).expect("log file");
        let child = Command::new(&mlserver)
            .arg("start")
            .arg(dir.path())
            .env("PYTHONPATH", pythonpath)
            .env("OMP_NUM_THREADS", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", mlserver.display()));
        let mut server = MlServer {
            grpc_port,
            http_port,
            dir,
            child: Some(child),
        };
        server.wait_ready(&names, Duration::from_secs(120));
        server
    }

    fn wait_ready(&mut self, models: &[String], timeout: Duration) {
        let end = Instant::now() + timeout;
        let ready = |path: String| matches!(http_get(self.http_port, &path), Some((200, _)));
        while Instant::now() < end {
            if ready("/v2/health/ready".into())
                && models.iter().all(|m| ready(format!("/v2/models/{m}/ready")))
            {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("MLServer exited with {status} before ready:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("MLServer not ready after {timeout:?}:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mlserver.log")).unwrap_or_default()
    }
}

impl Drop for MlServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
