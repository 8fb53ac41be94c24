//! Resuming a scan at a row of MCUs. Without restart markers, where a row starts in the
//! entropy-coded data, and the DC predictions it continues from, are only known by reading
//! every block before it; [`walk`] does that, skipping the coefficients' values, and
//! [`resumed_jpeg`] makes the rest of the scan a JPEG of its own that any decoder reads.
//!
//! The rest of the scan starts mid-byte, after the end of the last MCU before it. Rather than
//! shift every following bit, the new JPEG starts one row of MCUs earlier with a row written
//! here: flat blocks whose DC differences set the predictions the real row continues from,
//! and a last block whose last coefficient's magnitude bits end with those leftover bits of
//! the previous MCU. The scan's bytes then follow unchanged; the made-up row is decoded and
//! cropped away.

use std::cell::RefCell;
use std::collections::VecDeque;

use super::huffman::{BitReader, BitWriter, Huffman, category, extra_bits};
use super::layout::Layout;
use super::skip::Skipper;

/// Where a row of MCUs starts in the scan, and the DC predictions it starts from.
pub(super) struct Resume {
    /// Offset in the JPEG of the byte holding the row's first bit.
    offset: usize,
    /// Bits of that byte that still belong to the MCU before.
    leftover: u32,
    /// Per component (scan order): its last DC value before the row.
    predictions: Vec<i32>,
}

impl Resume {
    #[cfg(test)]
    pub(super) fn leftover_bits(&self) -> u32 {
        self.leftover
    }
}

/// Reads every block of the scan before row `row` of MCUs. `None` on data that is no valid
/// scan (it is then left to the decoder to report).
pub(super) fn walk(layout: &Layout, bytes: &[u8], row: usize) -> Option<Resume> {
    let data = bytes.get(layout.scan_start..)?;
    let mut bits = BitReader::new(data);
    let (across, _) = layout.mcus();
    let mut predictions = vec![0i64; layout.components.len()];
    let blocks = (across * layout.blocks_in_mcu()).checked_mul(row)?;
    Skipper::new(layout).skip(&mut bits, blocks as u64, &mut predictions)?;
    if bits.past_end() {
        return None;
    }
    let position = bits.position();
    Some(Resume {
        offset: layout.scan_start + bits.offset_of(position / 8)?,
        leftover: (position % 8) as u32,
        predictions: predictions
            .into_iter()
            .map(|p| i32::try_from(p).ok())
            .collect::<Option<_>>()?,
    })
}

/// The scan from row `row` of MCUs on as a JPEG of its own, with one made-up row of MCUs
/// before it (see the module's doc): its height is the image's rows from `row - 1` on.
/// `None` when the scan's tables cannot write such a row.
pub(super) fn resumed_jpeg(layout: &Layout, bytes: &[u8], row: usize, resume: &Resume) -> Option<Vec<u8>> {
    let (across, _) = layout.mcus();
    let (_, mcu_height) = layout.mcu_size();
    let height = u16::try_from(layout.height.checked_sub((row.checked_sub(1)?) * mcu_height)?).ok()?;
    let mut writer = BitWriter::new();
    let last_component = layout.components.len() - 1;
    for mcu in 0..across {
        for (c, component) in layout.components.iter().enumerate() {
            let blocks = component.h * component.v;
            for block in 0..blocks {
                let diff = if mcu == 0 && block == 0 {
                    resume.predictions[c]
                } else {
                    0
                };
                put_symbol(&component.dc, category(diff) as u8, &mut writer)?;
                writer.put(extra_bits(diff), category(diff));
                if mcu == across - 1 && c == last_component && block == blocks - 1 {
                    put_last_coefficients(&component.ac, resume.leftover, &mut writer)?;
                } else {
                    put_symbol(&component.ac, 0x00, &mut writer)?;
                }
            }
        }
    }
    let row_bytes = writer.finish()?;
    let tail = bytes.get(resume.offset..)?;
    let mut jpeg = Vec::with_capacity(layout.scan_start + row_bytes.len() + tail.len());
    jpeg.extend_from_slice(bytes.get(..layout.scan_start)?);
    jpeg.get_mut(layout.height_at..layout.height_at + 2)?
        .copy_from_slice(&height.to_be_bytes());
    jpeg.extend_from_slice(&row_bytes);
    jpeg.extend_from_slice(tail);
    Some(jpeg)
}

fn put_symbol(table: &Huffman, symbol: u8, writer: &mut BitWriter) -> Option<()> {
    let (code, len) = table.code(symbol)?;
    writer.put(u32::from(code), u32::from(len));
    Some(())
}

/// The AC coefficients of the made-up row's last block: they end on a byte boundary once the
/// decoder has read `leftover` more bits, which must be the last magnitude bits of the
/// coefficient at zig-zag position 63 (or, when `leftover` is 0, may be an end of block).
fn put_last_coefficients(ac: &Huffman, leftover: u32, writer: &mut BitWriter) -> Option<()> {
    let path = last_coefficients(ac, (writer.bits() % 8) as u32, leftover)?;
    let count = path.len();
    for (i, &symbol) in path.iter().enumerate() {
        put_symbol(ac, symbol, writer)?;
        let size = u32::from(symbol & 15);
        let size = if i + 1 == count { size - leftover } else { size };
        // Any magnitude will do: the row is cropped away.
        writer.put((1 << size) - 1, size);
    }
    Some(())
}

/// A last block found: (AC table's key, bits written mod 8, leftover, its symbols).
type LastBlock = (Vec<u8>, u32, u32, Vec<u8>);

thread_local! {
    /// The last blocks found on this thread: a camera's frames all have the same tables, and
    /// the search takes ~0.07 ms.
    static LAST_BLOCKS: RefCell<Vec<LastBlock>> = const { RefCell::new(Vec::new()) };
}

/// [`search_last_coefficients`], remembered.
fn last_coefficients(ac: &Huffman, start: u32, leftover: u32) -> Option<Vec<u8>> {
    let key: Vec<u8> = ac.key().collect();
    LAST_BLOCKS.with(|cell| {
        let mut known = cell.borrow_mut();
        if let Some((.., path)) = known
            .iter()
            .find(|(k, s, l, _)| *k == key && *s == start && *l == leftover)
        {
            return Some(path.clone());
        }
        let path = search_last_coefficients(ac, start, leftover)?;
        // (bits mod 8, leftover) of one table: 64 at most.
        if known.len() >= 64 {
            known.clear();
        }
        known.push((key, start, leftover, path.clone()));
        Some(path)
    })
}

/// The symbols of a last block written from a bit `start` (mod 8) into a byte, found by a
/// search over (position in the block, bits written mod 8); the last symbol's magnitude
/// loses its last `leftover` bits to the scan.
fn search_last_coefficients(ac: &Huffman, start: u32, leftover: u32) -> Option<Vec<u8>> {
    const STATES: usize = 64 * 8;
    let state = |k: u32, bits: u32| (k as usize) * 8 + (bits % 8) as usize;
    let start = state(1, start);
    // For each state reached: the state and symbol it was reached from.
    let mut from: Vec<Option<(usize, u8)>> = vec![None; STATES];
    let mut queue = VecDeque::from([start]);
    let mut seen = vec![false; STATES];
    seen[start] = true;
    let symbols: Vec<(u8, u8)> = ac.symbols().collect();
    while let Some(at) = queue.pop_front() {
        let (k, written) = ((at / 8) as u32, (at % 8) as u32);
        for &(symbol, len) in &symbols {
            let (run, size, len) = (u32::from(symbol >> 4), u32::from(symbol & 15), u32::from(len));
            let (next_k, bits) = match (run, size) {
                (15, 0) => (k + 16, len),
                (_, 0) => {
                    // An end of block.
                    if leftover == 0 && (written + len).is_multiple_of(8) {
                        return Some(path_to(&from, at, symbol));
                    }
                    continue;
                }
                _ if k + run > 63 => continue,
                _ => (k + run + 1, len + size),
            };
            if next_k == 64 {
                // The block's last coefficient: the decoder reads `leftover` of its bits from
                // the scan's own bytes.
                let ends = if leftover == 0 {
                    (written + bits).is_multiple_of(8)
                } else {
                    size >= leftover && (written + bits - leftover).is_multiple_of(8)
                };
                if ends {
                    return Some(path_to(&from, at, symbol));
                }
            } else if next_k < 64 {
                let next = state(next_k, written + bits);
                if !seen[next] {
                    seen[next] = true;
                    from[next] = Some((at, symbol));
                    queue.push_back(next);
                }
            }
        }
    }
    None
}

/// The symbols that lead to state `at`, then `last`, in order.
fn path_to(from: &[Option<(usize, u8)>], mut at: usize, last: u8) -> Vec<u8> {
    let mut path = vec![last];
    while let Some((previous, symbol)) = from[at] {
        path.push(symbol);
        at = previous;
    }
    path.reverse();
    path
}
