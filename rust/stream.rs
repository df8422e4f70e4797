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

use crate::backend::{Backend, Buffer, Device, Event};
use crate::error::{Error, Result, Status};
use crate::faults::{self, Fault};
use crate::ggml as sys;
use crate::trace::{Lane, Trace};

/// One weight tensor's two homes: where the host keeps it and where it goes in a layer image.
#[derive(Debug, Clone)]
pub struct TensorPlace {
    pub tensor: *mut sys::ggml_tensor,
    pub home_data: *mut c_void,
    /// Where copies read from: the home, or the engine's pinned staging copy of it.
    pub source: *const u8,
    pub home_buffer: sys::ggml_backend_buffer_t,
    /// Offset of this tensor inside its layer's device image (aligned).
    pub offset: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone)]
pub struct LayerImage {
    pub name: String,
    pub tensors: Vec<TensorPlace>,
    /// Bytes of the device image, alignment padding included.
    pub image_bytes: u64,
    /// Bytes of tensor data moved per load.
    pub data_bytes: u64,
}

/// Lays a layer's tensors out in one contiguous, aligned device image.
pub fn layout_layer(name: &str, tensors: Vec<TensorPlace>, alignment: u64) -> LayerImage {
    let mut offset = 0u64;
    let mut data_bytes = 0u64;
    let mut placed = Vec::with_capacity(tensors.len());
    for mut t in tensors {
        offset = align_up(offset, alignment);
        t.offset = offset;
        offset += t.bytes;
        data_bytes += t.bytes;
        placed.push(t);
    }
    LayerImage {
        name: name.to_string(),
        tensors: placed,
        image_bytes: align_up(offset, alignment),
        data_bytes,
    }
}

pub fn align_up(value: u64, alignment: u64) -> u64 {
    let a = alignment.max(1);
    value.div_ceil(a) * a
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

/// A raw pointer that the copy thread may use: the engine guarantees the memory stays alive
/// and unaliased by writers until the job completes (see the module comment).
#[derive(Debug, Clone, Copy)]
struct SendPtr(*mut u8);
// SAFETY: see the type's comment; the pointee is host memory the host keeps alive.
unsafe impl Send for SendPtr {}

#[derive(Debug)]
struct CopyJob {
    slot: usize,
    layer: usize,
    /// (source, destination offset within the arena, bytes)
    pieces: Vec<(SendPtr, u64, u64)>,
}

#[derive(Debug, Default)]
struct CopyOutcome {
    error: Option<Error>,
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
    host_visible: bool,
    /// Copy-stream backend and one shadow tensor spanning the arena (device arenas only).
    device: Option<DeviceCopier>,
}

struct DeviceCopier {
    backend: Backend,
    shadow: *mut sys::ggml_tensor,
    _shadow_ctx: ShadowContext,
    copy_done: Event,
    /// Per slot, recorded on the compute stream when its last reader was enqueued.
    compute_done: Arc<Vec<Event>>,
}

// SAFETY: the shadow tensor and its context are used only by the copy thread after creation.
unsafe impl Send for DeviceCopier {}

pub(crate) struct ShadowContext(*mut sys::ggml_context);
impl Drop for ShadowContext {
    fn drop(&mut self) {
        // SAFETY: we created the context; its only tensor is the shadow, unused after this.
        unsafe { sys::ggml_free(self.0) };
    }
}

impl CopyTarget {
    fn run(&self, job: &CopyJob) -> Result<u64> {
        if faults::should_fail(Fault::CopyThreadPanic) {
            panic!("injected panic in the copy thread");
        }
        if faults::should_fail(Fault::Copy) {
            return Err(Error::new(
                Status::Backend,
                format!("injected copy failure for layer {}", job.layer),
            ));
        }
        let mut bytes = 0;
        match &self.device {
            None => {
                debug_assert!(self.host_visible);
                for (src, dst, len) in &job.pieces {
                    // SAFETY: `dst..dst+len` lies inside the arena (checked when the plan laid
                    // out slots), the slot is Loading so nobody else reads or writes it, and
                    // `src` points at `len` bytes of host memory the host keeps alive.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            src.0,
                            self.arena.base().add(*dst as usize),
                            *len as usize,
                        )
                    };
                    bytes += len;
                }
            }
            Some(dev) => {
                dev.compute_done[job.slot].wait_on(&dev.backend);
                for (src, dst, len) in &job.pieces {
                    // SAFETY: the shadow tensor spans the whole arena, so offset+len is in range
                    // (checked at layout); the source stays alive as above.
                    unsafe {
                        sys::ggml_backend_tensor_set_async(
                            dev.backend.raw(),
                            dev.shadow,
                            src.0 as *const c_void,
                            *dst as usize,
                            *len as usize,
                        )
                    };
                    bytes += len;
                }
                dev.copy_done.record(&dev.backend);
                dev.copy_done.synchronize();
            }
        }
        Ok(bytes)
    }
}

/// Per-layer counters for one run (reset by `reset_stats`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LayerStats {
    pub name: String,
    pub resident: bool,
    pub loads: u64,
    pub bytes: u64,
    pub wait_us: u64,
    pub compute_us: u64,
    pub evict_us: u64,
    pub begin_count: u64,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StreamStats {
    pub passes: u64,
    pub layer_loads: u64,
    pub bytes_copied: u64,
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
    pub trace: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LayerState {
    Idle,
    Open { since: Instant, slot: Option<usize> },
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
    sync: Arc<Sync2>,
    worker: Option<JoinHandle<()>>,
    compute_done: Option<Arc<Vec<Event>>>,
    compute_backend: Option<sys::ggml_backend_t>,
    cursor: usize,
    in_pass: bool,
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
        let arena_bytes = offset.max(alignment);
        let arena = Arc::new(device.alloc(arena_bytes)?);
        let host_visible = arena.is_host();

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
        let epoch = Instant::now();
        let trace = Trace::new(config.trace, epoch);
        trace.set_layer_names(layers.iter().map(|l| l.name.clone()).collect());
        let target = CopyTarget {
            arena: arena.clone(),
            host_visible,
            device: device_copier,
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
                .filter(|t| t.source != t.home_data as *const u8)
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
            sync,
            worker: Some(worker),
            compute_done,
            compute_backend,
            cursor: 0,
            in_pass: false,
            open: LayerState::Idle,
            stats,
            trace,
            epoch,
        };
        if let Err(err) = streamer.load_resident() {
            streamer.shutdown();
            return Err(err);
        }
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
            let target_bytes = self.layers[layer].data_bytes;
            copy_now(&self.arena, &job)?;
            self.stats.bytes_copied += target_bytes;
            self.redirect(layer, base);
        }
        Ok(())
    }

    fn pieces(&self, layer: usize, base: u64) -> Vec<(SendPtr, u64, u64)> {
        self.layers[layer]
            .tensors
            .iter()
            .map(|t| (SendPtr(t.source as *mut u8), base + t.offset, t.bytes))
            .collect()
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

    pub fn arena_bytes(&self) -> u64 {
        self.arena.size()
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
        if let LayerState::Open { .. } = self.open {
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
            let Some(slot) = shared.slots.iter().position(|s| *s == SlotState::Free) else {
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
        self.check_layer(layer)?;
        if !self.in_pass {
            return Err(Error::state(
                "begin_layer outside a pass (call begin_pass first)",
            ));
        }
        if let LayerState::Open { .. } = self.open {
            return Err(Error::state(format!(
                "begin_layer({layer}) while another layer is open (call end_layer first)"
            )));
        }
        let start = Instant::now();
        self.stats.layers[layer].begin_count += 1;
        if self.is_resident(layer) {
            self.open = LayerState::Open {
                since: start,
                slot: None,
            };
            return Ok(());
        }
        let slot = self.acquire(layer)?;
        let waited = start.elapsed();
        self.redirect(layer, self.slot_offsets[slot]);
        let now = Instant::now();
        if waited.as_micros() > 0 {
            self.trace.record(
                Lane::Wait,
                &self.layers[layer].name,
                self.micros_since_epoch(start),
                waited.as_micros() as u64,
            );
        }
        let stats = &mut self.stats.layers[layer];
        stats.wait_us += waited.as_micros() as u64;
        self.stats.wait_us += waited.as_micros() as u64;
        self.open = LayerState::Open {
            since: now,
            slot: Some(slot),
        };
        Ok(())
    }

    /// Finds or loads `layer` into a slot, waits for the copy, marks the slot in use.
    fn acquire(&mut self, layer: usize) -> Result<usize> {
        let sync = self.sync.clone();
        let mut shared = sync.lock();
        let slot = match shared.slots.iter().position(|s| s.layer() == Some(layer)) {
            Some(slot) => {
                self.stats.prefetch_hits += 1;
                slot
            }
            None => {
                // Not predicted (first use, prefetch depth 0, or an out-of-order host).
                self.stats.prefetch_misses += 1;
                let slot = loop {
                    if let Some(free) = shared.slots.iter().position(|s| *s == SlotState::Free) {
                        break free;
                    }
                    // Take back a prefetched layer that is not needed now.
                    if let Some(unused) = shared
                        .slots
                        .iter()
                        .position(|s| matches!(s, SlotState::Ready(_) | SlotState::Failed(_)))
                    {
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
                self.stats.layers[layer].bytes += self.layers[layer].data_bytes;
                self.schedule(&mut shared);
                Ok(slot)
            }
            SlotState::Failed(l) if l == layer => {
                shared.slots[slot] = SlotState::Free;
                let err = shared.outcomes[slot]
                    .error
                    .take()
                    .unwrap_or_else(|| Error::new(Status::Backend, "layer copy failed"));
                Err(Error::new(
                    err.status,
                    format!(
                        "loading layer {} ({}): {}",
                        layer, self.layers[layer].name, err.message
                    ),
                ))
            }
            other => Err(Error::new(
                Status::Internal,
                format!("slot {slot} in state {other:?} while loading layer {layer}"),
            )),
        }
    }

    /// Ends the compute of `layer`: restores its host home and frees its slot.
    pub fn end_layer(&mut self, layer: usize) -> Result<()> {
        self.check_layer(layer)?;
        let LayerState::Open { since, slot } = self.open else {
            return Err(Error::state(format!(
                "end_layer({layer}) without begin_layer"
            )));
        };
        let open_layer = match slot {
            Some(s) => self.sync.lock().slots[s].layer(),
            None => None,
        };
        if slot.is_some() && open_layer != Some(layer) || slot.is_none() && !self.is_resident(layer)
        {
            return Err(Error::state(format!(
                "end_layer({layer}) does not match the open layer"
            )));
        }
        let compute = since.elapsed();
        self.trace.record(
            Lane::Compute,
            &self.layers[layer].name,
            self.micros_since_epoch(since),
            compute.as_micros() as u64,
        );
        self.stats.layers[layer].compute_us += compute.as_micros() as u64;
        self.stats.compute_us += compute.as_micros() as u64;
        self.open = LayerState::Idle;
        if let Some(slot) = slot {
            let evict_start = Instant::now();
            if let (Some(events), Some(backend)) = (&self.compute_done, self.compute_backend) {
                events[slot].record(&Backend::borrowed(backend)?);
            }
            self.restore(layer);
            let mut shared = self.sync.lock();
            shared.slots[slot] = SlotState::Free;
            self.schedule(&mut shared);
            drop(shared);
            self.stats.layers[layer].evict_us += evict_start.elapsed().as_micros() as u64;
        }
        Ok(())
    }

    /// Waits for in-flight copies, then points every streamed layer back at its host home.
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
        for layer in 0..self.layers.len() {
            if !self.is_resident(layer) {
                self.restore(layer);
            }
        }
        self.open = LayerState::Idle;
        self.in_pass = false;
        self.cursor = 0;
    }

    pub fn in_pass(&self) -> bool {
        self.in_pass
    }

    pub fn stats(&self) -> StreamStats {
        let shared = self.sync.lock();
        let mut stats = self.stats.clone();
        stats.bytes_copied += shared.copy_bytes;
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

fn copy_now(arena: &Buffer, job: &CopyJob) -> Result<()> {
    if arena.is_host() {
        for (src, dst, len) in &job.pieces {
            // SAFETY: the destination range lies inside the arena by construction and no copy
            // thread touches resident places; the source is live host memory.
            unsafe {
                std::ptr::copy_nonoverlapping(src.0, arena.base().add(*dst as usize), *len as usize)
            };
        }
        return Ok(());
    }
    let (_ctx, shadow) = shadow_tensor(arena)?;
    for (src, dst, len) in &job.pieces {
        // SAFETY: the shadow spans the arena; range checked at layout; source is live.
        unsafe {
            sys::ggml_backend_tensor_set(
                shadow,
                src.0 as *const c_void,
                *dst as usize,
                *len as usize,
            )
        };
    }
    Ok(())
}

/// A 1-D byte tensor covering the whole arena, the handle ggml's copy calls need.
pub(crate) fn shadow_tensor(arena: &Buffer) -> Result<(ShadowContext, *mut sys::ggml_tensor)> {
    let params = sys::ggml_init_params {
        mem_size: 4096,
        mem_buffer: std::ptr::null_mut(),
        no_alloc: true,
    };
    // SAFETY: a small metadata-only context.
    let ctx = unsafe { sys::ggml_init(params) };
    if ctx.is_null() {
        return Err(Error::new(
            Status::OutOfMemory,
            "cannot create a ggml context",
        ));
    }
    let ctx = ShadowContext(ctx);
    let len = i64::try_from(arena.size()).map_err(|_| Error::invalid("arena too large"))?;
    // SAFETY: valid context with room for one tensor header.
    let shadow = unsafe { sys::ggml_new_tensor_1d(ctx.0, sys::GGML_TYPE_I8, len) };
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
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target.run(&job)))
            .unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err(Error::new(
                    Status::Internal,
                    format!("copy thread panicked: {what}"),
                ))
            });
        let micros = start.elapsed().as_micros() as u64;
        let mut shared = sync.lock();
        match result {
            Ok(bytes) => {
                trace.record_copy(job.layer, start, micros, bytes);
                shared.copy_bytes += bytes;
                shared.copy_micros += micros;
                shared.copies += 1;
                shared.slots[job.slot] = SlotState::Ready(job.layer);
            }
            Err(err) => {
                log::error!("{}", err.message);
                shared.outcomes[job.slot].error = Some(err);
                shared.slots[job.slot] = SlotState::Failed(job.layer);
            }
        }
        sync.changed.notify_all();
    }
}
