//! What tract 0.23.9's NNEF reader cannot be trusted with. It trusts its input in ways a
//! hostile file exploits (found by the `bundle` fuzz target and by reading the loader; inputs
//! kept in `fuzz/regressions/bundle/`), so bundle loading refuses, cheaply and with a reason.
//!
//! Before tract reads the tar ([`check_archive`]):
//! - entries tract would load that our writer never produces: nested models (`*.nnef.tar`,
//!   `*.nnef.tgz`, `dir/graph.nnef`, which tract unpacks recursively and whose parse errors
//!   panic it), `graph.quant`, `*.safetensors`;
//! - a `.dat` tensor whose header declares more data than its entry holds: tract allocates
//!   the declared size before reading (2 GiB for a 144-byte entry);
//! - a `.dat` header tract mishandles otherwise: string tensors (allocated per declared value
//!   before reading), booleans with no data (an arithmetic overflow);
//! - a `graph.nnef` its parser would take exponential time on: the parser backtracks, doubling
//!   its work at each nesting level of brackets and prefix operators (631 bytes ending in a
//!   run of `+` took over 44 s).
//!
//! After tract's parse, before its build ([`check_document`]): transposes whose axes are not a
//! permutation.
//!
//! Entries are visited with seeks, so the weights of a real bundle are not read twice.

use std::io::{Read, Seek};

use tract_nnef::resource::{GRAPH_NNEF_FILENAME, GRAPH_QUANT_FILENAME};

use super::MANIFEST_ENTRY;

/// Largest `graph.nnef` we parse; Inception V3's is 147 KB.
const MAX_GRAPH_BYTES: u64 = 16 << 20;
/// Deepest nesting of brackets and prefix operators accepted. Inception V3's graph nests 4
/// deep; tract inlines small constants as nested arrays, one level per dimension.
const MAX_NESTING: u32 = 12;
/// Bound on the parser's work, counting 2^depth per character: 4.4 times Inception V3's
/// graph (235,635, parsed in 70 ms). tract parses deeply nested text at 2 to 3.5 us per unit
/// on our 2-core x86_64 machines, so the worst graph accepted takes a few seconds (127
/// statements 12 deep, at twice this bound, took 6 s) where an unbounded one could take
/// years (each level doubles it).
const MAX_PARSE_WORK: u64 = 1 << 20;
/// Size of an NNEF tensor file's header.
const DAT_HEADER_BYTES: usize = 128;

/// Checks every entry of the bundle (or bare NNEF tar) in `reader`.
pub(super) fn check_archive<R: Read + Seek>(reader: R) -> Result<(), String> {
    let mut archive = tar::Archive::new(reader);
    let entries = archive
        .entries_with_seek()
        .map_err(|e| format!("reading the tar: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("reading the tar: {e}"))?;
        if entry.header().entry_type().is_dir() {
            continue;
        }
        let raw = entry.path().map_err(|e| format!("reading the tar: {e}"))?;
        let name = raw.to_string_lossy();
        let name = name.strip_prefix("./").unwrap_or(&name).to_owned();
        // tract skips any path with a component starting with '.'.
        if name.split('/').any(|c| c.starts_with('.')) {
            continue;
        }
        let size = entry.size();
        if name == MANIFEST_ENTRY {
            continue;
        } else if name == GRAPH_NNEF_FILENAME {
            if size > MAX_GRAPH_BYTES {
                return Err(format!(
                    "graph.nnef is {size} bytes, more than the {MAX_GRAPH_BYTES} accepted"
                ));
            }
            let mut text = String::new();
            entry
                .read_to_string(&mut text)
                .map_err(|e| format!("reading graph.nnef: {e}"))?;
            check_graph_text(&text).map_err(|e| format!("graph.nnef: {e}"))?;
        } else if name.ends_with(".dat") {
            let mut header = [0u8; DAT_HEADER_BYTES];
            // A shorter entry is left to tract, which reports it.
            if entry.read_exact(&mut header).is_ok() {
                check_dat_header(&header, size.saturating_sub(DAT_HEADER_BYTES as u64))
                    .map_err(|e| format!("{name}: {e}"))?;
            }
        } else if name.ends_with(GRAPH_NNEF_FILENAME)
            || name.ends_with(GRAPH_QUANT_FILENAME)
            || name.ends_with(".nnef.tar")
            || name.ends_with(".nnef.tgz")
            || name.ends_with(".safetensors")
        {
            return Err(format!(
                "{name}: bundles hold one model with plain .dat tensors, not {name}"
            ));
        }
    }
    Ok(())
}

/// A tensor header (NNEF 1.0 tensor file, little-endian): its data must be in the entry, and
/// the values it declares must fit in that data (one bit per value at the least, for packed
/// booleans). String tensors, which tract allocates per value before reading, are refused.
fn check_dat_header(header: &[u8; DAT_HEADER_BYTES], data_bytes: u64) -> Result<(), String> {
    let word = |at: usize| u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]]);
    let declared_bytes = u64::from(word(4));
    if declared_bytes > data_bytes {
        return Err(format!(
            "tensor header declares {declared_bytes} data bytes, the entry holds {data_bytes}"
        ));
    }
    let rank = word(8);
    if rank > 8 {
        return Err(format!("tensor rank {rank} is more than 8"));
    }
    let item_type = u16::from_le_bytes([header[48], header[49]]);
    let vendor = u16::from_le_bytes([header[50], header[51]]);
    if vendor != 0 && item_type == 0x1000 {
        return Err("string tensors are not supported in bundles".into());
    }
    // tract computes `8 * bytes - 8` for booleans, which overflows on an empty one.
    if vendor == 0 && item_type == 5 && declared_bytes == 0 {
        return Err("a boolean tensor with no data bytes".into());
    }
    let values = (0..rank as usize)
        .map(|d| u64::from(word(12 + 4 * d)))
        .try_fold(1u64, |n, d| n.checked_mul(d));
    match values {
        Some(n) if n <= declared_bytes.saturating_mul(8).max(1) => Ok(()),
        _ => Err(format!(
            "tensor header declares {} values, more than its {declared_bytes} data bytes hold",
            values.map_or("an overflowing number of".to_owned(), |n| n.to_string())
        )),
    }
}

/// One bracket level of [`check_graph_text`]: its depth, and the prefix operators open in it.
struct Level {
    base: u32,
    prefix: u32,
}

/// Bounds the work of tract's NNEF text parser on `text`. Each `(` or `[` opens a level;
/// each prefix `+`, `-` or `!` opens one that lasts to the end of its argument (the next `,`
/// or `;`, or the closing bracket), as tract parses a prefix operator's operand as a whole
/// expression. Strings and comments are skipped. Conservative: it may count a level tract
/// would not, never the reverse.
fn check_graph_text(text: &str) -> Result<(), String> {
    parse_cost(text, MAX_NESTING, MAX_PARSE_WORK).map(|_| ())
}

/// What [`check_graph_text`] measures: the deepest nesting and the work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ParseCost {
    depth: u32,
    work: u64,
}

/// The scan behind [`check_graph_text`], with its limits as arguments.
fn parse_cost(text: &str, max_nesting: u32, max_work: u64) -> Result<ParseCost, String> {
    let bytes = text.as_bytes();
    let mut levels = vec![Level { base: 0, prefix: 0 }];
    let mut work: u64 = 0;
    let mut deepest = 0;
    // Whether the last token ends an operand, making a following '+' or '-' binary.
    let mut after_operand = false;
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let start = i;
        i += 1;
        match c {
            b' ' | b'\t' | b'\r' | b'\n' => continue,
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'"' | b'\'' => {
                while i < bytes.len() && bytes[i] != c {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i = (i + 1).min(bytes.len());
                after_operand = true;
            }
            b'(' | b'[' => {
                let depth = depth(&levels) + 1;
                if depth > max_nesting {
                    return Err(nesting_error(start, max_nesting));
                }
                levels.push(Level {
                    base: depth,
                    prefix: 0,
                });
                after_operand = false;
            }
            b')' | b']' => {
                if levels.len() > 1 {
                    levels.pop();
                }
                after_operand = true;
            }
            b',' => {
                if let Some(level) = levels.last_mut() {
                    level.prefix = 0;
                }
                after_operand = false;
            }
            // Statement and body boundaries: each statement is parsed on its own.
            b';' | b'{' | b'}' => {
                levels.truncate(1);
                if let Some(level) = levels.last_mut() {
                    level.prefix = 0;
                }
                after_operand = false;
            }
            b'+' | b'-' | b'!' if !after_operand => {
                if let Some(level) = levels.last_mut() {
                    level.prefix += 1;
                }
                if depth(&levels) > max_nesting {
                    return Err(nesting_error(start, max_nesting));
                }
            }
            c if c.is_ascii_alphanumeric() || c == b'_' || c == b'.' => {
                while i < bytes.len()
                    && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] == b'.')
                {
                    i += 1;
                }
                after_operand = !matches!(&text[start..i], "if" | "else" | "in" | "for" | "yield");
            }
            _ => after_operand = false,
        }
        deepest = deepest.max(depth(&levels));
        work = work.saturating_add(((i - start) as u64) << depth(&levels));
        if work > max_work {
            return Err(format!(
                "too deeply nested for its size to parse in bounded time (work {work} > {max_work}, at byte {start})"
            ));
        }
    }
    Ok(ParseCost { depth: deepest, work })
}

fn depth(levels: &[Level]) -> u32 {
    levels.last().map_or(0, |l| l.base + l.prefix)
}

fn nesting_error(at: usize, max_nesting: u32) -> String {
    format!("brackets and prefix operators nest more than {max_nesting} deep (at byte {at})")
}

/// After tract's parse, before its build: refuses what tract 0.23.9 cannot be trusted with in
/// a parsed NNEF graph: a `transpose` whose
/// `axes` is not a permutation of `0..n` makes its loader grow a list forever (found by the
/// `bundle` fuzz target: `fuzz/regressions/bundle/transpose-*`), and one that is not a
/// permutation of its rank panics it.
pub(super) fn check_document(doc: &tract_nnef::ast::Document) -> Result<(), String> {
    use tract_nnef::ast::{Literal, RValue};
    fn literal_axes(v: &RValue) -> Option<Vec<Option<usize>>> {
        let number = |l: &Literal| match l {
            Literal::Numeric(n) => Some(n.parse::<usize>().ok()),
            _ => None,
        };
        match v {
            RValue::Array(items) => items
                .iter()
                .map(|i| match i {
                    RValue::Literal(l) => number(l),
                    _ => None,
                })
                .collect(),
            RValue::Literal(Literal::Array(items)) => items.iter().map(number).collect(),
            _ => None,
        }
    }
    fn visit(v: &RValue) -> Result<(), String> {
        match v {
            RValue::Invocation(inv) => {
                if inv.id.0 == "transpose" {
                    let axes = inv
                        .arguments
                        .iter()
                        .find(|a| a.id.as_ref().is_some_and(|id| id.0 == "axes"))
                        .or_else(|| inv.arguments.get(1).filter(|a| a.id.is_none()));
                    // tract evaluates expressions here too; bundles (tract's own writer) hold
                    // plain literals, so anything else is refused rather than evaluated.
                    let Some(axes) = axes.and_then(|a| literal_axes(&a.rvalue)) else {
                        return Err("transpose axes are not a literal list of integers".into());
                    };
                    {
                        let mut seen = vec![false; axes.len()];
                        for axis in &axes {
                            match axis {
                                Some(a) if *a < seen.len() && !seen[*a] => seen[*a] = true,
                                _ => return Err(format!("transpose axes {axes:?} are not a permutation")),
                            }
                        }
                    }
                }
                inv.arguments.iter().try_for_each(|a| visit(&a.rvalue))
            }
            RValue::Binary(a, _, b) => visit(a).and_then(|()| visit(b)),
            RValue::Unary(_, a) => visit(a),
            RValue::Tuple(items) | RValue::Array(items) => items.iter().try_for_each(visit),
            RValue::Subscript(a, _) => visit(a),
            RValue::Comprehension(c) => visit(&c.yields),
            RValue::IfThenElse(c) => visit(&c.cond)
                .and_then(|()| visit(&c.then))
                .and_then(|()| visit(&c.otherwise)),
            RValue::Identifier(_) | RValue::Literal(_) => Ok(()),
        }
    }
    let fragments = doc.fragments.iter().filter_map(|f| f.body.as_ref());
    std::iter::once(&doc.graph_def.body)
        .chain(fragments)
        .flatten()
        .try_for_each(|assignment| visit(&assignment.right))
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, name, *data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    fn graph(body: &str) -> String {
        format!(
            "version 1.0;\n\ngraph network(input) -> (o) {{\n  input = external(shape = [1, 3]);\n  {body}\n}}\n"
        )
    }

    fn dat(declared_bytes: u32, dims: &[u32], bits: u32, data: usize) -> Vec<u8> {
        let mut out = vec![0u8; DAT_HEADER_BYTES + data];
        out[..4].copy_from_slice(&[0x4e, 0xef, 1, 0]);
        out[4..8].copy_from_slice(&declared_bytes.to_le_bytes());
        out[8..12].copy_from_slice(&(dims.len() as u32).to_le_bytes());
        for (d, n) in dims.iter().enumerate() {
            out[12 + 4 * d..16 + 4 * d].copy_from_slice(&n.to_le_bytes());
        }
        out[44..48].copy_from_slice(&bits.to_le_bytes());
        out
    }

    #[test]
    fn what_tract_writes_passes() {
        let tar = super::super::nnef_tar(&super::super::synthetic_tiny_model().unwrap()).unwrap();
        check_archive(Cursor::new(&tar)).unwrap();
    }

    #[test]
    fn the_fuzzers_run_of_prefix_pluses_is_refused() {
        let text = graph(&format!(
            "o = matmul(input, input, transposeA = false, transposeB = f{});",
            "+".repeat(100)
        ));
        let err = check_graph_text(&text).unwrap_err();
        assert!(
            err.contains(&format!("nest more than {MAX_NESTING} deep")),
            "{err}"
        );
    }

    #[test]
    fn nesting_is_accepted_up_to_the_limit() {
        let deep = |open: &str, close: &str, n: usize| format!("o = {}x{};", open.repeat(n), close.repeat(n));
        for (open, close) in [("(", ")"), ("[", "]"), ("-", ""), ("!", ""), ("+(", ")")] {
            let levels = open.len();
            let at_limit = MAX_NESTING as usize / levels;
            check_graph_text(&graph(&deep(open, close, at_limit))).unwrap();
            let err = check_graph_text(&graph(&deep(open, close, at_limit + 1))).unwrap_err();
            assert!(err.contains("nest more than"), "{open}: {err}");
        }
    }

    #[test]
    fn a_prefix_operator_lasts_to_the_end_of_its_argument() {
        // tract reads `-a + (b)` as `-(a + (b))`: the bracket is one level deeper.
        let n = MAX_NESTING as usize - 1;
        let inside = format!("o = f(-a + {}x{});", "(".repeat(n), ")".repeat(n));
        assert!(check_graph_text(&graph(&inside)).is_err());
        let next_argument = format!("o = f(-a, {}x{});", "(".repeat(n), ")".repeat(n));
        check_graph_text(&graph(&next_argument)).unwrap();
    }

    #[test]
    fn binary_operators_exponents_strings_and_comments_do_not_nest() {
        let chain = vec!["a"; 5_000].join(" - ");
        check_graph_text(&graph(&format!("o = {chain} + 1e-5 * -b != !c;"))).unwrap();
        let quoted = format!("o = f(\"{0}\", '{0}'); # {0}", "((((-[".repeat(10));
        check_graph_text(&graph(&quoted)).unwrap();
    }

    #[test]
    fn work_is_bounded_over_the_whole_graph() {
        // Each statement is within the nesting limit; together they would parse for seconds.
        let n = MAX_NESTING as usize - 1;
        let statement = format!("o = {}x{};\n", "(".repeat(n), ")".repeat(n));
        let err = check_graph_text(&graph(&statement.repeat(1000))).unwrap_err();
        assert!(err.contains("bounded time"), "{err}");
        check_graph_text(&graph(&statement)).unwrap();
    }

    #[test]
    fn tensor_headers_must_fit_their_data() {
        let ok = dat(16, &[4], 32, 16);
        check_archive(Cursor::new(tar_of(&[("w.dat", &ok)]))).unwrap();
        let absent = dat(u32::MAX, &[u32::MAX / 4], 32, 16);
        let err = check_archive(Cursor::new(tar_of(&[("w.dat", &absent)]))).unwrap_err();
        assert!(err.contains("the entry holds 16"), "{err}");
        let too_many = dat(0, &[1 << 20, 1 << 20], 0, 0);
        let err = check_archive(Cursor::new(tar_of(&[("w.dat", &too_many)]))).unwrap_err();
        assert!(err.contains("1099511627776 values"), "{err}");
        let overflow = dat(16, &[u32::MAX; 8], 32, 16);
        assert!(check_archive(Cursor::new(tar_of(&[("w.dat", &overflow)]))).is_err());
        let mut empty_bools = dat(0, &[0], 1, 0);
        empty_bools[48] = 5;
        let err = check_archive(Cursor::new(tar_of(&[("b.dat", &empty_bools)]))).unwrap_err();
        assert!(err.contains("no data bytes"), "{err}");
        let mut strings = dat(16, &[4], 8, 16);
        strings[48..52].copy_from_slice(&[0x00, 0x10, b'R', b'T']);
        let err = check_archive(Cursor::new(tar_of(&[("s.dat", &strings)]))).unwrap_err();
        assert!(err.contains("string tensors"), "{err}");
    }

    #[test]
    fn entries_tract_would_unpack_or_parse_beyond_one_model_are_refused() {
        for name in [
            "sub/graph.nnef",
            "m.nnef.tgz",
            "m.nnef.tar",
            "graph.quant",
            "w.safetensors",
        ] {
            let err = check_archive(Cursor::new(tar_of(&[(name, b"x")]))).unwrap_err();
            assert!(err.contains(name), "{name}: {err}");
        }
        // What tract ignores is left alone.
        check_archive(Cursor::new(tar_of(&[
            ("README", b"x"),
            ("./.hidden/graph.nnef", b"((("),
        ])))
        .unwrap();
    }
}
