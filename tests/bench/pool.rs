//! Benchmark 7: Pool: throughput of `edge-agent serve` at concurrency 1, 4 and 16 with batching on
//! and off, and the gRPC overhead per request beyond preprocessing and inference; the
//! offload path from an agent.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use edge_e2e::daemon::{Agent, AgentSpec, Mosquitto, TestClient, free_port};
use edge_e2e::pool::{Server, images_request};
use edge_proto::tensorflow::serving::prediction_service_client::PredictionServiceClient;
use edge_proto::tonic::transport::Channel;

use crate::Ctx;
use crate::inference::tuned_classifier;
use crate::preprocess::photo_jpeg;
use crate::report::{Report, Target};
use crate::stats::{median, ms};

const S: &str = "pool";

/// `total` Predict calls with `concurrency` in flight: (images/s, per-call ms).
async fn drive(
    channel: &Channel,
    image: &Arc<Vec<u8>>,
    concurrency: usize,
    total: usize,
) -> Result<(f64, Vec<f64>)> {
    let start = Instant::now();
    let per = total.div_ceil(concurrency);
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let mut client = PredictionServiceClient::new(channel.clone());
        let image = image.clone();
        tasks.push(tokio::spawn(async move {
            let mut times = Vec::new();
            for _ in 0..per {
                let t = Instant::now();
                client.predict(images_request(vec![image.to_vec()])).await?;
                times.push(ms(t.elapsed()));
            }
            Ok::<_, anyhow::Error>(times)
        }));
    }
    let mut times = Vec::new();
    for t in tasks {
        times.extend(t.await??);
    }
    Ok(((per * concurrency) as f64 / start.elapsed().as_secs_f64(), times))
}

pub fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let image = Arc::new(photo_jpeg(299, 299)?);
    let rt = tokio::runtime::Runtime::new()?;
    let mut rates: Vec<(bool, usize, f64)> = Vec::new();
    let mut c1_latency = f64::NAN;
    let (mut grpc_overhead, mut grpc_detail) = (f64::NAN, String::new());
    // As deployed: the pool tunes its runtime settings at load (the test harness turns that
    // off), cached in the bench's scratch directory like the in-process baselines'.
    let cache = ctx.scratch.path().to_str().context("scratch path is not UTF-8")?;
    let tuned = ["--tuning", "auto", "--tuning-cache", cache];
    // Both servers up at once and driven in turns, so that a change of the machine's speed
    // during the run (these VMs have fast and slow phases) falls on both alike.
    let batching_args = ["--max-batch-size", "4", "--max-queue-delay-ms", "2"];
    let servers = [false, true].map(|batching| {
        let batch: &[&str] = if batching { &batching_args } else { &[] };
        Server::start_bundle(&ctx.bundle, free_port(), &[&tuned[..], batch].concat())
    });
    let channels = servers.each_ref().map(|server| rt.block_on(server.channel()));
    for channel in &channels {
        rt.block_on(drive(channel, &image, 2, 4))?; // warm-up
    }
    for concurrency in [1, 4, 16] {
        let total = (4 * ctx.rounds).max(concurrency * 2);
        let mut r = [Vec::new(), Vec::new()];
        let mut lat = Vec::new();
        let (mut server_s, mut server_n) = (0.0, 0.0);
        for _ in 0..3 {
            for (b, channel) in channels.iter().enumerate() {
                let before = server_seconds(&servers[b]);
                let (rate, times) = rt.block_on(drive(channel, &image, concurrency, total))?;
                r[b].push(rate);
                if b == 0 && concurrency == 1 {
                    let after = server_seconds(&servers[b]);
                    server_s += after.0 - before.0;
                    server_n += after.1 - before.1;
                    lat.extend(times);
                }
            }
        }
        if concurrency == 1 {
            c1_latency = median(&lat);
            let server_ms = server_s / server_n * 1e3;
            let client_ms = lat.iter().sum::<f64>() / lat.len() as f64;
            grpc_overhead = client_ms - server_ms;
            grpc_detail = format!(
                "mean Predict at concurrency 1: {client_ms:.1} ms at the client, {server_ms:.1} ms inside \
                 the pool (edge_pool_request_seconds: decode, preprocess, infer, encode)"
            );
        }
        for (b, r) in r.iter().enumerate() {
            rates.push((b == 1, concurrency, median(r)));
        }
    }
    drop(servers);
    for concurrency in [1, 4, 16] {
        let get = |b: bool| {
            rates
                .iter()
                .find(|r| r.0 == b && r.1 == concurrency)
                .map_or(f64::NAN, |r| r.2)
        };
        report.row(
            S,
            format!("edge-agent serve, concurrency {concurrency}, batching on (max 4, 2 ms)"),
            get(true),
            "images/s",
            Some(("batching off (the default)", get(false))),
            Target::None,
        );
    }
    let geo = |b: bool| {
        let logs: Vec<f64> = rates.iter().filter(|r| r.0 == b).map(|r| r.2.ln()).collect();
        (logs.iter().sum::<f64>() / logs.len().max(1) as f64).exp()
    };
    report.row(
        S,
        "the default (batching off) against batching on, geometric mean over concurrency 1/4/16",
        geo(false),
        "images/s",
        Some(("batching on", geo(true))),
        Target::RatioAtLeast(0.98),
    );
    let on_wins = [1, 4, 16]
        .iter()
        .filter(|&&c| {
            let get = |b: bool| rates.iter().find(|r| r.0 == b && r.1 == c).map_or(0.0, |r| r.2);
            get(true) > get(false) * 1.02
        })
        .count();
    report.note(
        S,
        format!(
            "Batching was more than 2% faster at {on_wins} of 3 concurrencies; the default is off \
             (`--max-batch-size 0`). tract runs a batch of 4 as one larger inference, which on these cores \
             is not faster per image than 4 inferences side by side on one thread each."
        ),
    );

    // gRPC overhead: a Predict at concurrency 1 minus the same work in process.
    let c = tuned_classifier(ctx, &ctx.bundle, ctx.cpus)?;
    c.classify(&image, 5)?;
    let local: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            c.classify(&image, 5).map(|_| ms(t.elapsed()))
        })
        .collect::<Result<_, _>>()?;
    let local = median(&local);
    drop(c);
    report.row(
        S,
        "gRPC overhead per Predict (client round trip minus the pool's own request time, concurrency 1)",
        grpc_overhead,
        "ms",
        None,
        Target::None,
    );
    report.note(S, format!("gRPC overhead: {grpc_detail}."));

    // The offload path: an agent that sends every request to the pool.
    let server = Server::start_bundle(&ctx.bundle, free_port(), &tuned);
    rt.block_on(server.channel());
    let broker = Mosquitto::start_ephemeral();
    let spec = AgentSpec::new("bench-off", &ctx.bundle, Some(broker.url()))
        .env("EDGE_AGENT_MODEL__TUNING", "true")
        .env(
            "EDGE_AGENT_OFFLOAD__ENDPOINTS",
            format!("[\"127.0.0.1:{}\"]", server.port),
        )
        .env("EDGE_AGENT_OFFLOAD__TIMEOUT_MS", 30000)
        .env("EDGE_AGENT_OFFLOAD__MAX_LOCAL_WAIT_MS", 0)
        .env("EDGE_AGENT_OFFLOAD__MIN_CONFIDENCE", 1.0);
    let agent = Agent::start(spec);
    let client = rt.block_on(TestClient::connect(
        broker.port,
        "bench-off-client",
        &["bench/off"],
    ));
    let mut cluster = Vec::new();
    for i in 0..(4 * ctx.rounds) {
        let (rtt, v) = rt.block_on(ask(&client, &image, &format!("o{i}")))?;
        if v["source"] == "cluster" {
            let t = &v["timings_ms"];
            let local_work = t["preprocess"].as_f64().unwrap_or(0.0) + t["inference"].as_f64().unwrap_or(0.0);
            cluster.push((rtt, local_work));
        }
    }
    if cluster.is_empty() {
        bail!("no request reached the cluster through the offload path");
    }
    let rtt = median(&cluster.iter().map(|c| c.0).collect::<Vec<_>>());
    report.row(
        S,
        "offload path: MQTT request to cluster reply (cascade: local inference, then the pool)",
        rtt,
        "ms",
        Some((
            "local classify + pool Predict at concurrency 1",
            local + c1_latency,
        )),
        Target::None,
    );
    report.note(
        S,
        format!(
            "Pool: `edge-agent serve` (release) with the bundle and its tuned runtime settings (as \
             deployed), TF Serving Predict with one 299x299 JPEG \
             per call (`predict_images`), tonic client in process; {} calls per concurrency level, \
             three times for each server in turn (both running), median rate. In-process classify of the same JPEG: {local:.1} ms; a Predict at \
             concurrency 1: {c1_latency:.1} ms. Offload path: an agent with `min_confidence = 1` \
             (every request cascades to the pool after its local inference), {} of {} requests \
             answered by the cluster.",
            (4 * ctx.rounds).max(2),
            cluster.len(),
            4 * ctx.rounds
        ),
    );
    drop(agent);
    drop(server);
    Ok(())
}

async fn ask(client: &TestClient, image: &[u8], id: &str) -> Result<(f64, serde_json::Value)> {
    let start = Instant::now();
    client
        .request("edge/bench-off/classify", image, "bench/off", id, &[("id", id)])
        .await;
    let end = start + Duration::from_secs(60);
    loop {
        for r in client.take().into_iter().filter(|r| r.topic == "bench/off") {
            let v = r.json();
            if v["id"] == id {
                if v.get("error").is_some() {
                    bail!("error reply: {v}");
                }
                return Ok((ms(r.at - start), v));
            }
        }
        if Instant::now() > end {
            bail!("no reply to {id}");
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

/// The pool's `edge_pool_request_seconds` histogram: (sum of seconds, count).
fn server_seconds(server: &Server) -> (f64, f64) {
    let (_, body) = edge_e2e::daemon::http_get(server.http_port, "/metrics").unwrap_or_default();
    let value = |name: &str| {
        body.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    (
        value("edge_pool_request_seconds_sum"),
        value("edge_pool_request_seconds_count"),
    )
}
