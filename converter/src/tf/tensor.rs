//! A plain host tensor (shape + typed data) and its conversions from and to `TensorProto` and
//! from the raw little-endian bytes of a checkpoint; what constant folding computes on.

use edge_proto::tensorflow::{DataType, TensorProto, TensorShapeProto, tensor_shape_proto::Dim};

/// Refuse tensors with more elements than this (4 GiB of f64): a crafted shape must not make
/// us allocate without bound.
pub(crate) const MAX_ELEMENTS: usize = 1 << 29;

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Data {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    U8(Vec<u8>),
    Bool(Vec<bool>),
    Str(Vec<Vec<u8>>),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Data,
}

impl Data {
    pub fn len(&self) -> usize {
        match self {
            Data::F32(v) => v.len(),
            Data::F64(v) => v.len(),
            Data::I32(v) => v.len(),
            Data::I64(v) => v.len(),
            Data::U8(v) => v.len(),
            Data::Bool(v) => v.len(),
            Data::Str(v) => v.len(),
        }
    }

    pub fn dtype(&self) -> DataType {
        match self {
            Data::F32(_) => DataType::DtFloat,
            Data::F64(_) => DataType::DtDouble,
            Data::I32(_) => DataType::DtInt32,
            Data::I64(_) => DataType::DtInt64,
            Data::U8(_) => DataType::DtUint8,
            Data::Bool(_) => DataType::DtBool,
            Data::Str(_) => DataType::DtString,
        }
    }
}

/// Number of elements of `shape`, refusing overflow and absurd sizes.
pub(crate) fn element_count(shape: &[usize]) -> Result<usize, String> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= MAX_ELEMENTS)
        .ok_or_else(|| format!("tensor shape {shape:?} has too many elements"))
}

/// Dims of a fully known shape (`None` if any dim is unknown or the rank is unknown).
pub(crate) fn known_dims(shape: &TensorShapeProto) -> Option<Vec<usize>> {
    if shape.unknown_rank {
        return None;
    }
    shape.dim.iter().map(|d| usize::try_from(d.size).ok()).collect()
}

pub(crate) fn shape_proto(dims: &[usize]) -> TensorShapeProto {
    TensorShapeProto {
        dim: dims
            .iter()
            .map(|&d| Dim {
                size: d as i64,
                name: String::new(),
            })
            .collect(),
        unknown_rank: false,
    }
}

/// A shape with possibly unknown (`-1`) dims.
pub(crate) fn shape_proto_i64(dims: &[i64]) -> TensorShapeProto {
    TensorShapeProto {
        dim: dims
            .iter()
            .map(|&size| Dim {
                size,
                name: String::new(),
            })
            .collect(),
        unknown_rank: false,
    }
}

/// `n` values from a proto's repeated field: TensorFlow repeats the last value when fewer are
/// given (a splat constant stores one), and zero-fills when none are.
fn splat<T: Clone + Default>(vals: &[T], n: usize) -> Vec<T> {
    if vals.len() >= n {
        return vals[..n].to_vec();
    }
    let mut out = vals.to_vec();
    out.resize(n, vals.last().cloned().unwrap_or_default());
    out
}

impl HostTensor {
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Self {
        HostTensor {
            shape,
            data: Data::F32(data),
        }
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            Data::F32(v) => Some(v),
            _ => None,
        }
    }

    /// Integer contents (int32 or int64) widened to i64, e.g. a shape or axis operand.
    pub fn as_i64s(&self) -> Option<Vec<i64>> {
        match &self.data {
            Data::I32(v) => Some(v.iter().map(|&x| x as i64).collect()),
            Data::I64(v) => Some(v.clone()),
            _ => None,
        }
    }

    pub fn from_proto(p: &TensorProto) -> Result<Self, String> {
        let shape = match &p.tensor_shape {
            Some(s) => known_dims(s).ok_or("constant with an unknown shape")?,
            None => Vec::new(),
        };
        let n = element_count(&shape)?;
        let dtype = DataType::try_from(p.dtype).map_err(|_| format!("unknown dtype {}", p.dtype))?;
        if !p.tensor_content.is_empty() {
            return Self::from_le_bytes(dtype, shape, &p.tensor_content);
        }
        let data = match dtype {
            DataType::DtFloat => Data::F32(splat(&p.float_val, n)),
            DataType::DtDouble => Data::F64(splat(&p.double_val, n)),
            DataType::DtInt32 => Data::I32(splat(&p.int_val, n)),
            DataType::DtInt64 => Data::I64(splat(&p.int64_val, n)),
            DataType::DtUint8 => Data::U8(splat(&p.int_val, n).into_iter().map(|v| v as u8).collect()),
            DataType::DtBool => Data::Bool(splat(&p.bool_val, n)),
            DataType::DtString => Data::Str(splat(&p.string_val, n)),
            other => {
                return Err(format!(
                    "constants of type {} are not supported",
                    other.as_str_name()
                ));
            }
        };
        Ok(HostTensor { shape, data })
    }

    /// Decodes raw little-endian tensor bytes (`tensor_content`, or a checkpoint entry).
    pub fn from_le_bytes(dtype: DataType, shape: Vec<usize>, bytes: &[u8]) -> Result<Self, String> {
        let n = element_count(&shape)?;
        let width = match dtype {
            DataType::DtFloat | DataType::DtInt32 => 4,
            DataType::DtDouble | DataType::DtInt64 => 8,
            DataType::DtUint8 | DataType::DtBool => 1,
            other => {
                return Err(format!(
                    "raw tensors of type {} are not supported",
                    other.as_str_name()
                ));
            }
        };
        if bytes.len() != n * width {
            return Err(format!(
                "{} bytes of {} data for shape {shape:?} (expected {})",
                bytes.len(),
                dtype.as_str_name(),
                n * width
            ));
        }
        fn chunks<const W: usize, T>(b: &[u8], f: impl Fn([u8; W]) -> T) -> Vec<T> {
            b.chunks_exact(W)
                .map(|c| f(c.try_into().unwrap_or([0; W])))
                .collect()
        }
        let data = match dtype {
            DataType::DtFloat => Data::F32(chunks(bytes, f32::from_le_bytes)),
            DataType::DtInt32 => Data::I32(chunks(bytes, i32::from_le_bytes)),
            DataType::DtDouble => Data::F64(chunks(bytes, f64::from_le_bytes)),
            DataType::DtInt64 => Data::I64(chunks(bytes, i64::from_le_bytes)),
            DataType::DtUint8 => Data::U8(bytes.to_vec()),
            _ => Data::Bool(bytes.iter().map(|&b| b != 0).collect()),
        };
        Ok(HostTensor { shape, data })
    }

    /// The `TensorProto` tract-tensorflow reads: numbers in `tensor_content`, strings in
    /// `string_val`.
    pub fn to_proto(&self) -> TensorProto {
        let mut p = TensorProto {
            dtype: self.data.dtype() as i32,
            tensor_shape: Some(shape_proto(&self.shape)),
            ..Default::default()
        };
        fn le<T: Copy, const W: usize>(v: &[T], f: impl Fn(T) -> [u8; W]) -> Vec<u8> {
            v.iter().flat_map(|&x| f(x)).collect()
        }
        match &self.data {
            Data::F32(v) => p.tensor_content = le(v, f32::to_le_bytes),
            Data::F64(v) => p.tensor_content = le(v, f64::to_le_bytes),
            Data::I32(v) => p.tensor_content = le(v, i32::to_le_bytes),
            Data::I64(v) => p.tensor_content = le(v, i64::to_le_bytes),
            Data::U8(v) => p.tensor_content = v.clone(),
            Data::Bool(v) => p.bool_val = v.clone(),
            Data::Str(v) => p.string_val = v.clone(),
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splat_constant_repeats_its_single_value() {
        let p = TensorProto {
            dtype: DataType::DtFloat as i32,
            tensor_shape: Some(shape_proto(&[2, 2])),
            float_val: vec![0.5],
            ..Default::default()
        };
        assert_eq!(
            HostTensor::from_proto(&p).unwrap(),
            HostTensor::f32(vec![2, 2], vec![0.5; 4])
        );
    }

    #[test]
    fn proto_round_trip_keeps_shape_and_values() {
        let t = HostTensor::f32(vec![1, 3], vec![1.0, -2.5, 3.25]);
        assert_eq!(HostTensor::from_proto(&t.to_proto()).unwrap(), t);
        let i = HostTensor {
            shape: vec![2],
            data: Data::I64(vec![-1, 7]),
        };
        assert_eq!(HostTensor::from_proto(&i.to_proto()).unwrap(), i);
    }

    #[test]
    fn wrong_content_length_is_an_error() {
        let err = HostTensor::from_le_bytes(DataType::DtFloat, vec![3], &[0; 8]).unwrap_err();
        assert!(err.contains("8 bytes"), "{err}");
    }

    #[test]
    fn absurd_shapes_are_refused_before_allocating() {
        let p = TensorProto {
            dtype: DataType::DtFloat as i32,
            tensor_shape: Some(shape_proto(&[1 << 20, 1 << 20])),
            float_val: vec![1.0],
            ..Default::default()
        };
        assert!(
            HostTensor::from_proto(&p)
                .unwrap_err()
                .contains("too many elements")
        );
    }
}
