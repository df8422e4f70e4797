//! GGUF (versions 2 and 3, little-endian) reader and writer in plain Rust.
//!
//! The reader looks only at the header, the key/value metadata and the tensor infos; tensor data
//! is never read. Every number taken from the file is treated as hostile: lengths and counts are
//! bounded by what the rest of the file could hold before anything is allocated, arithmetic is
//! checked, and each error says what was wrong and where.
//!
//! This module depends on nothing but std and `crate::error`, because the fuzz targets compile
//! it on its own through `#[path]`.

use crate::error::{Error, Result, Status};
use std::collections::HashSet;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

const MAGIC: [u8; 4] = *b"GGUF";
/// Version the writer produces.
const WRITE_VERSION: u32 = 3;
/// Alignment when `general.alignment` is absent (ggml's GGUF_DEFAULT_ALIGNMENT).
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions (GGML_MAX_DIMS).
pub const MAX_DIMS: usize = 4;
/// Longest key or tensor name accepted; real ones are well under 256 bytes.
pub const MAX_NAME_LEN: u64 = 64 * 1024;
/// Longest string value accepted. Generous because some files embed whole tokenizer JSON
/// blobs; the remaining file size bounds it further.
pub const MAX_STRING_LEN: u64 = 16 * 1024 * 1024;
/// Arrays may hold arrays, but no deeper: nothing real nests further, and bounding the depth
/// bounds the recursion.
pub const MAX_ARRAY_DEPTH: u32 = 2;

/// Most metadata values (array elements included) in one file. Real files hold a few million at
/// most (vocabularies, merges, score arrays); the cap bounds memory, as each small value costs
/// several times its encoded size once parsed.
pub const MAX_METADATA_VALUES: u64 = 1 << 24;
/// Smallest possible encodings, used to reject counts the file cannot hold.
const MIN_KV_BYTES: u64 = 8 + 4 + 1; // empty key, type, one-byte value
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8; // empty name, n_dims = 0, type, offset
/// Largest Vec reserved up front; longer arrays grow as elements are actually read, so memory
/// follows the bytes really present rather than a count claimed by the file.
const MAX_PREALLOCATED: u64 = 4096;

// GGUF value type ids.
const TYPE_U8: u32 = 0;
const TYPE_I8: u32 = 1;
const TYPE_U16: u32 = 2;
const TYPE_I16: u32 = 3;
const TYPE_U32: u32 = 4;
const TYPE_I32: u32 = 5;
const TYPE_F32: u32 = 6;
const TYPE_BOOL: u32 = 7;
const TYPE_STRING: u32 = 8;
const TYPE_ARRAY: u32 = 9;
const TYPE_U64: u32 = 10;
const TYPE_I64: u32 = 11;
const TYPE_F64: u32 = 12;

/// ggml type ids (enum ggml_type) used by the writer's callers and tests.
pub mod ggml_type {
    pub const F32: u32 = 0;
    pub const F16: u32 = 1;
    pub const Q4_0: u32 = 2;
    pub const Q4_1: u32 = 3;
    pub const Q5_0: u32 = 6;
    pub const Q5_1: u32 = 7;
    pub const Q8_0: u32 = 8;
    pub const Q8_1: u32 = 9;
    pub const Q2_K: u32 = 10;
    pub const Q3_K: u32 = 11;
    pub const Q4_K: u32 = 12;
    pub const Q5_K: u32 = 13;
    pub const Q6_K: u32 = 14;
    pub const Q8_K: u32 = 15;
    pub const IQ2_XXS: u32 = 16;
    pub const IQ2_XS: u32 = 17;
    pub const IQ3_XXS: u32 = 18;
    pub const IQ1_S: u32 = 19;
    pub const IQ4_NL: u32 = 20;
    pub const IQ3_S: u32 = 21;
    pub const IQ2_S: u32 = 22;
    pub const IQ4_XS: u32 = 23;
    pub const I8: u32 = 24;
    pub const I16: u32 = 25;
    pub const I32: u32 = 26;
    pub const I64: u32 = 27;
    pub const F64: u32 = 28;
    pub const IQ1_M: u32 = 29;
    pub const BF16: u32 = 30;
    pub const TQ1_0: u32 = 34;
    pub const TQ2_0: u32 = 35;
    pub const MXFP4: u32 = 39;
    pub const NVFP4: u32 = 40;
    pub const Q1_0: u32 = 41;
    pub const Q2_0: u32 = 42;
}

/// The ggml type's name ("q4_k", "f32"), or "?" for an unknown one.
pub fn type_name(ggml_type: u32) -> &'static str {
    type_traits(ggml_type).map_or("?", |(name, _, _)| name)
}

/// Name, block size in elements and bytes per block of a ggml type, from ggml's type_traits
/// (ggml.c) and block structs (ggml-common.h) of the ggml this crate pins. Ids ggml removed
/// (4, 5, 31-33, 36-38) are unknown here, as they are to ggml's own GGUF reader.
pub fn type_traits(ggml_type: u32) -> Option<(&'static str, u64, u64)> {
    let traits = match ggml_type {
        0 => ("f32", 1, 4),
        1 => ("f16", 1, 2),
        2 => ("q4_0", 32, 18),
        3 => ("q4_1", 32, 20),
        6 => ("q5_0", 32, 22),
        7 => ("q5_1", 32, 24),
        8 => ("q8_0", 32, 34),
        9 => ("q8_1", 32, 36),
        10 => ("q2_K", 256, 84),
        11 => ("q3_K", 256, 110),
        12 => ("q4_K", 256, 144),
        13 => ("q5_K", 256, 176),
        14 => ("q6_K", 256, 210),
        15 => ("q8_K", 256, 292),
        16 => ("iq2_xxs", 256, 66),
        17 => ("iq2_xs", 256, 74),
        18 => ("iq3_xxs", 256, 98),
        19 => ("iq1_s", 256, 50),
        20 => ("iq4_nl", 32, 18),
        21 => ("iq3_s", 256, 110),
        22 => ("iq2_s", 256, 82),
        23 => ("iq4_xs", 256, 136),
        24 => ("i8", 1, 1),
        25 => ("i16", 1, 2),
        26 => ("i32", 1, 4),
        27 => ("i64", 1, 8),
        28 => ("f64", 1, 8),
        29 => ("iq1_m", 256, 56),
        30 => ("bf16", 1, 2),
        34 => ("tq1_0", 256, 54),
        35 => ("tq2_0", 256, 66),
        39 => ("mxfp4", 32, 17),
        40 => ("nvfp4", 64, 36),
        41 => ("q1_0", 128, 18),
        42 => ("q2_0", 64, 18),
        _ => return None,
    };
    Some(traits)
}

/// Bytes of a contiguous tensor: `ne[0] / block * type_size * ne[1] * ne[2] * ne[3]`.
/// Empty `dims` is a scalar. Errors (InvalidArgument) name the problem: unknown type, more than
/// four dimensions, `ne[0]` not a multiple of the block size, or an element count or byte size
/// beyond what ggml's int64 sizes can hold.
pub fn tensor_bytes(ggml_type: u32, dims: &[u64]) -> Result<u64> {
    let (type_name, block, type_size) = type_traits(ggml_type)
        .ok_or_else(|| Error::invalid(format!("unknown ggml type {ggml_type}")))?;
    if dims.len() > MAX_DIMS {
        return Err(Error::invalid(format!(
            "{} dimensions, ggml allows at most {MAX_DIMS}",
            dims.len()
        )));
    }
    let overflow = || {
        Error::invalid(format!(
            "shape {dims:?} of type {type_name} overflows 64-bit sizes"
        ))
    };
    // ggml stores element counts and byte sizes as int64.
    let limit = i64::MAX as u64;
    let mut elements: u64 = 1;
    for &d in dims {
        elements = elements
            .checked_mul(d)
            .filter(|&e| e <= limit)
            .ok_or_else(overflow)?;
    }
    let ne0 = dims.first().copied().unwrap_or(1);
    if ne0 % block != 0 {
        return Err(Error::invalid(format!(
            "first dimension {ne0} is not a multiple of the {type_name} block size {block}"
        )));
    }
    let mut bytes = (ne0 / block).checked_mul(type_size).ok_or_else(overflow)?;
    for &d in dims.iter().skip(1) {
        bytes = bytes.checked_mul(d).ok_or_else(overflow)?;
    }
    if bytes > limit {
        return Err(overflow());
    }
    Ok(bytes)
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// The GGUF type id of this value.
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => TYPE_U8,
            Value::I8(_) => TYPE_I8,
            Value::U16(_) => TYPE_U16,
            Value::I16(_) => TYPE_I16,
            Value::U32(_) => TYPE_U32,
            Value::I32(_) => TYPE_I32,
            Value::F32(_) => TYPE_F32,
            Value::Bool(_) => TYPE_BOOL,
            Value::Str(_) => TYPE_STRING,
            Value::Array(_) => TYPE_ARRAY,
            Value::U64(_) => TYPE_U64,
            Value::I64(_) => TYPE_I64,
            Value::F64(_) => TYPE_F64,
        }
    }

    pub fn type_name(&self) -> &'static str {
        value_type_name(self.type_id())
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Any non-negative integer value, widened.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(items) => Some(items),
            _ => None,
        }
    }
}

fn value_type_name(type_id: u32) -> &'static str {
    match type_id {
        TYPE_U8 => "u8",
        TYPE_I8 => "i8",
        TYPE_U16 => "u16",
        TYPE_I16 => "i16",
        TYPE_U32 => "u32",
        TYPE_I32 => "i32",
        TYPE_F32 => "f32",
        TYPE_BOOL => "bool",
        TYPE_STRING => "string",
        TYPE_ARRAY => "array",
        TYPE_U64 => "u64",
        TYPE_I64 => "i64",
        TYPE_F64 => "f64",
        _ => "unknown",
    }
}

/// Fewest bytes one value of a type occupies (a string is at least its length field, an array
/// its element type and count); None for an unknown type.
fn min_encoded_size(type_id: u32) -> Option<u64> {
    match type_id {
        TYPE_U8 | TYPE_I8 | TYPE_BOOL => Some(1),
        TYPE_U16 | TYPE_I16 => Some(2),
        TYPE_U32 | TYPE_I32 | TYPE_F32 => Some(4),
        TYPE_U64 | TYPE_I64 | TYPE_F64 | TYPE_STRING => Some(8),
        TYPE_ARRAY => Some(12),
        _ => None,
    }
}

/// One tensor's header entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub ggml_type: u32,
    /// ggml order: `dims[0]` is the innermost (contiguous) dimension.
    pub dims: Vec<u64>,
    /// Absolute file offset of the tensor's data.
    pub offset: u64,
    /// Size of the tensor's data in bytes.
    pub bytes: u64,
}

impl TensorInfo {
    pub fn type_name(&self) -> &'static str {
        type_traits(self.ggml_type).map_or("unknown", |t| t.0)
    }

    pub fn elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |acc, &d| acc.saturating_mul(d))
    }
}

/// Everything in a GGUF file except the tensor data.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufFile {
    pub version: u32,
    pub alignment: u64,
    /// Absolute offset where the data section starts (tensor offsets are relative to it in the
    /// file; `TensorInfo::offset` is already absolute).
    pub data_offset: u64,
    pub file_size: u64,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
}

impl GgufFile {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// `general.architecture`, when present and a string.
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(Value::as_str)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Total bytes of tensor data.
    pub fn total_tensor_bytes(&self) -> u64 {
        self.tensors
            .iter()
            .fold(0u64, |acc, t| acc.saturating_add(t.bytes))
    }
}

/// Reads the GGUF header, metadata and tensor infos of a file through a buffer.
/// Status::Io when the file cannot be opened or read, CorruptFile when it is not valid GGUF;
/// messages start with the path.
pub fn read_path(path: &Path) -> Result<GgufFile> {
    read_path_stamped(path).map(|(file, _)| file)
}

/// As `read_path`, with the stamp of the file that was read (to notice a later replacement).
pub fn read_path_stamped(path: &Path) -> Result<(GgufFile, FileStamp)> {
    let (file, stamp) = open_regular(path)?;
    let parsed = parse_reader(BufReader::with_capacity(64 * 1024, file), stamp.size)
        .map_err(|e| Error::new(e.status, format!("{}: {}", path.display(), e.message)))?;
    Ok((parsed, stamp))
}

/// What identifies a file's contents cheaply: device, inode, size and modification time. A
/// file replaced (renamed over, or rewritten in place) gets another stamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    pub device: u64,
    pub inode: u64,
    pub size: u64,
    pub modified_ns: i128,
}

impl FileStamp {
    pub fn of(meta: &std::fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            device: meta.dev(),
            inode: meta.ino(),
            size: meta.size(),
            modified_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        }
    }

    /// What differs from `earlier`, in words (empty when nothing does).
    pub fn changes_since(&self, earlier: &FileStamp) -> String {
        let mut what = Vec::new();
        if (self.device, self.inode) != (earlier.device, earlier.inode) {
            what.push("it is another file (inode)".to_string());
        }
        if self.size != earlier.size {
            what.push(format!("size {} -> {} bytes", earlier.size, self.size));
        }
        if self.modified_ns != earlier.modified_ns {
            what.push("modification time".to_string());
        }
        what.join(", ")
    }
}

/// Opens a model file for reading. Anything but a regular file (a FIFO, which would block
/// the open for ever, a directory, a device) is refused before it is opened.
pub fn open_regular(path: &Path) -> Result<(std::fs::File, FileStamp)> {
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
    if !meta.is_file() {
        return Err(Error::new(
            Status::Io,
            format!("{} is not a regular file", path.display()),
        ));
    }
    let file = std::fs::File::open(path)
        .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io(format!("cannot stat {}", path.display()), e))?;
    Ok((file, FileStamp::of(&meta)))
}

/// Parses a whole GGUF file held in memory (what the fuzz target drives).
pub fn parse_bytes(bytes: &[u8]) -> Result<GgufFile> {
    parse_reader(bytes, bytes.len() as u64)
}

/// Parses from any reader positioned at the start of a GGUF file of `file_size` bytes. Reads
/// sequentially and stops at the end of the tensor infos.
pub fn parse_reader<R: Read>(reader: R, file_size: u64) -> Result<GgufFile> {
    Parser {
        src: Source {
            inner: reader,
            pos: 0,
            size: file_size,
        },
        values: 0,
    }
    .parse()
}

/// Tracks the position so every read can be checked against the file size before it happens.
struct Source<R> {
    inner: R,
    pos: u64,
    size: u64,
}

impl<R: Read> Source<R> {
    fn remaining(&self) -> u64 {
        self.size.saturating_sub(self.pos)
    }

    fn ensure(&self, need: u64) -> Result<()> {
        if need > self.remaining() {
            return Err(Error::corrupt(format!(
                "truncated: needs {need} bytes at offset {} but the file ends at {}",
                self.pos, self.size
            )));
        }
        Ok(())
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<()> {
        self.ensure(buf.len() as u64)?;
        self.inner.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::corrupt(format!(
                    "truncated: the data ends before offset {}",
                    self.pos
                ))
            } else {
                Error::new(
                    Status::Io,
                    format!("read failed at offset {}: {e}", self.pos),
                )
            }
        })?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut buf = [0u8; N];
        self.fill(&mut buf)?;
        Ok(buf)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A length-prefixed byte string of at most `max` bytes (and never more than is left).
    fn bytes(&mut self, max: u64) -> Result<Vec<u8>> {
        let len = self.u64()?;
        if len > max {
            return Err(Error::corrupt(format!(
                "string length {len} at offset {} exceeds the limit of {max} bytes",
                self.pos - 8
            )));
        }
        self.ensure(len)?;
        // len <= remaining <= the real file size, so this allocation is backed by data.
        let mut buf =
            vec![0u8; usize::try_from(len).map_err(|_| Error::corrupt("string too long"))?];
        self.fill(&mut buf)?;
        Ok(buf)
    }

    /// Keys and tensor names must be valid UTF-8: they are looked up and compared.
    fn name(&mut self) -> Result<String> {
        let start = self.pos;
        let raw = self.bytes(MAX_NAME_LEN)?;
        String::from_utf8(raw)
            .map_err(|_| Error::corrupt(format!("name at offset {start} is not valid UTF-8")))
    }
}

/// Adds where the problem happened in front of a message.
fn context<T>(result: Result<T>, what: impl FnOnce() -> String) -> Result<T> {
    result.map_err(|e| Error::new(e.status, format!("{}: {}", what(), e.message)))
}

struct Parser<R> {
    src: Source<R>,
    /// Metadata values parsed so far, checked against MAX_METADATA_VALUES.
    values: u64,
}

impl<R: Read> Parser<R> {
    fn parse(mut self) -> Result<GgufFile> {
        let file_size = self.src.size;
        if file_size < 4 {
            return Err(Error::corrupt(format!(
                "not a GGUF file: only {file_size} bytes, too short for the magic"
            )));
        }
        let magic: [u8; 4] = self.src.array()?;
        if magic != MAGIC {
            return Err(Error::corrupt(format!(
                "not a GGUF file (magic {:02x} {:02x} {:02x} {:02x}, expected \"GGUF\")",
                magic[0], magic[1], magic[2], magic[3]
            )));
        }
        let version = context(self.src.u32(), || "reading the version".to_string())?;
        match version {
            2 | 3 => {}
            1 => {
                return Err(Error::corrupt(
                    "GGUF version 1 is not supported (only versions 2 and 3; re-convert the model)",
                ))
            }
            v if matches!(v.swap_bytes(), 1..=3) => {
                return Err(Error::corrupt(format!(
                    "big-endian GGUF (version {}) is not supported",
                    v.swap_bytes()
                )))
            }
            v => return Err(Error::corrupt(format!("unknown GGUF version {v}"))),
        }
        let n_tensors = context(self.src.u64(), || "reading the tensor count".to_string())?;
        let n_kv = context(self.src.u64(), || "reading the metadata count".to_string())?;
        // Each entry takes some minimum of bytes, so counts the file cannot hold are rejected
        // before any allocation or loop.
        let remaining = self.src.remaining();
        let needed = n_tensors.checked_mul(MIN_TENSOR_INFO_BYTES).and_then(|t| {
            n_kv.checked_mul(MIN_KV_BYTES)
                .and_then(|k| k.checked_add(t))
        });
        if !matches!(needed, Some(n) if n <= remaining) {
            return Err(Error::corrupt(format!(
                "{n_tensors} tensors and {n_kv} metadata entries cannot fit in the {remaining} bytes after the header"
            )));
        }

        let mut metadata = Vec::with_capacity(n_kv.min(MAX_PREALLOCATED) as usize);
        let mut seen_keys = HashSet::new();
        let mut alignment = DEFAULT_ALIGNMENT;
        for index in 0..n_kv {
            let key = context(self.src.name(), || format!("reading key {index}"))?;
            let type_id = context(self.src.u32(), || {
                format!("reading the type of key {index} '{key}'")
            })?;
            let value = context(self.value(type_id, 0), || {
                format!("reading the value of key {index} '{key}'")
            })?;
            if !seen_keys.insert(key.clone()) {
                return Err(Error::corrupt(format!(
                    "duplicate metadata key '{key}' (key {index})"
                )));
            }
            if key == "general.alignment" {
                alignment = match value {
                    Value::U32(a) if a != 0 && a.is_power_of_two() => u64::from(a),
                    ref other => {
                        return Err(Error::corrupt(format!(
                            "general.alignment must be a u32 power of two, got {} {:?}",
                            other.type_name(),
                            other
                        )))
                    }
                };
            }
            metadata.push((key, value));
        }

        let mut tensors = Vec::with_capacity(n_tensors.min(MAX_PREALLOCATED) as usize);
        let mut seen_names = HashSet::new();
        for index in 0..n_tensors {
            let name = context(self.src.name(), || {
                format!("reading the name of tensor {index}")
            })?;
            let (ggml_type, dims, relative_offset) = context(self.tensor_info(), || {
                format!("reading tensor {index} '{name}'")
            })?;
            if !seen_names.insert(name.clone()) {
                return Err(Error::corrupt(format!(
                    "duplicate tensor name '{name}' (tensor {index})"
                )));
            }
            tensors.push((name, ggml_type, dims, relative_offset));
        }

        let info_end = self.src.pos;
        let data_offset =
            align_up(info_end, alignment).ok_or_else(|| Error::corrupt("data offset overflows"))?;
        let tensors = tensors
            .into_iter()
            .map(|(name, ggml_type, dims, relative_offset)| {
                check_tensor(
                    name,
                    ggml_type,
                    dims,
                    relative_offset,
                    alignment,
                    data_offset,
                    file_size,
                )
            })
            .collect::<Result<Vec<_>>>()?;

        Ok(GgufFile {
            version,
            alignment,
            data_offset,
            file_size,
            metadata,
            tensors,
        })
    }

    fn tensor_info(&mut self) -> Result<(u32, Vec<u64>, u64)> {
        let n_dims = self.src.u32()?;
        if n_dims as usize > MAX_DIMS {
            return Err(Error::corrupt(format!(
                "{n_dims} dimensions, ggml allows at most {MAX_DIMS}"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(self.src.u64()?);
        }
        let ggml_type = self.src.u32()?;
        let offset = self.src.u64()?;
        Ok((ggml_type, dims, offset))
    }

    fn value(&mut self, type_id: u32, depth: u32) -> Result<Value> {
        self.values += 1;
        if self.values > MAX_METADATA_VALUES {
            return Err(Error::corrupt(format!(
                "more than {MAX_METADATA_VALUES} metadata values"
            )));
        }
        let src = &mut self.src;
        Ok(match type_id {
            TYPE_U8 => Value::U8(src.u8()?),
            TYPE_I8 => Value::I8(src.u8()? as i8),
            TYPE_U16 => Value::U16(src.u16()?),
            TYPE_I16 => Value::I16(src.u16()? as i16),
            TYPE_U32 => Value::U32(src.u32()?),
            TYPE_I32 => Value::I32(src.u32()? as i32),
            TYPE_F32 => Value::F32(f32::from_bits(src.u32()?)),
            // Lenient like ggml: any non-zero byte is true.
            TYPE_BOOL => Value::Bool(src.u8()? != 0),
            // Values are not looked up, so invalid UTF-8 (rare, in old vocabularies) is kept
            // lossily rather than rejecting the model.
            TYPE_STRING => {
                let raw = src.bytes(MAX_STRING_LEN)?;
                Value::Str(
                    String::from_utf8(raw)
                        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
                )
            }
            TYPE_U64 => Value::U64(src.u64()?),
            TYPE_I64 => Value::I64(src.u64()? as i64),
            TYPE_F64 => Value::F64(f64::from_bits(src.u64()?)),
            TYPE_ARRAY => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(Error::corrupt(format!(
                        "arrays nested deeper than {MAX_ARRAY_DEPTH} levels"
                    )));
                }
                let element_type = src.u32()?;
                let min_size = min_encoded_size(element_type).ok_or_else(|| {
                    Error::corrupt(format!("unknown array element type {element_type}"))
                })?;
                let count = src.u64()?;
                let remaining = src.remaining();
                if !matches!(count.checked_mul(min_size), Some(n) if n <= remaining) {
                    return Err(Error::corrupt(format!(
                        "array of {count} {} elements cannot fit in the remaining {remaining} bytes",
                        value_type_name(element_type)
                    )));
                }
                let mut items = Vec::with_capacity(count.min(MAX_PREALLOCATED) as usize);
                for i in 0..count {
                    let item = context(self.value(element_type, depth + 1), || {
                        format!("array element {i}")
                    })?;
                    items.push(item);
                }
                Value::Array(items)
            }
            other => return Err(Error::corrupt(format!("unknown value type {other}"))),
        })
    }
}

fn check_tensor(
    name: String,
    ggml_type: u32,
    dims: Vec<u64>,
    relative_offset: u64,
    alignment: u64,
    data_offset: u64,
    file_size: u64,
) -> Result<TensorInfo> {
    if name.is_empty() || name.contains('\0') {
        return Err(Error::corrupt(format!(
            "tensor name {name:?} is empty or contains NUL"
        )));
    }
    if type_traits(ggml_type).is_none() {
        return Err(Error::corrupt(format!(
            "tensor '{name}': unknown or removed ggml type {ggml_type}"
        )));
    }
    if dims.contains(&0) {
        return Err(Error::corrupt(format!(
            "tensor '{name}': shape {dims:?} has no elements"
        )));
    }
    let bytes = tensor_bytes(ggml_type, &dims)
        .map_err(|e| Error::corrupt(format!("tensor '{name}': {}", e.message)))?;
    if relative_offset % alignment != 0 {
        return Err(Error::corrupt(format!(
            "tensor '{name}': data offset {relative_offset} is not a multiple of the alignment {alignment}"
        )));
    }
    let range = data_offset
        .checked_add(relative_offset)
        .and_then(|start| start.checked_add(bytes).map(|end| (start, end)));
    match range {
        Some((start, end)) if end <= file_size => Ok(TensorInfo {
            name,
            ggml_type,
            dims,
            offset: start,
            bytes,
        }),
        Some((start, end)) => Err(Error::corrupt(format!(
            "tensor '{name}': data range {start}..{end} lies outside the file (size {file_size})"
        ))),
        None => Err(Error::corrupt(format!(
            "tensor '{name}': data offset {relative_offset} + {bytes} bytes overflows"
        ))),
    }
}

fn align_up(value: u64, alignment: u64) -> Option<u64> {
    let rem = value % alignment;
    if rem == 0 {
        Some(value)
    } else {
        value.checked_add(alignment - rem)
    }
}

/// Builds GGUF v3 files: for tests, fixtures and the demo model.
///
/// Structural mistakes that cannot be encoded (mixed-type arrays, arrays nested too deep, an
/// invalid `alignment()`) are remembered and reported by `write_to`/`write_path`; `to_bytes`
/// then returns an empty Vec. Values the reader rejects but GGUF can encode (for instance a
/// `general.alignment` of 3 given through `add_kv`) are written as given, so tests can build bad
/// files; padding then uses the default alignment.
#[derive(Debug, Default)]
pub struct Writer {
    metadata: Vec<(String, Value)>,
    tensors: Vec<PendingTensor>,
    names: HashSet<String>,
    deferred_error: Option<Error>,
}

#[derive(Debug)]
struct PendingTensor {
    name: String,
    ggml_type: u32,
    dims: Vec<u64>,
    bytes: u64,
    data: TensorData,
}

#[derive(Debug)]
enum TensorData {
    Bytes(Vec<u8>),
    /// Written as zeros without holding them in memory.
    Zeros,
}

impl Writer {
    pub fn new() -> Self {
        Writer::default()
    }

    /// Sets the data alignment (stored as `general.alignment`); must be a power of two that
    /// fits in u32.
    pub fn alignment(&mut self, alignment: u64) {
        match u32::try_from(alignment) {
            Ok(a) if a.is_power_of_two() => self.add_kv("general.alignment", Value::U32(a)),
            _ => self.defer(Error::invalid(format!(
                "alignment {alignment} is not a power of two that fits in u32"
            ))),
        }
    }

    /// Adds a metadata entry, replacing an earlier one with the same key in place.
    pub fn add_kv(&mut self, key: &str, value: Value) {
        if key.len() as u64 > MAX_NAME_LEN {
            return self.defer(Error::invalid(format!(
                "metadata key of {} bytes is too long",
                key.len()
            )));
        }
        if let Err(e) = check_encodable(&value, 0) {
            return self.defer(Error::invalid(format!(
                "metadata key '{key}': {}",
                e.message
            )));
        }
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
    }

    /// Adds a tensor; `data.len()` must equal `tensor_bytes(ggml_type, dims)`.
    pub fn add_tensor(
        &mut self,
        name: &str,
        ggml_type: u32,
        dims: &[u64],
        data: Vec<u8>,
    ) -> Result<()> {
        let bytes = self.check_tensor(name, ggml_type, dims)?;
        if data.len() as u64 != bytes {
            return Err(Error::invalid(format!(
                "tensor '{name}': {} bytes of data given, shape {dims:?} needs {bytes}",
                data.len()
            )));
        }
        self.push_tensor(name, ggml_type, dims, bytes, TensorData::Bytes(data));
        Ok(())
    }

    /// Adds a tensor whose zero-initialised data `fill` writes.
    pub fn add_tensor_with<F: FnOnce(&mut [u8])>(
        &mut self,
        name: &str,
        ggml_type: u32,
        dims: &[u64],
        fill: F,
    ) -> Result<()> {
        let bytes = self.check_tensor(name, ggml_type, dims)?;
        let len = usize::try_from(bytes).map_err(|_| {
            Error::invalid(format!(
                "tensor '{name}' of {bytes} bytes does not fit in memory"
            ))
        })?;
        let mut data = vec![0u8; len];
        fill(&mut data);
        self.push_tensor(name, ggml_type, dims, bytes, TensorData::Bytes(data));
        Ok(())
    }

    /// Adds a tensor of zeros without allocating its data: for fixtures that need realistic
    /// names and shapes but no real weights.
    pub fn add_tensor_zeroed(&mut self, name: &str, ggml_type: u32, dims: &[u64]) -> Result<()> {
        let bytes = self.check_tensor(name, ggml_type, dims)?;
        self.push_tensor(name, ggml_type, dims, bytes, TensorData::Zeros);
        Ok(())
    }

    pub fn write_to(&self, w: &mut impl Write) -> Result<()> {
        if let Some(e) = &self.deferred_error {
            return Err(e.clone());
        }
        let alignment = self.effective_alignment();
        let io = |e: std::io::Error| Error::new(Status::Io, format!("writing GGUF: {e}"));
        let mut out = CountingWriter {
            inner: w,
            written: 0,
        };

        let mut header = Vec::new();
        header.extend_from_slice(&MAGIC);
        header.extend_from_slice(&WRITE_VERSION.to_le_bytes());
        header.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        header.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            encode_str(&mut header, key);
            header.extend_from_slice(&value.type_id().to_le_bytes());
            encode_value(&mut header, value);
        }
        let mut relative = 0u64;
        for t in &self.tensors {
            relative = align_up(relative, alignment)
                .ok_or_else(|| Error::invalid("tensor data exceeds 64-bit offsets"))?;
            encode_str(&mut header, &t.name);
            header.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                header.extend_from_slice(&d.to_le_bytes());
            }
            header.extend_from_slice(&t.ggml_type.to_le_bytes());
            header.extend_from_slice(&relative.to_le_bytes());
            relative = relative
                .checked_add(t.bytes)
                .ok_or_else(|| Error::invalid("tensor data exceeds 64-bit offsets"))?;
        }
        out.write_all(&header).map_err(io)?;
        out.pad_to(alignment).map_err(io)?;
        // Like ggml, every tensor (the last included) is padded to the alignment.
        for t in &self.tensors {
            match &t.data {
                TensorData::Bytes(data) => out.write_all(data).map_err(io)?,
                TensorData::Zeros => out.write_zeros(t.bytes).map_err(io)?,
            }
            out.pad_to(alignment).map_err(io)?;
        }
        out.flush().map_err(io)
    }

    pub fn write_path(&self, path: &Path) -> Result<()> {
        let file = std::fs::File::create(path)
            .map_err(|e| Error::io(format!("cannot create {}", path.display()), e))?;
        let mut w = BufWriter::new(file);
        self.write_to(&mut w)
            .map_err(|e| Error::new(e.status, format!("{}: {}", path.display(), e.message)))?;
        w.flush()
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }

    /// The file in memory; empty when `write_to` would fail (see the type's docs).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        match self.write_to(&mut buf) {
            Ok(()) => buf,
            Err(_) => Vec::new(),
        }
    }

    fn defer(&mut self, error: Error) {
        self.deferred_error.get_or_insert(error);
    }

    /// Padding follows `general.alignment` when it is valid, else the default.
    fn effective_alignment(&self) -> u64 {
        match self.metadata.iter().find(|(k, _)| k == "general.alignment") {
            Some((_, Value::U32(a))) if a.is_power_of_two() => u64::from(*a),
            _ => DEFAULT_ALIGNMENT,
        }
    }

    fn check_tensor(&self, name: &str, ggml_type: u32, dims: &[u64]) -> Result<u64> {
        if name.len() as u64 > MAX_NAME_LEN {
            return Err(Error::invalid(format!(
                "tensor name of {} bytes is too long",
                name.len()
            )));
        }
        if self.names.contains(name) {
            return Err(Error::invalid(format!("duplicate tensor name '{name}'")));
        }
        tensor_bytes(ggml_type, dims)
            .map_err(|e| Error::invalid(format!("tensor '{name}': {}", e.message)))
    }

    fn push_tensor(
        &mut self,
        name: &str,
        ggml_type: u32,
        dims: &[u64],
        bytes: u64,
        data: TensorData,
    ) {
        self.names.insert(name.to_string());
        self.tensors.push(PendingTensor {
            name: name.to_string(),
            ggml_type,
            dims: dims.to_vec(),
            bytes,
            data,
        });
    }
}

/// GGUF arrays carry one element type, so elements must all share it.
fn check_encodable(value: &Value, depth: u32) -> Result<()> {
    match value {
        Value::Str(s) if s.len() as u64 > MAX_STRING_LEN => Err(Error::invalid(format!(
            "string of {} bytes exceeds the {MAX_STRING_LEN}-byte limit",
            s.len()
        ))),
        Value::Array(items) => {
            if depth >= MAX_ARRAY_DEPTH {
                return Err(Error::invalid(format!(
                    "arrays nested deeper than {MAX_ARRAY_DEPTH} levels"
                )));
            }
            if let Some(first) = items.first() {
                if let Some(odd) = items.iter().find(|v| v.type_id() != first.type_id()) {
                    return Err(Error::invalid(format!(
                        "array mixes {} and {} elements",
                        first.type_name(),
                        odd.type_name()
                    )));
                }
            }
            items.iter().try_for_each(|v| check_encodable(v, depth + 1))
        }
        _ => Ok(()),
    }
}

fn encode_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn encode_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::U8(v) => out.push(*v),
        Value::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Bool(v) => out.push(u8::from(*v)),
        Value::Str(s) => encode_str(out, s),
        Value::Array(items) => {
            // An empty array's element type is not recoverable from the Value; u8 is as good as any.
            let element_type = items.first().map_or(TYPE_U8, Value::type_id);
            out.extend_from_slice(&element_type.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            // Nested arrays repeat their own element type and count.
            for item in items {
                encode_value(out, item);
            }
        }
        Value::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
    }
}

struct CountingWriter<'a, W: Write> {
    inner: &'a mut W,
    written: u64,
}

impl<W: Write> CountingWriter<'_, W> {
    fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.inner.write_all(data)?;
        self.written += data.len() as u64;
        Ok(())
    }

    fn write_zeros(&mut self, mut count: u64) -> std::io::Result<()> {
        const ZEROS: [u8; 4096] = [0; 4096];
        while count > 0 {
            let chunk = count.min(ZEROS.len() as u64) as usize;
            self.write_all(&ZEROS[..chunk])?;
            count -= chunk as u64;
        }
        Ok(())
    }

    fn pad_to(&mut self, alignment: u64) -> std::io::Result<()> {
        let rem = self.written % alignment;
        if rem == 0 {
            return Ok(());
        }
        self.write_zeros(alignment - rem)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-assembles GGUF bytes so tests can produce what the Writer refuses to.
    struct Raw {
        bytes: Vec<u8>,
    }

    impl Raw {
        fn header(version: u32, n_tensors: u64, n_kv: u64) -> Raw {
            let mut bytes = MAGIC.to_vec();
            bytes.extend_from_slice(&version.to_le_bytes());
            bytes.extend_from_slice(&n_tensors.to_le_bytes());
            bytes.extend_from_slice(&n_kv.to_le_bytes());
            Raw { bytes }
        }
        fn u32(mut self, v: u32) -> Raw {
            self.bytes.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Raw {
            self.bytes.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn str(self, s: &str) -> Raw {
            let mut raw = self.u64(s.len() as u64);
            raw.bytes.extend_from_slice(s.as_bytes());
            raw
        }
        fn tensor(self, name: &str, dims: &[u64], ggml_type: u32, offset: u64) -> Raw {
            let mut raw = self.str(name).u32(dims.len() as u32);
            for &d in dims {
                raw = raw.u64(d);
            }
            raw.u32(ggml_type).u64(offset)
        }
        /// Pads to the default alignment and appends `data_len` bytes of data.
        fn data(mut self, data_len: usize) -> Vec<u8> {
            let padded = align_up(self.bytes.len() as u64, DEFAULT_ALIGNMENT).unwrap() as usize;
            self.bytes.resize(padded + data_len, 0);
            self.bytes
        }
    }

    fn err_of(bytes: &[u8]) -> Error {
        parse_bytes(bytes).expect_err("parse should fail")
    }

    fn every_value_type() -> Vec<(String, Value)> {
        vec![
            ("v.u8".into(), Value::U8(200)),
            ("v.i8".into(), Value::I8(-5)),
            ("v.u16".into(), Value::U16(60000)),
            ("v.i16".into(), Value::I16(-30000)),
            ("v.u32".into(), Value::U32(4_000_000_000)),
            ("v.i32".into(), Value::I32(-2_000_000_000)),
            ("v.f32".into(), Value::F32(1.5)),
            ("v.bool".into(), Value::Bool(true)),
            ("v.str".into(), Value::Str("héllo".into())),
            ("v.u64".into(), Value::U64(u64::MAX)),
            ("v.i64".into(), Value::I64(i64::MIN)),
            ("v.f64".into(), Value::F64(-2.25)),
            (
                "v.arr_str".into(),
                Value::Array(vec![Value::Str("a".into()), Value::Str("".into())]),
            ),
            (
                "v.arr_f32".into(),
                Value::Array(vec![Value::F32(0.5), Value::F32(-1.0)]),
            ),
            ("v.arr_empty".into(), Value::Array(vec![])),
            (
                "v.arr_nested".into(),
                Value::Array(vec![
                    Value::Array(vec![Value::I32(1), Value::I32(2)]),
                    Value::Array(vec![Value::Bool(false)]),
                ]),
            ),
        ]
    }

    /// Two tensors; the last one's data ends exactly at the end of the file (32 bytes of f32),
    /// so cutting any byte off makes the file invalid.
    fn small_file() -> Vec<u8> {
        let mut w = Writer::new();
        w.add_kv("general.architecture", Value::Str("llama".into()));
        w.add_kv("general.name", Value::Str("tiny".into()));
        w.add_tensor_with("blk.0.attn_q.weight", ggml_type::Q4_0, &[32, 2], |d| {
            d.fill(7)
        })
        .unwrap();
        w.add_tensor("output.weight", ggml_type::F32, &[8], vec![1; 32])
            .unwrap();
        w.to_bytes()
    }

    #[test]
    fn roundtrip_every_value_type_and_tensor_data() {
        let mut w = Writer::new();
        for (k, v) in every_value_type() {
            w.add_kv(&k, v);
        }
        w.add_kv("general.architecture", Value::Str("flux".into()));
        let f32_data: Vec<u8> = (0..8u8).flat_map(|i| f32::from(i).to_le_bytes()).collect();
        w.add_tensor("a.weight", ggml_type::F32, &[8], f32_data.clone())
            .unwrap();
        w.add_tensor_with("b.weight", ggml_type::Q8_0, &[64, 3], |d| d.fill(0xAB))
            .unwrap();
        w.add_tensor_zeroed("c.weight", ggml_type::F16, &[5, 3, 2, 1])
            .unwrap();
        let bytes = w.to_bytes();
        let file = parse_bytes(&bytes).unwrap();

        assert_eq!(file.version, 3);
        assert_eq!(file.alignment, 32);
        assert_eq!(file.file_size, bytes.len() as u64);
        assert_eq!(file.data_offset % 32, 0);
        let mut expected = every_value_type();
        expected.push(("general.architecture".into(), Value::Str("flux".into())));
        assert_eq!(file.metadata, expected);
        assert_eq!(file.architecture(), Some("flux"));
        assert_eq!(file.get("v.u16"), Some(&Value::U16(60000)));
        assert_eq!(file.get("missing"), None);

        let names: Vec<&str> = file.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a.weight", "b.weight", "c.weight"]);
        let a = file.tensor("a.weight").unwrap();
        assert_eq!((a.bytes, a.offset), (32, file.data_offset));
        assert_eq!(&bytes[a.offset as usize..][..32], &f32_data[..]);
        let b = file.tensor("b.weight").unwrap();
        assert_eq!(b.bytes, 2 * 3 * 34);
        assert_eq!(b.dims, [64, 3]);
        assert_eq!(b.type_name(), "q8_0");
        assert!(bytes[b.offset as usize..][..b.bytes as usize]
            .iter()
            .all(|&x| x == 0xAB));
        let c = file.tensor("c.weight").unwrap();
        assert_eq!((c.bytes, c.elements()), (60, 30));
        for t in &file.tensors {
            assert_eq!(t.offset % 32, 0, "{} is aligned", t.name);
        }
        assert_eq!(file.total_tensor_bytes(), 32 + 204 + 60);
    }

    #[test]
    fn custom_alignment_roundtrips() {
        let mut w = Writer::new();
        w.alignment(256);
        w.add_tensor("x", ggml_type::I8, &[3], vec![1, 2, 3])
            .unwrap();
        w.add_tensor("y", ggml_type::I8, &[3], vec![4, 5, 6])
            .unwrap();
        let file = parse_bytes(&w.to_bytes()).unwrap();
        assert_eq!(file.alignment, 256);
        assert_eq!(file.tensors[1].offset - file.tensors[0].offset, 256);
        assert_eq!(file.data_offset % 256, 0);
    }

    #[test]
    fn version_2_is_read() {
        let mut bytes = small_file();
        bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(parse_bytes(&bytes).unwrap().version, 2);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = small_file();
        let file = parse_bytes(&bytes).unwrap();
        let last = file.tensors.last().unwrap();
        assert_eq!(last.offset + last.bytes, bytes.len() as u64);
        for len in 0..bytes.len() {
            let e = err_of(&bytes[..len]);
            assert_eq!(e.status, Status::CorruptFile, "len {len}: {e}");
        }
    }

    #[test]
    fn truncation_messages_name_the_place() {
        // The file ends inside the first key's value.
        let mut raw = Raw::header(3, 0, 1)
            .str("general.architecture")
            .u32(TYPE_STRING)
            .u64(5);
        raw.bytes.extend_from_slice(b"ll");
        let e = err_of(&raw.bytes);
        assert!(
            e.message
                .starts_with("reading the value of key 0 'general.architecture': truncated"),
            "{e}"
        );
        let bytes = small_file();
        let file = parse_bytes(&bytes).unwrap();
        let e = err_of(&bytes[..file.tensors[1].offset as usize + 4]);
        assert!(
            e.message.contains("tensor 'output.weight': data range"),
            "{e}"
        );
        assert!(e.message.contains("lies outside the file"), "{e}");
    }

    #[test]
    fn wrong_magic() {
        let mut bytes = small_file();
        bytes[0] = b'X';
        let e = err_of(&bytes);
        assert!(
            e.message.starts_with("not a GGUF file (magic 58 47 55 46"),
            "{e}"
        );
        assert!(err_of(b"GG").message.contains("not a GGUF file"));
        assert!(err_of(b"").message.contains("not a GGUF file"));
    }

    #[test]
    fn unsupported_versions() {
        for (version, needle) in [
            (1u32, "version 1 is not supported"),
            (99, "unknown GGUF version 99"),
            (0, "unknown GGUF version 0"),
            (3u32.swap_bytes(), "big-endian"),
        ] {
            let mut bytes = small_file();
            bytes[4..8].copy_from_slice(&version.to_le_bytes());
            let e = err_of(&bytes);
            assert_eq!(e.status, Status::CorruptFile);
            assert!(e.message.contains(needle), "{version}: {e}");
        }
    }

    #[test]
    fn huge_counts_are_rejected_before_allocating() {
        let started = std::time::Instant::now();
        for (n_tensors, n_kv) in [
            (u64::MAX, 0),
            (0, u64::MAX),
            (u64::MAX / 24 + 1, 1),
            (1 << 40, 1 << 40),
        ] {
            let e = err_of(&Raw::header(3, n_tensors, n_kv).data(64));
            assert!(e.message.contains("cannot fit"), "{e}");
        }
        // A string and an array claiming more than the file holds.
        let e = err_of(&Raw::header(3, 0, 1).u64(u64::MAX).data(64));
        assert!(e.message.contains("string length"), "{e}");
        let e = err_of(
            &Raw::header(3, 0, 1)
                .str("k")
                .u32(TYPE_STRING)
                .u64(1 << 40)
                .data(64),
        );
        assert!(e.message.contains("exceeds the limit"), "{e}");
        let e = err_of(
            &Raw::header(3, 0, 1)
                .str("k")
                .u32(TYPE_STRING)
                .u64(1 << 20)
                .data(64),
        );
        assert!(e.message.contains("truncated"), "{e}");
        let e = err_of(
            &Raw::header(3, 0, 1)
                .str("k")
                .u32(TYPE_ARRAY)
                .u32(TYPE_U64)
                .u64(u64::MAX)
                .data(64),
        );
        assert!(
            e.message
                .contains("array of 18446744073709551615 u64 elements cannot fit"),
            "{e}"
        );
        assert!(started.elapsed().as_secs() < 2);
    }

    #[test]
    fn overflowing_dims() {
        let bytes = Raw::header(3, 1, 0)
            .tensor("t", &[u64::MAX, 2], ggml_type::F32, 0)
            .data(64);
        let e = err_of(&bytes);
        assert!(
            e.message.contains("tensor 't'") && e.message.contains("overflow"),
            "{e}"
        );
        let bytes = Raw::header(3, 1, 0)
            .tensor("t", &[1 << 32, 1 << 32, 1 << 32], ggml_type::F32, 0)
            .data(64);
        assert!(err_of(&bytes).message.contains("overflow"));
        let bytes = Raw::header(3, 1, 0)
            .tensor("t", &[1, 1, 1, 1, 1], ggml_type::F32, 0)
            .data(64);
        assert!(err_of(&bytes).message.contains("5 dimensions"));
        let bytes = Raw::header(3, 1, 0)
            .tensor("t", &[33], ggml_type::Q4_0, 0)
            .data(64);
        assert!(err_of(&bytes)
            .message
            .contains("not a multiple of the q4_0 block size 32"));
    }

    #[test]
    fn misaligned_offset() {
        let bytes = Raw::header(3, 1, 0)
            .tensor("t", &[4], ggml_type::F32, 4)
            .data(64);
        let e = err_of(&bytes);
        assert!(
            e.message
                .contains("tensor 't': data offset 4 is not a multiple of the alignment 32"),
            "{e}"
        );
    }

    #[test]
    fn data_outside_file() {
        let bytes = Raw::header(3, 1, 0)
            .tensor("blk.0.attn_q.weight", &[16], ggml_type::F32, 32)
            .data(64);
        let e = err_of(&bytes);
        assert!(
            e.message
                .contains("tensor 'blk.0.attn_q.weight': data range"),
            "{e}"
        );
        assert!(e.message.contains("outside the file (size"), "{e}");
        let bytes = Raw::header(3, 1, 0)
            .tensor("t", &[16], ggml_type::F32, u64::MAX - 31)
            .data(64);
        assert!(err_of(&bytes).message.contains("overflows"));
    }

    #[test]
    fn duplicate_names_and_keys() {
        let bytes = Raw::header(3, 2, 0)
            .tensor("t", &[8], ggml_type::F32, 0)
            .tensor("t", &[8], ggml_type::F32, 32)
            .data(64);
        assert!(err_of(&bytes).message.contains("duplicate tensor name 't'"));
        let bytes = Raw::header(3, 0, 2)
            .str("k")
            .u32(TYPE_U32)
            .u32(1)
            .str("k")
            .u32(TYPE_U32)
            .u32(2)
            .data(0);
        assert!(err_of(&bytes)
            .message
            .contains("duplicate metadata key 'k'"));
    }

    #[test]
    fn bad_alignment_values() {
        for value in [
            Value::U32(0),
            Value::U32(3),
            Value::U64(64),
            Value::Str("32".into()),
        ] {
            let mut w = Writer::new();
            w.add_kv("general.alignment", value.clone());
            w.add_tensor("t", ggml_type::F32, &[8], vec![0; 32])
                .unwrap();
            let e = err_of(&w.to_bytes());
            assert!(
                e.message
                    .contains("general.alignment must be a u32 power of two"),
                "{value:?}: {e}"
            );
        }
        let mut w = Writer::new();
        w.alignment(48);
        assert!(w.write_to(&mut Vec::new()).is_err());
        assert!(w.to_bytes().is_empty());
    }

    #[test]
    fn unknown_types() {
        for removed in [4u32, 5, 31, 36, 43, u32::MAX] {
            let bytes = Raw::header(3, 1, 0).tensor("w", &[8], removed, 0).data(64);
            let e = err_of(&bytes);
            assert!(
                e.message.contains(&format!(
                    "tensor 'w': unknown or removed ggml type {removed}"
                )),
                "{e}"
            );
        }
        let bytes = Raw::header(3, 0, 1).str("k").u32(13).data(8);
        assert!(err_of(&bytes).message.contains("unknown value type 13"));
        let bytes = Raw::header(3, 0, 1)
            .str("k")
            .u32(TYPE_ARRAY)
            .u32(99)
            .u64(0)
            .data(8);
        assert!(err_of(&bytes)
            .message
            .contains("unknown array element type 99"));
    }

    #[test]
    fn arrays_nested_too_deep() {
        let bytes = Raw::header(3, 0, 1)
            .str("k")
            .u32(TYPE_ARRAY)
            .u32(TYPE_ARRAY)
            .u64(1)
            .u32(TYPE_ARRAY)
            .u64(1)
            .u32(TYPE_U8)
            .u64(0)
            .data(0);
        assert!(err_of(&bytes).message.contains("nested deeper"));
        let mut w = Writer::new();
        w.add_kv(
            "k",
            Value::Array(vec![Value::Array(vec![Value::Array(vec![])])]),
        );
        assert!(w
            .write_to(&mut Vec::new())
            .unwrap_err()
            .message
            .contains("nested deeper"));
    }

    #[test]
    fn invalid_utf8_names_rejected_values_kept() {
        let mut raw = Raw::header(3, 0, 1).u64(2);
        raw.bytes.extend_from_slice(&[0xff, 0xfe]);
        assert!(err_of(&raw.u32(TYPE_U8).bytes)
            .message
            .contains("not valid UTF-8"));
        let mut raw = Raw::header(3, 0, 1).str("k").u32(TYPE_STRING).u64(2);
        raw.bytes.extend_from_slice(&[b'a', 0xff]);
        let file = parse_bytes(&raw.bytes).unwrap();
        assert_eq!(file.get("k"), Some(&Value::Str("a\u{fffd}".into())));
    }

    #[test]
    fn tensor_bytes_rules() {
        assert_eq!(tensor_bytes(ggml_type::F32, &[]).unwrap(), 4);
        assert_eq!(tensor_bytes(ggml_type::Q4_0, &[64, 3]).unwrap(), 2 * 18 * 3);
        assert_eq!(
            tensor_bytes(ggml_type::Q4_K, &[512, 2, 2]).unwrap(),
            2 * 144 * 4
        );
        assert_eq!(tensor_bytes(ggml_type::BF16, &[3, 0]).unwrap(), 0);
        assert!(tensor_bytes(ggml_type::Q4_K, &[255]).is_err());
        assert!(tensor_bytes(4, &[8])
            .unwrap_err()
            .message
            .contains("unknown ggml type 4"));
        assert!(tensor_bytes(ggml_type::F32, &[1 << 62, 2]).is_err());
        assert!(tensor_bytes(ggml_type::F64, &[1 << 61]).is_err());
        assert!(tensor_bytes(ggml_type::F32, &[1, 1, 1, 1, 1]).is_err());
    }

    #[test]
    fn type_table_is_consistent() {
        let known: Vec<u32> = (0..64).filter(|&t| type_traits(t).is_some()).collect();
        assert_eq!(known.len(), 35);
        for t in known {
            let (name, block, size) = type_traits(t).unwrap();
            assert!(block.is_power_of_two() && size > 0, "{name}");
        }
        assert_eq!(type_traits(ggml_type::MXFP4), Some(("mxfp4", 32, 17)));
        assert_eq!(type_traits(ggml_type::TQ1_0), Some(("tq1_0", 256, 54)));
    }

    #[test]
    fn writer_rejects_bad_tensors_and_values() {
        let mut w = Writer::new();
        w.add_tensor("t", ggml_type::F32, &[2], vec![0; 8]).unwrap();
        assert!(w
            .add_tensor("t", ggml_type::F32, &[2], vec![0; 8])
            .unwrap_err()
            .message
            .contains("duplicate"));
        assert!(w.add_tensor("u", ggml_type::F32, &[2], vec![0; 7]).is_err());
        assert!(w.add_tensor_zeroed("v", 4, &[2]).is_err());
        w.add_kv("mixed", Value::Array(vec![Value::U8(1), Value::I8(1)]));
        assert!(w
            .write_to(&mut Vec::new())
            .unwrap_err()
            .message
            .contains("mixes u8 and i8"));
        // A replaced key keeps its place.
        let mut w = Writer::new();
        w.add_kv("a", Value::U8(1));
        w.add_kv("b", Value::U8(2));
        w.add_kv("a", Value::U8(3));
        let file = parse_bytes(&w.to_bytes()).unwrap();
        assert_eq!(
            file.metadata,
            vec![("a".into(), Value::U8(3)), ("b".into(), Value::U8(2))]
        );
    }

    #[test]
    fn read_path_and_io_errors() {
        let dir = std::env::temp_dir().join(format!("gguf-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("small.gguf");
        let mut w = Writer::new();
        w.add_kv("general.architecture", Value::Str("llama".into()));
        w.add_tensor_zeroed("blk.0.ffn_up.weight", ggml_type::Q8_0, &[256, 4])
            .unwrap();
        w.write_path(&path).unwrap();
        let file = read_path(&path).unwrap();
        assert_eq!(file, parse_bytes(&std::fs::read(&path).unwrap()).unwrap());
        assert_eq!(file.tensors[0].bytes, 8 * 34 * 4);

        let e = read_path(&dir.join("missing.gguf")).unwrap_err();
        assert_eq!(e.status, Status::Io);
        std::fs::write(&path, b"GGUF\x07\0\0\0").unwrap();
        let e = read_path(&path).unwrap_err();
        assert_eq!(e.status, Status::CorruptFile);
        assert!(
            e.message.contains("small.gguf: unknown GGUF version 7"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Seeds for `fuzz/corpus/fuzz_gguf`: small valid files of several shapes and one
    /// truncated file. Kept reproducible by `fuzz_seeds_are_current`.
    fn fuzz_seeds() -> Vec<(&'static str, Vec<u8>)> {
        let mut minimal = Writer::new();
        minimal.add_kv("general.architecture", Value::Str("llama".into()));

        let mut llama = Writer::new();
        llama.add_kv("general.architecture", Value::Str("llama".into()));
        llama.add_kv("general.name", Value::Str("tiny".into()));
        llama.add_kv("llama.context_length", Value::U32(64));
        llama.add_kv("llama.rope.freq_base", Value::F32(10000.0));
        llama.add_kv(
            "tokenizer.ggml.tokens",
            Value::Array(vec![Value::Str("<s>".into()), Value::Str("a".into())]),
        );
        llama.add_kv(
            "tokenizer.ggml.scores",
            Value::Array(vec![Value::F32(0.0), Value::F32(-1.0)]),
        );
        llama.add_kv("tokenizer.ggml.add_bos_token", Value::Bool(true));
        llama
            .add_tensor_with("token_embd.weight", ggml_type::F32, &[4, 2], |d| d.fill(1))
            .unwrap();
        llama
            .add_tensor_with("blk.0.attn_q.weight", ggml_type::Q8_0, &[32], |d| d.fill(2))
            .unwrap();
        llama
            .add_tensor_zeroed("output_norm.weight", ggml_type::F32, &[4])
            .unwrap();

        let mut flux = Writer::new();
        flux.alignment(64);
        flux.add_kv("general.architecture", Value::Str("flux".into()));
        flux.add_tensor_zeroed(
            "double_blocks.0.img_attn.qkv.weight",
            ggml_type::F16,
            &[4, 2],
        )
        .unwrap();
        flux.add_tensor_zeroed("single_blocks.0.linear1.weight", ggml_type::BF16, &[4])
            .unwrap();
        flux.add_tensor_zeroed("img_in.weight", ggml_type::Q4_0, &[32])
            .unwrap();

        let mut every = Writer::new();
        for (key, value) in every_value_type() {
            every.add_kv(&key, value);
        }
        every
            .add_tensor("t", ggml_type::I8, &[2], vec![1, 2])
            .unwrap();
        let mut every_v2 = every.to_bytes();
        every_v2[4..8].copy_from_slice(&2u32.to_le_bytes());

        let llama = llama.to_bytes();
        let truncated = llama[..llama.len() * 3 / 5].to_vec();
        vec![
            ("minimal.gguf", minimal.to_bytes()),
            ("llama_tiny.gguf", llama),
            ("flux_tiny_align64.gguf", flux.to_bytes()),
            ("every_value_v2.gguf", every_v2),
            ("llama_tiny_truncated.gguf", truncated),
        ]
    }

    /// The committed fuzz seeds match `fuzz_seeds`; set OFFLOAD_ENGINE_WRITE_FUZZ_SEEDS=1 to
    /// rewrite them after changing the writer.
    #[test]
    fn fuzz_seeds_are_current() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/fuzz_gguf");
        let rewrite = std::env::var_os("OFFLOAD_ENGINE_WRITE_FUZZ_SEEDS").is_some();
        for (name, bytes) in fuzz_seeds() {
            assert_eq!(
                parse_bytes(&bytes).is_ok(),
                !name.contains("truncated"),
                "{name}"
            );
            let path = dir.join(name);
            if rewrite {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &bytes).unwrap();
            }
            let committed = std::fs::read(&path).unwrap_or_default();
            assert!(
                committed == bytes,
                "{} is stale; rerun with OFFLOAD_ENGINE_WRITE_FUZZ_SEEDS=1",
                path.display()
            );
        }
    }
}
