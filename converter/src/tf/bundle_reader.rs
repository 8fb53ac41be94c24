//! TensorFlow tensor bundles: the checkpoint in a SavedModel's `variables/` directory.
//!
//! `<prefix>.index` is an SSTable (see [`super::sstable`]) whose key `""` holds a
//! `BundleHeaderProto` (shard count, endianness) and whose other keys map tensor names to
//! `BundleEntryProto`s (dtype, shape, shard, offset, size, masked crc32c). The bytes live in
//! `<prefix>.data-<shard:05>-of-<shards:05>`: raw little-endian values, or for strings
//! `varint64 lengths, u32 masked crc of the lengths, bytes`. Every read is checked against the
//! file length before allocating, and against its checksum after.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use edge_proto::tensorflow::{
    BundleEntryProto, BundleHeaderProto, DataType, bundle_header_proto::Endianness,
};
use prost::Message;

use super::TfError;
use super::sstable::{crc32c, crc32c_extend, mask, read_table};
use super::tensor::{Data, HostTensor, element_count, known_dims};

/// An index file larger than this is not a checkpoint index we want to read into memory.
const MAX_INDEX_BYTES: u64 = 256 << 20;

/// An opened checkpoint: its index in memory, data files read on demand.
pub(crate) struct Bundle {
    prefix: PathBuf,
    num_shards: i32,
    entries: HashMap<String, BundleEntryProto>,
}

impl Bundle {
    /// Opens `<prefix>.index` (e.g. `prefix = saved_model_dir/variables/variables`).
    pub fn open(prefix: &Path) -> Result<Self, TfError> {
        let index_path = with_suffix(prefix, ".index");
        let err = |reason: String| TfError::Bundle {
            path: index_path.clone(),
            reason,
        };
        let len = std::fs::metadata(&index_path)
            .map_err(|e| TfError::io(&index_path, e))?
            .len();
        if len > MAX_INDEX_BYTES {
            return Err(TfError::TooLarge {
                path: index_path,
                what: "checkpoint index",
                size: len,
                limit: MAX_INDEX_BYTES,
            });
        }
        let bytes = std::fs::read(&index_path).map_err(|e| TfError::io(&index_path, e))?;
        let mut header = None;
        let mut entries = HashMap::new();
        for (key, value) in read_table(&bytes).map_err(&err)? {
            let key = String::from_utf8_lossy(&key).into_owned();
            if key.is_empty() {
                header = Some(
                    BundleHeaderProto::decode(value.as_slice()).map_err(|e| err(format!("header: {e}")))?,
                );
            } else {
                let entry = BundleEntryProto::decode(value.as_slice())
                    .map_err(|e| err(format!("entry {key:?}: {e}")))?;
                entries.insert(key, entry);
            }
        }
        let header = header.ok_or_else(|| err("no bundle header (key \"\")".into()))?;
        if header.endianness() != Endianness::Little {
            return Err(err("big-endian checkpoints are not supported".into()));
        }
        if let Some(v) = &header.version
            && v.min_consumer > 1
        {
            return Err(err(format!(
                "bundle format version {} is newer than this reader (1)",
                v.min_consumer
            )));
        }
        if header.num_shards < 1 {
            return Err(err(format!("header says {} shards", header.num_shards)));
        }
        Ok(Bundle {
            prefix: prefix.to_owned(),
            num_shards: header.num_shards,
            entries,
        })
    }

    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    pub fn index_path(&self) -> PathBuf {
        with_suffix(&self.prefix, ".index")
    }

    /// Reads the tensor stored under `key`.
    pub fn read(&self, key: &str) -> Result<HostTensor, TfError> {
        let entry = self.entries.get(key).ok_or_else(|| TfError::Bundle {
            path: self.index_path(),
            reason: format!("no tensor {key:?}"),
        })?;
        let shard = entry.shard_id;
        let path = with_suffix(
            &self.prefix,
            &format!(".data-{shard:05}-of-{:05}", self.num_shards),
        );
        let err = |reason: String| TfError::Bundle {
            path: path.clone(),
            reason: format!("tensor {key:?}: {reason}"),
        };
        if !entry.slices.is_empty() {
            return Err(err(
                "partitioned variables (saved as slices) are not supported".into()
            ));
        }
        if !(0..self.num_shards).contains(&shard) {
            return Err(err(format!("shard {shard} of {}", self.num_shards)));
        }
        let dtype =
            DataType::try_from(entry.dtype).map_err(|_| err(format!("unknown dtype {}", entry.dtype)))?;
        let shape = entry
            .shape
            .as_ref()
            .map_or(Some(Vec::new()), known_dims)
            .ok_or_else(|| err("unknown shape".into()))?;
        let n = element_count(&shape).map_err(&err)?;
        let (offset, size) = (u64::try_from(entry.offset), u64::try_from(entry.size));
        let (Ok(offset), Ok(size)) = (offset, size) else {
            return Err(err(format!(
                "negative offset {} or size {}",
                entry.offset, entry.size
            )));
        };
        let mut file = std::fs::File::open(&path).map_err(|e| TfError::io(&path, e))?;
        let file_len = file.metadata().map_err(|e| TfError::io(&path, e))?.len();
        if offset.checked_add(size).is_none_or(|end| end > file_len) {
            return Err(err(format!(
                "{size} bytes at offset {offset} run past the end of the {file_len}-byte file (truncated?)"
            )));
        }
        let width = match dtype {
            DataType::DtFloat | DataType::DtInt32 => Some(4),
            DataType::DtDouble | DataType::DtInt64 => Some(8),
            DataType::DtUint8 | DataType::DtBool => Some(1),
            _ => None,
        };
        if let Some(w) = width
            && size != (n as u64) * w
        {
            return Err(err(format!(
                "{size} bytes for {n} {} values",
                dtype.as_str_name()
            )));
        }
        let mut bytes = vec![0u8; size as usize];
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| file.read_exact(&mut bytes))
            .map_err(|e| TfError::io(&path, e))?;
        if dtype == DataType::DtString {
            return decode_strings(&bytes, shape, n, entry.crc32c).map_err(err);
        }
        if mask(crc32c(&bytes)) != entry.crc32c {
            return Err(err("data fails its checksum (corrupted file?)".into()));
        }
        HostTensor::from_le_bytes(dtype, shape, &bytes).map_err(err)
    }
}

fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn decode_strings(bytes: &[u8], shape: Vec<usize>, n: usize, stored_crc: u32) -> Result<HostTensor, String> {
    let mut pos = 0;
    let mut lengths = Vec::with_capacity(n.min(bytes.len()));
    let mut crc = 0;
    for _ in 0..n {
        let mut len = 0u64;
        let mut shift = 0;
        loop {
            let &b = bytes.get(pos).ok_or("string lengths run past the entry")?;
            pos += 1;
            len |= u64::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
            if shift >= 64 {
                return Err("bad string length varint".into());
            }
        }
        crc = match u32::try_from(len) {
            Ok(l) => crc32c_extend(crc, &l.to_le_bytes()),
            Err(_) => crc32c_extend(crc, &len.to_le_bytes()),
        };
        lengths.push(len);
    }
    let stored_len_crc = bytes.get(pos..pos + 4).ok_or("missing string length checksum")?;
    if stored_len_crc != mask(crc).to_le_bytes() {
        return Err("string lengths fail their checksum".into());
    }
    crc = crc32c_extend(crc, stored_len_crc);
    pos += 4;
    let mut strings = Vec::with_capacity(lengths.len());
    for len in lengths {
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| pos.checked_add(l))
            .filter(|&e| e <= bytes.len());
        let end = end.ok_or("string data runs past the entry")?;
        crc = crc32c_extend(crc, &bytes[pos..end]);
        strings.push(bytes[pos..end].to_vec());
        pos = end;
    }
    if mask(crc) != stored_crc {
        return Err("string data fails its checksum".into());
    }
    Ok(HostTensor {
        shape,
        data: Data::Str(strings),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::sstable::tests::build_table;
    use super::super::tensor::shape_proto;
    use super::*;

    fn entry(dtype: DataType, shape: &[usize], offset: usize, bytes: &[u8], crc: u32) -> Vec<u8> {
        BundleEntryProto {
            dtype: dtype as i32,
            shape: Some(shape_proto(shape)),
            offset: offset as i64,
            size: bytes.len() as i64,
            crc32c: crc,
            ..Default::default()
        }
        .encode_to_vec()
    }

    pub(crate) fn string_bytes(strings: &[&[u8]]) -> (Vec<u8>, u32) {
        let (mut out, mut crc) = (Vec::new(), 0);
        for s in strings {
            out.push(s.len() as u8);
            crc = crc32c_extend(crc, &(s.len() as u32).to_le_bytes());
        }
        out.extend_from_slice(&mask(crc).to_le_bytes());
        crc = crc32c_extend(crc, &mask(crc).to_le_bytes());
        for s in strings {
            out.extend_from_slice(s);
            crc = crc32c_extend(crc, s);
        }
        (out, mask(crc))
    }

    /// Writes a one-shard bundle at `prefix` holding `tensors` (f32 or strings).
    pub(crate) fn write_test_bundle(prefix: &Path, tensors: &[(&str, HostTensor)]) {
        let mut data = Vec::new();
        let mut entries: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut sorted: Vec<&(&str, HostTensor)> = tensors.iter().collect();
        sorted.sort_by_key(|(k, _)| *k);
        for (key, t) in sorted {
            let (bytes, crc) = match &t.data {
                Data::Str(s) => string_bytes(&s.iter().map(Vec::as_slice).collect::<Vec<_>>()),
                _ => {
                    let b = t.to_proto().tensor_content;
                    let crc = mask(crc32c(&b));
                    (b, crc)
                }
            };
            entries.push((
                key.as_bytes().to_vec(),
                entry(t.data.dtype(), &t.shape, data.len(), &bytes, crc),
            ));
            data.extend_from_slice(&bytes);
        }
        let header = BundleHeaderProto {
            num_shards: 1,
            ..Default::default()
        }
        .encode_to_vec();
        let mut refs: Vec<(&[u8], &[u8])> = vec![(b"", &header)];
        refs.extend(entries.iter().map(|(k, v)| (k.as_slice(), v.as_slice())));
        std::fs::write(with_suffix(prefix, ".index"), build_table(&refs, 2)).unwrap();
        std::fs::write(with_suffix(prefix, ".data-00000-of-00001"), data).unwrap();
    }

    /// A one-shard bundle with a float [2,2] "w" and a string [2] "s"; returns the prefix.
    fn write_bundle(dir: &Path, corrupt_data: bool) -> PathBuf {
        let prefix = dir.join("variables");
        let w = HostTensor::f32(vec![2, 2], vec![1.0, -2.0, 0.5, 4.0]);
        let s = HostTensor {
            shape: vec![2],
            data: Data::Str(vec![b"hello".to_vec(), b"graph".to_vec()]),
        };
        write_test_bundle(&prefix, &[("w", w), ("s", s)]);
        if corrupt_data {
            let path = with_suffix(&prefix, ".data-00000-of-00001");
            let mut data = std::fs::read(&path).unwrap();
            let last = data.len() - 1;
            data[last] ^= 1;
            std::fs::write(path, data).unwrap();
        }
        prefix
    }

    #[test]
    fn reads_float_and_string_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = Bundle::open(&write_bundle(dir.path(), false)).unwrap();
        assert_eq!(
            bundle.read("w").unwrap(),
            HostTensor::f32(vec![2, 2], vec![1.0, -2.0, 0.5, 4.0])
        );
        let s = bundle.read("s").unwrap();
        assert_eq!(s.data, Data::Str(vec![b"hello".to_vec(), b"graph".to_vec()]));
        assert!(
            bundle
                .read("missing")
                .unwrap_err()
                .to_string()
                .contains("no tensor \"missing\"")
        );
    }

    #[test]
    fn corrupted_or_truncated_data_is_an_error_naming_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = write_bundle(dir.path(), true);
        let bundle = Bundle::open(&prefix).unwrap();
        let err = bundle.read("w").unwrap_err().to_string();
        assert!(err.contains("\"w\"") && err.contains("checksum"), "{err}");
        let data = with_suffix(&prefix, ".data-00000-of-00001");
        std::fs::write(&data, [0u8; 10]).unwrap();
        let err = bundle.read("s").unwrap_err().to_string();
        assert!(err.contains("run past the end"), "{err}");
    }
}
