//! HTML building blocks shared by the device page and the fleet dashboard: escaping, the page
//! shell (inline style, the refresh script and its Content-Security-Policy), and small
//! server-rendered SVG charts. No external assets: devices are often offline.

use std::fmt::Write as _;

use base64::Engine;
use sha2::{Digest, Sha256};

/// `s` as HTML text or a quoted attribute value: every string that came from the network goes
/// through here.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// The CSS class of a device state: known states only, so no network string ever lands in
/// an attribute.
pub fn state_class(state: &str) -> &'static str {
    match state {
        "online" => "online",
        "backpressure" => "backpressure",
        "draining" => "draining",
        "drained" => "drained",
        "shutting_down" => "shutting_down",
        "offline" => "offline",
        _ => "unknown",
    }
}

/// At most `max` characters of `s` (memory bound for strings kept from the network).
pub fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// Seconds between refreshes of both pages.
pub const REFRESH_SECS: u32 = 5;

/// The refresh script: polls the page's JSON endpoint (`data-api` on `<body>`) and reloads
/// when it answers, unless the operator is typing in a form field; a banner says when the
/// endpoint stops answering. Without JavaScript the `<noscript>` meta refresh does the same.
const SCRIPT: &str = "(function(){var b=document.body,s=document.getElementById('stale');\
setInterval(function(){var a=document.activeElement;if(a&&a.tagName==='INPUT')return;\
fetch(b.dataset.api,{cache:'no-store'}).then(function(r){if(!r.ok)throw r.status;location.reload();})\
.catch(function(){s.hidden=false;});},5000);})();";

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:1em 2em;color:#222;background:#fafafa}\
h1{font-size:1.4em;margin:.2em 0}h2{font-size:1.1em;margin:1.2em 0 .4em}\
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}\
th a{color:inherit}#fleet td:not(:last-child){white-space:nowrap}td.n{text-align:right;font-variant-numeric:tabular-nums}\
.kv td:first-child{color:#555}.pill{display:inline-block;padding:0 .5em;border-radius:.6em;color:#fff;background:#777}\
.pill.online{background:#2e7d32}.pill.backpressure{background:#ef6c00}.pill.draining,.pill.drained{background:#1565c0}\
.pill.shutting_down{background:#6a1b9a}.pill.offline{background:#bdbdbd}.bad{color:#b71c1c}\
tr.offline td{color:#9e9e9e;background:#f0f0f0}#stale{background:#b71c1c;color:#fff;padding:.3em .6em}\
.charts{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0;background:#fff;border:1px solid #ddd;padding:.4em}\
figcaption{font-weight:600;margin-bottom:.2em}.legend span{margin-right:1em}.muted{color:#777}\
img.thumb{max-width:96px;max-height:96px;display:block}";

/// The `Content-Security-Policy` of both pages: nothing but this inline style and script,
/// `data:` images (thumbnails), and fetches to this origin.
pub fn content_security_policy() -> String {
    let hash = |s: &str| base64::engine::general_purpose::STANDARD.encode(Sha256::digest(s.as_bytes()));
    format!(
        "default-src 'none'; style-src 'sha256-{}'; script-src 'sha256-{}'; img-src data:; \
         connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
        hash(STYLE),
        hash(SCRIPT)
    )
}

/// A whole page: `title` (escaped here), `api` (the JSON endpoint the script polls) and the
/// body's HTML (already escaped by the caller).
pub fn page(title: &str, api: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\"><title>{title}</title>\
         <noscript><meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\"></noscript>\
         <style>{STYLE}</style></head><body data-api=\"{api}\">\
         <div id=\"stale\" hidden>Not answering: the figures below are from the last refresh.</div>\
         {body}<script>{SCRIPT}</script></body></html>\n",
        title = esc(title),
        api = esc(api),
    )
}

/// `n` with at most one decimal (none when whole), `-` when absent.
pub fn num(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 => format!("{v:.0}"),
        Some(v) if v.is_finite() => format!("{v:.1}"),
        _ => "-".into(),
    }
}

/// A duration in seconds, short: `42 s`, `7 min`, `3 h`, `2 d`.
pub fn age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{} h", s / 3600),
        s => format!("{} d", s / 86_400),
    }
}

/// One series of a chart.
pub struct Series<'a> {
    pub name: &'a str,
    pub colour: &'a str,
    /// One value per slot, oldest first; `None` where there is no data.
    pub values: Vec<Option<f64>>,
}

const W: f64 = 540.0;
const H: f64 = 110.0;

/// Stacked bars (counts per slot), with a legend and the maximum on the y axis.
pub fn bar_chart(title: &str, slots: usize, series: &[Series<'_>], x_label: &str) -> String {
    let slots = slots.max(1);
    let totals: Vec<f64> = (0..slots)
        .map(|i| {
            series
                .iter()
                .map(|s| s.values.get(i).copied().flatten().unwrap_or(0.0))
                .sum()
        })
        .collect();
    let max = totals.iter().copied().fold(0.0, f64::max).max(1.0);
    let bw = W / slots as f64;
    let mut svg = String::new();
    for i in 0..slots {
        let mut y = H;
        for s in series {
            let v = s.values.get(i).copied().flatten().unwrap_or(0.0);
            if v <= 0.0 {
                continue;
            }
            let h = v / max * H;
            y -= h;
            let _ = write!(
                svg,
                "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{}\"><title>{}: {}</title></rect>",
                i as f64 * bw,
                (bw - 1.0).max(1.0),
                s.colour,
                esc(s.name),
                num(Some(v))
            );
        }
    }
    figure(title, &num(Some(max)), &svg, series, x_label)
}

/// Lines (one per series), gaps where a slot has no data.
pub fn line_chart(title: &str, slots: usize, series: &[Series<'_>], unit: &str, x_label: &str) -> String {
    let slots = slots.max(1);
    let max = series
        .iter()
        .flat_map(|s| s.values.iter().copied().flatten())
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    let max = if max > 0.0 { max } else { 1.0 };
    let step = W / slots as f64;
    let mut svg = String::new();
    for s in series {
        let mut points = String::new();
        let flush = |svg: &mut String, points: &mut String| {
            if let Some((x, y)) = points
                .trim_end()
                .split_once(',')
                .filter(|_| !points.trim_end().contains(' '))
            {
                // A lone point: a dot, as a one-point line would not show.
                let _ = write!(
                    svg,
                    "<circle cx=\"{x}\" cy=\"{y}\" r=\"2\" fill=\"{}\"><title>{}</title></circle>",
                    s.colour,
                    esc(s.name)
                );
                points.clear();
            } else if !points.is_empty() {
                let _ = write!(
                    svg,
                    "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\" points=\"{}\"><title>{}</title></polyline>",
                    s.colour,
                    points.trim_end(),
                    esc(s.name)
                );
                points.clear();
            }
        };
        for (i, v) in s.values.iter().enumerate().take(slots) {
            match v {
                Some(v) if v.is_finite() => {
                    let x = (i as f64 + 0.5) * step;
                    let y = H - v / max * H;
                    let _ = write!(points, "{x:.1},{y:.1} ");
                }
                _ => flush(&mut svg, &mut points),
            }
        }
        flush(&mut svg, &mut points);
    }
    figure(
        title,
        &format!("{} {unit}", num(Some(max))),
        &svg,
        series,
        x_label,
    )
}

fn figure(title: &str, max_label: &str, inner: &str, series: &[Series<'_>], x_label: &str) -> String {
    let mut legend = String::new();
    for s in series {
        let _ = write!(
            legend,
            "<span><svg width=\"10\" height=\"10\"><rect width=\"10\" height=\"10\" fill=\"{}\"/></svg> {}</span>",
            s.colour,
            esc(s.name)
        );
    }
    format!(
        "<figure><figcaption>{}</figcaption>\
         <svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{}\" viewBox=\"0 0 {W} {}\" role=\"img\">\
         <rect width=\"{W}\" height=\"{H}\" fill=\"#fff\" stroke=\"#ccc\"/>{inner}\
         <text x=\"2\" y=\"10\" font-size=\"10\" fill=\"#555\">{}</text>\
         <text x=\"2\" y=\"{}\" font-size=\"10\" fill=\"#555\">{}</text></svg>\
         <div class=\"legend\">{legend}</div></figure>",
        esc(title),
        H + 14.0,
        H + 14.0,
        esc(max_label),
        H + 12.0,
        esc(x_label),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_from_the_network_is_text() {
        assert_eq!(
            esc("<script>alert('x')</script> & \"q\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
        assert_eq!(esc("a\u{0}b\nc"), "a\u{fffd}b\u{fffd}c");
    }

    #[test]
    fn clip_bounds_characters_not_bytes() {
        assert_eq!(clip("héllo", 3), "hél…");
        assert_eq!(clip("hi", 3), "hi");
    }

    #[test]
    fn the_policy_names_the_exact_inline_style_and_script() {
        let csp = content_security_policy();
        assert!(csp.contains("script-src 'sha256-"), "{csp}");
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        let page = page("<t>", "/api/x", "");
        assert!(page.contains(&format!("<script>{SCRIPT}</script>")));
        assert!(page.contains(&format!("<style>{STYLE}</style>")));
        assert!(page.contains("<title>&lt;t&gt;</title>"));
    }

    #[test]
    fn charts_escape_names_and_survive_empty_data() {
        let s = [Series {
            name: "<b>",
            colour: "#000",
            values: vec![None, Some(2.0), Some(f64::NAN)],
        }];
        let bars = bar_chart("t", 3, &s, "15 min");
        assert!(bars.contains("&lt;b&gt;") && !bars.contains("<b>"));
        let lines = line_chart("t", 3, &s, "ms", "15 min");
        assert!(lines.contains("<circle"), "a lone point is a dot: {lines}");
        let two = [Series {
            name: "x",
            colour: "#000",
            values: vec![Some(1.0), Some(2.0)],
        }];
        assert!(line_chart("t", 2, &two, "ms", "").contains("<polyline"));
        assert!(line_chart("t", 0, &[], "ms", "").contains("<svg"));
    }
}
