//! The wire encodings the pool server (`pool`) and the offload client (`offload`) share,
//! free of either: KServe v2 BYTES framing, little-endian tensor contents, and TF Serving
//! `TensorProto`s of strings and floats. Errors are plain strings; each side wraps them
//! (a gRPC status in the server, a failed call in the client).

use edge_proto::tensorflow::{DataType, TensorProto, TensorShapeProto};

/// KServe BYTES raw contents: each element is its u32 little-endian length, then its bytes.
pub fn split_raw_bytes(raw: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    let mut rest = raw;
    while !rest.is_empty() {
        let Some((len, tail)) = rest.split_first_chunk::<4>() else {
            return Err("raw BYTES input ends inside a length prefix".into());
        };
        let len = u32::from_le_bytes(*len) as usize;
        if tail.len() < len {
            return Err(format!("raw BYTES element of {len} bytes overruns the input"));
        }
        out.push(tail[..len].to_vec());
        rest = &tail[len..];
    }
    Ok(out)
}

/// The KServe BYTES raw contents of `items` (see [`split_raw_bytes`]).
pub fn join_raw_bytes(items: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(items.iter().map(|i| i.len() + 4).sum());
    for i in items {
        out.extend_from_slice(&(i.len() as u32).to_le_bytes());
        out.extend_from_slice(i);
    }
    out
}

/// Little-endian float32 values (TensorProto `tensor_content`, KServe raw FP32 contents).
pub fn le_f32s(bytes: &[u8]) -> Result<Vec<f32>, String> {
    if !bytes.len().is_multiple_of(4) {
        return Err(format!(
            "{} bytes are not a whole number of float32 values",
            bytes.len()
        ));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Little-endian float64 values, narrowed to float32 (KServe raw FP64 contents).
pub fn le_f64s_as_f32(bytes: &[u8]) -> Result<Vec<f32>, String> {
    if !bytes.len().is_multiple_of(8) {
        return Err(format!(
            "{} bytes are not a whole number of float64 values",
            bytes.len()
        ));
    }
    Ok(bytes
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
        .collect())
}

/// `values` as little-endian float32 bytes (the inverse of [`le_f32s`]).
pub fn f32s_le(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A DT_STRING tensor of `shape` holding `strings` (encoded images, label names).
pub fn string_tensor(shape: &[i64], strings: Vec<Vec<u8>>) -> TensorProto {
    TensorProto {
        dtype: DataType::DtString as i32,
        tensor_shape: Some(TensorShapeProto::from_dims(shape)),
        string_val: strings,
        ..TensorProto::default()
    }
}

/// A DT_FLOAT tensor of `shape`: its values in `float_val`, or (`packed`) as little-endian
/// `tensor_content`.
pub fn float_tensor(shape: &[i64], values: Vec<f32>, packed: bool) -> TensorProto {
    let mut t = TensorProto {
        dtype: DataType::DtFloat as i32,
        tensor_shape: Some(TensorShapeProto::from_dims(shape)),
        ..TensorProto::default()
    };
    if packed {
        t.tensor_content = f32s_le(&values);
    } else {
        t.float_val = values;
    }
    t
}

/// The float values of a DT_FLOAT tensor, from `tensor_content` (little-endian) or
/// `float_val`.
pub fn float_values(t: &TensorProto) -> Result<Vec<f32>, String> {
    if t.tensor_content.is_empty() {
        Ok(t.float_val.clone())
    } else {
        le_f32s(&t.tensor_content)
    }
}

/// A tensor's dimensions (none without a shape).
pub fn dims(t: &TensorProto) -> Vec<i64> {
    t.tensor_shape
        .as_ref()
        .map(TensorShapeProto::sizes)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_bytes_round_trip_and_reject_overruns() {
        let items = vec![b"abc".to_vec(), Vec::new(), vec![0xFF; 300]];
        let raw = join_raw_bytes(&items);
        assert_eq!(split_raw_bytes(&raw), Ok(items));
        assert!(split_raw_bytes(&raw[..raw.len() - 1]).is_err());
        assert!(split_raw_bytes(&[1, 0]).is_err());
        assert!(split_raw_bytes(&[5, 0, 0, 0, 1]).is_err());
    }

    #[test]
    fn little_endian_floats_round_trip() {
        let v = [1.5f32, -0.25, 0.0];
        assert_eq!(le_f32s(&f32s_le(&v)), Ok(v.to_vec()));
        assert!(le_f32s(&[0, 0, 0]).is_err());
        let packed = float_tensor(&[1, 3], v.to_vec(), true);
        let listed = float_tensor(&[1, 3], v.to_vec(), false);
        assert_eq!(float_values(&packed), Ok(v.to_vec()));
        assert_eq!(float_values(&listed), Ok(v.to_vec()));
        assert_eq!(dims(&packed), vec![1, 3]);
        let f64s: Vec<u8> = [2.5f64, -1.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(le_f64s_as_f32(&f64s), Ok(vec![2.5, -1.0]));
        assert!(le_f64s_as_f32(&f64s[..7]).is_err());
    }
}
