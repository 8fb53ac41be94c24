//! JPEG Huffman tables (ITU T.81 annex C), read both ways, and the bit reader and writer of
//! entropy-coded data with its 0xFF 0x00 byte stuffing (F.1.2.3).

/// Bits of code looked up in one step; longer codes (rare) take the per-length path.
const LOOKUP_BITS: u32 = 9;

/// One DHT table: canonical codes of up to 16 bits for up to 256 symbols.
#[derive(Debug, Clone)]
pub(super) struct Huffman {
    /// By the next [`LOOKUP_BITS`] bits: (code length, symbol); length 0 for longer codes.
    lookup: Vec<(u8, u8)>,
    /// Per code length 1..=16: largest code of that length (-1 if none), and the index in
    /// `symbols` of its first code minus that first code.
    max_code: [i32; 17],
    offset: [i32; 17],
    symbols: Vec<u8>,
    /// By symbol: (code, length), length 0 when the table cannot write the symbol.
    codes: [(u16, u8); 256],
}

impl Huffman {
    /// The table of `counts[l]` codes of length `l + 1` for `symbols`, in order; `None` for a
    /// table no conforming decoder would accept (more codes than a length holds).
    pub(super) fn new(counts: &[u8; 16], symbols: &[u8]) -> Option<Huffman> {
        let total: usize = counts.iter().map(|&c| usize::from(c)).sum();
        if total != symbols.len() || total > 256 {
            return None;
        }
        let mut codes = [(0u16, 0u8); 256];
        let mut max_code = [-1i32; 17];
        let mut offset = [0i32; 17];
        let mut lookup = vec![(0u8, 0u8); 1 << LOOKUP_BITS];
        let (mut code, mut k) = (0u32, 0usize);
        for (l, &count) in (1u32..=16).zip(counts) {
            if count > 0 {
                offset[l as usize] = k as i32 - code as i32;
            }
            for _ in 0..count {
                // A code of all ones is reserved (C.2), and longer ones do not fit: libjpeg
                // refuses such a table.
                if code >= (1 << l) - 1 {
                    return None;
                }
                let symbol = symbols[k];
                codes[usize::from(symbol)] = (code as u16, l as u8);
                if l <= LOOKUP_BITS {
                    let shift = LOOKUP_BITS - l;
                    let first = (code << shift) as usize;
                    lookup[first..first + (1 << shift)].fill((l as u8, symbol));
                }
                code += 1;
                k += 1;
            }
            if count > 0 {
                max_code[l as usize] = code as i32 - 1;
            }
            code <<= 1;
        }
        Some(Huffman {
            lookup,
            max_code,
            offset,
            symbols: symbols.to_vec(),
            codes,
        })
    }

    /// The (code, length) that writes `symbol`, if the table has it.
    pub(super) fn code(&self, symbol: u8) -> Option<(u16, u8)> {
        let (code, len) = self.codes[usize::from(symbol)];
        (len > 0).then_some((code, len))
    }

    /// The table as bytes (each symbol and its code length, in order): equal keys, equal
    /// tables.
    pub(super) fn key(&self) -> impl Iterator<Item = u8> + '_ {
        self.symbols().flat_map(|(s, len)| [s, len])
    }

    /// Symbols the table can write, with their code lengths.
    pub(super) fn symbols(&self) -> impl Iterator<Item = (u8, u8)> + '_ {
        self.symbols.iter().map(|&s| (s, self.codes[usize::from(s)].1))
    }

    /// Reads one symbol; `None` for bits that are no code of the table (corrupt data).
    #[inline(always)]
    pub(super) fn decode(&self, bits: &mut BitReader) -> Option<u8> {
        let (len, symbol) = self.lookup[bits.peek(LOOKUP_BITS) as usize];
        if len > 0 {
            bits.consume(u32::from(len));
            return Some(symbol);
        }
        let (len, symbol) = self.decode_long(bits.peek(16) as u32)?;
        bits.consume(len);
        Some(symbol)
    }

    /// The symbol whose code starts `window` (the next 16 bits), with the code's length.
    pub(super) fn decode_window(&self, window: u32) -> Option<(u32, u8)> {
        let (len, symbol) = self.lookup[(window >> (16 - LOOKUP_BITS)) as usize];
        if len > 0 {
            return Some((u32::from(len), symbol));
        }
        self.decode_long(window)
    }

    #[cold]
    fn decode_long(&self, window: u32) -> Option<(u32, u8)> {
        for l in LOOKUP_BITS + 1..=16 {
            let code = (window >> (16 - l)) as i32;
            if code <= self.max_code[l as usize] {
                let index = usize::try_from(self.offset[l as usize] + code).ok()?;
                return Some((l, *self.symbols.get(index)?));
            }
        }
        None
    }
}

/// Reads entropy-coded bits, most significant first, dropping the 0x00 stuffed after every
/// 0xFF. At a marker (or the end of the data) it reads zeros and says so: a decoder that
/// needed those bits read past the scan.
#[derive(Clone)]
pub(super) struct BitReader<'a> {
    data: &'a [u8],
    /// Offset in `data` of the next byte to load.
    pos: usize,
    /// Bits not yet consumed, left-aligned.
    buffer: u64,
    count: u32,
    /// Stuffed 0x00 bytes passed (data bytes loaded: `pos - stuffed`).
    stuffed: u64,
    /// Zero bits loaded after the last data byte.
    padding: u64,
}

impl<'a> BitReader<'a> {
    pub(super) fn new(data: &'a [u8]) -> Self {
        BitReader {
            data,
            pos: 0,
            buffer: 0,
            count: 0,
            stuffed: 0,
            padding: 0,
        }
    }

    /// Makes at least 57 bits available.
    #[inline(always)]
    pub(super) fn refill(&mut self) {
        if self.count > 56 {
            return;
        }
        // Eight bytes at once when none is 0xFF (no stuffing, no marker).
        if let Some(chunk) = self.data.get(self.pos..self.pos + 8) {
            let word = u64::from_be_bytes(chunk.try_into().unwrap_or_default());
            if !has_ff_byte(word) {
                let take = (64 - self.count) / 8;
                let keep = self.count + 8 * take;
                let mask = if keep >= 64 { u64::MAX } else { !(u64::MAX >> keep) };
                self.buffer |= (word >> self.count) & mask;
                self.count = keep;
                self.pos += take as usize;
                return;
            }
        }
        let state = refill_slow(
            self.data,
            (self.pos, self.buffer, self.count, self.stuffed, self.padding),
        );
        (self.pos, self.buffer, self.count, self.stuffed, self.padding) = state;
    }

    /// Makes at least 56 bits available without asking how many are: eight bytes are laid over
    /// the buffer at once, those past the ones counted being the data's next bits (read again
    /// by the next refill). `false` when it had to go byte by byte (stuffing, a marker, the end).
    #[inline(always)]
    pub(super) fn refill_unasked(&mut self) -> bool {
        debug_assert!(self.count < 64);
        if let Some(chunk) = self.data.get(self.pos..self.pos + 8) {
            let word = u64::from_be_bytes(chunk.try_into().unwrap_or_default());
            if !has_ff_byte(word) {
                // With fewer than 64 bits held (what reading leaves), no shift is out of range.
                let take = 63u32.wrapping_sub(self.count) >> 3;
                self.buffer |= word.wrapping_shr(self.count);
                self.count += take * 8;
                self.pos += take as usize;
                return true;
            }
        }
        let state = refill_slow(
            self.data,
            (self.pos, self.buffer, self.count, self.stuffed, self.padding),
        );
        (self.pos, self.buffer, self.count, self.stuffed, self.padding) = state;
        false
    }

    /// The next `n` bits (1..=32), not consumed. Needs a [`refill`](Self::refill) since.
    #[inline(always)]
    pub(super) fn peek(&self, n: u32) -> u64 {
        self.buffer >> (64 - n)
    }

    #[inline(always)]
    pub(super) fn consume(&mut self, n: u32) {
        self.buffer <<= n;
        self.count = self.count.saturating_sub(n);
    }

    /// Consumes `n` bits of the (at least `n`) held.
    #[inline(always)]
    pub(super) fn consume_held(&mut self, n: u32) {
        debug_assert!(n <= self.count);
        self.buffer <<= n;
        self.count -= n;
    }

    /// The signed value (F.2.2.1 EXTEND) of the `n` bits (0..=16) after the next `skip`, not
    /// consumed, without a branch.
    #[inline(always)]
    pub(super) fn extended_after(&self, skip: u32, n: u32) -> i32 {
        let bits = self.buffer << skip;
        // The first bit is 1 for a positive value; a negative one is written as its one's
        // complement.
        let negative = ((bits as i64) >> 63) as u64 ^ u64::MAX;
        let magnitude = ((bits ^ negative) >> 1) >> (63 - n);
        ((magnitude ^ negative).wrapping_sub(negative)) as i32
    }

    /// Reads `n` bits (0..=16) as an unsigned value.
    #[inline(always)]
    pub(super) fn take(&mut self, n: u32) -> u32 {
        if n == 0 {
            return 0;
        }
        let value = self.peek(n) as u32;
        self.consume(n);
        value
    }

    /// Bits consumed from the start of the data (stuffing not counted).
    pub(super) fn position(&self) -> u64 {
        (self.loaded() * 8 + self.padding).saturating_sub(u64::from(self.count))
    }

    /// Whether the bits consumed go past the last data byte (into a marker or the end).
    pub(super) fn past_end(&self) -> bool {
        self.position() > self.loaded() * 8
    }

    /// Data bytes loaded (stuffing not counted).
    fn loaded(&self) -> u64 {
        self.pos as u64 - self.stuffed
    }

    /// Offset in the stuffed data of data byte `index`, which must be one of the last loaded.
    pub(super) fn offset_of(&self, index: u64) -> Option<usize> {
        let mut back = self.loaded().checked_sub(index)?;
        let mut pos = self.pos;
        while back > 0 {
            pos = pos.checked_sub(1)?;
            // A 0x00 right after 0xFF is stuffing: the data byte is the 0xFF.
            if self.data[pos] == 0x00 && pos > 0 && self.data[pos - 1] == 0xFF {
                pos -= 1;
            }
            back -= 1;
        }
        Some(pos)
    }
}

/// The reader's state (position, buffer, count, stuffed bytes, padding bits) after loading byte
/// by byte until 57 bits are available. A function of values, not of the reader, so that the
/// reader's hot state stays in registers.
#[cold]
#[inline(never)]
fn refill_slow(data: &[u8], state: (usize, u64, u32, u64, u64)) -> (usize, u64, u32, u64, u64) {
    let (mut pos, mut buffer, mut count, mut stuffed, mut padding) = state;
    while count <= 56 {
        let byte = match data.get(pos) {
            Some(&0xFF) if data.get(pos + 1) == Some(&0x00) => {
                pos += 2;
                stuffed += 1;
                0xFF
            }
            Some(&0xFF) | None => {
                padding += 8;
                0
            }
            Some(&b) => {
                pos += 1;
                b
            }
        };
        buffer |= u64::from(byte) << (56 - count);
        count += 8;
    }
    (pos, buffer, count, stuffed, padding)
}

/// Whether any byte of `word` is 0xFF.
#[inline(always)]
fn has_ff_byte(word: u64) -> bool {
    let inverted = !word;
    (inverted.wrapping_sub(0x0101_0101_0101_0101) & !inverted & 0x8080_8080_8080_8080) != 0
}

/// Writes entropy-coded bits, stuffing a 0x00 after every 0xFF byte.
pub(super) struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    count: u32,
    written: u64,
}

impl BitWriter {
    pub(super) fn new() -> Self {
        BitWriter {
            out: Vec::new(),
            acc: 0,
            count: 0,
            written: 0,
        }
    }

    /// Appends the low `n` bits (0..=16) of `value`, most significant first.
    pub(super) fn put(&mut self, value: u32, n: u32) {
        if n == 0 {
            return;
        }
        self.acc = (self.acc << n) | u64::from(value & ((1u32 << n) - 1));
        self.count += n;
        self.written += u64::from(n);
        while self.count >= 8 {
            self.count -= 8;
            let byte = (self.acc >> self.count) as u8;
            self.out.push(byte);
            if byte == 0xFF {
                self.out.push(0x00);
            }
        }
        self.acc &= (1u64 << self.count) - 1;
    }

    /// Bits written so far.
    pub(super) fn bits(&self) -> u64 {
        self.written
    }

    /// The bytes written; `None` unless they end on a byte boundary.
    pub(super) fn finish(self) -> Option<Vec<u8>> {
        (self.count == 0).then_some(self.out)
    }
}

/// Magnitude category of a coefficient or DC difference (F.1.2.1): its bit length.
pub(super) fn category(value: i32) -> u32 {
    32 - value.unsigned_abs().leading_zeros()
}

/// The `category(value)` extra bits that write `value` (F.1.2.1: negatives as value - 1).
pub(super) fn extra_bits(value: i32) -> u32 {
    let n = category(value);
    if n == 0 {
        return 0;
    }
    (if value < 0 { value - 1 } else { value }) as u32 & ((1u32 << n) - 1)
}

/// The value that `n` extra bits `bits` write (F.2.2.1 EXTEND).
#[inline(always)]
pub(super) fn extend(bits: u32, n: u32) -> i32 {
    if n == 0 {
        return 0;
    }
    let bits = bits as i32;
    if bits < 1 << (n - 1) {
        bits - (1 << n) + 1
    } else {
        bits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ITU T.81 table K.3: the luminance DC table every baseline encoder may use.
    fn luma_dc() -> Huffman {
        let counts = [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0];
        Huffman::new(&counts, &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]).unwrap()
    }

    #[test]
    fn codes_are_canonical_as_in_the_standard() {
        let table = luma_dc();
        // K.3: category 0 is 00, 5 is 110, 11 is 111111110.
        assert_eq!(table.code(0), Some((0b00, 2)));
        assert_eq!(table.code(5), Some((0b110, 3)));
        assert_eq!(table.code(11), Some((0b1_1111_1110, 9)));
        assert_eq!(table.code(12), None);
    }

    #[test]
    fn written_symbols_and_values_read_back_through_stuffing() {
        let table = luma_dc();
        let values = [0, 1, -1, 255, -1024, 2047, 7, -3, 0, 100];
        let mut writer = BitWriter::new();
        for &v in &values {
            let (code, len) = table.code(category(v) as u8).unwrap();
            writer.put(u32::from(code), u32::from(len));
            writer.put(extra_bits(v), category(v));
        }
        // Pad with ones to a byte, as encoders do.
        let pad = (8 - writer.bits() % 8) % 8;
        writer.put(0xFF, pad as u32);
        let bytes = writer.finish().unwrap();
        let mut data = bytes.clone();
        data.extend_from_slice(&[0xFF, 0xD9]);
        let mut reader = BitReader::new(&data);
        for &v in &values {
            reader.refill();
            let n = u32::from(table.decode(&mut reader).unwrap());
            let bits = reader.take(n);
            assert_eq!(extend(bits, n), v);
        }
        assert!(!reader.past_end());
        // Every data byte maps back to its offset in the stuffed bytes.
        let last = reader.position() / 8;
        let offset = reader.offset_of(last).unwrap();
        let data_bytes_before = bytes[..offset]
            .iter()
            .enumerate()
            .filter(|&(i, &b)| !(b == 0 && i > 0 && bytes[i - 1] == 0xFF))
            .count() as u64;
        assert_eq!(data_bytes_before, last);
    }

    #[test]
    fn extend_without_a_branch_is_extend() {
        for n in 0..=15u32 {
            for value in 0..1u32 << n {
                // `value`'s bits after 3 others, then ones (the next code's bits).
                let word =
                    (u64::from(0b101u32) << 61) | (u64::from(value) << (61 - n)) | ((1u64 << (61 - n)) - 1);
                let mut reader = BitReader::new(&[]);
                reader.buffer = word;
                reader.count = 64;
                assert_eq!(
                    reader.extended_after(3, n),
                    extend(value, n),
                    "{n} bits {value:b}"
                );
            }
        }
    }

    #[test]
    fn a_table_with_too_many_codes_is_refused() {
        // Three codes of length 1 cannot exist.
        let counts = [3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(Huffman::new(&counts, &[0, 1, 2]).is_none());
    }
}
