//! The edge bundle format and the inference runtime shared by `edge-agent` (daemon, pool,
//! one-shot classify) and `edge-convert`, plus (feature `convert`) the converter itself.

pub mod bundle;
pub mod preprocess;
pub mod runtime;

#[cfg(feature = "convert")]
pub mod convert;
#[cfg(feature = "convert")]
pub mod tf;

/// An error and its causes on one line, each cause once: typed errors here often repeat their
/// source's text in their own message, which a plain `{:#}` would print twice.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        next = e.source();
    }
    out
}
