//! GGUF v2/v3 reader: header, metadata, tensor table, alignment, and dequantisation to f32.
//!
//! Format facts (from the GGUF specification and ggml's block layouts): little-endian; header
//! `GGUF` magic, `u32` version, `u64` tensor count, `u64` metadata count; metadata values are
//! typed (13 types, arrays nest); each tensor entry is name, dims (`ne0` fastest), ggml type and
//! an offset relative to the data section, which starts at the next multiple of
//! `general.alignment` (default 32) after the tensor table.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};

use crate::error::{Error, Result, io_err};

/// A GGUF metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Unsigned integer (u8/u16/u32/u64).
    U(u64),
    /// Signed integer (i8/i16/i32/i64).
    I(i64),
    /// Float (f32/f64).
    F(f64),
    /// Boolean.
    Bool(bool),
    /// UTF-8 string.
    Str(String),
    /// Array of values.
    Array(Vec<Value>),
}

impl Value {
    /// As an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U(v) => Some(v),
            Value::I(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    /// As a float, if numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::U(v) => Some(v as f64),
            Value::I(v) => Some(v as f64),
            Value::F(v) => Some(v),
            _ => None,
        }
    }
    /// As a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    /// As an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
    /// As a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
}

/// The ggml tensor types lopper reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types, missing_docs)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q8_0,
    Q4_K,
    Q5_K,
    Q6_K,
}

impl GgmlType {
    /// The ggml type id.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::BF16 => 30,
        }
    }

    fn from_id(id: u32) -> std::result::Result<Self, String> {
        Ok(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4_K,
            13 => GgmlType::Q5_K,
            14 => GgmlType::Q6_K,
            30 => GgmlType::BF16,
            other => {
                let name = match other {
                    6 => "Q5_0",
                    7 => "Q5_1",
                    9 => "Q8_1",
                    10 => "Q2_K",
                    11 => "Q3_K",
                    15 => "Q8_K",
                    16..=23 => "an IQ type",
                    _ => "an unknown type",
                };
                return Err(format!(
                    "ggml type {other} ({name}) is not supported; lopper reads F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K, Q5_K and Q6_K (re-quantise the file with llama.cpp's llama-quantize to one of these)"
                ));
            }
        })
    }

    /// (weights per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4_K => (256, 144),
            GgmlType::Q5_K => (256, 176),
            GgmlType::Q6_K => (256, 210),
        }
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// GGUF tensor name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions, `ne0` (contiguous) first.
    pub dims: Vec<u64>,
    /// Storage type.
    pub ggml_type: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Byte size of the data.
    pub size: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }
    /// Row-major shape (`[ne1, ne0]` for matrices: `[out, in]` like torch).
    pub fn row_major_shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A memory-mapped GGUF file.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    map: memmap2::Mmap,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata, by key.
    pub metadata: BTreeMap<String, Value>,
    /// Tensor table, in file order.
    pub tensors: Vec<TensorInfo>,
    /// Alignment of the data section.
    pub alignment: u64,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> std::result::Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(format!(
                "the file ends at byte {} while reading {what} (needs {n} bytes at offset {}); the file is truncated or corrupt, download it again",
                self.buf.len(),
                self.pos
            )),
        }
    }
    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    fn string(&mut self, what: &str) -> std::result::Result<String, String> {
        let n = self.u64(what)?;
        if n > self.buf.len() as u64 {
            return Err(format!(
                "{what} claims a string of {n} bytes, longer than the file; the file is corrupt"
            ));
        }
        let b = self.take(n as usize, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("{what} is not valid UTF-8"))
    }
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> std::result::Result<Value, String> {
        let what = &format!("metadata value `{key}`");
        Ok(match ty {
            0 => Value::U(self.take(1, what)?[0] as u64),
            1 => Value::I(self.take(1, what)?[0] as i8 as i64),
            2 => Value::U(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap()) as u64),
            3 => Value::I(i16::from_le_bytes(self.take(2, what)?.try_into().unwrap()) as i64),
            4 => Value::U(self.u32(what)? as u64),
            5 => Value::I(self.u32(what)? as i32 as i64),
            6 => Value::F(f32::from_le_bytes(self.take(4, what)?.try_into().unwrap()) as f64),
            7 => Value::Bool(self.take(1, what)?[0] != 0),
            8 => Value::Str(self.string(what)?),
            9 => {
                if depth > 4 {
                    return Err(format!("{what}: arrays nested too deeply"));
                }
                let inner = self.u32(what)?;
                let n = self.u64(what)?;
                if n > (self.buf.len() - self.pos) as u64 {
                    return Err(format!(
                        "{what} claims {n} array items, more than the file can hold; the file is corrupt"
                    ));
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(inner, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U(self.u64(what)?),
            11 => Value::I(self.u64(what)? as i64),
            12 => Value::F(f64::from_le_bytes(self.take(8, what)?.try_into().unwrap())),
            t => {
                return Err(format!(
                    "{what} has unknown value type {t}; the file is corrupt"
                ));
            }
        })
    }
}

impl GgufFile {
    /// Memory-maps and parses `path`. Every structural problem (wrong magic, unsupported version,
    /// truncation, unsupported tensor type, tensor data out of bounds) is an error naming the file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(io_err(path))?;
        // SAFETY: the map is read-only; lopper never writes to a GGUF file it has open, and the
        // file is only read through bounds-checked slices.
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(path))?;
        let (version, metadata, tensors, alignment) =
            Self::parse(&map).map_err(|msg| Error::Gguf {
                path: path.to_owned(),
                msg,
            })?;
        Ok(Self {
            path: path.to_owned(),
            map,
            version,
            metadata,
            tensors,
            alignment,
        })
    }

    #[allow(clippy::type_complexity)]
    fn parse(
        buf: &[u8],
    ) -> std::result::Result<(u32, BTreeMap<String, Value>, Vec<TensorInfo>, u64), String> {
        let mut c = Cursor { buf, pos: 0 };
        let magic = c.take(4, "the magic number")?;
        if magic != b"GGUF" {
            return Err(format!(
                "wrong magic {:02x?} (expected \"GGUF\"): this is not a GGUF file",
                magic
            ));
        }
        let version = c.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(format!(
                "GGUF version {version} is not supported (lopper reads versions 2 and 3); convert the model with a current llama.cpp"
            ));
        }
        let n_tensors = c.u64("the tensor count")?;
        let n_kv = c.u64("the metadata count")?;
        if n_tensors > 1 << 24 || n_kv > 1 << 24 {
            return Err(format!(
                "implausible header ({n_tensors} tensors, {n_kv} metadata entries); the file is corrupt"
            ));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("a metadata key")?;
            let ty = c.u32("a metadata type")?;
            let v = c.value(ty, &key, 0)?;
            metadata.insert(key, v);
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => return Err(format!("general.alignment {v:?} is not a power of two")),
            },
        };
        let mut raw = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = c.string("a tensor name")?;
            let what = format!("the entry of tensor `{name}`");
            let n_dims = c.u32(&what)?;
            if n_dims == 0 || n_dims > 4 {
                return Err(format!(
                    "tensor `{name}` has {n_dims} dimensions (1 to 4 allowed)"
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64(&what)?);
            }
            let ty = c.u32(&what)?;
            let offset = c.u64(&what)?;
            let ggml_type = GgmlType::from_id(ty).map_err(|m| format!("tensor `{name}`: {m}"))?;
            raw.push((name, dims, ggml_type, offset));
        }
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(raw.len());
        for (name, dims, ggml_type, offset) in raw {
            let numel = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| format!("tensor `{name}` dims {dims:?} overflow"))?;
            let (bw, bb) = ggml_type.block();
            if numel % bw as u64 != 0 || dims[0] % bw as u64 != 0 {
                return Err(format!(
                    "tensor `{name}` ({ggml_type:?}, dims {dims:?}): rows are not a whole number of {bw}-weight blocks"
                ));
            }
            let size = numel / bw as u64 * bb as u64;
            let start = data_start + offset;
            if start
                .checked_add(size)
                .is_none_or(|end| end > buf.len() as u64)
            {
                return Err(format!(
                    "tensor `{name}` data ({size} bytes at offset {start}) runs past the end of the file ({} bytes); the file is truncated, download it again",
                    buf.len()
                ));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset: start,
                size,
            });
        }
        Ok((version, metadata, tensors, alignment))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the file in bytes.
    pub fn file_size(&self) -> u64 {
        self.map.len() as u64
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// The table entry of tensor `name`.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.map[info.offset as usize..(info.offset + info.size) as usize]
    }

    /// Dequantises tensor `name` to f32, in row-major order (shape [`TensorInfo::row_major_shape`]).
    pub fn dequantize(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let info = self.tensor_info(name).ok_or_else(|| Error::Gguf {
            path: self.path.clone(),
            msg: format!("tensor `{name}` is missing"),
        })?;
        let data = dequantize(
            info.ggml_type,
            self.tensor_bytes(info),
            info.numel() as usize,
        );
        Ok((info.row_major_shape(), data))
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantises `n` weights stored as `ty` in `bytes` (which must hold exactly `n` weights).
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let (bw, bb) = ty.block();
    assert_eq!(
        bytes.len(),
        n / bw * bb,
        "dequantize: byte count does not match {n} weights of {ty:?}"
    );
    let mut out = vec![0f32; n];
    let blocks = bytes.chunks_exact(bb).zip(out.chunks_exact_mut(bw));
    match ty {
        GgmlType::F32 => {
            for (b, o) in blocks {
                o[0] = f32::from_le_bytes(b.try_into().unwrap());
            }
        }
        GgmlType::F16 => {
            for (b, o) in blocks {
                o[0] = f16_at(b, 0);
            }
        }
        GgmlType::BF16 => {
            for (b, o) in blocks {
                o[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        GgmlType::Q4_0 => {
            for (b, o) in blocks {
                let d = f16_at(b, 0);
                let qs = &b[2..18];
                for j in 0..16 {
                    o[j] = d * ((qs[j] & 0x0F) as i32 - 8) as f32;
                    o[j + 16] = d * ((qs[j] >> 4) as i32 - 8) as f32;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (b, o) in blocks {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let qs = &b[4..20];
                for j in 0..16 {
                    o[j] = d * (qs[j] & 0x0F) as f32 + m;
                    o[j + 16] = d * (qs[j] >> 4) as f32 + m;
                }
            }
        }
        GgmlType::Q8_0 => {
            for (b, o) in blocks {
                let d = f16_at(b, 0);
                for j in 0..32 {
                    o[j] = d * (b[2 + j] as i8) as f32;
                }
            }
        }
        GgmlType::Q4_K => {
            for (b, o) in blocks {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let qs = &b[16..144];
                for (k, (q, o)) in qs.chunks_exact(32).zip(o.chunks_exact_mut(64)).enumerate() {
                    let (sc1, m1) = scale_min_k4(2 * k, scales);
                    let (sc2, m2) = scale_min_k4(2 * k + 1, scales);
                    let (d1, m1, d2, m2) = (d * sc1, dmin * m1, d * sc2, dmin * m2);
                    for l in 0..32 {
                        o[l] = d1 * (q[l] & 0x0F) as f32 - m1;
                        o[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
                    }
                }
            }
        }
        GgmlType::Q5_K => {
            for (b, o) in blocks {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let qh = &b[16..48];
                let qs = &b[48..176];
                for (k, (q, o)) in qs.chunks_exact(32).zip(o.chunks_exact_mut(64)).enumerate() {
                    let (sc1, m1) = scale_min_k4(2 * k, scales);
                    let (sc2, m2) = scale_min_k4(2 * k + 1, scales);
                    let (d1, m1, d2, m2) = (d * sc1, dmin * m1, d * sc2, dmin * m2);
                    let (u1, u2) = (1u8 << (2 * k), 2u8 << (2 * k));
                    for l in 0..32 {
                        let hi1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                        let hi2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                        o[l] = d1 * ((q[l] & 0x0F) + hi1) as f32 - m1;
                        o[l + 32] = d2 * ((q[l] >> 4) + hi2) as f32 - m2;
                    }
                }
            }
        }
        GgmlType::Q6_K => {
            for (b, o) in blocks {
                let ql_all = &b[0..128];
                let qh_all = &b[128..192];
                let sc_all = &b[192..208];
                let d = f16_at(b, 208);
                for half in 0..2 {
                    let ql = &ql_all[64 * half..];
                    let qh = &qh_all[32 * half..];
                    let sc = &sc_all[8 * half..];
                    let o = &mut o[128 * half..];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        o[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                        o[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                        o[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                        o[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                    }
                }
            }
        }
    }
    out
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K super-block.
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    if j < 4 {
        ((q[j] & 63) as f32, (q[j + 4] & 63) as f32)
    } else {
        let sc = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
        let m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
        (sc as f32, m as f32)
    }
}

/// Builds a GGUF v3 file in memory: metadata, then the tensor table, then aligned tensor data.
#[derive(Debug, Clone, Default)]
pub struct GgufBuilder {
    /// Metadata entries, written in order.
    pub metadata: Vec<(String, Value)>,
    /// Tensors: GGUF name, dims (`ne0` first), type, raw bytes.
    pub tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
}

impl GgufBuilder {
    /// Adds a metadata entry.
    pub fn meta(&mut self, key: &str, value: Value) -> &mut Self {
        self.metadata.push((key.into(), value));
        self
    }

    /// Adds an F32 tensor from a row-major host tensor (`[out, in]` becomes `ne = [in, out]`).
    pub fn tensor_f32(&mut self, name: &str, shape: &[usize], data: &[f32]) -> &mut Self {
        let dims = shape.iter().rev().map(|&d| d as u64).collect();
        let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensors.push((name.into(), dims, GgmlType::F32, bytes));
        self
    }

    /// Adds a tensor stored as `ty` (F32, F16 or Q8_0) from a row-major host tensor. Q8_0 needs
    /// rows of a multiple of 32 values; other rows, and 1-D tensors, are stored as F16 / F32.
    /// Returns the type used.
    pub fn tensor(&mut self, name: &str, shape: &[usize], data: &[f32], ty: GgmlType) -> GgmlType {
        let ty = stored_type(shape, ty);
        let dims = shape.iter().rev().map(|&d| d as u64).collect();
        self.tensors.push((name.into(), dims, ty, encode(data, ty)));
        ty
    }

    /// The metadata and the tensor table of a file holding this builder's tensors followed by
    /// `later` (`(name, dims, type, byte length)`), padded to the data section; and each
    /// tensor's offset in the data section, in that order.
    fn header(&self, later: &[(String, Vec<u64>, GgmlType, u64)]) -> (Vec<u8>, Vec<u64>) {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        let n = self.tensors.len() + later.len();
        out.extend_from_slice(&(n as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            write_str(&mut out, k);
            out.extend_from_slice(&value_type(v).to_le_bytes());
            write_value(&mut out, v);
        }
        let entries = self
            .tensors
            .iter()
            .map(|(name, dims, ty, bytes)| (name, dims, *ty, bytes.len() as u64))
            .chain(
                later
                    .iter()
                    .map(|(name, dims, ty, len)| (name, dims, *ty, *len)),
            );
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(n);
        for (name, dims, ty, len) in entries {
            write_str(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ty.id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + len).div_ceil(ALIGN) * ALIGN;
        }
        out.resize(out.len().div_ceil(ALIGN as usize) * ALIGN as usize, 0);
        offsets.push(offset);
        (out, offsets)
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let (mut out, offsets) = self.header(&[]);
        let start = out.len();
        for ((_, _, _, bytes), off) in self.tensors.iter().zip(offsets) {
            out.resize(start + off as usize, 0);
            out.extend_from_slice(bytes);
        }
        out
    }

    /// The layout of the file holding this builder's metadata and tensors, then the tensors of
    /// `later` (`(name, row-major shape, type asked)`, stored as [`GgufBuilder::tensor`] would
    /// store them) whose data comes at write time ([`GgufLayout::encode`]): from the shapes
    /// alone, so a model can be written one tensor at a time.
    pub fn layout(&self, later: Vec<(String, Vec<usize>, GgmlType)>) -> GgufLayout {
        let later: Vec<(String, Vec<usize>, GgmlType)> = later
            .into_iter()
            .map(|(n, shape, ty)| {
                let ty = stored_type(&shape, ty);
                (n, shape, ty)
            })
            .collect();
        let entries: Vec<(String, Vec<u64>, GgmlType, u64)> = later
            .iter()
            .map(|(n, shape, ty)| {
                let dims = shape.iter().rev().map(|&d| d as u64).collect();
                (n.clone(), dims, *ty, stored_len(shape, *ty))
            })
            .collect();
        let (head, offsets) = self.header(&entries);
        let start = head.len() as u64;
        let fixed = self
            .tensors
            .iter()
            .zip(&offsets)
            .map(|((_, _, _, bytes), off)| (start + off, bytes.clone()))
            .collect();
        let slots = later
            .into_iter()
            .zip(&offsets[self.tensors.len()..])
            .map(|((n, shape, ty), off)| (n, (start + off, shape, ty)))
            .collect();
        // The file ends with the last tensor's bytes, not its padding.
        let len = match (entries.last(), self.tensors.last()) {
            (Some((_, _, _, l)), _) => start + offsets[offsets.len() - 2] + l,
            (None, Some((_, _, _, b))) => start + offsets[offsets.len() - 2] + b.len() as u64,
            (None, None) => start,
        };
        GgufLayout {
            head,
            fixed,
            slots,
            len,
        }
    }
}

/// Data alignment of the files [`GgufBuilder`] writes (`general.alignment`).
const ALIGN: u64 = 32;

/// The type [`GgufBuilder::tensor`] stores a row-major tensor of `shape` asked as `ty` in.
fn stored_type(shape: &[usize], ty: GgmlType) -> GgmlType {
    let row = shape.last().copied().unwrap_or(0);
    match ty {
        _ if shape.len() < 2 => GgmlType::F32,
        GgmlType::Q8_0 if row % 32 != 0 => GgmlType::F16,
        GgmlType::Q8_0 | GgmlType::F16 => ty,
        _ => GgmlType::F32,
    }
}

/// Bytes of a tensor of `shape` stored as `ty` (a type of [`stored_type`]).
fn stored_len(shape: &[usize], ty: GgmlType) -> u64 {
    let n = shape.iter().product::<usize>() as u64;
    match ty {
        GgmlType::F16 => 2 * n,
        GgmlType::Q8_0 => n / 32 * 34,
        _ => 4 * n,
    }
}

/// `data` stored as `ty` (a type of [`stored_type`]).
fn encode(data: &[f32], ty: GgmlType) -> Vec<u8> {
    match ty {
        GgmlType::F16 => data
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect(),
        GgmlType::Q8_0 => quantize_q8_0(data),
        _ => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// Where every tensor of a GGUF file goes ([`GgufBuilder::layout`]): its header and the
/// builder's own tensors, and a slot for each tensor written later.
#[derive(Debug, Clone)]
pub struct GgufLayout {
    /// Metadata and tensor table, padded to the data section.
    head: Vec<u8>,
    /// The builder's tensors: absolute offset and bytes.
    fixed: Vec<(u64, Vec<u8>)>,
    /// Name -> (absolute offset, row-major shape, stored type) of the tensors written later.
    slots: BTreeMap<String, (u64, Vec<usize>, GgmlType)>,
    len: u64,
}

impl GgufLayout {
    /// The file's length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.fixed.is_empty() && self.slots.is_empty()
    }

    /// Names of the tensors written later.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.slots.keys().map(String::as_str)
    }

    /// Writes the header and the builder's tensors.
    pub fn write_fixed(
        &self,
        write_at: &mut dyn FnMut(u64, &[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        write_at(0, &self.head)?;
        for (at, bytes) in &self.fixed {
            write_at(*at, bytes)?;
        }
        Ok(())
    }

    /// Tensor `name`'s bytes (row-major `data` of `shape`) in its slot's type, and where they go.
    pub fn encode(&self, name: &str, shape: &[usize], data: &[f32]) -> Result<(u64, Vec<u8>)> {
        let bad = |msg: String| Error::Gguf {
            path: "(being written)".into(),
            msg,
        };
        let (at, want, ty) = self
            .slots
            .get(name)
            .ok_or_else(|| bad(format!("{name} is not in the tensor table")))?;
        if want != shape {
            return Err(bad(format!(
                "{name}: {shape:?} written into a slot of {want:?}"
            )));
        }
        Ok((*at, encode(data, *ty)))
    }
}

/// Q8_0 blocks of 32 values: an f16 scale `d = max|x| / 127`, then 32 `i8` `round(x / d)`.
pub fn quantize_q8_0(data: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() / 32 * 34);
    for block in data.chunks(32) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        for &v in block {
            out.push((v * inv).round().clamp(-127.0, 127.0) as i8 as u8);
        }
    }
    out
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn value_type(v: &Value) -> u32 {
    match v {
        Value::U(x) if *x <= u32::MAX as u64 => 4,
        Value::U(_) => 10,
        Value::I(_) => 5,
        Value::F(_) => 6,
        Value::Bool(_) => 7,
        Value::Str(_) => 8,
        Value::Array(_) => 9,
    }
}

fn write_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U(x) if *x <= u32::MAX as u64 => out.extend_from_slice(&(*x as u32).to_le_bytes()),
        Value::U(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I(x) => out.extend_from_slice(&(*x as i32).to_le_bytes()),
        Value::F(x) => out.extend_from_slice(&(*x as f32).to_le_bytes()),
        Value::Bool(b) => out.push(*b as u8),
        Value::Str(s) => write_str(out, s),
        Value::Array(items) => {
            // Every item is written with the first item's type (arrays are homogeneous).
            let ty = items.first().map_or(4, |first| {
                match (
                    first,
                    items
                        .iter()
                        .any(|i| matches!(i, Value::U(x) if *x > u32::MAX as u64)),
                ) {
                    (Value::U(_), true) => 10,
                    (f, _) => value_type(f),
                }
            });
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for i in items {
                match (ty, i) {
                    (10, Value::U(x)) => out.extend_from_slice(&x.to_le_bytes()),
                    _ => write_value(out, i),
                }
            }
        }
    }
}

/// A llama-architecture GGUF of a model (`shape` + HF-named `weights`), F32 tensors, q/k rows
/// permuted to llama.cpp's layout, per-layer arrays where layers differ. No tokenizer metadata:
/// add it with [`GgufBuilder::meta`].
pub fn llama_gguf(shape: &lopper_core::ModelShape, weights: &crate::HostWeights) -> GgufBuilder {
    llama_gguf_typed(shape, weights, GgmlType::F32)
}

/// [`llama_gguf`] with 2-D weights stored as `ty` (F32, F16 or Q8_0; see [`GgufBuilder::tensor`]).
pub fn llama_gguf_typed(
    shape: &lopper_core::ModelShape,
    weights: &crate::HostWeights,
    ty: GgmlType,
) -> GgufBuilder {
    let mut b = llama_gguf_meta(shape, ty);
    for (name, t) in &weights.tensors {
        if let Some((g, t)) = llama_gguf_tensor(shape, name, t) {
            b.tensor(&g, &t.shape, &t.data, ty);
        }
    }
    b
}

/// A model's tensor as [`llama_gguf`] stores it: its GGUF name and its data (q/k rows
/// permuted to llama.cpp's layout); `None` for a name GGUF has no place for.
pub fn llama_gguf_tensor<'t>(
    shape: &lopper_core::ModelShape,
    hf: &str,
    t: &'t crate::HostTensor,
) -> Option<(String, std::borrow::Cow<'t, crate::HostTensor>)> {
    use crate::weights::{hf_to_gguf_name, permute_qk_rows};
    use std::borrow::Cow;
    let g = hf_to_gguf_name(hf)?;
    let layer = hf
        .strip_prefix("model.layers.")
        .and_then(|r| r.split('.').next())
        .and_then(|l| l.parse::<usize>().ok());
    let heads = match (layer, &g) {
        (Some(l), g) if g.contains("attn_q.") => Some(shape.layers[l].n_heads),
        (Some(l), g) if g.contains("attn_k.") => Some(shape.layers[l].n_kv_heads),
        _ => None,
    };
    Some(match heads {
        Some(h) => (g, Cow::Owned(permute_qk_rows(t, h, true))),
        None => (g, Cow::Borrowed(t)),
    })
}

/// The metadata of [`llama_gguf_typed`]'s file for `shape`, and the zero MLP of a layer that
/// keeps attention without an MLP; the model's own tensors are not in it.
pub fn llama_gguf_meta(shape: &lopper_core::ModelShape, ty: GgmlType) -> GgufBuilder {
    let mut b = GgufBuilder::default();
    let n = shape.n_layers();
    // Heterogeneous layers are written as llama.cpp's `deci` architecture (the LLaMA decoder
    // with per-layer head counts and MLP widths, 0 heads = no attention block); uniform ones as
    // plain `llama`, which every GGUF reader knows.
    let uniform = shape.layers.windows(2).all(|w| w[0] == w[1])
        && shape.layers.iter().all(|l| l.has_attn() && l.has_mlp());
    let arch = if uniform { "llama" } else { "deci" };
    // llama.cpp's deci graph drops a layer's attention output when its MLP width is 0
    // (`continue` before the residual add), so a layer with attention and no MLP gets a
    // one-channel MLP of zeros instead (it adds exactly 0), flagged in `lopper.mlp_removed`
    // so that lopper reads the layer back without an MLP.
    let placeholder: Vec<bool> = shape
        .layers
        .iter()
        .map(|l| l.has_attn() && !l.has_mlp())
        .collect();
    let ffn_of =
        |i: usize, l: &lopper_core::LayerShape| if placeholder[i] { 1 } else { l.ffn_hidden };
    let per_layer = |f: &dyn Fn(usize, &lopper_core::LayerShape) -> usize| -> Value {
        let v: Vec<usize> = shape
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| f(i, l))
            .collect();
        if uniform {
            Value::U(v[0] as u64)
        } else {
            Value::Array(v.into_iter().map(|x| Value::U(x as u64)).collect())
        }
    };
    let head_dim = shape
        .layers
        .iter()
        .find(|l| l.has_attn())
        .map_or(0, |l| l.head_dim);
    let k = |key: &str| format!("{arch}.{key}");
    b.meta("general.architecture", Value::Str(arch.into()))
        .meta("general.alignment", Value::U(32))
        .meta(&k("block_count"), Value::U(n as u64))
        .meta(
            &k("context_length"),
            Value::U(shape.max_position_embeddings as u64),
        )
        .meta(&k("embedding_length"), Value::U(shape.hidden_size as u64))
        .meta(&k("feed_forward_length"), per_layer(&|i, l| ffn_of(i, l)))
        .meta(&k("attention.head_count"), per_layer(&|_, l| l.n_heads))
        .meta(
            &k("attention.head_count_kv"),
            per_layer(&|_, l| l.n_kv_heads),
        )
        .meta(&k("attention.key_length"), Value::U(head_dim as u64))
        .meta(&k("attention.value_length"), Value::U(head_dim as u64))
        .meta(
            &k("attention.layer_norm_rms_epsilon"),
            Value::F(shape.norm_eps),
        )
        .meta(&k("rope.freq_base"), Value::F(shape.rope.theta))
        .meta(&k("rope.dimension_count"), Value::U(head_dim as u64))
        .meta(&k("vocab_size"), Value::U(shape.vocab_size as u64));
    if placeholder.iter().any(|&p| p) {
        b.meta(
            "lopper.mlp_removed",
            Value::Array(placeholder.iter().map(|&p| Value::Bool(p)).collect()),
        );
        let h = shape.hidden_size;
        for (i, _) in placeholder.iter().enumerate().filter(|(_, p)| **p) {
            b.tensor(
                &format!("blk.{i}.ffn_norm.weight"),
                &[h],
                &vec![1.0; h],
                GgmlType::F32,
            );
            for t in ["ffn_gate", "ffn_up"] {
                b.tensor(&format!("blk.{i}.{t}.weight"), &[1, h], &vec![0.0; h], ty);
            }
            b.tensor(
                &format!("blk.{i}.ffn_down.weight"),
                &[h, 1],
                &vec![0.0; h],
                ty,
            );
        }
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two hand-made blocks: bytes `(i * 37 + block * 11 + 5) % 256`, with the f16 scale fields
    /// overwritten by `value * (block + 1)`.
    fn blocks(ty: GgmlType, f16s: &[(usize, f32)]) -> Vec<u8> {
        let (_, n) = ty.block();
        let mut b = Vec::new();
        for blk in 0..2 {
            let mut x: Vec<u8> = (0..n)
                .map(|i| ((i * 37 + blk * 11 + 5) % 256) as u8)
                .collect();
            for &(pos, v) in f16s {
                x[pos..pos + 2].copy_from_slice(&f16::from_f32(v * (blk + 1) as f32).to_le_bytes());
            }
            b.extend(x);
        }
        b
    }

    /// Reference values from gguf-py 0.19 (`gguf.quants.dequantize`, numpy), for the same bytes:
    /// (sum, sum of squares, values at the given indices).
    fn check(ty: GgmlType, f16s: &[(usize, f32)], sum: f64, sum_sq: f64, at: &[(usize, f64)]) {
        let bytes = blocks(ty, f16s);
        let n = 2 * ty.block().0;
        let out = dequantize(ty, &bytes, n);
        let s: f64 = out.iter().map(|&x| x as f64).sum();
        let s2: f64 = out.iter().map(|&x| (x as f64).powi(2)).sum();
        assert!(
            (s - sum).abs() < 1e-6 * sum.abs().max(1.0),
            "{ty:?} sum {s} vs {sum}"
        );
        assert!(
            (s2 - sum_sq).abs() < 1e-6 * sum_sq,
            "{ty:?} sum_sq {s2} vs {sum_sq}"
        );
        for &(i, v) in at {
            assert_eq!(out[i] as f64, v, "{ty:?}[{i}]");
        }
    }

    #[test]
    fn dequantises_hand_made_blocks_like_the_reference() {
        check(
            GgmlType::Q4_0,
            &[(0, 0.5)],
            -29.5,
            807.25,
            &[(0, 3.5), (1, -2.0), (17, -0.5), (33, 7.0)],
        );
        check(
            GgmlType::Q4_1,
            &[(0, 0.25), (2, -1.5)],
            40.75,
            234.0625,
            &[(0, 0.75), (1, 2.0), (63, 3.0)],
        );
        check(
            GgmlType::Q8_0,
            &[(0, 0.125)],
            -50.0,
            14718.75,
            &[(0, 9.875), (17, -7.5), (33, 31.75)],
        );
        let idx = [0, 1, 17, 31, 33, 63, 100, 200, 255];
        let k = |vals: [f64; 9]| -> Vec<(usize, f64)> { idx.iter().copied().zip(vals).collect() };
        check(
            GgmlType::Q4_K,
            &[(0, 0.0625), (2, 0.03125)],
            11265.5,
            522400.34375,
            &k([
                6.40625, 14.21875, 14.21875, -1.40625, 26.5625, 49.8125, 3.125, 47.4375, -1.09375,
            ]),
        );
        check(
            GgmlType::Q5_K,
            &[(0, 0.0625), (2, 0.03125)],
            24165.5,
            2288284.84375,
            &k([
                31.40625, 14.21875, 14.21875, -1.40625, 65.3125, 26.5625, 8.125, 106.4375, -1.09375,
            ]),
        );
        check(
            GgmlType::Q6_K,
            &[(208, 0.015625)],
            66.9375,
            579114.0849609375,
            &k([
                10.140625, -9.21875, -3.4375, 11.0, 2.34375, -26.0, 42.140625, 51.59375, -1.5,
            ]),
        );
    }

    #[test]
    fn dequantises_float_types() {
        let v = [1.5f32, -2.25, 0.0, 65504.0];
        let f32b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(dequantize(GgmlType::F32, &f32b, 4), v);
        let f16b: Vec<u8> = v
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_le_bytes())
            .collect();
        assert_eq!(dequantize(GgmlType::F16, &f16b, 4), v);
        let bf: Vec<u8> = [1.5f32, -2.25, 0.0, 3.0e38]
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
            .collect();
        let out = dequantize(GgmlType::BF16, &bf, 4);
        assert_eq!(&out[..3], &[1.5, -2.25, 0.0]);
        assert!((out[3] - 3.0e38).abs() < 1e36);
    }

    fn tiny_file() -> GgufBuilder {
        let mut b = GgufBuilder::default();
        b.meta("general.architecture", Value::Str("llama".into()))
            .meta("some.array", Value::Array(vec![Value::U(1), Value::U(2)]))
            .tensor_f32(
                "a.weight",
                &[2, 32],
                &(0..64).map(|x| x as f32).collect::<Vec<_>>(),
            )
            .tensor_f32("b.weight", &[3], &[1.0, 2.0, 3.0]);
        b
    }

    fn open_bytes(bytes: &[u8]) -> Result<GgufFile> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        std::fs::write(&p, bytes).unwrap();
        GgufFile::open(&p)
    }

    fn expect_err(bytes: &[u8], needle: &str) {
        let e = open_bytes(bytes).expect_err("must fail").to_string();
        assert!(
            e.contains(needle) && e.contains("m.gguf"),
            "error {e:?} should mention {needle:?} and the file"
        );
    }

    #[test]
    fn writes_and_reads_back_metadata_and_tensors() {
        let f = open_bytes(&tiny_file().to_bytes()).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(
            f.get("general.architecture").unwrap().as_str(),
            Some("llama")
        );
        assert_eq!(f.get("some.array").unwrap().as_array().unwrap().len(), 2);
        let (shape, data) = f.dequantize("a.weight").unwrap();
        assert_eq!(shape, vec![2, 32]);
        assert_eq!(data[63], 63.0);
        assert_eq!(f.dequantize("b.weight").unwrap().1, vec![1.0, 2.0, 3.0]);
        assert_eq!(
            f.tensor_info("b.weight").unwrap().offset % 32,
            0,
            "data is aligned"
        );
    }

    #[test]
    fn bad_files_give_clear_errors() {
        let good = tiny_file().to_bytes();
        let mut wrong_magic = good.clone();
        wrong_magic[..4].copy_from_slice(b"GGML");
        expect_err(&wrong_magic, "not a GGUF file");
        let mut v1 = good.clone();
        v1[4..8].copy_from_slice(&1u32.to_le_bytes());
        expect_err(&v1, "version 1 is not supported");
        expect_err(&good[..good.len() - 10], "truncated");
        expect_err(&good[..40], "truncated");
        expect_err(&good[..2], "truncated");
        let mut b = tiny_file();
        b.tensors[0].2 = GgmlType::Q4_1;
        b.tensors[0].3.truncate(40);
        let mut bytes = b.to_bytes();
        // Patch the type id of the first tensor to 10 (Q2_K), which lopper does not read.
        let pos = bytes.windows(8).position(|w| w == b"a.weight").unwrap() + 8 + 4 + 16;
        bytes[pos..pos + 4].copy_from_slice(&10u32.to_le_bytes());
        expect_err(&bytes, "Q2_K");
        let f = open_bytes(&good).unwrap();
        let e = f.dequantize("missing.weight").unwrap_err().to_string();
        assert!(e.contains("missing.weight"), "{e}");
    }
}
