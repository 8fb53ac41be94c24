//! `graph.nnef` parsed on other threads while tract reads the tensors.
//!
//! tract's NNEF parser re-parses an expression once per level of nesting that is not a
//! subscript (`sub` tries `atom "[" ...` first, then `atom` again), so its time grows with
//! 2^depth: Inception V3's 145 KB graph took 72 ms, a fifth of a restart, more than reading its
//! 95 MB of weights. The parser is tract's all the same: [`GraphLoader`] takes `graph.nnef`
//! before tract's own loader, hands tract the document with an empty graph body, and parses
//! the body's statements with tract's `parse_assignments` in [`threads`] chunks on threads of
//! their own, which run while tract reads the `.dat` entries after it; [`take_body`] joins
//! them once tract is done. A text it cannot split goes to tract's loader untouched.

use std::cell::RefCell;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use tract_nnef::ast::Assignment;
use tract_nnef::internal::*;
use tract_nnef::resource::{GRAPH_NNEF_FILENAME, GraphNnef, Resource, ResourceLoader};

/// Chunks (and threads) the body is parsed in.
const MAX_THREADS: usize = 4;

/// One chunk's statements: being parsed on a thread, or parsed already (no thread could be
/// started for it).
enum Parse {
    Thread(JoinHandle<TractResult<Vec<Assignment>>>),
    Done(TractResult<Vec<Assignment>>),
}

thread_local! {
    /// The body being parsed for the load running on this thread (tract calls the loader on
    /// the thread that reads the model).
    static PENDING: RefCell<Option<Vec<Parse>>> = const { RefCell::new(None) };
}

/// Byte ranges of a document: everything up to the graph body's `{` included, the body, and
/// from its `}` on.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Split {
    pub(super) open: usize,
    pub(super) close: usize,
    /// Where each statement ends (after its `;`), in order.
    pub(super) ends: Vec<usize>,
}

/// Finds the graph body of an NNEF document: the `{ ... }` after the `graph` keyword that
/// starts a top-level declaration (after `;` or `}`, not a parameter of that name), skipping
/// strings and comments; `None` when the text is not that shape.
pub(super) fn split(text: &str) -> Option<Split> {
    let bytes = text.as_bytes();
    let (mut i, mut depth) = (0, 0usize);
    let mut graph_seen = false;
    let mut open = None;
    let mut ends = Vec::new();
    // The last byte outside comments and whitespace before `i`.
    let mut last: Option<u8> = None;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            quote @ (b'"' | b'\'') => {
                i += 1;
                while i < bytes.len() && bytes[i] != quote {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                if i >= bytes.len() {
                    return None;
                }
            }
            b'{' => {
                if depth == 0 && graph_seen && open.is_none() {
                    open = Some(i);
                }
                depth += 1;
            }
            b'}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0
                    && let Some(open) = open
                {
                    return Some(Split { open, close: i, ends });
                }
            }
            b';' if depth == 1 && open.is_some() => ends.push(i + 1),
            b'g' if depth == 0
                && !graph_seen
                && matches!(last, None | Some(b';' | b'}'))
                && text[i..].starts_with("graph")
                && bytes.get(i + 5).is_none_or(|b| !is_word(*b)) =>
            {
                graph_seen = true;
            }
            _ => {}
        }
        if !b.is_ascii_whitespace() {
            last = Some(b);
        }
        i += 1;
    }
    None
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The body's statements in at most `n` chunks of about equal length, as text: together the
/// whole body (what follows the last statement belongs to the last chunk, so that anything
/// but comments there fails its parse as it fails tract's). Empty when the body has no
/// statement.
fn chunks<'t>(text: &'t str, split: &Split, n: usize) -> Vec<&'t str> {
    let body_start = split.open + 1;
    let total = split.close - body_start;
    let Some(&last) = split.ends.last() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut start = body_start;
    for &end in &split.ends {
        let done = end - body_start;
        if end != last && done * n >= total * (out.len() + 1) {
            out.push(&text[start..end]);
            start = end;
        }
    }
    out.push(&text[start..split.close]);
    out
}

/// Threads to parse on: the cores, at most [`MAX_THREADS`].
fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_THREADS))
}

/// Takes `graph.nnef` before tract's own loader (see the module doc).
#[derive(Debug)]
pub(super) struct GraphLoader;

impl ResourceLoader for GraphLoader {
    fn name(&self) -> StaticName {
        "EdgeGraphLoader".into()
    }

    fn try_load(
        &self,
        path: &Path,
        reader: &mut dyn std::io::Read,
        _framework: &tract_nnef::framework::Nnef,
    ) -> TractResult<Option<(String, Arc<dyn Resource>)>> {
        // The model's own graph only (a sub-model's would be `name/graph.nnef`).
        if path != Path::new(GRAPH_NNEF_FILENAME) {
            return Ok(None);
        }
        let mut text = String::new();
        reader.read_to_string(&mut text)?;
        let key = path.to_string_lossy().to_string();
        let split = split(&text);
        let chunks = split
            .as_ref()
            .map(|s| chunks(&text, s, threads()))
            .unwrap_or_default();
        let Some(split) = split.filter(|_| !chunks.is_empty()) else {
            return Ok(Some((key, Arc::new(GraphNnef(text)))));
        };
        let parses = chunks
            .into_iter()
            .map(|chunk| {
                let owned = chunk.to_owned();
                std::thread::Builder::new()
                    .name("edge-nnef-parse".into())
                    .spawn(move || tract_nnef::ast::parse::parse_assignments(&owned))
                    .map_or_else(
                        |_| Parse::Done(tract_nnef::ast::parse::parse_assignments(chunk)),
                        Parse::Thread,
                    )
            })
            .collect();
        PENDING.with(|p| *p.borrow_mut() = Some(parses));
        let head = format!("{}{}", &text[..=split.open], &text[split.close..]);
        Ok(Some((key, Arc::new(GraphNnef(head)))))
    }
}

/// The graph body [`GraphLoader`] parsed for the load on this thread, if it split one off;
/// call after every `proto_model_for_read`, failed or not.
pub(super) fn take_body() -> Option<TractResult<Vec<Assignment>>> {
    let parses = PENDING.with(|p| p.borrow_mut().take())?;
    let mut body = Vec::new();
    for parse in parses {
        let part = match parse {
            Parse::Thread(thread) => thread
                .join()
                .unwrap_or_else(|_| Err(format_err!("the graph parser panicked"))),
            Parse::Done(part) => part,
        };
        match part {
            Ok(part) => body.extend(part),
            Err(e) => return Some(Err(e)),
        }
    }
    Some(Ok(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"version 1.0;

extension tract_registry tract_core;

# a comment with { braces } and a ; and the word graph
fragment f(x: tensor<scalar>) -> (y: tensor<scalar>)
{
  y = x;
}

graph network(input) -> (out) {
  input = external(shape = [1, 4]);
  w = variable<scalar>(label = "we;ird {label} \" graph", shape = [4, 2]);
  # } not the end
  m = matmul(input, w, transposeA = false, transposeB = false);
  p = conv(m, w, padding = [(0, 0), (1, 1)], label = 'a;b');
  out = f(p);
}
"#;

    #[test]
    fn the_body_is_found_past_strings_comments_and_fragments() {
        let s = split(DOC).unwrap();
        assert!(DOC[..s.open].ends_with("-> (out) "), "{}", &DOC[..=s.open]);
        assert_eq!(DOC[s.close..].trim(), "}");
        assert_eq!(s.ends.len(), 5, "five statements: {:?}", s.ends);
        assert!(s.ends.iter().all(|&e| DOC.as_bytes()[e - 1] == b';'));
        assert_eq!(split("version 1.0; fragment f() -> () { }"), None, "no graph");
        // A parameter named `graph` does not start the graph.
        let named = "version 1.0;\nfragment f(graph: tensor<scalar>) -> (y: tensor<scalar>) { y = graph; }\ngraph g(x) -> (y) { y = f(x); }";
        let s = split(named).unwrap();
        assert!(
            named[..s.open].ends_with("graph g(x) -> (y) "),
            "{}",
            &named[..=s.open]
        );
        assert_eq!(split("graph g() -> () { x = \"open;"), None, "open string");
    }

    #[test]
    fn a_statement_that_does_not_parse_is_an_error_of_the_load() {
        let nnef = tract_nnef::nnef();
        let load = |text: &str| {
            let path = Path::new(GRAPH_NNEF_FILENAME);
            let loaded = GraphLoader.try_load(path, &mut text.as_bytes(), &nnef).unwrap();
            let (key, resource) = loaded.unwrap();
            assert_eq!(key, GRAPH_NNEF_FILENAME);
            let head = resource.downcast_arc::<GraphNnef>().unwrap();
            (head.0.clone(), take_body())
        };
        let (head, body) = load(DOC);
        assert!(
            !head.contains("matmul"),
            "the body is not in what tract parses: {head}"
        );
        assert_eq!(body.unwrap().unwrap().len(), 5);
        assert!(take_body().is_none(), "taken once");
        let broken = DOC.replace("out = f(p);", "out = f(p;");
        let (_, body) = load(&broken);
        assert!(body.unwrap().is_err());
        // Not the model's own graph: left to tract's loader.
        let other = GraphLoader.try_load(Path::new("sub/graph.nnef"), &mut DOC.as_bytes(), &nnef);
        assert!(other.unwrap().is_none());
    }

    #[test]
    fn what_follows_the_last_statement_is_parsed_with_it() {
        let s = split(DOC).unwrap();
        for n in 1..=6 {
            let parts = chunks(DOC, &s, n);
            assert_eq!(
                parts.concat(),
                DOC[s.open + 1..s.close],
                "{n} chunks cover the body"
            );
        }
        // A comment with a `;` after the last statement parses; anything else fails.
        let commented = DOC.replace("  out = f(p);\n", "  out = f(p);\n  # done; really\n");
        let s = split(&commented).unwrap();
        let parsed: usize = chunks(&commented, &s, 3)
            .into_iter()
            .map(|c| tract_nnef::ast::parse::parse_assignments(c).unwrap().len())
            .sum();
        assert_eq!(parsed, 5);
        let junk = DOC.replace("  out = f(p);\n", "  out = f(p);\n  junk\n");
        let s = split(&junk).unwrap();
        let last = chunks(&junk, &s, 3).pop().unwrap();
        assert!(tract_nnef::ast::parse::parse_assignments(last).is_err());
        // No statement at all: left to tract, which refuses this one.
        let s = split("graph g() -> () { junk }").unwrap();
        assert!(chunks("graph g() -> () { junk }", &s, 2).is_empty());
    }

    #[test]
    fn chunks_parse_to_the_same_document_as_tract() {
        let whole = tract_nnef::ast::parse::parse_document(DOC).unwrap();
        let s = split(DOC).unwrap();
        for n in 1..=6 {
            let parts = chunks(DOC, &s, n);
            assert!(!parts.is_empty() && parts.len() <= n, "{n}: {parts:?}");
            let mut body = Vec::new();
            for part in parts {
                body.extend(tract_nnef::ast::parse::parse_assignments(part).unwrap());
            }
            let head = format!("{}{}", &DOC[..=s.open], &DOC[s.close..]);
            let mut doc = tract_nnef::ast::parse::parse_document(&head).unwrap();
            assert!(doc.graph_def.body.is_empty());
            doc.graph_def.body = body;
            assert_eq!(doc, whole, "{n} chunks");
        }
    }
}
