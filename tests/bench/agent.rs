//! Benchmark 3: Agent overhead: MQTT request to reply through a local Mosquitto, one request in
//! flight, minus the preprocessing and inference the reply reports.
//! Benchmark 4: Sustained throughput of the daemon with many requests in flight, against the best raw
//! tract configuration on the same cores (and ONNX Runtime's best).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use edge_e2e::daemon::{Agent, AgentSpec, Mosquitto, TestClient};

use crate::Ctx;
use crate::inference::{input, rate_at_once, time_runs, tuned_classifier};
use crate::ort::Ort;
use crate::preprocess::photo_jpeg;
use crate::report::{Report, Target};
use crate::stats::{median, ms, quantile};

const S: &str = "agent";
const TOPIC: &str = "edge/bench/classify";
const REPLIES: &str = "bench/replies";

pub fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let image = photo_jpeg(299, 299)?;
    let broker = Mosquitto::start_ephemeral();
    // As on a device: runtime-settings tuning on (the test harness turns it off), so the agent
    // runs the instruction set and settings the tuner picks, like the raw-runtime baseline of
    // this process (the same tuner, its cache in the bench's scratch directory).
    let spec =
        AgentSpec::new("bench", &ctx.bundle, Some(broker.url())).env("EDGE_AGENT_MODEL__TUNING", "true");
    let agent = Agent::start(spec);
    let rt = tokio::runtime::Runtime::new()?;
    let client = rt.block_on(TestClient::connect(broker.port, "bench-client", &[REPLIES]));
    let mut next = 0usize;
    // Warm-up: the first inferences of a process are slower.
    rt.block_on(burst(&client, &image, &mut next, 4))?;

    // 3. One request in flight.
    let n = 20 * ctx.rounds;
    let mut overhead = Vec::with_capacity(n);
    let mut rtts = Vec::with_capacity(n);
    let mut worst = String::new();
    for _ in 0..n {
        let (rtt, reply) = rt.block_on(one(&client, &image, &mut next))?;
        let t = &reply["timings_ms"];
        let work = t["preprocess"].as_f64().unwrap_or(0.0) + t["inference"].as_f64().unwrap_or(0.0);
        rtts.push(rtt);
        overhead.push(rtt - work);
        if overhead.iter().all(|&o| o <= rtt - work) {
            worst = format!("round trip {rtt:.1} ms, reply timings {t}");
        }
    }
    report.row(
        S,
        "agent overhead p50 (MQTT in to reply out, minus preprocessing and inference)",
        quantile(&overhead, 0.5),
        "ms",
        None,
        Target::ValueAtMost(2.0),
    );
    report.row(
        S,
        "agent overhead p99",
        quantile(&overhead, 0.99),
        "ms",
        None,
        Target::ValueAtMost(10.0),
    );
    report.note(
        S,
        format!(
            "Overhead: {n} requests one after the other (MQTT 5, QoS 1, a 299x299 JPEG of {} bytes) \
             through Mosquitto on loopback to `edge-agent run` (release build, default config: \
             durable queue with flush before the PUBACK, workers and threads auto, adaptive \
             parallelism); round trip measured at the client, minus the reply's own \
             `timings_ms.preprocess + inference`. Round trip p50 {:.1} ms. It includes the queue's \
             enqueue with its fsync before the request is acknowledged (the lease in the same \
             commit, a worker being idle) and the reply's commit to the outbox (not synced). The \
             slowest: {worst}.",
            image.len(),
            quantile(&rtts, 0.5)
        ),
    );

    // 4. Many requests in flight vs raw tract on the same cores.
    let burst_n = 8 * ctx.cpus;
    let alone = tuned_classifier(ctx, &ctx.bundle, ctx.cpus)?;
    let single = tuned_classifier(ctx, &ctx.bundle, 1)?;
    let x = input(&alone);
    time_runs(&alone, &x, 1)?;
    let mut ort_par: Vec<Ort> = (0..ctx.cpus)
        .map(|_| Ort::start(&ctx.python, &ctx.onnx_nchw, 1))
        .collect::<Result<_>>()?;
    let mut ort_all = Ort::start(&ctx.python, &ctx.onnx_nchw, ctx.cpus)?;
    let (mut daemon, mut seq, mut par, mut o_seq, mut o_par) = (vec![], vec![], vec![], vec![], vec![]);
    let per_thread = burst_n.div_ceil(ctx.cpus);
    for _ in 0..ctx.rounds {
        let start = Instant::now();
        let last = rt.block_on(burst(&client, &image, &mut next, burst_n))?;
        daemon.push(burst_n as f64 / (last - start).as_secs_f64());

        let start = Instant::now();
        time_runs(&alone, &x, burst_n)?;
        seq.push(burst_n as f64 / start.elapsed().as_secs_f64());

        par.push(rate_at_once(&single, &x, ctx.cpus, per_thread)?);

        let start = Instant::now();
        ort_all.run(burst_n)?;
        o_seq.push(burst_n as f64 / start.elapsed().as_secs_f64());

        let start = Instant::now();
        for o in &mut ort_par {
            o.send(per_thread)?;
        }
        for o in &mut ort_par {
            o.collect()?;
        }
        o_par.push((per_thread * ctx.cpus) as f64 / start.elapsed().as_secs_f64());
    }
    let (daemon, seq, par, o_seq, o_par) = (
        median(&daemon),
        median(&seq),
        median(&par),
        median(&o_seq),
        median(&o_par),
    );
    let (best_name, best) = if par >= seq {
        (
            format!(
                "raw runtime (tuned settings), {} single-threaded inferences at once",
                ctx.cpus
            ),
            par,
        )
    } else {
        (
            format!(
                "raw runtime (tuned settings), one {}-thread inference at a time",
                ctx.cpus
            ),
            seq,
        )
    };
    report.row(
        S,
        format!("daemon sustained throughput, {burst_n} requests in flight"),
        daemon,
        "images/s",
        Some((&best_name, best)),
        Target::RatioAtLeast(0.95),
    );
    let ort_best = o_par.max(o_seq);
    let ort_name = format!(
        "ONNX Runtime NCHW, best of 1x{c} threads and {c}x1 thread",
        c = ctx.cpus
    );
    report.row(
        S,
        "daemon sustained throughput vs ONNX Runtime's best",
        daemon,
        "images/s",
        Some((&ort_name, ort_best)),
        // Issue 20: the daemon, JPEG decoding and queue included, at 0.8 of the raw ONNX
        // Runtime's best way of using the same cores.
        Target::RatioAtLeast(0.8),
    );
    report.note(
        S,
        format!(
            "Throughput: {burst_n} requests published at once, time from the first publish to the last \
             reply, {} rounds interleaved with the raw runtime in-process (the tuned settings) (inference only, no decoding): \
             one {c}-thread inference at a time {seq:.2} images/s, {c} single-threaded inferences at \
             once {par:.2} images/s; ONNX Runtime {o_seq:.2} and {o_par:.2} images/s the same two ways. \
             The daemon also decodes and preprocesses each JPEG and writes the queue.",
            ctx.rounds,
            c = ctx.cpus
        ),
    );

    // Adaptive parallelism seen from the daemon: a request alone gets every core.
    let alone_ms = median(&time_runs(&alone, &x, 3)?);
    let single_ms = median(&time_runs(&single, &x, 3)?);
    let mut inference = Vec::new();
    for _ in 0..5 {
        let (_, reply) = rt.block_on(one(&client, &image, &mut next))?;
        inference.push(reply["timings_ms"]["inference"].as_f64().unwrap_or(f64::NAN));
    }
    report.note(
        S,
        format!(
            "Adaptive parallelism: a request alone took {:.0} ms of inference in the daemon; the raw runtime \
             takes {alone_ms:.0} ms with {} threads and {single_ms:.0} ms with 1.",
            median(&inference),
            ctx.cpus
        ),
    );
    drop(agent);
    drop(broker);
    Ok(())
}

/// Sends one request and waits for its reply: (round trip ms, reply).
async fn one(client: &TestClient, image: &[u8], next: &mut usize) -> Result<(f64, serde_json::Value)> {
    let id = format!("b{next}");
    *next += 1;
    let start = Instant::now();
    client.request(TOPIC, image, REPLIES, &id, &[("id", &id)]).await;
    let end = start + Duration::from_secs(60);
    loop {
        for r in client.take().into_iter().filter(|r| r.topic == REPLIES) {
            let v = r.json();
            if v["id"] != id.as_str() {
                continue;
            }
            if v.get("error").is_some() {
                bail!("error reply: {v}");
            }
            return Ok((ms(r.at - start), v));
        }
        if Instant::now() > end {
            bail!("no reply to {id} within 60 s");
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// Publishes `n` requests at once; returns when the last reply arrived.
async fn burst(client: &TestClient, image: &[u8], next: &mut usize, n: usize) -> Result<Instant> {
    let ids: Vec<String> = (0..n).map(|i| format!("b{}", *next + i)).collect();
    *next += n;
    for id in &ids {
        client.request(TOPIC, image, REPLIES, id, &[("id", id)]).await;
    }
    let end = Instant::now() + Duration::from_secs(300);
    let mut left: std::collections::HashSet<String> = ids.into_iter().collect();
    let mut last = None;
    loop {
        for r in client.take().into_iter().filter(|r| r.topic == REPLIES) {
            let v = r.json();
            if let Some(id) = v["id"].as_str()
                && left.remove(id)
            {
                if v.get("error").is_some() {
                    bail!("error reply: {v}");
                }
                last = last.max(Some(r.at));
            }
        }
        if left.is_empty() {
            return last.context("no replies");
        }
        if Instant::now() > end {
            bail!("{} of {n} replies missing after 300 s", left.len());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
