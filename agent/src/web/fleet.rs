//! The fleet dashboard (`edge-agent fleet-status --serve ADDR`): one row per device from the
//! retained statuses on `<prefix>/+/status`, sortable and filterable through the query string
//! (so it works without JavaScript), counts per state and per model version, devices whose
//! last will said offline greyed. `/api/fleet` is the same data as JSON. Read-only.
//!
//! Bounded: at most `MAX_DEVICES` rows, each a few clipped strings and numbers (the status
//! document itself is not kept).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Mutex;

use serde::Serialize;
use serde_json::Value;

use super::html::{age, clip, esc, page, state_class};

/// Devices listed at most; statuses of further devices are counted and dropped.
pub const MAX_DEVICES: usize = 10_000;
const MAX_TEXT: usize = 200;
/// Characters of the filter kept from the query string.
const MAX_FILTER: usize = 100;

/// One device, from its last status.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub device: String,
    pub state: String,
    pub model: String,
    pub version: String,
    pub queued: u64,
    pub local: Option<u64>,
    pub cluster: Option<u64>,
    pub errors: Option<u64>,
    /// `breaker, n healthy`, or `None` with offload off (or unknown).
    pub pool: Option<String>,
    pub last_error: Option<String>,
    /// When the status was published (its own clock, for a retained one) or received.
    pub at_ms: u64,
}

impl Row {
    /// A row from a status document received at `now_ms` on the topic of `device`.
    pub fn from_status(device: &str, doc: &Value, retained: bool, now_ms: u64) -> Row {
        let s = |v: &Value| v.as_str().map(|s| clip(s, MAX_TEXT)).unwrap_or_default();
        let q = &doc["queue"];
        let published = doc["started_at_ms"]
            .as_u64()
            .zip(doc["uptime_s"].as_u64())
            .map(|(start, up)| start.saturating_add(up.saturating_mul(1000)));
        let at_ms = match published {
            // A retained status may be old: its own clock says when (never in the future).
            Some(p) if retained => p.min(now_ms),
            _ => now_ms,
        };
        Row {
            device: clip(device, MAX_TEXT),
            state: match s(&doc["state"]) {
                st if st.is_empty() => "unknown".into(),
                st => st,
            },
            model: s(&doc["model"]["name"]),
            version: s(&doc["model"]["version"]),
            queued: q["pending"].as_u64().unwrap_or(0) + q["leased"].as_u64().unwrap_or(0),
            local: doc["answered"]["local"].as_u64(),
            cluster: doc["answered"]["cluster"].as_u64(),
            errors: doc["answered"]["errors"].as_u64(),
            pool: doc["pool"].as_object().map(|p| {
                format!(
                    "{}, {} healthy",
                    clip(p.get("breaker").and_then(Value::as_str).unwrap_or("?"), MAX_TEXT),
                    p.get("healthy_endpoints").and_then(Value::as_u64).unwrap_or(0)
                )
            }),
            last_error: doc["last_error"].as_object().map(|e| {
                let code = e.get("code").and_then(Value::as_str).unwrap_or("");
                let message = e.get("message").and_then(Value::as_str).unwrap_or("");
                clip(&format!("{code}: {message}"), MAX_TEXT)
            }),
            at_ms,
        }
    }

    fn matches(&self, filter: &str) -> bool {
        let f = filter.to_lowercase();
        [&self.device, &self.state, &self.model, &self.version]
            .iter()
            .any(|s| s.to_lowercase().contains(&f))
            || self
                .last_error
                .as_ref()
                .is_some_and(|e| e.to_lowercase().contains(&f))
    }
}

/// Every device's row, updated by the subscription and read by the HTTP server.
#[derive(Debug, Default)]
pub struct Fleet {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    rows: HashMap<String, Row>,
    dropped: u64,
    connected: bool,
    broker: String,
}

/// Columns the table sorts by (`?sort=`).
pub const COLUMNS: [(&str, &str); 9] = [
    ("device", "device"),
    ("state", "state"),
    ("model", "model"),
    ("queued", "queued"),
    ("local", "local"),
    ("cluster", "cluster"),
    ("errors", "errors"),
    ("pool", "pool"),
    ("age", "status age"),
];

/// How to list: `?sort=<column>&desc=1&q=<filter>`.
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct Query {
    #[serde(default)]
    pub sort: String,
    #[serde(default)]
    pub desc: Option<String>,
    #[serde(default)]
    pub q: String,
}

/// What `/api/fleet` returns and the page shows.
#[derive(Debug, Serialize)]
pub struct View {
    pub broker: String,
    pub connected: bool,
    pub devices: Vec<Row>,
    pub by_state: BTreeMap<String, u64>,
    pub by_model: BTreeMap<String, u64>,
    /// Statuses ignored because `MAX_DEVICES` were listed already.
    pub dropped: u64,
}

impl Fleet {
    pub fn new(broker: &str) -> Self {
        Fleet {
            inner: Mutex::new(Inner {
                broker: broker.to_owned(),
                ..Inner::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn set_connected(&self, connected: bool) {
        self.lock().connected = connected;
    }

    /// A status on `<prefix>/<device>/status`; an empty payload (a cleared retained
    /// status) removes the device. Errors name what was wrong with the payload.
    pub fn update(&self, device: &str, payload: &[u8], retained: bool, now_ms: u64) -> Result<(), String> {
        let mut g = self.lock();
        if payload.is_empty() {
            g.rows.remove(device);
            return Ok(());
        }
        let doc: Value =
            serde_json::from_slice(payload).map_err(|e| format!("not a status document: {e}"))?;
        if !doc.is_object() {
            return Err("not a status document: not a JSON object".into());
        }
        let row = Row::from_status(device, &doc, retained, now_ms);
        if g.rows.len() >= MAX_DEVICES && !g.rows.contains_key(device) {
            g.dropped += 1;
            return Err(format!("more than {MAX_DEVICES} devices: not listed"));
        }
        g.rows.insert(device.to_owned(), row);
        Ok(())
    }

    /// The rows filtered and sorted as `query` says, with the counts (of every device).
    pub fn view(&self, query: &Query) -> View {
        let g = self.lock();
        let mut by_state = BTreeMap::new();
        let mut by_model = BTreeMap::new();
        for r in g.rows.values() {
            *by_state.entry(r.state.clone()).or_insert(0) += 1;
            *by_model.entry(format!("{} {}", r.model, r.version)).or_insert(0) += 1;
        }
        let filter = clip(query.q.trim(), MAX_FILTER);
        let mut devices: Vec<Row> = g.rows.values().filter(|r| r.matches(&filter)).cloned().collect();
        devices.sort_by(|a, b| {
            let key = match query.sort.as_str() {
                "state" => a.state.cmp(&b.state),
                "model" => (&a.model, &a.version).cmp(&(&b.model, &b.version)),
                "queued" => a.queued.cmp(&b.queued),
                "local" => a.local.cmp(&b.local),
                "cluster" => a.cluster.cmp(&b.cluster),
                "errors" => a.errors.cmp(&b.errors),
                "pool" => a.pool.cmp(&b.pool),
                "age" => b.at_ms.cmp(&a.at_ms),
                _ => std::cmp::Ordering::Equal,
            };
            key.then_with(|| a.device.cmp(&b.device))
        });
        if query.desc.is_some() {
            devices.reverse();
        }
        View {
            broker: g.broker.clone(),
            connected: g.connected,
            devices,
            by_state,
            by_model,
            dropped: g.dropped,
        }
    }
}

/// The dashboard page.
pub fn render(view: &View, query: &Query, now_ms: u64) -> String {
    let filter = clip(query.q.trim(), MAX_FILTER);
    let mut b = String::new();
    let _ = write!(
        b,
        "<h1>Fleet <span class=\"muted\">{} device(s) on {}</span></h1>",
        view.by_state.values().sum::<u64>(),
        esc(&view.broker)
    );
    if !view.connected {
        b.push_str("<p class=\"bad\" id=\"disconnected\">Not connected to the broker: the rows are the last statuses received.</p>");
    }
    b.push_str("<p id=\"by-state\">By state: ");
    for (state, n) in &view.by_state {
        let _ = write!(
            b,
            "<span class=\"pill {}\">{}</span> {n} &nbsp;",
            state_class(state),
            esc(state)
        );
    }
    b.push_str("</p><p id=\"by-model\">By model version: ");
    for (model, n) in &view.by_model {
        let _ = write!(b, "<b>{}</b> {n} &nbsp;", esc(model));
    }
    b.push_str("</p>");
    if view.dropped > 0 {
        let _ = write!(
            b,
            "<p class=\"bad\">{} status(es) ignored: over {MAX_DEVICES} devices.</p>",
            view.dropped
        );
    }
    let _ = write!(
        b,
        "<form method=\"get\"><input type=\"hidden\" name=\"sort\" value=\"{}\">\
         <input type=\"search\" name=\"q\" value=\"{}\" placeholder=\"filter: device, state, model, error\" size=\"40\"> \
         <button>Filter</button></form><p></p>",
        esc(&query.sort),
        esc(&filter)
    );
    b.push_str("<table id=\"fleet\"><tr>");
    for (key, title) in COLUMNS {
        let desc = query.sort == key && query.desc.is_none();
        let arrow = match (query.sort == key, query.desc.is_some()) {
            (true, false) => " ▲",
            (true, true) => " ▼",
            _ => "",
        };
        let _ = write!(
            b,
            "<th><a href=\"?sort={key}{}&amp;q={}\">{title}</a>{arrow}</th>",
            if desc { "&amp;desc=1" } else { "" },
            url_encode(&filter)
        );
    }
    b.push_str("<th>last error</th></tr>");
    for r in &view.devices {
        let n = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
        let _ = write!(
            b,
            "<tr class=\"{class}\"><td>{device}</td><td><span class=\"pill {class}\">{state}</span></td>\
             <td>{} {}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td>{}</td><td class=\"n\">{}</td><td class=\"bad\">{}</td></tr>",
            esc(&r.model),
            esc(&r.version),
            r.queued,
            n(r.local),
            n(r.cluster),
            n(r.errors),
            esc(r.pool.as_deref().unwrap_or("-")),
            age(now_ms.saturating_sub(r.at_ms) / 1000),
            esc(r.last_error.as_deref().unwrap_or("")),
            class = state_class(&r.state),
            state = esc(&r.state),
            device = esc(&r.device),
        );
    }
    b.push_str("</table><p class=\"muted\">Read-only. JSON: <a href=\"/api/fleet\">/api/fleet</a>.</p>");
    page("Fleet · edge-agent", "/api/fleet", &b)
}

/// `s` for a query-string value.
fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            b => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(state: &str, version: &str, local: u64) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "device": "ignored", "state": state, "model": {"name": "effnet", "version": version},
            "queue": {"pending": 2, "leased": 1}, "answered": {"local": local, "cluster": 0, "errors": 0},
            "started_at_ms": 1_000_000u64, "uptime_s": 10,
        }))
        .unwrap()
    }

    #[test]
    fn rows_sort_filter_and_count_per_state_and_version() {
        let f = Fleet::new("mqtt://b:1883");
        f.update("cam1", &status("online", "1", 5), false, 2_000_000)
            .unwrap();
        f.update("cam2", &status("offline", "2", 9), false, 2_000_000)
            .unwrap();
        f.update("cam3", &status("online", "2", 1), true, 2_000_000)
            .unwrap();
        let v = f.view(&Query {
            sort: "local".into(),
            ..Query::default()
        });
        let order: Vec<&str> = v.devices.iter().map(|r| r.device.as_str()).collect();
        assert_eq!(order, ["cam3", "cam1", "cam2"]);
        assert_eq!(v.by_state.get("online"), Some(&2));
        assert_eq!(v.by_model.get("effnet 2"), Some(&2));
        assert_eq!(v.devices[0].queued, 3);
        // A retained status is as old as its own clock says; a live one is new.
        assert_eq!(v.devices[0].at_ms, 1_010_000);
        assert_eq!(v.devices[1].at_ms, 2_000_000);
        let desc = f.view(&Query {
            sort: "local".into(),
            desc: Some("1".into()),
            ..Query::default()
        });
        assert_eq!(desc.devices[0].device, "cam2");
        let filtered = f.view(&Query {
            q: "OFFLINE".into(),
            ..Query::default()
        });
        assert_eq!(filtered.devices.len(), 1);
        assert_eq!(
            filtered.by_state.values().sum::<u64>(),
            3,
            "counts cover the whole fleet"
        );
        // An empty retained payload clears the device; garbage is refused.
        f.update("cam2", b"", true, 0).unwrap();
        assert!(f.update("cam4", b"<html>", false, 0).is_err());
        assert!(f.update("cam4", b"[1]", false, 0).is_err());
        assert_eq!(f.view(&Query::default()).devices.len(), 2);
    }

    #[test]
    fn the_fleet_is_bounded() {
        let f = Fleet::new("b");
        let long = "d".repeat(10_000);
        for i in 0..MAX_DEVICES + 50 {
            let _ = f.update(&format!("{long}{i}"), &status("online", "1", 0), false, 0);
        }
        let v = f.view(&Query::default());
        assert_eq!(v.devices.len(), MAX_DEVICES);
        assert_eq!(v.dropped, 50);
        assert!(v.devices.iter().all(|r| r.device.chars().count() <= MAX_TEXT + 1));
    }

    #[test]
    fn strings_from_the_network_render_as_text() {
        let f = Fleet::new("mqtt://<b>");
        let doc = serde_json::json!({"state": "<script>s</script>", "model": {"name": "<script>m</script>", "version": "\"><script>"},
            "last_error": {"code": "x", "message": "<script>e</script>"}});
        f.update(
            "<script>alert(1)</script>",
            &serde_json::to_vec(&doc).unwrap(),
            false,
            0,
        )
        .unwrap();
        let q = Query {
            q: "\"><script>q".into(),
            sort: "<x>".into(),
            desc: None,
        };
        let page = render(&f.view(&Query::default()), &q, 0);
        assert_eq!(
            page.matches("<script>").count(),
            1,
            "only the page's own script: {page}"
        );
        assert!(page.contains("<td>&lt;script&gt;alert(1)&lt;/script&gt;</td>"));
        assert!(page.contains("value=\"&quot;&gt;&lt;script&gt;q\""));
        assert!(page.contains("&q=%22%3E%3Cscript%3Eq") || page.contains("&amp;q=%22%3E%3Cscript%3Eq"));
    }
}
