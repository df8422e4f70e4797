//! The tensor registry: every weight tensor the engine knows, the layer it belongs to, and
//! where its bytes live right now.
//!
//! Registration only records descriptors; grouping into layers happens lazily (`finalize`)
//! so the architecture can be detected from all names at once and layer indices follow
//! execution order whatever order the host registered tensors in.

use std::borrow::Cow;
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use once_cell::sync::Lazy;

use crate::diskio::ModelFile;
use crate::error::{Error, Result, Status};
use crate::gguf;
use crate::patterns::{self, Component, LayerKey, Pattern};

/// Where the bytes of a tensor or layer are right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Location {
    /// Plain host memory (the host's buffer, or engine-owned pageable memory).
    Host,
    /// Page-locked host memory that the device can copy from asynchronously.
    Pinned,
    /// Device memory: a resident place or a streaming slot of the arena.
    Device,
    /// Only in the model file (descriptor registered from GGUF, not loaded).
    File,
}

impl Location {
    pub fn as_str(self) -> &'static str {
        match self {
            Location::Host => "host",
            Location::Pinned => "pinned",
            Location::Device => "device",
            Location::File => "file",
        }
    }
}

/// What the registry knows about where a tensor comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A live `ggml_tensor` owned by the host.
    Ggml(*mut crate::ggml::ggml_tensor),
    /// A descriptor only (planning, simulation).
    Descriptor,
    /// Data at `offset` of registered file number `file`.
    File { file: u32, offset: u64 },
    /// A host `ggml_tensor` without data whose home is the model file (disk tier).
    GgmlFile {
        tensor: *mut crate::ggml::ggml_tensor,
        file: u32,
        offset: u64,
    },
}

/// `name`, or the name ggml holds for `t` when the host gave none.
fn name_or_ggml<'a>(name: Option<&'a str>, t: &crate::ggml::ggml_tensor) -> Cow<'a, str> {
    match name {
        Some(n) => Cow::Borrowed(n),
        // SAFETY: ggml names are NUL-terminated inside their fixed array.
        None => Cow::Owned(
            unsafe { std::ffi::CStr::from_ptr(t.name.as_ptr()) }
                .to_string_lossy()
                .into_owned(),
        ),
    }
}

/// Stable handle of a registered tensor. The upper half names the registry so an id from
/// another registry is rejected instead of silently aliasing a tensor here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(pub u64);

impl TensorId {
    fn new(registry: u32, index: u32) -> TensorId {
        TensorId((u64::from(registry) << 32) | u64::from(index))
    }
    fn registry(self) -> u32 {
        (self.0 >> 32) as u32
    }
    fn index(self) -> usize {
        (self.0 & 0xffff_ffff) as usize
    }
}

/// Layer membership of a tensor: a streamable layer, or the always-resident global group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    Layer(u32),
    Global,
}

#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: Box<str>,
    pub component: Component,
    pub membership: Membership,
    pub ggml_type: u32,
    pub n_dims: u8,
    pub dims: [u64; 4],
    pub bytes: u64,
    pub source: Source,
    pub location: Location,
}

#[derive(Debug, Clone)]
pub struct Layer {
    pub name: String,
    pub component: Component,
    pub tensors: Vec<TensorId>,
    pub bytes: u64,
    pub location: Location,
    order: LayerKey,
}

static NEXT_REGISTRY_SERIAL: AtomicU32 = AtomicU32::new(1);

/// Which live engine uses each host tensor (by address). An engine points its tensors at its
/// own device memory, so a second engine over the same tensors would record that memory as
/// their home: a tensor belongs to one live engine at a time.
static CLAIMS: Lazy<Mutex<HashMap<usize, u64>>> = Lazy::new(Mutex::default);
static NEXT_CLAIM_OWNER: AtomicU64 = AtomicU64::new(1);

fn claims() -> std::sync::MutexGuard<'static, HashMap<usize, u64>> {
    CLAIMS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Objects whose host freed them while a call (on another thread, or a callback's) still held
/// them: an engine among them lets go of its tensors when that call returns. A claim that
/// conflicts waits for them, a bounded time, before it is refused, so a host that frees an
/// engine and registers its tensors again is not refused for a release already under way.
static RELEASING: Lazy<(Mutex<usize>, Condvar)> = Lazy::new(Default::default);
const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// A freed handle's destruction begins (`true`, at the free) or has ended (`false`).
pub(crate) fn deferred_release(begins: bool) {
    let (count, ended) = &*RELEASING;
    let mut count = count.lock().unwrap_or_else(|p| p.into_inner());
    if begins {
        *count += 1;
    } else {
        *count = count.saturating_sub(1);
        ended.notify_all();
    }
}

/// Waits until no freed handle awaits destruction, or `RELEASE_WAIT` has passed; false when
/// none was pending (a retry would see the same claims).
fn wait_for_deferred_releases() -> bool {
    let (count, ended) = &*RELEASING;
    let guard = count.lock().unwrap_or_else(|p| p.into_inner());
    if *guard == 0 {
        return false;
    }
    let _ = ended
        .wait_timeout_while(guard, RELEASE_WAIT, |n| *n > 0)
        .unwrap_or_else(|p| p.into_inner());
    true
}

/// Runs `check`, a test for claimed tensors, again after pending releases when it fails.
fn unless_released<T>(mut check: impl FnMut() -> Result<T>) -> Result<T> {
    match check() {
        Err(_) if wait_for_deferred_releases() => check(),
        other => other,
    }
}

fn claimed_error(name: &str) -> Error {
    Error::state(format!(
        "tensor '{name}' is in use by another live engine (a tensor belongs to one engine at a time: free that engine first)"
    ))
}

/// An engine's hold on the host tensors of its registry; released when dropped, after the
/// engine has put every tensor back home.
#[derive(Debug)]
pub struct TensorClaim {
    owner: u64,
    tensors: Vec<usize>,
}

impl Default for TensorClaim {
    fn default() -> Self {
        TensorClaim {
            owner: NEXT_CLAIM_OWNER.fetch_add(1, Ordering::Relaxed),
            tensors: Vec::new(),
        }
    }
}

impl Drop for TensorClaim {
    fn drop(&mut self) {
        let mut claims = claims();
        for t in &self.tensors {
            if claims.get(t) == Some(&self.owner) {
                claims.remove(t);
            }
        }
    }
}

#[derive(Clone)]
pub struct Registry {
    serial: u32,
    pattern_override: Option<Pattern>,
    pattern: Option<Pattern>,
    tensors: Vec<TensorEntry>,
    /// name hash -> index; collisions probe the next hash value (names are compared).
    by_hash: HashMap<u64, u32>,
    layers: Vec<Layer>,
    global: Vec<TensorId>,
    files: Vec<ModelFile>,
    /// Contexts holding tensors this registry created itself (`load_gguf`); shared with the
    /// engines made from clones of it, freed with the last of them.
    owned_contexts: Vec<std::sync::Arc<crate::backend::Context>>,
    grouped: bool,
    frozen: bool,
    /// Host-given layers (tensor index -> layer number): when there are any, they define the
    /// layers and every other tensor is global.
    assigned: HashMap<u32, u32>,
}

// SAFETY: the raw pointers a registry holds are the host's tensors (and contexts it owns
// itself); it stores them and reads them only in calls made for the host, which the header
// lets come from any thread, one at a time per handle.
unsafe impl Send for Registry {}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("tensors", &self.tensors.len())
            .field("layers", &self.layers.len())
            .finish()
    }
}

fn name_hash(name: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    name.hash(&mut hasher);
    hasher.finish()
}

/// The layer name without its trailing index: "clip_l.….layers.3" -> "clip_l.….layers.".
fn tower(name: &str) -> &str {
    name.trim_end_matches(|c: char| c.is_ascii_digit())
}

/// Conditioner towers in the order pipelines run them (SD3: CLIP-L, CLIP-G, then T5).
const TOWER_ORDER: [&str; 4] = ["clip_l", "clip_g", "t5xxl", "t5"];

/// Two stacks of one component whose layers get identical keys (two CLIP towers of SD3 in
/// one file) must not interleave: such parallel towers run one after the other, known
/// conditioner towers in pipeline order, others alphabetically after them. Towers that never
/// collide (Wan's blocks and VACE blocks) keep rank 0 so the pattern's interleaving stands.
fn parallel_tower_ranks(layers: &[Layer]) -> Vec<usize> {
    let mut by_key: HashMap<(Component, LayerKey), Vec<&str>> = HashMap::new();
    for l in layers {
        by_key
            .entry((l.component, l.order))
            .or_default()
            .push(tower(&l.name));
    }
    let mut parallel: Vec<&str> = by_key
        .values()
        .filter(|towers| towers.iter().any(|t| *t != towers[0]))
        .flatten()
        .copied()
        .collect();
    let known = |t: &str| {
        let head = t.split('.').next().unwrap_or(t);
        TOWER_ORDER
            .iter()
            .position(|k| *k == head)
            .unwrap_or(TOWER_ORDER.len())
    };
    parallel.sort_unstable_by(|a, b| (known(a), *a).cmp(&(known(b), *b)));
    parallel.dedup();
    layers
        .iter()
        .map(|l| {
            let t = tower(&l.name);
            parallel.iter().position(|p| *p == t).map_or(0, |i| i + 1)
        })
        .collect()
}

/// Description of one tensor to register (from ggml, GGUF or the caller).
#[derive(Debug, Clone)]
pub struct TensorDesc<'a> {
    pub name: &'a str,
    pub ggml_type: u32,
    pub dims: &'a [u64],
    pub bytes: u64,
    pub source: Source,
    pub location: Location,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new(None)
    }
}

impl Registry {
    /// A registry; `pattern` fixes the layer grouping, `None` detects it from the names.
    pub fn new(pattern: Option<Pattern>) -> Registry {
        Registry {
            serial: NEXT_REGISTRY_SERIAL.fetch_add(1, Ordering::Relaxed),
            pattern_override: pattern,
            pattern: None,
            tensors: Vec::new(),
            by_hash: HashMap::new(),
            layers: Vec::new(),
            global: Vec::new(),
            files: Vec::new(),
            owned_contexts: Vec::new(),
            grouped: false,
            frozen: false,
            assigned: HashMap::new(),
        }
    }

    /// Parses a pattern argument: a built-in name, or a user regex (anything with regex syntax).
    pub fn pattern_from_arg(arg: &str) -> Result<Pattern> {
        // A bare identifier is meant as a built-in name: an unknown one should say so rather
        // than silently become a regex that matches nothing.
        if arg.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            Pattern::builtin(arg)
        } else {
            Pattern::user(arg, &[])
        }
    }

    pub fn set_pattern(&mut self, pattern: Option<Pattern>) -> Result<()> {
        self.check_not_frozen("change the layer pattern")?;
        self.pattern_override = pattern;
        self.grouped = false;
        Ok(())
    }

    /// After `freeze` the set of tensors is fixed (a plan refers to it).
    pub fn freeze(&mut self) {
        self.finalize();
        self.frozen = true;
    }

    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    fn check_not_frozen(&self, what: &str) -> Result<()> {
        if self.frozen {
            Err(Error::state(format!(
                "cannot {what}: the registry is fixed once a plan uses it (create a new engine to change the model)"
            )))
        } else {
            Ok(())
        }
    }

    /// Registers one tensor; duplicate names are an error.
    pub fn add(&mut self, desc: TensorDesc<'_>) -> Result<TensorId> {
        self.check_not_frozen("register tensors")?;
        if desc.name.is_empty() {
            return Err(Error::invalid("tensor name is empty"));
        }
        if desc.dims.len() > 4 {
            return Err(Error::invalid(format!(
                "tensor '{}': {} dimensions (ggml allows at most 4)",
                desc.name,
                desc.dims.len()
            )));
        }
        if self.tensors.len() >= u32::MAX as usize {
            return Err(Error::invalid("too many tensors"));
        }
        // Every loader agrees: a tensor without elements is no weight (the GGUF reader
        // refuses one in a file as corrupt).
        if desc.dims.contains(&0) || desc.bytes == 0 {
            return Err(Error::invalid(format!(
                "tensor '{}' has no elements (shape {:?})",
                desc.name, desc.dims
            )));
        }
        let mut slot = name_hash(desc.name);
        while let Some(&index) = self.by_hash.get(&slot) {
            if &*self.tensors[index as usize].name == desc.name {
                return Err(Error::new(
                    Status::AlreadyExists,
                    format!("tensor '{}' is already registered", desc.name),
                ));
            }
            slot = slot.wrapping_add(1);
        }
        let index = self.tensors.len() as u32;
        let mut dims = [1u64; 4];
        dims[..desc.dims.len()].copy_from_slice(desc.dims);
        let (component, _, _) = patterns::split_prefix(desc.name);
        self.tensors.push(TensorEntry {
            name: desc.name.into(),
            component,
            membership: Membership::Global,
            ggml_type: desc.ggml_type,
            n_dims: desc.dims.len() as u8,
            dims,
            bytes: desc.bytes,
            source: desc.source,
            location: desc.location,
        });
        self.by_hash.insert(slot, index);
        self.grouped = false;
        Ok(TensorId::new(self.serial, index))
    }

    /// The ggml tensors an engine may point at its device memory, with their names.
    fn host_tensors(&self) -> impl Iterator<Item = (usize, &str)> {
        self.tensors.iter().filter_map(|t| match t.source {
            Source::Ggml(tensor) | Source::GgmlFile { tensor, .. } => {
                Some((tensor as usize, &*t.name))
            }
            Source::Descriptor | Source::File { .. } => None,
        })
    }

    /// Adds this registry's host tensors to `claim`; all or nothing. A tensor another live
    /// engine holds is an `InvalidState` error naming it.
    pub fn claim(&self, claim: &mut TensorClaim) -> Result<()> {
        unless_released(|| self.claim_now(claim))
    }

    fn claim_now(&self, claim: &mut TensorClaim) -> Result<()> {
        let mut claims = claims();
        if let Some((_, name)) = self
            .host_tensors()
            .find(|(t, _)| claims.get(t).is_some_and(|&o| o != claim.owner))
        {
            return Err(claimed_error(name));
        }
        for (t, _) in self.host_tensors() {
            if claims.insert(t, claim.owner).is_none() {
                claim.tensors.push(t);
            }
        }
        Ok(())
    }

    fn check_unclaimed(tensor: *mut crate::ggml::ggml_tensor, name: &str) -> Result<()> {
        unless_released(|| {
            if claims().contains_key(&(tensor as usize)) {
                return Err(claimed_error(name));
            }
            Ok(())
        })
    }

    /// Registers every tensor described by a GGUF file; reads no tensor data.
    pub fn add_gguf(&mut self, path: &Path) -> Result<usize> {
        self.check_not_frozen("register tensors")?;
        let (file, stamp) = gguf::read_path_stamped(path)?;
        let file_index = self.files.len() as u32;
        let before = self.tensors.len();
        for tensor in &file.tensors {
            let added = self.add(TensorDesc {
                name: &tensor.name,
                ggml_type: tensor.ggml_type,
                dims: &tensor.dims,
                bytes: tensor.bytes,
                source: Source::File {
                    file: file_index,
                    offset: tensor.offset,
                },
                location: Location::File,
            });
            if let Err(err) = added {
                // All or nothing: a half-registered file would plan a model that is not there.
                self.truncate(before);
                return Err(Error::new(
                    err.status,
                    format!("{}: {}", path.display(), err.message),
                ));
            }
        }
        self.files.push(ModelFile {
            path: path.to_path_buf(),
            stamp: Some(stamp),
        });
        Ok(self.tensors.len() - before)
    }

    /// Reads a GGUF file into ggml tensors the registry owns and registers them: with their
    /// data in host memory, or (`file_backed`) without data, streamed from the file. The file
    /// is validated by our own reader first, so nothing malformed reaches ggml.
    pub fn load_gguf(&mut self, path: &Path, file_backed: bool) -> Result<usize> {
        use crate::ggml as sys;
        use std::os::unix::fs::FileExt;
        self.check_not_frozen("register tensors")?;
        let (file, stamp) = gguf::read_path_stamped(path)?;
        // ggml keeps names in a fixed array; a longer name would be cut and no longer match.
        let max_name = crate::ggml::max_name_bytes() - 1;
        if let Some(long) = file.tensors.iter().find(|t| t.name.len() > max_name) {
            return Err(Error::new(
                Status::Unsupported,
                format!(
                    "{}: tensor name '{}' is longer than ggml's {max_name} characters",
                    path.display(),
                    long.name
                ),
            ));
        }
        // SAFETY: no preconditions.
        let overhead = unsafe { sys::ggml_tensor_overhead() };
        let data_bytes: u64 = if file_backed {
            0
        } else {
            file.tensors.iter().map(|t| t.bytes + 64).sum()
        };
        let mem = (file.tensors.len() + 1) as u64 * overhead as u64 + data_bytes;
        let mem = usize::try_from(mem).map_err(|_| Error::invalid("model too large"))?;
        let ctx = crate::backend::Context::new(mem, file_backed)?;
        let reader = if file_backed {
            None
        } else {
            Some(gguf::open_regular(path)?.0)
        };
        for info in &file.tensors {
            let mut ne = [1i64; 4];
            for (slot, &d) in ne.iter_mut().zip(&info.dims) {
                *slot = d as i64; // the reader checked every size fits in i64
            }
            let n_dims = info.dims.len().max(1) as i32;
            // SAFETY: the context has room for every tensor (sized above); the type and shape
            // passed the reader's checks (known type, block-aligned first dimension).
            let t = unsafe { sys::ggml_new_tensor(ctx.raw(), info.ggml_type, n_dims, ne.as_ptr()) };
            if t.is_null() {
                return Err(Error::new(Status::OutOfMemory, "ggml context is full"));
            }
            let name = std::ffi::CString::new(info.name.as_str())
                .map_err(|_| Error::invalid("tensor name contains NUL"))?;
            // SAFETY: valid tensor; the name fits (checked above).
            unsafe { sys::ggml_set_name(t, name.as_ptr()) };
            if let Some(reader) = &reader {
                // SAFETY: not no_alloc, so ggml placed `nbytes` of data for the tensor, which
                // equals `info.bytes` for this type and shape.
                let data = unsafe {
                    std::slice::from_raw_parts_mut((*t).data as *mut u8, info.bytes as usize)
                };
                reader
                    .read_exact_at(data, info.offset)
                    .map_err(|e| Error::io(path.display(), e))?;
            }
        }
        // SAFETY: the context and its tensors live as long as this registry or its clones.
        let added = unsafe {
            if file_backed {
                self.add_file_backed_parsed(ctx.raw(), path, &file, stamp)?
            } else {
                self.add_ggml_context(ctx.raw())?
            }
        };
        self.owned_contexts.push(std::sync::Arc::new(ctx));
        Ok(added)
    }

    /// Registers a host ggml tensor (`name` overrides the name ggml holds). Its data must be
    /// in host memory; it is checked here so nothing invalid reaches ggml later.
    ///
    /// # Safety
    /// `tensor` must be NULL or point to a valid tensor that outlives the registry's engines.
    pub unsafe fn add_ggml_tensor(
        &mut self,
        tensor: *mut crate::ggml::ggml_tensor,
        name: Option<&str>,
    ) -> Result<TensorId> {
        use crate::ggml as sys;
        if tensor.is_null() {
            return Err(Error::new(Status::NullPointer, "tensor is NULL"));
        }
        // SAFETY: a non-null tensor the caller guarantees valid.
        let t = unsafe { &*tensor };
        let name = name_or_ggml(name, t);
        let name = &*name;
        Registry::check_unclaimed(tensor, name)?;
        if t.data.is_null() {
            return Err(Error::invalid(format!(
                "tensor '{name}' has no data: load the weights into host memory first \
                 (or register a no_alloc context from its file: the disk tier)"
            )));
        }
        // SAFETY: a non-null buffer of a valid tensor.
        if !t.buffer.is_null() && !unsafe { sys::ggml_backend_buffer_is_host(t.buffer) } {
            return Err(Error::new(
                Status::Unsupported,
                format!("tensor '{name}' lives in device memory; register weights while they are in host memory"),
            ));
        }
        if t.type_ >= sys::GGML_TYPE_COUNT {
            return Err(Error::invalid(format!(
                "tensor '{name}' has an invalid ggml type {}",
                t.type_
            )));
        }
        // As GGUF files record them: trailing sizes of 1 are not dimensions.
        // SAFETY: a valid tensor.
        let n_dims = unsafe { sys::ggml_n_dims(tensor) }.clamp(1, 4) as usize;
        let dims: Vec<u64> = t.ne[..n_dims].iter().map(|&d| d.max(0) as u64).collect();
        // SAFETY: a valid tensor with a valid type.
        let bytes = unsafe { sys::ggml_nbytes(tensor) } as u64;
        self.add(TensorDesc {
            name,
            ggml_type: t.type_,
            dims: &dims,
            bytes,
            source: Source::Ggml(tensor),
            location: Location::Host,
        })
    }

    /// Registers a host tensor whose data also lies at `offset` of registered file `file`:
    /// the engine reads it from there (disk tier) and its host memory holds nothing needed.
    ///
    /// # Safety
    /// As `add_ggml_tensor`.
    pub unsafe fn add_ggml_tensor_in_file(
        &mut self,
        tensor: *mut crate::ggml::ggml_tensor,
        name: &str,
        file: u32,
        offset: u64,
    ) -> Result<TensorId> {
        if self.files.get(file as usize).is_none() {
            return Err(Error::not_found(format!("no registered file {file}")));
        }
        // SAFETY: forwarded caller guarantee.
        let id = unsafe { self.add_ggml_tensor(tensor, Some(name))? };
        let entry = &mut self.tensors[id.index()];
        entry.source = Source::GgmlFile {
            tensor,
            file,
            offset,
        };
        entry.location = Location::File;
        Ok(id)
    }

    /// Registers a host tensor whose data lies at `offset` of the file at `path` (any format:
    /// the bytes there are the tensor's data as ggml lays it out), for hosts with their own
    /// loader that leave the weights in the file (the disk tier). The file is registered on
    /// its first use (its stamp taken then; streaming refuses it once it changed), and a range
    /// outside it is refused.
    ///
    /// # Safety
    /// As `add_ggml_tensor`.
    pub unsafe fn add_ggml_tensor_from_file(
        &mut self,
        tensor: *mut crate::ggml::ggml_tensor,
        name: Option<&str>,
        path: &Path,
        offset: u64,
    ) -> Result<TensorId> {
        if tensor.is_null() {
            return Err(Error::new(Status::NullPointer, "tensor is NULL"));
        }
        // SAFETY: a non-null tensor the caller guarantees valid.
        let t = unsafe { &*tensor };
        let name = name_or_ggml(name, t);
        let name = &*name;
        self.check_not_frozen("register tensors")?;
        let files_before = self.files.len();
        let added = (|| {
            let file = match self.files.iter().position(|f| f.path == path) {
                Some(known) => known as u32,
                None => self.add_stamped_file(path, Some(gguf::open_regular(path)?.1))?,
            };
            let size = self.files[file as usize].stamp.map_or(0, |s| s.size);
            // SAFETY: as above.
            let bytes = unsafe { crate::ggml::ggml_nbytes(tensor) } as u64;
            if offset.checked_add(bytes).is_none_or(|end| end > size) {
                return Err(Error::new(
                    Status::CorruptFile,
                    format!(
                        "tensor '{name}': bytes {offset}..{} lie outside {} ({size} bytes)",
                        offset.saturating_add(bytes),
                        path.display()
                    ),
                ));
            }
            // SAFETY: forwarded caller guarantee.
            unsafe { self.add_ggml_tensor_in_file(tensor, name, file, offset) }
        })();
        if added.is_err() {
            self.files.truncate(files_before); // a file registered for this tensor alone
        }
        added
    }

    /// Registers every tensor of a host context (as `add_ggml_tensor`); all or nothing.
    ///
    /// # Safety
    /// `ctx` must be NULL or a valid context whose tensors outlive the registry's engines.
    pub unsafe fn add_ggml_context(
        &mut self,
        ctx: *mut crate::ggml::ggml_context,
    ) -> Result<usize> {
        use crate::ggml as sys;
        if ctx.is_null() {
            return Err(Error::new(Status::NullPointer, "context is NULL"));
        }
        let before = self.tensors.len();
        // SAFETY: iterating a valid context.
        let mut t = unsafe { sys::ggml_get_first_tensor(ctx) };
        while !t.is_null() {
            // SAFETY: tensors of a valid context.
            if let Err(err) = unsafe { self.add_ggml_tensor(t, None) } {
                self.truncate(before);
                return Err(err);
            }
            // SAFETY: as above.
            t = unsafe { sys::ggml_get_next_tensor(ctx, t) };
        }
        Ok(self.tensors.len() - before)
    }

    /// The model as the planner sees it: each layer's device image and the bytes a load of it
    /// moves, laid out exactly as an engine lays them out (`layout`), so a plan made here is
    /// the plan an engine makes for the same tensors and budget. Tensors that stream from a
    /// file (the disk tier) keep the file's layout; so do tensors described by a GGUF file
    /// (`add_gguf`) when `streams_from_file`, else they are planned as loaded into memory.
    pub fn model_cost(&mut self, streams_from_file: bool) -> crate::planner::ModelCost {
        use crate::layout::{self, Extent};
        self.finalize();
        let extent = |id: &TensorId| {
            let t = &self.tensors[id.index()];
            let file = match t.source {
                Source::GgmlFile { file, offset, .. } => Some((file, offset)),
                Source::File { file, offset } if streams_from_file => Some((file, offset)),
                _ => None,
            };
            Extent {
                bytes: t.bytes,
                file,
            }
        };
        let images: Vec<(String, layout::ImageLayout)> = self
            .layers
            .iter()
            .map(|l| {
                let extents: Vec<Extent> = l.tensors.iter().map(extent).collect();
                (l.name.clone(), layout::as_in_file_or_packed(&extents))
            })
            .collect();
        let global_extents: Vec<Extent> = self.global.iter().map(extent).collect();
        let global = layout::packed(&global_extents);
        let named: Vec<(&str, &layout::ImageLayout)> =
            images.iter().map(|(n, l)| (n.as_str(), l)).collect();
        let mut cost = layout::model_cost(&named, &global);
        // What the layers' weights take per element now, for advice on quantizing.
        let (bytes, elements) = self
            .layers
            .iter()
            .flat_map(|l| &l.tensors)
            .map(|id| &self.tensors[id.index()])
            .fold((0f64, 0f64), |(b, e), t| {
                (
                    b + t.bytes as f64,
                    e + t.dims[..usize::from(t.n_dims)].iter().product::<u64>() as f64,
                )
            });
        cost.bits_per_weight = (elements > 0.0 && bytes > 0.0).then(|| bytes * 8.0 / elements);
        cost
    }

    /// Disk tier: registers the tensors of a host context whose data stays in the model file
    /// (the tensors must have no data: the engine places them on the device when they run).
    /// Each tensor must exist in the GGUF file with the same type and shape. All or nothing.
    ///
    /// # Safety
    /// `ctx` must be a valid ggml context whose tensors outlive this registry and its engines.
    pub unsafe fn add_file_backed_context(
        &mut self,
        ctx: *mut crate::ggml::ggml_context,
        path: &Path,
    ) -> Result<usize> {
        self.check_not_frozen("register tensors")?;
        if ctx.is_null() {
            return Err(Error::new(Status::NullPointer, "context is NULL"));
        }
        let (file, stamp) = gguf::read_path_stamped(path)?;
        // SAFETY: forwarded caller guarantee.
        unsafe { self.add_file_backed_parsed(ctx, path, &file, stamp) }
    }

    /// `add_file_backed_context` with the file already read.
    ///
    /// # Safety
    /// As `add_file_backed_context`; `ctx` is not NULL and `file` was read from `path`.
    unsafe fn add_file_backed_parsed(
        &mut self,
        ctx: *mut crate::ggml::ggml_context,
        path: &Path,
        file: &gguf::GgufFile,
        stamp: gguf::FileStamp,
    ) -> Result<usize> {
        use crate::ggml as sys;
        let by_name: HashMap<&str, &gguf::TensorInfo> =
            file.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
        let before_tensors = self.tensors.len();
        let before_files = self.files.len();
        self.files.push(ModelFile {
            path: path.to_path_buf(),
            stamp: Some(stamp),
        });
        let file_index = before_files as u32;
        let result = (|| {
            // SAFETY: iterating a valid context (caller's guarantee).
            let mut t = unsafe { sys::ggml_get_first_tensor(ctx) };
            while !t.is_null() {
                // SAFETY: tensors of a valid context; names are NUL-terminated.
                let (name, tensor) = unsafe {
                    (
                        std::ffi::CStr::from_ptr((*t).name.as_ptr())
                            .to_string_lossy()
                            .into_owned(),
                        &*t,
                    )
                };
                let info = by_name.get(name.as_str()).ok_or_else(|| {
                    Error::not_found(format!(
                        "{}: no tensor '{name}' in the file",
                        path.display()
                    ))
                })?;
                Registry::check_unclaimed(t, &name)?;
                if !tensor.data.is_null() {
                    return Err(Error::invalid(format!(
                        "tensor '{name}' already has data; file-backed tensors come from a no_alloc context"
                    )));
                }
                let dims: Vec<u64> = tensor.ne.iter().map(|&d| d.max(0) as u64).collect();
                let mut file_dims = info.dims.clone();
                file_dims.resize(4, 1);
                if tensor.type_ != info.ggml_type || dims != file_dims {
                    return Err(Error::corrupt(format!(
                        "{}: tensor '{name}' is {:?} of type {} in the file but {:?} of type {} in the host",
                        path.display(),
                        info.dims,
                        info.ggml_type,
                        dims,
                        tensor.type_
                    )));
                }
                self.add(TensorDesc {
                    name: &name,
                    ggml_type: info.ggml_type,
                    dims: &info.dims,
                    bytes: info.bytes,
                    source: Source::GgmlFile {
                        tensor: t,
                        file: file_index,
                        offset: info.offset,
                    },
                    location: Location::File,
                })?;
                // SAFETY: as above.
                t = unsafe { sys::ggml_get_next_tensor(ctx, t) };
            }
            Ok(self.tensors.len() - before_tensors)
        })();
        if result.is_err() {
            self.truncate(before_tensors);
            self.files.truncate(before_files);
        }
        result
    }

    fn truncate(&mut self, len: usize) {
        self.tensors.truncate(len);
        self.by_hash.retain(|_, index| (*index as usize) < len);
        self.assigned.retain(|&index, _| (index as usize) < len);
        self.grouped = false;
    }

    /// Puts a tensor in layer `layer` explicitly, for hosts that know where each weight is
    /// used (stable-diffusion.cpp's graph-cut segments) better than any name pattern. Layers
    /// run in the order of their numbers (numbers need not be contiguous). Once a registry
    /// has an assignment, assignments alone define its layers: every tensor without one is
    /// global (always resident), whatever the pattern says.
    pub fn assign(&mut self, id: TensorId, layer: u32) -> Result<()> {
        self.check_not_frozen("assign tensors to layers")?;
        let index = self.check_id(id)?;
        self.assigned.insert(index as u32, layer);
        self.grouped = false;
        Ok(())
    }

    /// The layer a host-assigned tensor is in (`assign`), as the pattern would name it.
    fn assigned_layer(&self, index: usize) -> Option<patterns::Matched> {
        self.assigned
            .get(&(index as u32))
            .map(|&n| patterns::Matched {
                layer_name: format!("layer.{n}"),
                order: LayerKey {
                    kind_rank: 0,
                    index: u64::from(n),
                    sub_rank: 0,
                },
            })
    }

    pub fn files(&self) -> &[ModelFile] {
        &self.files
    }

    /// Registers a model file without its tensors (their descriptors come from elsewhere);
    /// returns its number for `Source::GgmlFile`. Its stamp is taken now, when it exists.
    pub fn add_file(&mut self, path: &Path) -> Result<u32> {
        let stamp = std::fs::metadata(path)
            .ok()
            .map(|m| gguf::FileStamp::of(&m));
        self.add_stamped_file(path, stamp)
    }

    /// As `add_file`, with the stamp taken when the file was read (streaming refuses a file
    /// that changed since).
    pub fn add_stamped_file(&mut self, path: &Path, stamp: Option<gguf::FileStamp>) -> Result<u32> {
        self.check_not_frozen("register files")?;
        self.files.push(ModelFile {
            path: path.to_path_buf(),
            stamp,
        });
        Ok(self.files.len() as u32 - 1)
    }

    pub fn file_path(&self, file: u32) -> Option<&Path> {
        self.files.get(file as usize).map(|f| f.path.as_path())
    }

    /// Groups tensors into layers in execution order (idempotent, cheap when nothing changed).
    pub fn finalize(&mut self) {
        if self.grouped {
            return;
        }
        let pattern = match &self.pattern_override {
            Some(p) => p.clone(),
            None => {
                let names: Vec<&str> = self.tensors.iter().map(|t| &*t.name).collect();
                patterns::detect(&names)
            }
        };
        // Per component, layer name -> index: the same block index in the text encoder and
        // in the diffusion model are different layers.
        let mut by_layer: HashMap<Component, HashMap<String, usize>> = HashMap::new();
        let mut layers: Vec<Layer> = Vec::new();
        let mut global = Vec::new();
        let explicit = !self.assigned.is_empty();
        let assigned: Vec<Option<patterns::Matched>> = (0..self.tensors.len())
            .map(|i| {
                if explicit {
                    self.assigned_layer(i)
                } else {
                    None
                }
            })
            .collect();
        for (index, tensor) in self.tensors.iter_mut().enumerate() {
            let id = TensorId::new(self.serial, index as u32);
            let matched = if explicit {
                assigned[index].clone()
            } else {
                pattern.match_name(&tensor.name)
            };
            // Assigned layer numbers are the host's, across all its tensors' components.
            let component = if explicit {
                Component::Unknown
            } else {
                tensor.component
            };
            match matched {
                Some(matched) => {
                    let in_component = by_layer.entry(component).or_default();
                    let slot = match in_component.get(matched.layer_name.as_str()) {
                        Some(&slot) => slot,
                        None => {
                            layers.push(Layer {
                                name: matched.layer_name.clone(),
                                component,
                                tensors: Vec::new(),
                                bytes: 0,
                                location: tensor.location,
                                order: matched.order,
                            });
                            in_component.insert(matched.layer_name, layers.len() - 1);
                            layers.len() - 1
                        }
                    };
                    let layer = &mut layers[slot];
                    layer.tensors.push(id);
                    layer.bytes = layer.bytes.saturating_add(tensor.bytes);
                    tensor.membership = Membership::Layer(slot as u32);
                }
                None => {
                    tensor.membership = Membership::Global;
                    global.push(id);
                }
            }
        }
        // Components keep their registration order; within one, the pattern gives the order.
        let mut component_rank: HashMap<Component, usize> = HashMap::new();
        for layer in &layers {
            let next = component_rank.len();
            component_rank.entry(layer.component).or_insert(next);
        }
        let tower_rank = parallel_tower_ranks(&layers);
        let mut order: Vec<usize> = (0..layers.len()).collect();
        order.sort_by(|&a, &b| {
            let key = |i: usize| {
                let l = &layers[i];
                (
                    component_rank[&l.component],
                    tower_rank[i],
                    l.order,
                    &l.name,
                )
            };
            key(a).cmp(&key(b))
        });
        let mut new_index = vec![0u32; layers.len()];
        for (new, &old) in order.iter().enumerate() {
            new_index[old] = new as u32;
        }
        for tensor in &mut self.tensors {
            if let Membership::Layer(old) = tensor.membership {
                tensor.membership = Membership::Layer(new_index[old as usize]);
            }
        }
        let mut slots: Vec<Option<Layer>> = layers.into_iter().map(Some).collect();
        self.layers = order
            .iter()
            .map(|&old| slots[old].take().expect("each layer is moved once"))
            .collect();
        self.global = global;
        log::debug!(
            "grouped {} tensors into {} layers {} ({} always resident)",
            self.tensors.len(),
            self.layers.len(),
            if explicit {
                "as the host assigned them".to_string()
            } else {
                format!("with pattern {}", pattern.name())
            },
            self.global.len()
        );
        self.pattern = Some(pattern);
        self.grouped = true;
    }

    fn grouped(&self) -> Result<()> {
        if self.grouped {
            Ok(())
        } else {
            Err(Error::state("registry not finalized"))
        }
    }

    pub fn architecture(&mut self) -> String {
        self.finalize();
        self.pattern
            .as_ref()
            .map(|p| p.name().to_string())
            .unwrap_or_default()
    }

    pub fn tensor_count(&self) -> usize {
        self.tensors.len()
    }

    pub fn layer_count(&mut self) -> usize {
        self.finalize();
        self.layers.len()
    }

    /// Layers in execution order (finalizes first).
    pub fn layers(&mut self) -> &[Layer] {
        self.finalize();
        &self.layers
    }

    /// Layers of an already finalized registry (for holders of a shared reference).
    pub fn grouped_layers(&self) -> Result<&[Layer]> {
        self.grouped()?;
        Ok(&self.layers)
    }

    pub fn layer(&mut self, index: usize) -> Result<&Layer> {
        self.finalize();
        let count = self.layers.len();
        self.layers.get(index).ok_or_else(|| {
            Error::not_found(format!(
                "layer index {index} out of range (model has {count} layers)"
            ))
        })
    }

    pub fn global_tensors(&mut self) -> &[TensorId] {
        self.finalize();
        &self.global
    }

    pub fn global_bytes(&mut self) -> u64 {
        self.finalize();
        self.global
            .iter()
            .map(|id| self.tensors[id.index()].bytes)
            .fold(0u64, u64::saturating_add)
    }

    pub fn total_bytes(&self) -> u64 {
        self.tensors
            .iter()
            .map(|t| t.bytes)
            .fold(0u64, u64::saturating_add)
    }

    pub fn find(&self, name: &str) -> Result<TensorId> {
        let mut slot = name_hash(name);
        while let Some(&index) = self.by_hash.get(&slot) {
            if &*self.tensors[index as usize].name == name {
                return Ok(TensorId::new(self.serial, index));
            }
            slot = slot.wrapping_add(1);
        }
        Err(Error::not_found(format!(
            "no tensor named '{name}' is registered"
        )))
    }

    fn check_id(&self, id: TensorId) -> Result<usize> {
        if id.registry() != self.serial {
            return Err(Error::new(
                Status::InvalidHandle,
                format!("tensor id {:#x} belongs to another registry", id.0),
            ));
        }
        let index = id.index();
        if index >= self.tensors.len() {
            return Err(Error::not_found(format!("unknown tensor id {:#x}", id.0)));
        }
        Ok(index)
    }

    pub fn tensor(&self, id: TensorId) -> Result<&TensorEntry> {
        let index = self.check_id(id)?;
        Ok(&self.tensors[index])
    }

    pub fn tensor_mut(&mut self, id: TensorId) -> Result<&mut TensorEntry> {
        let index = self.check_id(id)?;
        Ok(&mut self.tensors[index])
    }

    /// Layer index of a tensor, or `None` for the global group.
    pub fn layer_of(&mut self, id: TensorId) -> Result<Option<usize>> {
        self.finalize();
        Ok(match self.tensor(id)?.membership {
            Membership::Layer(layer) => Some(layer as usize),
            Membership::Global => None,
        })
    }

    pub fn set_layer_location(&mut self, layer: usize, location: Location) -> Result<()> {
        self.finalize();
        let ids = self.layer(layer)?.tensors.clone();
        for id in ids {
            self.tensors[id.index()].location = location;
        }
        self.layers[layer].location = location;
        Ok(())
    }

    /// Iterates tensors in execution order: each layer's tensors, then the global group.
    pub fn execution_order(&mut self) -> Vec<TensorId> {
        self.finalize();
        let mut ids: Vec<TensorId> = self
            .layers
            .iter()
            .flat_map(|l| l.tensors.iter().copied())
            .collect();
        ids.extend(self.global.iter().copied());
        ids
    }

    /// Bytes of heap memory this registry holds per tensor (for the benchmark).
    pub fn approx_heap_bytes(&self) -> usize {
        let names: usize = self.tensors.iter().map(|t| t.name.len()).sum();
        let entries = self.tensors.capacity() * std::mem::size_of::<TensorEntry>();
        let index = self.by_hash.capacity() * (std::mem::size_of::<(u64, u32)>() + 1);
        let layers: usize = self
            .layers
            .iter()
            .map(|l| l.tensors.capacity() * 8 + l.name.capacity() + std::mem::size_of::<Layer>())
            .sum();
        names + entries + index + layers + self.global.capacity() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(name: &str, bytes: u64) -> TensorDesc<'_> {
        TensorDesc {
            name,
            ggml_type: 0,
            dims: &[4],
            bytes,
            source: Source::Descriptor,
            location: Location::Host,
        }
    }

    fn flux_registry() -> Registry {
        let mut r = Registry::new(None);
        // Registered out of order on purpose: indices must follow execution order anyway.
        for name in [
            "model.diffusion_model.single_blocks.1.linear1.weight",
            "model.diffusion_model.double_blocks.1.img_attn.qkv.weight",
            "model.diffusion_model.img_in.weight",
            "model.diffusion_model.single_blocks.0.linear1.weight",
            "model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
            "model.diffusion_model.double_blocks.0.txt_mlp.0.weight",
        ] {
            r.add(desc(name, 100)).unwrap();
        }
        r
    }

    #[test]
    fn a_conflicting_claim_waits_for_a_release_under_way_and_only_then() {
        // An address no ggml tensor has, held by an engine whose free is under way.
        let address = Box::into_raw(Box::new(0u64)) as usize;
        let is_free = || {
            if claims().contains_key(&address) {
                Err(claimed_error("t"))
            } else {
                Ok(())
            }
        };
        let mut held = TensorClaim::default();
        claims().insert(address, held.owner);
        held.tensors.push(address);
        deferred_release(true);
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(held);
            deferred_release(false);
        });
        assert_eq!(unless_released(is_free), Ok(()));
        releaser.join().unwrap();

        // Nothing under way: refused at once.
        let held = TensorClaim {
            tensors: vec![address],
            ..TensorClaim::default()
        };
        claims().insert(address, held.owner);
        let started = std::time::Instant::now();
        assert!(unless_released(is_free).is_err());
        assert!(started.elapsed() < RELEASE_WAIT);
        drop(held);
        // SAFETY: made by Box::into_raw above and never freed.
        drop(unsafe { Box::from_raw(address as *mut u64) });
    }

    #[test]
    fn groups_in_execution_order_whatever_the_registration_order() {
        let mut r = flux_registry();
        assert_eq!(r.architecture(), "flux");
        let names: Vec<_> = r.layers().iter().map(|l| l.name.clone()).collect();
        assert_eq!(
            names,
            [
                "double_blocks.0",
                "double_blocks.1",
                "single_blocks.0",
                "single_blocks.1"
            ]
        );
        assert_eq!(r.layers()[0].tensors.len(), 2);
        assert_eq!(r.layers()[0].bytes, 200);
        assert_eq!(r.global_bytes(), 100);
        assert_eq!(r.total_bytes(), 600);
        let id = r
            .find("model.diffusion_model.double_blocks.0.txt_mlp.0.weight")
            .unwrap();
        assert_eq!(r.layer_of(id).unwrap(), Some(0));
        let global = r.find("model.diffusion_model.img_in.weight").unwrap();
        assert_eq!(r.layer_of(global).unwrap(), None);
        assert_eq!(r.execution_order().len(), 6);
        assert_eq!(*r.execution_order().last().unwrap(), global);
    }

    #[test]
    fn duplicates_unknown_names_and_foreign_ids_are_errors() {
        let mut r = flux_registry();
        let err = r
            .add(desc("model.diffusion_model.img_in.weight", 1))
            .unwrap_err();
        assert_eq!(err.status, Status::AlreadyExists);
        assert!(err.message.contains("img_in"));
        assert_eq!(r.find("nope").unwrap_err().status, Status::NotFound);
        let other = flux_registry();
        let foreign = other.find("model.diffusion_model.img_in.weight").unwrap();
        assert_eq!(r.tensor(foreign).unwrap_err().status, Status::InvalidHandle);
        let past_end = TensorId::new(r.serial, 1000);
        assert_eq!(r.tensor(past_end).unwrap_err().status, Status::NotFound);
        assert_eq!(r.layer(99).unwrap_err().status, Status::NotFound);
    }

    #[test]
    fn frozen_registry_refuses_new_tensors() {
        let mut r = flux_registry();
        r.freeze();
        assert_eq!(
            r.add(desc("x", 1)).unwrap_err().status,
            Status::InvalidState
        );
    }

    #[test]
    fn explicit_pattern_overrides_detection_and_unmatched_go_global() {
        let mut r = Registry::new(Some(Pattern::builtin("llama_gguf").unwrap()));
        r.add(desc("blk.0.attn_q.weight", 10)).unwrap();
        r.add(desc("double_blocks.0.x", 10)).unwrap();
        assert_eq!(r.layer_count(), 1);
        assert_eq!(r.global_bytes(), 10);
    }

    #[test]
    fn hash_collisions_probe_without_losing_names() {
        // Force two names into one probe chain by inserting directly under the same slot.
        let mut r = Registry::new(None);
        let a = r.add(desc("a", 1)).unwrap();
        let slot = name_hash("b");
        r.by_hash.insert(slot, a.index() as u32); // occupy b's slot with a
        let b = r.add(desc("b", 2)).unwrap();
        assert_eq!(r.find("b").unwrap(), b);
        assert_eq!(r.find("a").unwrap(), a);
    }
}
