//! The parts of a JPEG's headers that splitting its scan needs: frame size and sampling, the
//! Huffman tables of the scan, and where the entropy-coded data starts. Only what libjpeg-turbo
//! decodes as one baseline scan over every component, without restart markers, qualifies.

use super::huffman::Huffman;

/// Most blocks one MCU may hold (ITU T.81 B.2.3).
const MAX_BLOCKS_IN_MCU: usize = 10;

/// A component of the scan, in scan order.
#[derive(Debug, Clone)]
pub(super) struct Component {
    /// Blocks per MCU across and down.
    pub h: usize,
    pub v: usize,
    pub dc: Huffman,
    pub ac: Huffman,
    /// Which of the (up to 4) DC and AC tables `dc` and `ac` are: components often share.
    pub tables: (usize, usize),
}

/// A frame header: (id, h, v) of each component, the offset of the height, width, height.
type Frame = (Vec<(u8, usize, usize)>, usize, usize, usize);

/// A baseline JPEG whose one scan covers every component.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    pub width: usize,
    pub height: usize,
    /// Offset of the frame header's two height bytes.
    pub height_at: usize,
    pub components: Vec<Component>,
    /// Offset of the first entropy-coded byte (just after the scan header).
    pub scan_start: usize,
}

impl Layout {
    /// `None` unless `bytes` is a baseline (or 8-bit extended) Huffman JPEG with one scan over
    /// every component and no restart interval.
    pub(super) fn parse(bytes: &[u8]) -> Option<Layout> {
        if bytes.get(..2)? != [0xFF, 0xD8] {
            return None;
        }
        let mut tables: [[Option<Huffman>; 4]; 2] = Default::default();
        // (id, h, v) of the frame's components, the height's offset, the size.
        let mut frame: Option<Frame> = None;
        let mut at = 2;
        loop {
            // A marker: 0xFF, any number of fill 0xFF, the code.
            if *bytes.get(at)? != 0xFF {
                return None;
            }
            while *bytes.get(at + 1)? == 0xFF {
                at += 1;
            }
            let marker = *bytes.get(at + 1)?;
            let length = usize::from(u16::from_be_bytes([*bytes.get(at + 2)?, *bytes.get(at + 3)?]));
            let segment = bytes.get(at + 4..(at + 2).checked_add(length)?)?;
            match marker {
                0xC0 | 0xC1 => {
                    if frame.is_some() || *segment.first()? != 8 {
                        return None;
                    }
                    let height = usize::from(u16::from_be_bytes([*segment.get(1)?, *segment.get(2)?]));
                    let width = usize::from(u16::from_be_bytes([*segment.get(3)?, *segment.get(4)?]));
                    let count = usize::from(*segment.get(5)?);
                    let mut components = Vec::with_capacity(count);
                    for c in segment.get(6..6 + 3 * count)?.chunks_exact(3) {
                        let (h, v) = (usize::from(c[1] >> 4), usize::from(c[1] & 15));
                        if !(1..=4).contains(&h) || !(1..=4).contains(&v) {
                            return None;
                        }
                        components.push((c[0], h, v));
                    }
                    if height == 0 || width == 0 || count == 0 {
                        return None;
                    }
                    frame = Some((components, at + 5, width, height));
                }
                // Every other frame type: progressive, lossless, arithmetic coding.
                0xC2 | 0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => return None,
                0xC4 => {
                    let mut rest = segment;
                    while let Some((&class_id, tail)) = rest.split_first() {
                        let (class, id) = (usize::from(class_id >> 4), usize::from(class_id & 15));
                        let counts: &[u8; 16] = tail.get(..16)?.try_into().ok()?;
                        let total: usize = counts.iter().map(|&c| usize::from(c)).sum();
                        let symbols = tail.get(16..16 + total)?;
                        *tables.get_mut(class)?.get_mut(id)? = Some(Huffman::new(counts, symbols)?);
                        rest = &tail[16 + total..];
                    }
                }
                // A restart interval.
                0xDD if u16::from_be_bytes([*segment.first()?, *segment.get(1)?]) != 0 => return None,
                0xDA => return Self::scan(segment, at + 2 + length, frame?, &tables),
                // A marker without a segment (SOI, EOI, RSTn, TEM) cannot come here.
                0x01 | 0xD0..=0xD9 => return None,
                _ => {}
            }
            at += 2 + length;
        }
    }

    fn scan(
        header: &[u8],
        scan_start: usize,
        (frame, height_at, width, height): Frame,
        tables: &[[Option<Huffman>; 4]; 2],
    ) -> Option<Layout> {
        let count = usize::from(*header.first()?);
        let selectors = header.get(1..1 + 2 * count)?;
        let spectral = header.get(1 + 2 * count..4 + 2 * count)?;
        // One scan over every component, the whole spectrum at full precision.
        if count != frame.len() || spectral != [0, 63, 0] {
            return None;
        }
        let mut components = Vec::with_capacity(count);
        for s in selectors.chunks_exact(2) {
            let &(_, h, v) = frame.iter().find(|(id, _, _)| *id == s[0])?;
            let ids = (usize::from(s[1] >> 4), usize::from(s[1] & 15));
            let dc = tables[0].get(ids.0)?.clone()?;
            let ac = tables[1].get(ids.1)?.clone()?;
            // A lone component is coded block by block whatever its sampling factors say.
            let (h, v) = if count == 1 { (1, 1) } else { (h, v) };
            components.push(Component {
                h,
                v,
                dc,
                ac,
                tables: ids,
            });
        }
        if frame.len() == 1 && (frame[0].1, frame[0].2) != (1, 1) {
            // libjpeg's rows of MCUs would not be rows of blocks.
            return None;
        }
        let layout = Layout {
            width,
            height,
            height_at,
            components,
            scan_start,
        };
        (layout.blocks_in_mcu() <= MAX_BLOCKS_IN_MCU).then_some(layout)
    }

    pub(super) fn blocks_in_mcu(&self) -> usize {
        self.components.iter().map(|c| c.h * c.v).sum()
    }

    /// Pixels across and down one MCU.
    pub(super) fn mcu_size(&self) -> (usize, usize) {
        let h = self.components.iter().map(|c| c.h).max().unwrap_or(1);
        let v = self.components.iter().map(|c| c.v).max().unwrap_or(1);
        (8 * h, 8 * v)
    }

    /// MCUs across and down the image.
    pub(super) fn mcus(&self) -> (usize, usize) {
        let (w, h) = self.mcu_size();
        (self.width.div_ceil(w), self.height.div_ceil(h))
    }

    /// Whether some component is subsampled vertically: libjpeg then smooths chroma across
    /// rows of MCUs, so a row's first pixels depend on the row above.
    pub(super) fn subsampled_vertically(&self) -> bool {
        let v = self.components.iter().map(|c| c.v).max().unwrap_or(1);
        self.components.iter().any(|c| c.v != v)
    }
}
