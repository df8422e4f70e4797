//! Layer streaming: one device arena allocated once, resident layers at fixed places,
//! streamed layers rotating through a ring of slots, filled ahead of use by a copy thread.
//!
//! Protocol per slot: Free -> Loading -> Ready -> InUse -> Free. Only the host thread moves a
//! slot to InUse and back to Free, and only the copy thread moves Loading to Ready/Failed,
//! so a slot is never overwritten while the compute that reads it may still run: a copy into
//! a slot is queued only after the previous occupant's `end_layer` (on event-capable devices,
//! the copy stream additionally waits for the compute stream's event recorded there).

use std::collections::VecDeque;
use std::ffi::c_void;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::backend::{Backend, Buffer, Context, Device, Event};
use crate::diskio::{FileSet, ReadFailure};
use crate::error::{Error, Result, Status};
use crate::faults::{self, Fault};
use crate::ggml as sys;
use crate::trace::{Lane, Trace};

/// One weight tensor's two homes: where the host keeps it and where it goes in a layer image.
#[derive(Debug, Clone)]
pub struct TensorPlace {
    pub tensor: *mut sys::ggml_tensor,
    pub home_data: *mut c_void,
    /// Where copies read from: the home, the engine's pinned staging copy, or the file.
    pub source: TensorSource,
    pub home_buffer: sys::ggml_backend_buffer_t,
    /// Offset of this tensor inside its layer's device image (aligned).
    pub offset: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorSource {
    Memory(*const u8),
    /// The model file itself (disk tier): `offset` of registered file `file`.
    File {
        file: u32,
        offset: u64,
    },
}

pub use crate::layout::{align_up, FileSpan};

#[derive(Debug, Clone)]
pub struct LayerImage {
    pub name: String,
    pub tensors: Vec<TensorPlace>,
    /// Set when the layer streams from its file in one read (image layout = file layout).
    pub file_span: Option<FileSpan>,
    /// Bytes of the device image, alignment padding included.
    pub image_bytes: u64,
    /// Bytes of tensor data in the image.
    pub data_bytes: u64,
    /// Bytes one load moves (the data, or the file stretch read in one go).
    pub copy_bytes: u64,
}

impl LayerImage {
    fn from_layout(
        name: &str,
        tensors: Vec<TensorPlace>,
        layout: crate::layout::ImageLayout,
    ) -> Self {
        let tensors = tensors
            .into_iter()
            .zip(&layout.offsets)
            .map(|(mut t, &offset)| {
                t.offset = offset;
                t
            })
            .collect();
        LayerImage {
            name: name.to_string(),
            tensors,
            file_span: layout.file_span,
            image_bytes: layout.image_bytes,
            data_bytes: layout.data_bytes,
            copy_bytes: layout.copy_bytes,
        }
    }

    pub fn layout(&self) -> crate::layout::ImageLayout {
        crate::layout::ImageLayout {
            offsets: self.tensors.iter().map(|t| t.offset).collect(),
            file_span: self.file_span,
            image_bytes: self.image_bytes,
            data_bytes: self.data_bytes,
            copy_bytes: self.copy_bytes,
        }
    }
}

fn extents(tensors: &[TensorPlace]) -> Vec<crate::layout::Extent> {
    tensors
        .iter()
        .map(|t| crate::layout::Extent {
            bytes: t.bytes,
            file: match t.source {
                TensorSource::File { file, offset } => Some((file, offset)),
                TensorSource::Memory(_) => None,
            },
        })
        .collect()
}

/// Lays a layer's tensors out in one contiguous, aligned device image.
pub fn layout_layer(name: &str, tensors: Vec<TensorPlace>) -> LayerImage {
    let layout = crate::layout::packed(&extents(&tensors));
    LayerImage::from_layout(name, tensors, layout)
}

/// Lays out a layer whose tensors all come from one model file so that a single aligned read
/// of the file stretch fills the image; packed otherwise (see `layout::as_in_file_or_packed`).
pub fn layout_file_layer(name: &str, tensors: Vec<TensorPlace>) -> LayerImage {
    let layout = crate::layout::as_in_file_or_packed(&extents(&tensors));
    LayerImage::from_layout(name, tensors, layout)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Free,
    Loading(usize),
    Ready(usize),
    InUse(usize),
    Failed(usize),
}

impl SlotState {
    fn layer(self) -> Option<usize> {
        match self {
            SlotState::Free => None,
            SlotState::Loading(l)
            | SlotState::Ready(l)
            | SlotState::InUse(l)
            | SlotState::Failed(l) => Some(l),
        }
    }
}

/// One copy into the arena at `dst` (an arena offset).
#[derive(Debug, Clone, Copy)]
enum Piece {
    /// From host memory the host (or the engine's staging) keeps alive while the engine lives.
    Memory { src: *const u8, dst: u64, len: u64 },
    /// From a model file; at least `needed` of the `len` bytes must exist in the file.
    File {
        file: u32,
        offset: u64,
        dst: u64,
        len: u64,
        needed: u64,
    },
}

// SAFETY: the pointers in `Memory` pieces point at host memory that outlives every copy job
// (the engine drains the copy thread before the host may free it), and the destination slot
// is written by this job alone (the slot protocol in the module comment).
unsafe impl Send for Piece {}

#[derive(Debug)]
struct CopyJob {
    slot: usize,
    layer: usize,
    pieces: Vec<Piece>,
}

#[derive(Debug, Default)]
struct CopyOutcome {
    error: Option<Error>,
    /// File offset where a failed read stopped (names the tensor in the error).
    failed_offset: Option<u64>,
}

struct Shared {
    slots: Vec<SlotState>,
    outcomes: Vec<CopyOutcome>,
    queue: VecDeque<CopyJob>,
    shutdown: bool,
    copy_bytes: u64,
    copy_micros: u64,
    copies: u64,
}

struct Sync2 {
    state: Mutex<Shared>,
    changed: Condvar,
}

impl Sync2 {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic on the copy thread is caught there; a poisoned lock still holds valid state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Where the copy thread writes: straight memory on host-visible arenas, or async device
/// copies on a dedicated stream otherwise.
struct CopyTarget {
    arena: Arc<Buffer>,
    /// Copy-stream backend and one shadow tensor spanning the arena (device arenas only).
    device: Option<DeviceCopier>,
    files: Arc<FileSet>,
}

struct DeviceCopier {
    backend: Backend,
    shadow: *mut sys::ggml_tensor,
    _shadow_ctx: Context,
    copy_done: Event,
    /// Per slot, recorded on the compute stream when its last reader was enqueued.
    compute_done: Arc<Vec<Event>>,
}

// SAFETY: the shadow tensor and its context are used only by the copy thread after creation.
unsafe impl Send for DeviceCopier {}

impl CopyTarget {
    fn run(&self, job: &CopyJob, bounce: &mut Bounce) -> std::result::Result<u64, ReadFailure> {
        if faults::should_fail(Fault::CopyThreadPanic) {
            panic!("injected panic in the copy thread");
        }
        if faults::should_fail(Fault::Copy) {
            return Err(ReadFailure {
                error: Error::new(
                    Status::Backend,
                    format!("injected copy failure for layer {}", job.layer),
                ),
                offset: 0,
            });
        }
        match &self.device {
            None => execute_host(&self.arena, &self.files, &job.pieces),
            Some(dev) => {
                dev.compute_done[job.slot].wait_on(&dev.backend);
                let bytes = execute_device(&self.files, &job.pieces, bounce, |src, dst, len| {
                    // SAFETY: the shadow tensor spans the whole arena, so dst+len is in range
                    // (checked at layout); the source stays alive until the copy completes
                    // (host memory, or the bounce buffer which we synchronize on below).
                    unsafe {
                        sys::ggml_backend_tensor_set_async(
                            dev.backend.raw(),
                            dev.shadow,
                            src.cast(),
                            dst as usize,
                            len as usize,
                        )
                    };
                    dev.copy_done.record(&dev.backend);
                    dev.copy_done.synchronize();
                })?;
                Ok(bytes)
            }
        }
    }
}

/// A host buffer aligned for direct I/O, for file reads bound for device memory.
#[derive(Default)]
struct Bounce {
    buffer: Vec<u8>,
}

impl Bounce {
    fn get(&mut self, len: usize) -> &mut [u8] {
        let align = crate::diskio::DIRECT_ALIGNMENT as usize;
        if self.buffer.len() < len + align {
            self.buffer = vec![0u8; len + align];
        }
        let pad = self.buffer.as_ptr().align_offset(align);
        &mut self.buffer[pad..pad + len]
    }
}

/// Runs copy pieces into a host-visible arena: memcpy, or a read straight into the slot.
fn execute_host(
    arena: &Buffer,
    files: &FileSet,
    pieces: &[Piece],
) -> std::result::Result<u64, ReadFailure> {
    let mut bytes = 0;
    for piece in pieces {
        match *piece {
            Piece::Memory { src, dst, len } => {
                // SAFETY: `dst..dst+len` lies inside the arena (laid out by the plan), the slot
                // or resident place is written by this job alone, and `src` points at `len`
                // bytes of live host memory.
                unsafe {
                    std::ptr::copy_nonoverlapping(src, arena.base().add(dst as usize), len as usize)
                };
                bytes += len;
            }
            Piece::File {
                file,
                offset,
                dst,
                len,
                needed,
            } => {
                // SAFETY: as above, the destination range is inside the arena and ours alone.
                let target = unsafe {
                    std::slice::from_raw_parts_mut(arena.base().add(dst as usize), len as usize)
                };
                files.read(file, offset, target, needed)?;
                bytes += needed;
            }
        }
    }
    Ok(bytes)
}

/// Runs copy pieces into device memory through `set(src, dst, len)`; file data goes through
/// the bounce buffer first.
fn execute_device(
    files: &FileSet,
    pieces: &[Piece],
    bounce: &mut Bounce,
    mut set: impl FnMut(*const u8, u64, u64),
) -> std::result::Result<u64, ReadFailure> {
    let mut bytes = 0;
    for piece in pieces {
        match *piece {
            Piece::Memory { src, dst, len } => {
                set(src, dst, len);
                bytes += len;
            }
            Piece::File {
                file,
                offset,
                dst,
                len,
                needed,
            } => {
                let staging = bounce.get(len as usize);
                files.read(file, offset, staging, needed)?;
                set(staging.as_ptr(), dst, needed);
                bytes += needed;
            }
        }
    }
    Ok(bytes)
}

/// Per-layer counters for one run (reset by `reset_stats`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LayerStats {
    pub name: String,
    pub resident: bool,
    pub loads: u64,
    pub bytes: u64,
    /// What one load of the layer copies (its image's data, or the file stretch read in one
    /// go): `bytes` is `loads` of these.
    pub load_bytes: u64,
    pub wait_us: u64,
    pub compute_us: u64,
    pub evict_us: u64,
    pub begin_count: u64,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StreamStats {
    pub passes: u64,
    pub layer_loads: u64,
    /// Every byte copied to the device: placement + streamed + prefetch_unused.
    pub bytes_copied: u64,
    /// Copied once when placed: the global group and the resident layers.
    pub placement_bytes: u64,
    /// Copied for the streamed layer loads that `begin_layer` used.
    pub streamed_bytes: u64,
    /// Copied ahead but not used (yet): the next pass's first layers after the last pass,
    /// or prefetches taken back for a layer the host asked for out of order.
    pub prefetch_unused_bytes: u64,
    pub copy_us: u64,
    pub wait_us: u64,
    pub compute_us: u64,
    pub bookkeeping_us: u64,
    pub prefetch_hits: u64,
    pub prefetch_misses: u64,
    pub resident_reloads: u64,
    pub arena_bytes: u64,
    pub arena_peak_bytes: u64,
    /// Bytes of streamed layers copied from engine-owned staging (pinned) memory.
    pub staged_bytes: u64,
    pub layers: Vec<LayerStats>,
}

pub struct StreamConfig {
    pub prefetch_depth: u32,
    /// Engine-owned (pinned where the device has it) copies of streamed layers' data.
    pub staging: Option<Buffer>,
    /// The engine's timeline: shared by its successive placements, so one trace file
    /// covers a whole job even when a pipeline moves the engine off and on the device.
    pub trace: Trace,
    /// Parked placement: a streamed layer owns one fixed slot (its position in the stream
    /// order modulo the slot count) and its tensors point there from the start, also while
    /// the slot holds another layer; they never point home again until teardown. For hosts
    /// that resolve weight addresses or buffers before the layer runs (llama.cpp's scheduler
    /// splits the graph by the weights' buffers when a context is made).
    pub parked: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum LayerState {
    Idle,
    /// Layers `first..first + slots.len()` are open (one, or a range the host computes as
    /// one graph); each streamed one holds its slot.
    Open {
        first: usize,
        since: Instant,
        slots: Vec<Option<usize>>,
    },
}

/// The streaming state of one prepared engine.
pub struct Streamer {
    layers: Vec<LayerImage>,
    resident_offset: Vec<Option<u64>>,
    stream_order: Vec<usize>,
    position_in_order: Vec<Option<usize>>,
    slot_offsets: Vec<u64>,
    slot_bytes: u64,
    depth: usize,
    arena: Arc<Buffer>,
    /// Kept alive until the copy thread is joined (dropped after `Drop::drop`).
    _staging: Option<Buffer>,
    files: Arc<FileSet>,
    sync: Arc<Sync2>,
    worker: Option<JoinHandle<()>>,
    compute_done: Option<Arc<Vec<Event>>>,
    compute_backend: Option<sys::ggml_backend_t>,
    cursor: usize,
    in_pass: bool,
    parked: bool,
    open: LayerState,
    stats: StreamStats,
    pub trace: Trace,
    epoch: Instant,
}

impl std::fmt::Debug for Streamer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streamer")
            .field("layers", &self.layers.len())
            .field("slots", &self.slot_offsets.len())
            .field("slot_bytes", &self.slot_bytes)
            .finish()
    }
}

impl Streamer {
    /// Allocates the arena once, copies the resident layers in and starts the copy thread.
    ///
    /// `resident[i]` says whether layer i stays on the device; `slots` streaming slots of
    /// `slot_bytes` each serve the others.
    pub fn new(
        device: &Device,
        compute_backend: Option<sys::ggml_backend_t>,
        layers: Vec<LayerImage>,
        resident: &[bool],
        slots: usize,
        config: StreamConfig,
        files: Arc<FileSet>,
    ) -> Result<Streamer> {
        let staging = config.staging;
        if resident.len() != layers.len() {
            return Err(Error::new(
                Status::Internal,
                "resident flags do not match the layers",
            ));
        }
        let alignment = 256u64;
        let mut offset = 0u64;
        let mut resident_offset = vec![None; layers.len()];
        for (i, layer) in layers.iter().enumerate() {
            if resident[i] {
                resident_offset[i] = Some(offset);
                offset = align_up(offset + layer.image_bytes, alignment);
            }
        }
        let stream_order: Vec<usize> = (0..layers.len()).filter(|&i| !resident[i]).collect();
        let slot_bytes = stream_order
            .iter()
            .map(|&i| layers[i].image_bytes)
            .max()
            .map(|b| align_up(b, alignment))
            .unwrap_or(0);
        let slots = if stream_order.is_empty() {
            0
        } else {
            slots.max(1)
        };
        let mut slot_offsets = Vec::with_capacity(slots);
        for _ in 0..slots {
            slot_offsets.push(offset);
            offset += slot_bytes;
        }
        // Direct I/O reads land straight in slots: their addresses must be sector-aligned,
        // so over-allocate by one alignment unit and shift every place by the base's misfit.
        let io_alignment = if layers.iter().any(|l| l.file_span.is_some()) {
            crate::diskio::DIRECT_ALIGNMENT
        } else {
            1
        };
        let arena_bytes = offset.max(alignment) + io_alignment - 1;
        let arena = Arc::new(device.alloc(arena_bytes)?);
        // Schedulers (ggml's) run an op where its weights live when their buffer says so.
        arena.mark_as_weights();
        let host_visible = arena.is_host();
        let shift = (arena.base() as u64).next_multiple_of(io_alignment) - arena.base() as u64;
        for place in resident_offset
            .iter_mut()
            .flatten()
            .chain(slot_offsets.iter_mut())
        {
            *place += shift;
        }

        let mut position_in_order = vec![None; layers.len()];
        for (pos, &layer) in stream_order.iter().enumerate() {
            position_in_order[layer] = Some(pos);
        }

        let (device_copier, compute_done) = if host_visible {
            (None, None)
        } else {
            let events: Option<Vec<Event>> =
                (0..slots.max(1)).map(|_| Event::new(device)).collect();
            let copy_done = Event::new(device);
            match (events, copy_done, compute_backend) {
                (Some(events), Some(copy_done), Some(_)) => {
                    let events = Arc::new(events);
                    let backend = device.init_backend()?;
                    let (ctx, shadow) = shadow_tensor(&arena)?;
                    (
                        Some(DeviceCopier {
                            backend,
                            shadow,
                            _shadow_ctx: ctx,
                            copy_done,
                            compute_done: events.clone(),
                        }),
                        Some(events),
                    )
                }
                _ => {
                    return Err(Error::new(
                        Status::Unsupported,
                        format!(
                            "device {} has no events or no compute backend was given; streaming to it needs both",
                            device.name
                        ),
                    ))
                }
            }
        };

        let sync = Arc::new(Sync2 {
            state: Mutex::new(Shared {
                slots: vec![SlotState::Free; slots],
                outcomes: (0..slots).map(|_| CopyOutcome::default()).collect(),
                queue: VecDeque::new(),
                shutdown: false,
                copy_bytes: 0,
                copy_micros: 0,
                copies: 0,
            }),
            changed: Condvar::new(),
        });
        let trace = config.trace;
        let epoch = trace.epoch();
        trace.set_layer_names(layers.iter().map(|l| l.name.clone()).collect());
        let target = CopyTarget {
            arena: arena.clone(),
            device: device_copier,
            files: files.clone(),
        };
        let worker = {
            let sync = sync.clone();
            let trace = trace.clone();
            std::thread::Builder::new()
                .name("offload-copy".into())
                .spawn(move || copy_thread(sync, target, trace))
                .map_err(|e| {
                    Error::new(
                        Status::Internal,
                        format!("cannot start the copy thread: {e}"),
                    )
                })?
        };

        let mut stats = StreamStats {
            arena_bytes,
            arena_peak_bytes: offset,
            staged_bytes: layers
                .iter()
                .flat_map(|l| &l.tensors)
                .filter(|t| matches!(t.source, TensorSource::Memory(src) if src != t.home_data as *const u8))
                .map(|t| t.bytes)
                .sum(),
            ..Default::default()
        };
        stats.layers = layers
            .iter()
            .enumerate()
            .map(|(i, l)| LayerStats {
                name: l.name.clone(),
                resident: resident[i],
                load_bytes: l.copy_bytes,
                ..Default::default()
            })
            .collect();

        let mut streamer = Streamer {
            layers,
            resident_offset,
            stream_order,
            position_in_order,
            slot_offsets,
            slot_bytes,
            depth: config.prefetch_depth as usize,
            arena,
            _staging: staging,
            files,
            sync,
            worker: Some(worker),
            compute_done,
            compute_backend,
            cursor: 0,
            in_pass: false,
            parked: config.parked,
            open: LayerState::Idle,
            stats,
            trace,
            epoch,
        };
        if let Err(err) = streamer.load_resident() {
            streamer.shutdown();
            return Err(err);
        }
        if streamer.parked {
            for &layer in &streamer.stream_order {
                let slot = streamer.fixed_slot(layer).expect("a streamed layer");
                streamer.redirect(layer, streamer.slot_offsets[slot]);
            }
        }
        // The first streamed layers start copying now, not at the first pass: whatever the
        // host does before it (another component's stage) overlaps them.
        let sync = streamer.sync.clone();
        streamer.schedule(&mut sync.lock());
        Ok(streamer)
    }

    /// Copies every resident layer to its fixed place (once per engine) and points it there.
    fn load_resident(&mut self) -> Result<()> {
        for layer in 0..self.layers.len() {
            let Some(base) = self.resident_offset[layer] else {
                continue;
            };
            // Resident layers go through slot-free synchronous copies on this thread.
            let pieces = self.pieces(layer, base);
            let job = CopyJob {
                slot: usize::MAX,
                layer,
                pieces,
            };
            let copied =
                copy_now(&self.arena, &self.files, &job).map_err(|f| self.read_error(layer, f))?;
            self.stats.placement_bytes += copied;
            self.redirect(layer, base);
        }
        Ok(())
    }

    fn pieces(&self, layer: usize, base: u64) -> Vec<Piece> {
        let image = &self.layers[layer];
        if let Some(span) = image.file_span {
            return vec![Piece::File {
                file: span.file,
                offset: span.start,
                dst: base,
                len: image.image_bytes,
                needed: span.needed,
            }];
        }
        image
            .tensors
            .iter()
            .map(|t| match t.source {
                TensorSource::Memory(src) => Piece::Memory {
                    src,
                    dst: base + t.offset,
                    len: t.bytes,
                },
                TensorSource::File { file, offset } => Piece::File {
                    file,
                    offset,
                    dst: base + t.offset,
                    len: t.bytes,
                    needed: t.bytes,
                },
            })
            .collect()
    }

    /// Names the tensor a failed read stopped in, so the host learns what and where.
    fn read_error(&self, layer: usize, failure: ReadFailure) -> Error {
        let image = &self.layers[layer];
        // The tensor the read stopped in, or else the first one it had not reached yet.
        let tensor = image
            .tensors
            .iter()
            .filter_map(|t| match t.source {
                TensorSource::File { offset, .. } if offset + t.bytes > failure.offset => {
                    Some((offset, t))
                }
                _ => None,
            })
            .min_by_key(|(offset, _)| *offset)
            .map(|(_, t)| t);
        let what = match tensor {
            // SAFETY: registered tensors are alive; ggml names are NUL-terminated.
            Some(t) => format!(
                "tensor '{}' at file offset {}",
                unsafe { std::ffi::CStr::from_ptr((*t.tensor).name.as_ptr()) }.to_string_lossy(),
                failure.offset
            ),
            None => format!("file offset {}", failure.offset),
        };
        Error::new(
            failure.error.status,
            format!(
                "loading layer {} ({}), {what}: {}",
                layer, image.name, failure.error.message
            ),
        )
    }

    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }

    pub fn is_resident(&self, layer: usize) -> bool {
        self.resident_offset.get(layer).copied().flatten().is_some()
    }

    pub fn slot_count(&self) -> usize {
        self.slot_offsets.len()
    }

    pub fn slot_bytes(&self) -> u64 {
        self.slot_bytes
    }

    /// The arena is host memory (the CPU device, or an integrated GPU sharing it).
    pub fn arena_is_host(&self) -> bool {
        self.arena.is_host()
    }

    /// The arena's ggml buffer (what placed tensors' `buffer` points at).
    pub fn arena_buffer(&self) -> sys::ggml_backend_buffer_t {
        self.arena.raw()
    }

    pub fn arena_bytes(&self) -> u64 {
        self.arena.size()
    }

    /// The backend the slots' compute-done events are recorded on from now on.
    pub fn set_compute_backend(&mut self, backend: sys::ggml_backend_t) {
        if self.compute_backend.is_some() {
            self.compute_backend = Some(backend);
        }
    }

    /// In parked placement, the one slot a streamed layer is ever loaded into.
    fn fixed_slot(&self, layer: usize) -> Option<usize> {
        let position = self.position_in_order[layer]?;
        (self.parked && !self.slot_offsets.is_empty()).then(|| position % self.slot_offsets.len())
    }

    fn micros_since_epoch(&self, t: Instant) -> u64 {
        t.duration_since(self.epoch).as_micros() as u64
    }

    /// Points every tensor of `layer` at its device image starting at `base`.
    fn redirect(&self, layer: usize, base: u64) {
        for t in &self.layers[layer].tensors {
            // SAFETY: `t.tensor` is a live host tensor (the host keeps registered tensors alive
            // until the engine is freed); the address lies inside our arena.
            unsafe {
                (*t.tensor).buffer = self.arena.raw();
                (*t.tensor).data = self.arena.base().add((base + t.offset) as usize) as *mut c_void;
            }
        }
    }

    /// Points every tensor of `layer` back at its host home.
    fn restore(&self, layer: usize) {
        for t in &self.layers[layer].tensors {
            // SAFETY: as in `redirect`; the home pointers were read from these same tensors.
            unsafe {
                (*t.tensor).buffer = t.home_buffer;
                (*t.tensor).data = t.home_data;
            }
        }
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.layers.len() {
            return Err(Error::not_found(format!(
                "layer {layer} out of range (model has {} layers)",
                self.layers.len()
            )));
        }
        Ok(())
    }

    pub fn begin_pass(&mut self) -> Result<()> {
        if self.in_pass {
            return Err(Error::state(
                "begin_pass: a pass is already open (call end_pass first)",
            ));
        }
        self.in_pass = true;
        let mut shared = self.sync.lock();
        self.schedule(&mut shared);
        Ok(())
    }

    pub fn end_pass(&mut self) -> Result<()> {
        if !self.in_pass {
            return Err(Error::state("end_pass without begin_pass"));
        }
        if matches!(self.open, LayerState::Open { .. }) {
            return Err(Error::state(
                "end_pass while a layer is still open (call end_layer first)",
            ));
        }
        self.in_pass = false;
        self.stats.passes += 1;
        Ok(())
    }

    /// Queues prefetches into free slots, in execution order from the cursor, up to the
    /// prefetch depth; wraps into the next pass so its first layers overlap this pass's tail.
    fn schedule(&self, shared: &mut Shared) {
        let len = self.stream_order.len();
        let mut ahead = shared
            .slots
            .iter()
            .filter(|s| matches!(s, SlotState::Loading(_) | SlotState::Ready(_)))
            .count();
        for step in 0..len {
            if ahead >= self.depth {
                return;
            }
            let candidate = self.stream_order[(self.cursor + step) % len];
            if shared.slots.iter().any(|s| s.layer() == Some(candidate)) {
                continue;
            }
            let free = match self.fixed_slot(candidate) {
                // In order: a layer whose slot is still taken holds back the ones after it.
                Some(fixed) => (shared.slots[fixed] == SlotState::Free).then_some(fixed),
                None => shared.slots.iter().position(|s| *s == SlotState::Free),
            };
            let Some(slot) = free else {
                return;
            };
            self.queue_load(shared, slot, candidate, false);
            ahead += 1;
        }
    }

    fn queue_load(&self, shared: &mut Shared, slot: usize, layer: usize, urgent: bool) {
        let job = CopyJob {
            slot,
            layer,
            pieces: self.pieces(layer, self.slot_offsets[slot]),
        };
        shared.slots[slot] = SlotState::Loading(layer);
        shared.outcomes[slot] = CopyOutcome::default();
        if urgent {
            shared.queue.push_front(job);
        } else {
            shared.queue.push_back(job);
        }
        self.sync.changed.notify_all();
    }

    /// Makes `layer` usable on the device: waits only if its copy is not done yet.
    pub fn begin_layer(&mut self, layer: usize) -> Result<()> {
        self.begin_layers(layer, 1)
    }

    /// Makes layers `first..first + count` usable at once, for a host that computes them as
    /// one graph. Their streamed layers must fit the slots together (and, parked, must not
    /// share a fixed slot).
    pub fn begin_layers(&mut self, first: usize, count: usize) -> Result<()> {
        let end = first
            .checked_add(count)
            .filter(|&end| count > 0 && end <= self.layers.len())
            .ok_or_else(|| {
                Error::not_found(format!(
                    "layers {first}..{first}+{count} out of range (model has {} layers)",
                    self.layers.len()
                ))
            })?;
        if !self.in_pass {
            return Err(Error::state(
                "begin_layer outside a pass (call begin_pass first)",
            ));
        }
        if let LayerState::Open { first: open, .. } = self.open {
            return Err(Error::state(format!(
                "begin_layer({first}) while layer {open} is open (call end_layer first)"
            )));
        }
        let streamed: Vec<usize> = (first..end).filter(|&l| !self.is_resident(l)).collect();
        if streamed.len() > self.slot_offsets.len() {
            return Err(Error::invalid(format!(
                "layers {first}..{end} stream {} layers at once, more than the {} slots of the plan",
                streamed.len(),
                self.slot_offsets.len()
            )));
        }
        if self.parked {
            let mut fixed: Vec<usize> = streamed
                .iter()
                .filter_map(|&l| self.fixed_slot(l))
                .collect();
            fixed.sort_unstable();
            if fixed.windows(2).any(|w| w[0] == w[1]) {
                return Err(Error::invalid(format!(
                    "layers {first}..{end} share a fixed slot: open fewer at once"
                )));
            }
        }
        let start = Instant::now();
        let mut slots = vec![None; count];
        for layer in first..end {
            self.stats.layers[layer].begin_count += 1;
            if self.is_resident(layer) {
                continue;
            }
            let acquired = self.acquire(layer, first..end);
            let slot = match acquired {
                Ok(slot) => slot,
                Err(err) => {
                    // Give back what this call took: nothing is half open.
                    let mut shared = self.sync.lock();
                    for s in slots.iter().flatten() {
                        shared.slots[*s] = SlotState::Free;
                    }
                    drop(shared);
                    for l in first..layer {
                        if !self.is_resident(l) && !self.parked {
                            self.restore(l);
                        }
                    }
                    return Err(err);
                }
            };
            self.redirect(layer, self.slot_offsets[slot]);
            slots[layer - first] = Some(slot);
        }
        let waited = start.elapsed();
        let now = Instant::now();
        if waited.as_micros() > 0 && !streamed.is_empty() {
            self.trace.record(
                Lane::Wait,
                &self.layers[first].name,
                self.micros_since_epoch(start),
                waited.as_micros() as u64,
            );
        }
        let share = waited.as_micros() as u64 / streamed.len().max(1) as u64;
        for &l in &streamed {
            self.stats.layers[l].wait_us += share;
        }
        self.stats.wait_us += if streamed.is_empty() {
            0
        } else {
            waited.as_micros() as u64
        };
        self.open = LayerState::Open {
            first,
            since: now,
            slots,
        };
        Ok(())
    }

    /// Finds or loads `layer` into a slot, waits for the copy, marks the slot in use.
    /// Layers in `keep` (the range being opened) are never taken back from their slots.
    fn acquire(&mut self, layer: usize, keep: std::ops::Range<usize>) -> Result<usize> {
        let sync = self.sync.clone();
        let mut shared = sync.lock();
        let slot = match shared.slots.iter().position(|s| s.layer() == Some(layer)) {
            Some(slot) => {
                self.stats.prefetch_hits += 1;
                log::trace!("layer {layer} ({}): prefetched", self.layers[layer].name);
                slot
            }
            None => {
                // Not predicted (first use, prefetch depth 0, or an out-of-order host).
                self.stats.prefetch_misses += 1;
                log::trace!(
                    "layer {layer} ({}): not prefetched, loading now",
                    self.layers[layer].name
                );
                let fixed = self.fixed_slot(layer);
                let slot = loop {
                    if let Some(fixed) = fixed {
                        // Its own slot only: free, or holding a prefetch not needed now.
                        match shared.slots[fixed] {
                            SlotState::Free => break fixed,
                            SlotState::Ready(l) | SlotState::Failed(l) if !keep.contains(&l) => {
                                break fixed
                            }
                            _ => {}
                        }
                        shared = sync.changed.wait(shared).unwrap_or_else(|p| p.into_inner());
                        continue;
                    }
                    if let Some(free) = shared.slots.iter().position(|s| *s == SlotState::Free) {
                        break free;
                    }
                    // Take back a prefetched layer that is not needed now.
                    if let Some(unused) = shared.slots.iter().position(|s| {
                        matches!(s, SlotState::Ready(l) | SlotState::Failed(l) if !keep.contains(l))
                    }) {
                        break unused;
                    }
                    shared = sync.changed.wait(shared).unwrap_or_else(|p| p.into_inner());
                };
                self.queue_load(&mut shared, slot, layer, true);
                slot
            }
        };
        if let Some(pos) = self.position_in_order[layer] {
            self.cursor = (pos + 1) % self.stream_order.len();
        }
        while matches!(shared.slots[slot], SlotState::Loading(_)) {
            shared = sync.changed.wait(shared).unwrap_or_else(|p| p.into_inner());
        }
        match shared.slots[slot] {
            SlotState::Ready(l) if l == layer => {
                shared.slots[slot] = SlotState::InUse(layer);
                self.stats.layer_loads += 1;
                self.stats.layers[layer].loads += 1;
                self.stats.layers[layer].bytes += self.layers[layer].copy_bytes;
                self.stats.streamed_bytes += self.layers[layer].copy_bytes;
                self.schedule(&mut shared);
                Ok(slot)
            }
            SlotState::Failed(l) if l == layer => {
                shared.slots[slot] = SlotState::Free;
                let error = shared.outcomes[slot]
                    .error
                    .take()
                    .unwrap_or_else(|| Error::new(Status::Backend, "layer copy failed"));
                let offset = shared.outcomes[slot].failed_offset.take().unwrap_or(0);
                Err(self.read_error(layer, ReadFailure { error, offset }))
            }
            other => Err(Error::new(
                Status::Internal,
                format!("slot {slot} in state {other:?} while loading layer {layer}"),
            )),
        }
    }

    /// Ends the compute of `layer`: restores its host home and frees its slot.
    pub fn end_layer(&mut self, layer: usize) -> Result<()> {
        self.end_layers(layer, 1)
    }

    /// Ends layers `first..first + count`, opened together by `begin_layers`.
    pub fn end_layers(&mut self, first: usize, count: usize) -> Result<()> {
        if first >= self.layers.len() {
            self.check_layer(first)?;
        }
        let LayerState::Open {
            first: open_first,
            since,
            ref slots,
        } = self.open
        else {
            return Err(Error::state(format!(
                "end_layer({first}) without begin_layer"
            )));
        };
        if open_first != first || slots.len() != count {
            return Err(Error::state(format!(
                "end_layer({first}, {count} layers) does not match the open layers {open_first}..{}",
                open_first + slots.len()
            )));
        }
        let slots = slots.clone();
        let compute = since.elapsed();
        let name = if count == 1 {
            self.layers[first].name.clone()
        } else {
            format!(
                "{}..{}",
                self.layers[first].name,
                self.layers[first + count - 1].name
            )
        };
        self.trace.record(
            Lane::Compute,
            &name,
            self.micros_since_epoch(since),
            compute.as_micros() as u64,
        );
        let share = compute.as_micros() as u64 / count as u64;
        for layer in first..first + count {
            self.stats.layers[layer].compute_us += share;
        }
        self.stats.compute_us += compute.as_micros() as u64;
        self.open = LayerState::Idle;
        if slots.iter().all(Option::is_none) {
            return Ok(());
        }
        let evict_start = Instant::now();
        if let (Some(events), Some(backend)) = (&self.compute_done, self.compute_backend) {
            let backend = Backend::borrowed(backend)?;
            for slot in slots.iter().flatten() {
                events[*slot].record(&backend);
            }
        }
        if !self.parked {
            for (i, slot) in slots.iter().enumerate() {
                if slot.is_some() {
                    self.restore(first + i);
                }
            }
        }
        let mut shared = self.sync.lock();
        for slot in slots.iter().flatten() {
            shared.slots[*slot] = SlotState::Free;
        }
        self.schedule(&mut shared);
        drop(shared);
        let evicted = evict_start.elapsed().as_micros() as u64;
        for (i, slot) in slots.iter().enumerate() {
            if slot.is_some() {
                self.stats.layers[first + i].evict_us += evicted;
            }
        }
        Ok(())
    }

    /// Waits for in-flight copies, then points every streamed layer back at its host home
    /// (parked layers stay parked).
    pub fn offload_all(&mut self) {
        let sync = self.sync.clone();
        let mut shared = sync.lock();
        // Jobs not yet taken by the copy thread are dropped; their slots go back to Free.
        let pending: Vec<usize> = shared.queue.drain(..).map(|job| job.slot).collect();
        for slot in pending {
            shared.slots[slot] = SlotState::Free;
        }
        while shared
            .slots
            .iter()
            .any(|s| matches!(s, SlotState::Loading(_)))
        {
            shared = sync.changed.wait(shared).unwrap_or_else(|p| p.into_inner());
        }
        for slot in shared.slots.iter_mut() {
            *slot = SlotState::Free;
        }
        drop(shared);
        if !self.parked {
            for layer in 0..self.layers.len() {
                if !self.is_resident(layer) {
                    self.restore(layer);
                }
            }
        }
        self.open = LayerState::Idle;
        self.in_pass = false;
        self.cursor = 0;
    }

    /// Writes new data for one tensor everywhere this streamer keeps it: the host home, the
    /// staging copy and, for a resident layer, the device copy. Prefetched copies are dropped
    /// first, since they hold the old data.
    pub fn update_tensor(
        &mut self,
        tensor: *mut sys::ggml_tensor,
        offset: u64,
        data: &[u8],
    ) -> Result<()> {
        if self.in_pass {
            return Err(Error::state(
                "cannot change weights while a pass is open (end it first)",
            ));
        }
        let Some((layer, place)) = self.layers.iter().enumerate().find_map(|(i, l)| {
            l.tensors
                .iter()
                .find(|t| t.tensor == tensor)
                .map(|t| (i, t.clone()))
        }) else {
            return Err(Error::not_found("the tensor is not placed by this engine"));
        };
        if offset + data.len() as u64 > place.bytes {
            return Err(Error::invalid("write past the end of the tensor"));
        }
        self.offload_all();
        let write = |dst: *mut u8| {
            // SAFETY: `dst` starts a region of `place.bytes` bytes (the home, staging copy or a
            // host-visible arena place) and offset + len was checked to fit it; no copy is in
            // flight (drained above).
            unsafe {
                std::ptr::copy_nonoverlapping(data.as_ptr(), dst.add(offset as usize), data.len())
            }
        };
        if !place.home_data.is_null() {
            write(place.home_data.cast());
        }
        if let TensorSource::Memory(src) = place.source {
            if src != place.home_data as *const u8 {
                write(src as *mut u8);
            }
        }
        if let Some(base) = self.resident_offset[layer] {
            let dst = base + place.offset;
            if self.arena.is_host() {
                // SAFETY: the resident place lies inside the arena (laid out at construction).
                write(unsafe { self.arena.base().add(dst as usize) });
            } else {
                let (_ctx, shadow) = shadow_tensor(&self.arena)?;
                // SAFETY: the shadow spans the arena and dst + offset + len lies in the
                // resident place; the synchronous set completes before `data` is released.
                unsafe {
                    sys::ggml_backend_tensor_set(
                        shadow,
                        data.as_ptr().cast(),
                        (dst + offset) as usize,
                        data.len(),
                    )
                };
            }
        }
        Ok(())
    }

    pub fn in_pass(&self) -> bool {
        self.in_pass
    }

    pub fn stats(&self) -> StreamStats {
        let shared = self.sync.lock();
        let mut stats = self.stats.clone();
        stats.bytes_copied = stats.placement_bytes + shared.copy_bytes;
        stats.prefetch_unused_bytes = shared.copy_bytes.saturating_sub(stats.streamed_bytes);
        stats.copy_us = shared.copy_micros;
        stats
    }

    pub fn reset_stats(&mut self) {
        let mut shared = self.sync.lock();
        shared.copy_bytes = 0;
        shared.copy_micros = 0;
        shared.copies = 0;
        drop(shared);
        let layers = std::mem::take(&mut self.stats.layers);
        self.stats = StreamStats {
            arena_bytes: self.stats.arena_bytes,
            arena_peak_bytes: self.stats.arena_peak_bytes,
            layers: layers
                .into_iter()
                .map(|l| LayerStats {
                    name: l.name,
                    resident: l.resident,
                    load_bytes: l.load_bytes,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
    }

    fn shutdown(&mut self) {
        {
            let mut shared = self.sync.lock();
            shared.shutdown = true;
            self.sync.changed.notify_all();
        }
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }

    /// Restores every tensor (resident ones too) to its host home; used at teardown.
    pub fn restore_all(&mut self) {
        self.offload_all();
        for layer in 0..self.layers.len() {
            self.restore(layer);
        }
    }
}

impl Drop for Streamer {
    fn drop(&mut self) {
        self.restore_all();
        self.shutdown();
    }
}

/// Runs a job synchronously on the calling thread (resident places at prepare time).
fn copy_now(
    arena: &Buffer,
    files: &FileSet,
    job: &CopyJob,
) -> std::result::Result<u64, ReadFailure> {
    if arena.is_host() {
        return execute_host(arena, files, &job.pieces);
    }
    let (_ctx, shadow) = shadow_tensor(arena).map_err(|error| ReadFailure { error, offset: 0 })?;
    let mut bounce = Bounce::default();
    execute_device(files, &job.pieces, &mut bounce, |src, dst, len| {
        // SAFETY: the shadow spans the arena; the range was laid out inside it; the source is
        // live host memory or the bounce buffer, and the synchronous set completes here.
        unsafe { sys::ggml_backend_tensor_set(shadow, src.cast(), dst as usize, len as usize) };
    })
}

/// A 1-D byte tensor covering the whole arena, the handle ggml's copy calls need.
pub(crate) fn shadow_tensor(arena: &Buffer) -> Result<(Context, *mut sys::ggml_tensor)> {
    let ctx = Context::new(4096, true)?;
    let len = i64::try_from(arena.size()).map_err(|_| Error::invalid("arena too large"))?;
    // SAFETY: valid context with room for one tensor header.
    let shadow = unsafe { sys::ggml_new_tensor_1d(ctx.raw(), sys::GGML_TYPE_I8, len) };
    // SAFETY: the arena holds exactly `len` bytes from its base, so the tensor fits.
    let status =
        unsafe { sys::ggml_backend_tensor_alloc(arena.raw(), shadow, arena.base() as *mut c_void) };
    if status != sys::GGML_STATUS_SUCCESS {
        return Err(Error::new(
            Status::Backend,
            "cannot place the arena shadow tensor",
        ));
    }
    Ok((ctx, shadow))
}

fn copy_thread(sync: Arc<Sync2>, target: CopyTarget, trace: Trace) {
    crate::log::mark_library_thread();
    let mut bounce = Bounce::default();
    loop {
        let job = {
            let mut shared = sync.lock();
            loop {
                if shared.shutdown {
                    return;
                }
                if let Some(job) = shared.queue.pop_front() {
                    break job;
                }
                shared = sync.changed.wait(shared).unwrap_or_else(|p| p.into_inner());
            }
        };
        let start = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            target.run(&job, &mut bounce)
        }))
        .unwrap_or_else(|panic| {
            let what = crate::error::panic_text(&*panic);
            Err(ReadFailure {
                error: Error::new(Status::Internal, format!("copy thread panicked: {what}")),
                offset: 0,
            })
        });
        let micros = start.elapsed().as_micros() as u64;
        if let Ok(bytes) = &result {
            log::trace!(
                "copied layer {} into slot {}: {bytes} bytes in {micros} us",
                job.layer,
                job.slot
            );
        }
        let mut shared = sync.lock();
        let failed = match result {
            Ok(bytes) => {
                trace.record_copy(job.layer, start, micros, bytes);
                shared.copy_bytes += bytes;
                shared.copy_micros += micros;
                shared.copies += 1;
                shared.slots[job.slot] = SlotState::Ready(job.layer);
                None
            }
            Err(failure) => {
                let message = failure.error.message.clone();
                shared.outcomes[job.slot].failed_offset = Some(failure.offset);
                shared.outcomes[job.slot].error = Some(failure.error);
                shared.slots[job.slot] = SlotState::Failed(job.layer);
                Some(message)
            }
        };
        sync.changed.notify_all();
        drop(shared);
        // Logged with no lock held: the host's log callback may call back into the library.
        if let Some(message) = failed {
            log::error!("{message}");
        }
    }
}
