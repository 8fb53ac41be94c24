#!/usr/bin/env python3
"""Start `edge-agent serve` the way the rendered Deployment starts it and check its probes.

Reads a rendered overlay (the output of `kubectl kustomize k8s/overlays/edge`), takes the
server container's command, args and environment exactly as the kubelet would build them
(envFrom ConfigMaps in order, then env, which wins; valueFrom configMapKeyRef and
resourceFieldRef resolved from the manifest; $(VAR) references expanded), and runs it here.
Only three values are overridden, each printed:

  * the bundle path (EDGE_POOL_BUNDLE or --bundle), which must lie under one of the
    container's volume mounts, becomes a real bundle file;
  * the gRPC and HTTP listen addresses (EDGE_POOL_LISTEN / --listen, EDGE_POOL_HTTP_LISTEN /
    --http-listen): host 127.0.0.1 and a free port instead of the rendered host and port.
    The rendered ports must equal the container ports named grpc and metrics, the probe ports
    and the prometheus.io/port annotation.

command[0] (the path in the image) is mapped to the binary of the same name in --bin-dir and
must equal the ENTRYPOINT of k8s/Dockerfile. When run as root, the server runs as the pod's
runAsUser/runAsGroup. The image's own PATH and a HOSTNAME are the only other variables.

Checks: every grpc probe of the container (startup, readiness, liveness) answers SERVING
within its timeout before the startup probe's budget runs out; /healthz, /readyz and the
scrape path answer; after SIGTERM the readiness probe sees NOT_SERVING at once, the process
keeps running for the drain delay and exits 0 within terminationGracePeriodSeconds.
Prints one line per check and a closing "N passed, N failed" line; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from decimal import Decimal
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

# What the runtime image sets (distroless/cc-debian12); the kubelet adds nothing else here
# because the pod has enableServiceLinks: false.
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

SUFFIXES = {
    "": 1, "m": Decimal("0.001"),
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
}


class Failed(Exception):
    pass


def quantity(text: str | int | float) -> Decimal:
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(text))
    if not m or m.group(2) not in SUFFIXES:
        raise Failed(f"cannot read the quantity {text!r}")
    return Decimal(m.group(1)) * Decimal(SUFFIXES[m.group(2)])


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables are replaced, $$ is a literal $."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", sub, value)


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        if ok:
            self.passed += 1
            print(f"PASS {what}" + (f": {detail}" if detail else ""), flush=True)
        else:
            self.failed += 1
            print(f"FAIL {what}" + (f": {detail}" if detail else ""), flush=True)
        return ok


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(path: Path) -> tuple[dict, dict, dict[str, dict[str, str]]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    deployments = [d for d in docs if d.get("kind") == "Deployment"]
    if len(deployments) != 1:
        raise Failed(f"{path}: expected one Deployment, found {len(deployments)}")
    deployment = deployments[0]
    containers = deployment["spec"]["template"]["spec"]["containers"]
    named = [c for c in containers if c["name"] == "server"]
    container = named[0] if named else containers[0]
    configmaps = {
        d["metadata"]["name"]: dict(d.get("data") or {})
        for d in docs
        if d.get("kind") == "ConfigMap"
    }
    return deployment, container, configmaps


def container_env(
    deployment: dict, container: dict, configmaps: dict[str, dict[str, str]]
) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        if "configMapRef" not in source:
            raise Failed(f"envFrom source not supported by this test: {source}")
        ref = source["configMapRef"]
        data = configmaps.get(ref["name"])
        if data is None:
            if ref.get("optional"):
                continue
            raise Failed(f"envFrom names the ConfigMap {ref['name']}, not in the manifests")
        prefix = source.get("prefix", "")
        for key, value in data.items():
            env[prefix + key] = str(value)
    meta = deployment["metadata"]
    for item in container.get("env") or []:
        name = item["name"]
        if "value" in item:
            env[name] = expand(str(item["value"]), env)
            continue
        source = item.get("valueFrom") or {}
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            data = configmaps.get(ref["name"], {})
            if ref["key"] not in data:
                if ref.get("optional"):
                    continue
                raise Failed(f"env {name}: {ref['name']}/{ref['key']} not in the manifests")
            env[name] = str(data[ref["key"]])
        elif "resourceFieldRef" in source:
            ref = source["resourceFieldRef"]
            target = container
            if ref.get("containerName") not in (None, container["name"]):
                raise Failed(f"env {name}: resourceFieldRef of another container")
            kind, resource = ref["resource"].split(".", 1)
            amount = (target.get("resources") or {}).get(kind, {}).get(resource)
            if amount is None:
                raise Failed(f"env {name}: the container sets no {ref['resource']}")
            divisor = quantity(ref.get("divisor", "1"))
            # The kubelet rounds up: ceil(amount / divisor).
            env[name] = str(math.ceil(quantity(amount) / divisor))
        elif "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            values = {
                "metadata.name": f"{meta['name']}-test",
                "metadata.namespace": meta.get("namespace", "default"),
                "status.podIP": "127.0.0.1",
                "status.hostIP": "127.0.0.1",
                "spec.nodeName": socket.gethostname(),
                "spec.serviceAccountName": deployment["spec"]["template"]["spec"].get(
                    "serviceAccountName", "default"
                ),
            }
            if path not in values:
                raise Failed(f"env {name}: fieldRef {path} not supported by this test")
            env[name] = values[path]
        else:
            raise Failed(f"env {name}: {source} not supported by this test (secrets?)")
    return env


def setting(args: list[str], env: dict[str, str], flag: str, var: str) -> tuple[str, str | None]:
    """Where a setting comes from (clap: a flag wins over its variable) and its value."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return ("arg", args[i + 1])
        if arg.startswith(flag + "="):
            return ("arg", arg.split("=", 1)[1])
    return ("env", env.get(var))


def override(args: list[str], env: dict[str, str], flag: str, var: str, value: str) -> None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            args[i + 1] = value
            return
        if arg.startswith(flag + "="):
            args[i] = f"{flag}={value}"
            return
    env[var] = value


def grpc_check(port: int, service: str, timeout: float) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            return f"error {e.code().name}"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")
    except OSError as e:
        return 0, str(e)


def entrypoint(dockerfile: Path) -> list[str] | None:
    found = None
    for line in dockerfile.read_text().splitlines():
        if line.strip().startswith("ENTRYPOINT"):
            found = json.loads(line.strip()[len("ENTRYPOINT"):].strip())
    return found


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True, type=Path, help="rendered edge overlay")
    ap.add_argument("--bin-dir", required=True, type=Path, help="directory holding edge-agent")
    ap.add_argument("--bundle", required=True, type=Path, help="a real bundle to serve")
    ap.add_argument("--dockerfile", type=Path, help="check command[0] against its ENTRYPOINT")
    ap.add_argument("--log", type=Path, help="server stderr (default: a temporary file)")
    opts = ap.parse_args()

    report = Report()
    deployment, container, configmaps = load(opts.manifest)
    pod = deployment["spec"]["template"]["spec"]
    env = container_env(deployment, container, configmaps)
    command = [expand(c, env) for c in container.get("command") or []]
    args = [expand(a, env) for a in container.get("args") or []]
    if not command:
        raise Failed("the container has no command: the test needs the image's ENTRYPOINT")

    print(f"rendered command: {command}  args: {args}")
    print("rendered environment:")
    for key in sorted(env):
        print(f"  {key}={env[key]}")

    if opts.dockerfile:
        ep = entrypoint(opts.dockerfile)
        report.check(
            ep is not None and command[: len(ep)] == ep,
            "command is the Dockerfile's ENTRYPOINT",
            f"command {command}, ENTRYPOINT {ep}",
        )

    binary = opts.bin_dir / Path(command[0]).name
    if not binary.is_file():
        raise Failed(f"{binary} not found (command[0] {command[0]} mapped into --bin-dir)")
    rest = command[1:] + args

    # Ports: what the server will listen on must be what the probes, Services and scrapers use.
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
    where, listen = setting(rest, env, "--listen", "EDGE_POOL_LISTEN")
    listen = listen or "0.0.0.0:9000"  # the flag's default
    where_http, http_listen = setting(rest, env, "--http-listen", "EDGE_POOL_HTTP_LISTEN")
    http_listen = "0.0.0.0:9464" if http_listen is None else http_listen
    grpc_port = int(listen.rsplit(":", 1)[1])
    report.check(ports.get("grpc") == grpc_port, "gRPC listen port = containerPort grpc",
                 f"{listen} ({where}), containerPort {ports.get('grpc')}")
    probes = {
        kind: container[kind]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
        if kind in container
    }
    for kind, probe in probes.items():
        if "grpc" in probe:
            report.check(probe["grpc"]["port"] == grpc_port, f"{kind} probes the gRPC port",
                         f"port {probe['grpc']['port']}")
    report.check(bool(http_listen), "HTTP endpoints enabled", http_listen)
    http_port = int(http_listen.rsplit(":", 1)[1]) if http_listen else None
    report.check(ports.get("metrics") == http_port, "HTTP listen port = containerPort metrics",
                 f"{http_listen} ({where_http}), containerPort {ports.get('metrics')}")
    annotations = deployment["spec"]["template"]["metadata"].get("annotations") or {}
    if "prometheus.io/port" in annotations:
        report.check(str(http_port) == annotations["prometheus.io/port"],
                     "prometheus.io/port = HTTP listen port", annotations["prometheus.io/port"])
    scrape_path = annotations.get("prometheus.io/path", "/metrics")

    # The bundle: the rendered path must be inside a mounted volume (filled by the
    # initContainer or an image volume); then it is replaced by a real file.
    where_bundle, bundle = setting(rest, env, "--bundle", "EDGE_POOL_BUNDLE")
    mounts = [m["mountPath"].rstrip("/") + "/" for m in container.get("volumeMounts") or []]
    report.check(bool(bundle) and any(bundle.startswith(m) for m in mounts),
                 "bundle path lies under a volume mount", f"{bundle} ({where_bundle}), mounts {mounts}")
    copied = [
        c for c in pod.get("initContainers") or []
        if any(m["name"] in {v["name"] for v in container.get("volumeMounts") or []}
               for m in c.get("volumeMounts") or [])
    ]
    if copied:
        print(f"bundle volume filled by initContainer(s) {[c['name'] for c in copied]}")

    # The tuning cache (edge-tuning.json, written at load): on a writable volume, as the root
    # file system is read-only; here it goes to a fresh directory the server's user can write.
    where_cache, cache = setting(rest, env, "--tuning-cache", "EDGE_POOL_TUNING_CACHE")
    if cache is not None:
        writable = [
            m["mountPath"].rstrip("/") + "/" for m in container.get("volumeMounts") or []
            if not m.get("readOnly")
        ]
        report.check(any((cache.rstrip("/") + "/").startswith(m) for m in writable),
                     "tuning cache lies under a writable volume mount",
                     f"{cache} ({where_cache}), writable mounts {writable}")
        cache_dir = tempfile.mkdtemp(prefix="edge-tuning-")
        atexit.register(shutil.rmtree, cache_dir, True)
        os.chmod(cache_dir, 0o777)
        override(rest, env, "--tuning-cache", "EDGE_POOL_TUNING_CACHE", cache_dir)
        print(f"overridden: tuning cache -> {cache_dir}")

    # Overrides: only the bundle path, the two listen addresses and the tuning cache.
    local_grpc, local_http = free_port(), free_port()
    override(rest, env, "--bundle", "EDGE_POOL_BUNDLE", str(opts.bundle.resolve()))
    override(rest, env, "--listen", "EDGE_POOL_LISTEN", f"127.0.0.1:{local_grpc}")
    override(rest, env, "--http-listen", "EDGE_POOL_HTTP_LISTEN", f"127.0.0.1:{local_http}")
    print(f"overridden: bundle -> {opts.bundle.resolve()}, gRPC -> 127.0.0.1:{local_grpc}, "
          f"HTTP -> 127.0.0.1:{local_http}")

    run_env = {"PATH": IMAGE_PATH, "HOSTNAME": f"{deployment['metadata']['name']}-test", **env}
    security = {**(pod.get("securityContext") or {}), **(container.get("securityContext") or {})}
    preexec = None
    if os.geteuid() == 0 and security.get("runAsUser") is not None:
        uid = int(security["runAsUser"])
        gid = int(security.get("runAsGroup", uid))

        def preexec() -> None:  # the pod's user, as the kubelet would start it
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)

        print(f"running as uid {uid} gid {gid} (the pod's securityContext)")
    elif security.get("runAsNonRoot"):
        report.check(os.geteuid() != 0, "runs as non-root", f"euid {os.geteuid()}")

    log_path = opts.log or Path(tempfile.mkstemp(prefix="edge-pool-", suffix=".log")[1])
    log = open(log_path, "wb")
    started = time.monotonic()
    proc = subprocess.Popen([str(binary), *rest], env=run_env, stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL, preexec_fn=preexec, cwd="/")
    try:
        # Every grpc probe must answer SERVING before the startup probe's budget runs out.
        startup = probes.get("startupProbe", {})
        budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) + startup.get(
            "initialDelaySeconds", 0)
        deadline = started + budget
        for kind, probe in probes.items():
            if "grpc" not in probe:
                continue
            service = probe["grpc"].get("service", "")
            timeout = probe.get("timeoutSeconds", 1)
            status = "not tried"
            while time.monotonic() < deadline and proc.poll() is None:
                status = grpc_check(local_grpc, service, timeout)
                if status == "SERVING":
                    break
                time.sleep(0.2)
            report.check(status == "SERVING", f"{kind} (grpc.health.v1 Check service {service!r})",
                         f"{status} after {time.monotonic() - started:.1f} s (budget {budget} s)")
        if proc.poll() is not None:
            raise Failed(f"edge-agent serve exited with {proc.returncode}; log: {log_path}")

        code, _ = http_get(local_http, "/healthz")
        report.check(code == 200, "/healthz", str(code))
        code, _ = http_get(local_http, "/readyz")
        report.check(code == 200, "/readyz", str(code))
        code, body = http_get(local_http, scrape_path)
        report.check(code == 200 and "edge_pool_" in body, f"{scrape_path} (Prometheus scrape)",
                     f"{code}, {sum(1 for l in body.splitlines() if l.startswith('edge_pool_'))} edge_pool_ samples")
        limit = (container.get("resources") or {}).get("limits", {}).get("memory")
        rss = rss_bytes(proc.pid)
        if limit and rss:
            report.check(rss < quantity(limit), "resident memory under the memory limit",
                         f"{rss / 2**20:.0f} MiB of {limit} (this bundle)")

        # Termination as the kubelet does it: SIGTERM, then SIGKILL after the grace period.
        grace = pod.get("terminationGracePeriodSeconds", 30)
        _, delay = setting(rest, env, "--drain-delay-secs", "EDGE_POOL_DRAIN_DELAY_SECS")
        delay = float(delay if delay is not None else 5)
        term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        readiness = probes.get("readinessProbe", {})
        service = readiness.get("grpc", {}).get("service", "")
        status = "not tried"
        while time.monotonic() - term < 2:
            status = grpc_check(local_grpc, service, readiness.get("timeoutSeconds", 1))
            if status == "NOT_SERVING":
                break
            time.sleep(0.05)
        report.check(status == "NOT_SERVING", "readiness probe after SIGTERM",
                     f"{status} after {time.monotonic() - term:.2f} s")
        code, _ = http_get(local_http, "/readyz")
        report.check(code == 503, "/readyz after SIGTERM", str(code))
        try:
            rc = proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
        took = time.monotonic() - term
        report.check(rc == 0 and took >= delay - 0.5 and took < grace,
                     "drains, then exits 0 within terminationGracePeriodSeconds",
                     f"exit {rc} after {took:.1f} s (drain delay {delay:g} s, grace {grace} s)")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()

    if report.failed:
        print(f"server log: {log_path}")
        sys.stdout.write(Path(log_path).read_text(errors="replace")[-4000:])
    print(f"serve probe test: {report.passed} passed, {report.failed} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Failed as e:
        print(f"FAIL {e}")
        print("serve probe test: 0 passed, 1 failed")
        sys.exit(1)
