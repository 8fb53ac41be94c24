//! The device page (`GET /` on `http.listen`): the retained status made readable, charts of
//! the last 15 minutes, the confidence histogram, the last requests. `/api/status` is the
//! same data as JSON.

use std::fmt::Write as _;

use base64::Engine;
use serde_json::Value;

use super::history::{BINS, LATENCIES, SLOT_SECS, SLOTS, Snapshot};
use super::html::{Series, age, bar_chart, esc, line_chart, num, page};

/// `/api/status`: the status document (with `mqtt_connected`) and the history.
pub fn json(status: &Value, history: &Snapshot) -> Value {
    serde_json::json!({"status": status, "history": history})
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => esc(s),
        Value::Null => "-".into(),
        v => esc(&v.to_string()),
    }
}

/// The whole page. `status` is the agent's status document plus `mqtt_connected`.
pub fn render(status: &Value, history: &Snapshot) -> String {
    let mut b = String::new();
    let state = status["state"].as_str().unwrap_or("unknown");
    let _ = write!(
        b,
        "<h1>{} <span class=\"pill {}\" id=\"state\">{}</span></h1>",
        text(&status["device"]),
        super::html::state_class(state),
        esc(state)
    );
    let model = format!(
        "{} {}",
        text(&status["model"]["name"]),
        text(&status["model"]["version"])
    );
    let reload = match &status["model_reload"] {
        Value::Null => "none since start".to_owned(),
        r => {
            let mut s = format!("{} {}", text(&r["command"]), text(&r["state"]));
            if let Some(id) = r["id"].as_str() {
                let _ = write!(s, " (id {})", esc(id));
            }
            if let Some(src) = r["source"].as_str() {
                let _ = write!(s, " from {}", esc(src));
            }
            if r["state"] == "failed" {
                let _ = write!(
                    s,
                    ": <span class=\"bad\">{} {}</span>",
                    text(&r["kind"]),
                    text(&r["reason"])
                );
            }
            s
        }
    };
    let connected = match status["mqtt_connected"].as_bool() {
        Some(true) => "connected".to_owned(),
        Some(false) => "<span class=\"bad\">not connected</span>".to_owned(),
        None => "-".to_owned(),
    };
    let pool = match &status["pool"] {
        Value::Null => "offload off".to_owned(),
        p => format!(
            "breaker {}, {} healthy endpoint(s)",
            text(&p["breaker"]),
            text(&p["healthy_endpoints"])
        ),
    };
    let q = &status["queue"];
    let queue = format!(
        "pending {}, leased {}, outbox {}, dead {} ({} of {} items, {} of {} bytes)",
        text(&q["pending"]),
        text(&q["leased"]),
        text(&q["outbox"]),
        text(&q["dead"]),
        q["pending"].as_u64().unwrap_or(0)
            + q["leased"].as_u64().unwrap_or(0)
            + q["outbox"].as_u64().unwrap_or(0),
        text(&q["max_items"]),
        text(&q["bytes"]),
        text(&q["max_bytes"]),
    );
    let a = &status["answered"];
    let answered = format!(
        "<span id=\"answered-local\">{}</span> locally, <span id=\"answered-cluster\">{}</span> by the cluster, \
         <span id=\"answered-errors\">{}</span> with errors",
        text(&a["local"]),
        text(&a["cluster"]),
        text(&a["errors"])
    );
    let last_error = match &status["last_error"] {
        Value::Null => "none".to_owned(),
        e => format!(
            "<span class=\"bad\">{}: {}</span>",
            text(&e["code"]),
            text(&e["message"])
        ),
    };
    let uptime = status["uptime_s"].as_u64().map(age).unwrap_or_else(|| "-".into());
    let rows = [
        ("Model", format!("<span id=\"model\">{model}</span>")),
        ("Last reload or rollback", reload),
        ("Broker", connected),
        ("Cluster pool", pool),
        ("Queue", queue),
        ("Answered since start", answered),
        ("Uptime", uptime),
        ("Agent version", text(&status["agent_version"])),
        ("Last error", last_error),
    ];
    b.push_str("<table class=\"kv\">");
    for (k, v) in rows {
        let _ = write!(b, "<tr><td>{k}</td><td>{v}</td></tr>");
    }
    b.push_str("</table>");

    charts(&mut b, history);
    confidence(&mut b, history);
    recent(&mut b, history);
    b.push_str(
        "<p class=\"muted\">Read-only. JSON: <a href=\"/api/status\">/api/status</a>, \
         Prometheus: <a href=\"/metrics\">/metrics</a>.</p>",
    );
    let title = format!("{} · edge-agent", status["device"].as_str().unwrap_or("device"));
    page(&title, "/api/status", &b)
}

fn charts(b: &mut String, h: &Snapshot) {
    let x = format!(
        "last {} min, {SLOT_SECS} s per bar",
        SLOTS as u64 * SLOT_SECS / 60
    );
    let counts =
        |f: fn(&super::history::Slot) -> u32| h.slots.iter().map(|s| Some(f64::from(f(s)))).collect();
    let answered = [
        Series {
            name: "local",
            colour: "#2e7d32",
            values: counts(|s| s.local),
        },
        Series {
            name: "cluster",
            colour: "#1565c0",
            values: counts(|s| s.cluster),
        },
        Series {
            name: "errors",
            colour: "#c62828",
            values: counts(|s| s.errors),
        },
    ];
    let colours = ["#ef6c00", "#6a1b9a", "#1565c0", "#222"];
    let latency: Vec<Series<'_>> = LATENCIES
        .iter()
        .zip(colours)
        .enumerate()
        .map(|(i, (name, colour))| Series {
            name,
            colour,
            values: h.slots.iter().map(|s| s.mean_ms(i)).collect(),
        })
        .collect();
    b.push_str("<h2>Last 15 minutes</h2><div class=\"charts\">");
    b.push_str(&bar_chart("Requests answered", SLOTS, &answered, &x));
    b.push_str(&line_chart("Mean latency", SLOTS, &latency, "ms", &x));
    b.push_str("</div>");
}

fn confidence(b: &mut String, h: &Snapshot) {
    let judged: u64 = h.confidence.iter().sum();
    let series = [Series {
        name: "local inferences",
        colour: "#2e7d32",
        values: h.confidence.iter().map(|&c| Some(c as f64)).collect(),
    }];
    let share = if judged == 0 {
        "-".to_owned()
    } else {
        format!("{:.1}%", h.below_threshold as f64 * 100.0 / judged as f64)
    };
    let _ = write!(
        b,
        "<h2>Top-1 confidence since start</h2><div class=\"charts\">{}</div>\
         <p>Below <code>offload.min_confidence</code> ({:.2}): <b id=\"below-share\">{share}</b> of {judged} local inferences.</p>",
        bar_chart(
            "Top-1 score of local inferences",
            BINS,
            &series,
            &format!("0 to 1, {BINS} bins")
        ),
        h.min_confidence
    );
}

fn recent(b: &mut String, h: &Snapshot) {
    let _ = write!(b, "<h2>Last {} requests</h2>", h.recent.len());
    if h.recent.is_empty() {
        b.push_str("<p class=\"muted\">None since start.</p>");
        return;
    }
    let images = h.recent_images > 0;
    b.push_str("<table id=\"recent\"><tr>");
    if images {
        b.push_str("<th>image</th>");
    }
    b.push_str("<th>id</th><th>top-1</th><th>score</th><th>source</th><th>reason</th><th>total ms</th></tr>");
    for r in &h.recent {
        b.push_str("<tr>");
        if images {
            match h.images.iter().find(|(n, _)| *n == r.n) {
                Some((_, png)) => {
                    let data = base64::engine::general_purpose::STANDARD.encode(png);
                    let _ = write!(
                        b,
                        "<td><img class=\"thumb\" alt=\"\" src=\"data:image/png;base64,{data}\"></td>"
                    );
                }
                None => b.push_str("<td></td>"),
            }
        }
        let (label, score) = match &r.error {
            Some((code, message)) => (
                format!("<span class=\"bad\">{}: {}</span>", esc(code), esc(message)),
                "-".into(),
            ),
            None => (
                esc(r.label.as_deref().unwrap_or("-")),
                r.score.map(|s| format!("{s:.3}")).unwrap_or_else(|| "-".into()),
            ),
        };
        let _ = write!(
            b,
            "<td>{}</td><td>{label}</td><td class=\"n\">{score}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td></tr>",
            esc(&r.id),
            esc(&r.source),
            esc(&r.reason),
            num(r.total_ms)
        );
    }
    b.push_str("</table>");
}

#[cfg(test)]
mod tests {
    use super::super::history::History;
    use super::*;

    #[test]
    fn strings_from_the_network_render_as_text() {
        let status = serde_json::json!({
            "device": "<script>alert(1)</script>", "state": "online\"><script>",
            "model": {"name": "<img src=x onerror=alert(1)>", "version": "1"},
            "model_reload": {"command": "reload", "state": "failed", "kind": "fetch_failed",
                             "reason": "<script>r</script>", "source": "http://x/<b>"},
            "answered": {"local": 1, "cluster": 0, "errors": 0},
            "last_error": {"code": "internal", "message": "<script>e</script>"},
            "mqtt_connected": true,
        });
        let h = History::new(2, 0.5);
        let reply = serde_json::json!({"id": "<script>id</script>", "source": "local", "reason": "x",
            "top": [{"label": "<script>label</script>", "score": 0.5}]});
        h.answered(0, &serde_json::to_vec(&reply).unwrap());
        let page = render(&status, &h.snapshot(0));
        assert_eq!(
            page.matches("<script>").count(),
            1,
            "only the page's own script: {page}"
        );
        for s in [
            "&lt;script&gt;alert(1)&lt;/script&gt;",
            "&lt;script&gt;label",
            "&lt;script&gt;id",
            "&lt;script&gt;e",
            "&lt;img src=x",
        ] {
            assert!(page.contains(s), "{s} missing");
        }
    }

    #[test]
    fn a_fresh_agent_renders_without_history() {
        let status =
            serde_json::json!({"device": "cam1", "state": "online", "model": {"name": "m", "version": "2"}});
        let page = render(&status, &History::new(0, 0.0).snapshot(0));
        assert!(page.contains("<span id=\"model\">m 2</span>"));
        assert!(page.contains("None since start."));
    }
}
