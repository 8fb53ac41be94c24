//! Reader for the LevelDB table ("SSTable") format TensorFlow writes `variables.index` in.
//!
//! Layout (all integers little-endian, varints LEB128):
//! - footer (last 48 bytes): metaindex block handle, index block handle (each two varint64:
//!   offset, size), zero padding to 40 bytes, then the 8-byte magic `0xdb4775248b80fb57`;
//! - every block is followed by a 5-byte trailer: 1 compression-type byte (0 = none, 1 =
//!   snappy) and the masked crc32c of the block contents plus that byte;
//! - a block is a run of entries `varint32 shared, varint32 unshared, varint32 value_len,
//!   key[shared..], value`, each key sharing `shared` leading bytes with the previous one,
//!   followed by `u32` restart offsets and their `u32` count;
//! - the index block maps a separator key per data block to that block's handle.
//!
//! TensorFlow writes bundles uncompressed; compressed blocks are refused with a clear error.

const MAGIC: u64 = 0xdb47_7524_8b80_fb57;
const FOOTER_LEN: usize = 48;
const TRAILER_LEN: usize = 5;

/// One key/value pair of a table.
pub(crate) type Entry = (Vec<u8>, Vec<u8>);

/// All entries of a table, in key order.
pub(crate) fn read_table(bytes: &[u8]) -> Result<Vec<Entry>, String> {
    if bytes.len() < FOOTER_LEN {
        return Err(format!("{} bytes is too short for a table footer", bytes.len()));
    }
    let footer = &bytes[bytes.len() - FOOTER_LEN..];
    let magic = u64::from_le_bytes(footer[40..48].try_into().map_err(|_| "footer")?);
    if magic != MAGIC {
        return Err(format!(
            "bad table magic {magic:#018x}: not a TensorFlow checkpoint index"
        ));
    }
    let mut pos = 0;
    let _metaindex = BlockHandle::decode(footer, &mut pos)?;
    let index = BlockHandle::decode(footer, &mut pos)?;
    let mut entries = Vec::new();
    for (_, handle) in parse_block(read_block(bytes, index)?)? {
        let mut p = 0;
        let handle = BlockHandle::decode(handle, &mut p)?;
        for (k, v) in parse_block(read_block(bytes, handle)?)? {
            entries.push((k, v.to_vec()));
        }
    }
    Ok(entries)
}

type BlockEntry<'a> = (Vec<u8>, &'a [u8]);

#[derive(Debug, Clone, Copy)]
struct BlockHandle {
    offset: u64,
    size: u64,
}

impl BlockHandle {
    fn decode(buf: &[u8], pos: &mut usize) -> Result<Self, String> {
        Ok(BlockHandle {
            offset: varint(buf, pos)?,
            size: varint(buf, pos)?,
        })
    }
}

fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let &b = buf.get(*pos).ok_or("truncated varint")?;
        *pos += 1;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("varint longer than 10 bytes".into())
}

fn read_block(file: &[u8], h: BlockHandle) -> Result<&[u8], String> {
    let start = usize::try_from(h.offset).map_err(|_| "block offset overflows")?;
    let size = usize::try_from(h.size).map_err(|_| "block size overflows")?;
    let end = start
        .checked_add(size)
        .filter(|&e| e.checked_add(TRAILER_LEN).is_some_and(|t| t <= file.len()))
        .ok_or_else(|| {
            format!(
                "block at {start}+{size} runs past the end of the {}-byte file",
                file.len()
            )
        })?;
    let (contents, kind) = (&file[start..end], file[end]);
    let stored = u32::from_le_bytes(
        file[end + 1..end + TRAILER_LEN]
            .try_into()
            .map_err(|_| "trailer")?,
    );
    let actual = mask(crc32c_extend(crc32c(contents), &[kind]));
    if stored != actual {
        return Err(format!(
            "block at {start} fails its checksum (stored {stored:#010x}, computed {actual:#010x})"
        ));
    }
    match kind {
        0 => Ok(contents),
        1 => Err("the index is snappy-compressed; only uncompressed checkpoints (what TensorFlow writes) are supported".into()),
        k => Err(format!("block at {start} has unknown compression type {k}")),
    }
}

/// Entries of one block; values borrow from it.
fn parse_block(block: &[u8]) -> Result<Vec<BlockEntry<'_>>, String> {
    let n = block.len();
    let count_at = n.checked_sub(4).ok_or("block shorter than its restart count")?;
    let restarts = u32::from_le_bytes(block[count_at..].try_into().map_err(|_| "restarts")?) as usize;
    let data_end = restarts
        .checked_mul(4)
        .and_then(|r| count_at.checked_sub(r))
        .ok_or_else(|| format!("block of {n} bytes cannot hold {restarts} restart points"))?;
    let mut entries = Vec::new();
    let mut key: Vec<u8> = Vec::new();
    let mut pos = 0;
    while pos < data_end {
        let shared = varint(block, &mut pos)? as usize;
        let unshared = varint(block, &mut pos)? as usize;
        let value_len = varint(block, &mut pos)? as usize;
        if shared > key.len() {
            return Err(format!(
                "entry at {pos} shares {shared} bytes of a {}-byte key",
                key.len()
            ));
        }
        let key_end = pos
            .checked_add(unshared)
            .filter(|&e| e <= data_end)
            .ok_or("entry key runs past its block")?;
        let value_end = key_end
            .checked_add(value_len)
            .filter(|&e| e <= data_end)
            .ok_or("entry value runs past its block")?;
        key.truncate(shared);
        key.extend_from_slice(&block[pos..key_end]);
        entries.push((key.clone(), &block[key_end..value_end]));
        pos = value_end;
    }
    Ok(entries)
}

// ---------------------------------------------------------------------------- crc32c

const fn crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0x82f6_3b78 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

static CRC_TABLE: [u32; 256] = crc_table();

/// CRC-32C (Castagnoli), as TensorFlow and LevelDB checksum blocks and tensors.
pub(crate) fn crc32c(data: &[u8]) -> u32 {
    crc32c_extend(0, data)
}

pub(crate) fn crc32c_extend(crc: u32, data: &[u8]) -> u32 {
    let mut c = !crc;
    for &b in data {
        c = CRC_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// LevelDB's masked CRC, stored so that a CRC of data containing CRCs is not degenerate.
pub(crate) fn mask(crc: u32) -> u32 {
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn put_varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn block(entries: &[(&[u8], &[u8])], restart_every: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut restarts = Vec::new();
        let mut prev: &[u8] = &[];
        for (i, (k, v)) in entries.iter().enumerate() {
            let shared = if i % restart_every == 0 {
                restarts.push(out.len() as u32);
                0
            } else {
                prev.iter().zip(k.iter()).take_while(|(a, b)| a == b).count()
            };
            put_varint(&mut out, shared as u64);
            put_varint(&mut out, (k.len() - shared) as u64);
            put_varint(&mut out, v.len() as u64);
            out.extend_from_slice(&k[shared..]);
            out.extend_from_slice(v);
            prev = k;
        }
        for r in &restarts {
            out.extend_from_slice(&r.to_le_bytes());
        }
        out.extend_from_slice(&(restarts.len() as u32).to_le_bytes());
        out
    }

    fn append_block(file: &mut Vec<u8>, contents: &[u8], kind: u8) -> (u64, u64) {
        let handle = (file.len() as u64, contents.len() as u64);
        file.extend_from_slice(contents);
        file.push(kind);
        file.extend_from_slice(&mask(crc32c_extend(crc32c(contents), &[kind])).to_le_bytes());
        handle
    }

    /// A table as TensorFlow's TableBuilder writes it: data blocks of `per_block` entries.
    pub fn build_table(entries: &[(&[u8], &[u8])], per_block: usize) -> Vec<u8> {
        let mut file = Vec::new();
        let mut index: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        for chunk in entries.chunks(per_block) {
            let (off, size) = append_block(&mut file, &block(chunk, 3), 0);
            let mut h = Vec::new();
            put_varint(&mut h, off);
            put_varint(&mut h, size);
            index.push((chunk[chunk.len() - 1].0.to_vec(), h));
        }
        let meta = append_block(&mut file, &block(&[], 1), 0);
        let idx: Vec<(&[u8], &[u8])> = index.iter().map(|(k, v)| (k.as_slice(), v.as_slice())).collect();
        let index_handle = append_block(&mut file, &block(&idx, 1), 0);
        let mut footer = Vec::new();
        for v in [meta.0, meta.1, index_handle.0, index_handle.1] {
            put_varint(&mut footer, v);
        }
        footer.resize(40, 0);
        footer.extend_from_slice(&MAGIC.to_le_bytes());
        file.extend_from_slice(&footer);
        file
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c_extend(crc32c(b"1234"), b"56789"), 0xe306_9283);
    }

    #[test]
    fn reads_prefix_compressed_entries_across_blocks() {
        let entries: Vec<(Vec<u8>, Vec<u8>)> = (0..20)
            .map(|i| (format!("layer_{:02}/kernel", i).into_bytes(), vec![i as u8; i]))
            .collect();
        let refs: Vec<(&[u8], &[u8])> = entries
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
            .collect();
        let table = build_table(&refs, 7);
        assert_eq!(read_table(&table).unwrap(), entries);
    }

    #[test]
    fn corruption_truncation_and_compression_are_clear_errors() {
        let table = build_table(&[(b"a", b"1"), (b"b", b"2")], 8);
        let mut flipped = table.clone();
        flipped[2] ^= 0x40;
        assert!(read_table(&flipped).unwrap_err().contains("checksum"));
        assert!(
            read_table(&table[..table.len() - 1])
                .unwrap_err()
                .contains("magic")
        );
        assert!(read_table(&table[..30]).unwrap_err().contains("too short"));

        let mut file = Vec::new();
        let (off, size) = append_block(&mut file, &block(&[], 1), 1);
        let mut footer = Vec::new();
        for v in [off, size, off, size] {
            put_varint(&mut footer, v);
        }
        footer.resize(40, 0);
        footer.extend_from_slice(&MAGIC.to_le_bytes());
        file.extend_from_slice(&footer);
        assert!(read_table(&file).unwrap_err().contains("snappy"));
    }
}
