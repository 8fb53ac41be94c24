//! Debian's nginx as the L7 gRPC proxy of the tests (a pool reached through an ingress): TLS
//! on its listener, HTTP/2, `grpc_pass` to an upstream of `edge-agent serve` processes. Each
//! instance runs from its own temp dir (configuration, pid, logs, temp paths) on a free
//! loopback port, never touching /etc/nginx or /var.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::daemon::{free_port, signal, wait_for_port, wait_timeout};

/// Where Debian's `nginx` package (also pulled in by nginx-light and nginx-full) puts the binary.
pub const NGINX: &str = "/usr/sbin/nginx";

fn nginx_binary() -> PathBuf {
    let p = PathBuf::from(NGINX);
    assert!(
        p.exists(),
        "{NGINX} not found: the ingress tests need Debian's nginx (apt-get install nginx; .ci/run installs it)"
    );
    p
}

/// A running nginx terminating TLS and proxying gRPC to loopback upstreams.
pub struct Nginx {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Nginx {
    /// Listens on `127.0.0.1:<free port>` with TLS (`cert`, `key`: PEM) and HTTP/2 and sends
    /// every call to one of `upstreams` (ports on 127.0.0.1), round-robin per request. An
    /// upstream that refuses or drops a connection is marked down for 2 s and the request tried
    /// on the next one (`grpc_next_upstream`, nginx's defaults plus 502-504).
    pub fn start(cert: &Path, key: &Path, upstreams: &[u16]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        // Started as root, nginx runs its worker as `nobody`: let it write its temp files.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
        }
        let port = free_port();
        let d = dir.path().display();
        let servers: String = upstreams
            .iter()
            .map(|p| format!("        server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;\n"))
            .collect();
        let conf = format!(
            "daemon off;\n\
             worker_processes 1;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\n\
             events {{ worker_connections 512; }}\n\
             http {{\n\
                 log_format grpc '$status upstream=$upstream_addr upstream_status=$upstream_status '\n\
                                 'grpc_status=$sent_trailer_grpc_status grpc_timeout=$http_grpc_timeout '\n\
                                 'request_time=$request_time \"$request\"';\n\
                 access_log {d}/access.log grpc;\n\
                 client_body_temp_path {d}/body;\n\
                 proxy_temp_path {d}/proxy;\n\
                 fastcgi_temp_path {d}/fastcgi;\n\
                 uwsgi_temp_path {d}/uwsgi;\n\
                 scgi_temp_path {d}/scgi;\n\
                 # Photos up to the agent's limits (the default 1m would answer 413).\n\
                 client_max_body_size 16m;\n\
                 upstream pools {{\n\
             {servers}\
                 }}\n\
                 server {{\n\
                     listen 127.0.0.1:{port} ssl http2;\n\
                     server_name localhost;\n\
                     ssl_certificate {cert};\n\
                     ssl_certificate_key {key};\n\
                     location / {{\n\
                         grpc_pass grpc://pools;\n\
                         grpc_connect_timeout 1s;\n\
                         grpc_next_upstream error timeout http_502 http_503 http_504 non_idempotent;\n\
                         grpc_next_upstream_tries 3;\n\
                     }}\n\
                 }}\n\
             }}\n",
            cert = cert.display(),
            key = key.display(),
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).expect("write nginx.conf");
        let mut n = Nginx {
            port,
            dir,
            child: None,
        };
        n.spawn();
        n
    }

    fn spawn(&mut self) {
        let d = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("stderr.log"))
            .expect("open stderr.log");
        let child = Command::new(nginx_binary())
            // Its own process group, so that dropping it can stop the worker too.
            .process_group(0)
            .arg("-p")
            .arg(d)
            .arg("-c")
            .arg(d.join("nginx.conf"))
            .arg("-e")
            .arg(d.join("error.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start nginx");
        self.child = Some(child);
        assert!(
            wait_for_port(self.port, Duration::from_secs(10)),
            "nginx did not listen on {}:\n{}",
            self.port,
            self.error_log()
        );
    }

    /// Stops nginx (SIGTERM: fast shutdown, open connections closed) and waits for its exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, "-TERM");
            wait_timeout(&mut child, Duration::from_secs(10)).expect("nginx exits after SIGTERM");
        }
    }

    /// Starts it again on the same port and configuration.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "nginx is running");
        self.spawn();
    }

    /// One line per proxied call (status, upstream address and status, grpc-status,
    /// grpc-timeout as received, request time).
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    pub fn error_log(&self) -> String {
        let d = self.dir.path();
        let read = |f: &str| std::fs::read_to_string(d.join(f)).unwrap_or_default();
        format!("{}{}", read("stderr.log"), read("error.log"))
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // The master and its worker share the process group nginx was started in.
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", c.id())])
                .status();
            let _ = c.wait();
        }
    }
}
