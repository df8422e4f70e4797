//! The engine: a device, a registry of the host's weight tensors, a plan, and the streamer
//! that carries it out. This is the object behind `offload_engine_engine*` in the C ABI.

use std::sync::Arc;

use crate::diskio::FileSet;
use std::time::Instant;

use crate::backend::{Backend, Buffer, Device};
use crate::error::{Error, Result, Status};
use crate::ggml as sys;
use crate::planner::{self, Budget, Link, ModelCost, Plan, Workload};
use crate::registry::{Location, Registry, Source, TensorClaim, TensorId};
use crate::stream::{
    layout_file_layer, layout_layer, LayerImage, StreamConfig, StreamStats, Streamer, TensorPlace,
    TensorSource,
};

/// Most compute threads an engine asks its backend for. ggml aborts when it cannot start the
/// threads it was told to use, so the number is bounded before it gets there.
pub const MAX_COMPUTE_THREADS: i32 = 256;

#[derive(Debug, Clone)]
pub struct EngineParams {
    /// ggml device name ("CPU", "CUDA0", ...); `None` picks the first GPU, else the CPU.
    pub device: Option<String>,
    /// Device memory the engine may assume free; `None` measures it from the device.
    pub budget_bytes: Option<u64>,
    pub min_free_bytes: u64,
    pub safety_fraction: f64,
    pub prefetch_depth: u32,
    pub compute_threads: i32,
    pub trace: bool,
    /// Cap on engine-owned staging copies of streamed layers. `None`: stage everything on
    /// devices with pinned host memory (async copies need it), nothing elsewhere. `Some(n)`
    /// stages up to n bytes, in plain host memory where the device has no pinned kind.
    pub pinned_limit_bytes: Option<u64>,
    /// Built-in pattern name or user regex; `None` detects the architecture.
    pub pattern: Option<String>,
    /// Parked placement (see `StreamConfig::parked`): streamed tensors point at their fixed
    /// slot in the arena from placement until teardown, never at their host home.
    pub park_streamed: bool,
}

impl Default for EngineParams {
    fn default() -> Self {
        EngineParams {
            device: None,
            budget_bytes: None,
            min_free_bytes: 512 << 20,
            safety_fraction: 0.90,
            prefetch_depth: 1,
            compute_threads: 1,
            trace: false,
            pinned_limit_bytes: None,
            pattern: None,
            park_streamed: false,
        }
    }
}

pub struct Engine {
    params: EngineParams,
    device: Device,
    backend: Backend,
    /// The host's backend for the slots' compute-done events (`set_compute_backend`).
    host_backend: Option<sys::ggml_backend_t>,
    registry: Registry,
    plan: Option<Plan>,
    streamer: Option<Streamer>,
    /// Extra bytes the host reserves (compute buffers, KV cache) declared before planning.
    reserve_bytes: u64,
    /// Figures measured by earlier runs of this engine, used when re-planning.
    measured: Option<Measured>,
    profile: bool,
    pass_started: Option<Instant>,
    /// The counters at the end of the last profiled pass (per-pass figures are differences).
    profile_mark: Option<StreamStats>,
    /// The timeline of every placement (recording only with `params.trace`).
    trace: crate::trace::Trace,
    /// The counters of the last placement, kept when the engine leaves the device.
    released_stats: Option<StreamStats>,
    /// This engine's hold on its host tensors; dropped after the streamer has restored them.
    claim: TensorClaim,
}

// SAFETY: the engine's raw pointers are the host's registered tensors and ggml objects it
// owns (backend, buffers, contexts). None is tied to the thread that created it, and every
// use goes through `&mut Engine`, so moving the engine to another thread (a pipeline placing
// the next component in the background) cannot race: the host's side of the contract is not
// to touch a component's tensors while the pipeline places it.
unsafe impl Send for Engine {}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("device", &self.device.name)
            .field("registry", &self.registry)
            .field("planned", &self.plan.is_some())
            .finish()
    }
}

impl Engine {
    pub fn new(params: EngineParams) -> Result<Engine> {
        let pattern = params
            .pattern
            .as_deref()
            .map(Registry::pattern_from_arg)
            .transpose()?;
        Engine::with_registry(params, Registry::new(pattern))
    }

    /// An engine over an existing registry (its tensor ids stay valid here).
    pub fn with_registry(params: EngineParams, registry: Registry) -> Result<Engine> {
        if !(params.safety_fraction > 0.0 && params.safety_fraction <= 1.0) {
            return Err(Error::invalid(format!(
                "safety fraction {} must be in (0, 1]",
                params.safety_fraction
            )));
        }
        if params.prefetch_depth > 64 {
            return Err(Error::invalid(format!(
                "prefetch depth {} is larger than 64",
                params.prefetch_depth
            )));
        }
        if !(1..=MAX_COMPUTE_THREADS).contains(&params.compute_threads) {
            return Err(Error::invalid(format!(
                "compute threads {} must be 1..{MAX_COMPUTE_THREADS}",
                params.compute_threads
            )));
        }
        let mut claim = TensorClaim::default();
        registry.claim(&mut claim)?;
        let device = Device::select(params.device.as_deref())?;
        let backend = device.init_backend()?;
        backend.set_threads(params.compute_threads);
        let trace = crate::trace::Trace::new(params.trace, Instant::now());
        Ok(Engine {
            profile: std::env::var_os("OFFLOAD_ENGINE_PROFILE").is_some_and(|v| v != "0"),
            params,
            device,
            backend,
            host_backend: None,
            registry,
            plan: None,
            streamer: None,
            reserve_bytes: 0,
            measured: None,
            pass_started: None,
            profile_mark: None,
            released_stats: None,
            claim,
            trace,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The compute backend the host should run its graphs on.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    pub fn plan(&self) -> Option<&Plan> {
        self.plan.as_ref()
    }

    pub fn params(&self) -> &EngineParams {
        &self.params
    }

    /// Sets the device memory the engine may use (instead of measuring free memory).
    pub fn set_budget(&mut self, bytes: u64) {
        self.params.budget_bytes = Some(bytes);
    }

    /// Device bytes a fully resident placement takes: the global group and every layer at
    /// the arena's alignment, plus the slack a file-backed arena keeps for direct-I/O alignment:
    /// exactly the arena `prepare` allocates when everything fits.
    pub fn resident_bytes(&mut self) -> Result<u64> {
        let model = self.model_cost()?;
        let places = model.layers.iter().map(|l| l.bytes).sum::<u64>() + model.global_bytes;
        Ok(places.max(crate::layout::IMAGE_ALIGNMENT))
    }

    /// The model as the planner sees it, from the images this engine would place.
    fn model_cost(&mut self) -> Result<ModelCost> {
        let (images, global) = self.layer_images()?;
        let layouts: Vec<(String, crate::layout::ImageLayout)> = images
            .iter()
            .map(|i| (i.name.clone(), i.layout()))
            .collect();
        let named: Vec<(&str, &crate::layout::ImageLayout)> =
            layouts.iter().map(|(n, l)| (n.as_str(), l)).collect();
        Ok(crate::layout::model_cost(&named, &global.layout()))
    }

    /// Device bytes the engine holds now (its arena), 0 when it is not placed.
    pub fn device_bytes(&self) -> u64 {
        self.streamer.as_ref().map_or(0, Streamer::arena_bytes)
    }

    /// Takes the engine off the device: in-flight copies finish, every tensor points at its
    /// host home again and the arena is freed. The figures measured so far are kept for the
    /// next `prepare`. Returns the device bytes freed.
    pub fn release(&mut self) -> Result<u64> {
        let Some(streamer) = &self.streamer else {
            return Ok(0);
        };
        if streamer.in_pass() {
            return Err(Error::state(
                "cannot take the engine off the device while a pass is open (end it first)",
            ));
        }
        let stats = streamer.stats();
        self.measured = Measured::from_stats(&stats).or(self.measured.take());
        self.released_stats = Some(stats);
        let freed = streamer.arena_bytes();
        self.streamer = None;
        self.plan = None;
        for layer in 0..self.registry.layer_count() {
            let ids = self.registry.layer(layer)?.tensors.clone();
            let from_file = ids.iter().any(|&id| {
                self.registry
                    .tensor(id)
                    .is_ok_and(|t| matches!(t.source, Source::GgmlFile { .. }))
            });
            let location = if from_file {
                Location::File
            } else {
                Location::Host
            };
            self.registry.set_layer_location(layer, location)?;
        }
        Ok(freed)
    }

    /// Writes `data` at byte `offset` of tensor `name` everywhere the engine keeps it: the
    /// host home, the staging copy and the device copy of a resident layer. Streamed layers
    /// carry it from their next copy on (prefetched copies are dropped first).
    pub fn update_tensor(&mut self, name: &str, offset: u64, data: &[u8]) -> Result<()> {
        self.check_tensor_write(name, offset, data.len() as u64)?;
        let entry = self.registry.tensor(self.registry.find(name)?)?;
        let tensor = match entry.source {
            Source::Ggml(tensor) => tensor,
            Source::GgmlFile { .. } => {
                return Err(Error::new(
                    Status::Unsupported,
                    format!(
                        "tensor '{name}' streams from the model file, which the engine never \
                         writes; load it into host memory to change it at run time"
                    ),
                ))
            }
            _ => {
                return Err(Error::new(
                    Status::Unsupported,
                    format!("tensor '{name}' is a descriptor only; it has no data to change"),
                ))
            }
        };
        match self.streamer.as_mut() {
            Some(streamer) => streamer.update_tensor(tensor, offset, data),
            None => {
                // Off the device: the tensor points at its home.
                // SAFETY: a registered host tensor with `bytes` bytes of host data (checked at
                // registration); the range was checked above.
                unsafe {
                    let dst = ((*tensor).data as *mut u8).add(offset as usize);
                    std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len());
                }
                Ok(())
            }
        }
    }

    /// Gives up the engine's hold on its tensors (the host freed it; it is off the device and
    /// never placed again), so another engine may take them.
    pub fn release_claim(&mut self) {
        self.claim = TensorClaim::default();
    }

    /// Whether `len` bytes at `offset` lie inside tensor `name`.
    pub fn check_tensor_write(&self, name: &str, offset: u64, len: u64) -> Result<()> {
        let entry = self.registry.tensor(self.registry.find(name)?)?;
        if offset.checked_add(len).is_none_or(|end| end > entry.bytes) {
            return Err(Error::invalid(format!(
                "tensor '{name}' has {} bytes; cannot write {len} at offset {offset}",
                entry.bytes
            )));
        }
        Ok(())
    }

    /// Declares device memory the host needs besides the weights (compute buffer, KV cache).
    /// Takes effect at the next `prepare` (plan or re-plan).
    pub fn set_reserve(&mut self, bytes: u64) -> Result<()> {
        if self.streamer.as_ref().is_some_and(|s| s.in_pass()) {
            return Err(Error::state(
                "cannot change the reserve while a pass is open (end it first)",
            ));
        }
        self.reserve_bytes = bytes;
        Ok(())
    }

    /// Registers a host tensor. Its data must be in host memory and stay alive (and at the
    /// same address) until the engine is freed.
    ///
    /// # Safety
    /// `tensor` must point to a valid `ggml_tensor` that outlives the engine.
    pub unsafe fn register_tensor(
        &mut self,
        tensor: *mut sys::ggml_tensor,
        name: Option<&str>,
    ) -> Result<TensorId> {
        // SAFETY: forwarded caller guarantee.
        let id = unsafe { self.registry.add_ggml_tensor(tensor, name)? };
        self.registry.claim(&mut self.claim)?;
        Ok(id)
    }

    /// Disk tier: registers a no_alloc context's tensors whose data stays in `path`.
    ///
    /// # Safety
    /// `ctx` must be a valid context whose tensors outlive the engine.
    pub unsafe fn register_file_backed(
        &mut self,
        ctx: *mut sys::ggml_context,
        path: &std::path::Path,
    ) -> Result<usize> {
        // SAFETY: forwarded caller guarantee.
        let count = unsafe { self.registry.add_file_backed_context(ctx, path)? };
        self.registry.claim(&mut self.claim)?;
        Ok(count)
    }

    /// Registers every tensor of a ggml context.
    ///
    /// # Safety
    /// `ctx` must be a valid context whose tensors outlive the engine.
    pub unsafe fn register_context(&mut self, ctx: *mut sys::ggml_context) -> Result<usize> {
        // SAFETY: forwarded caller guarantee.
        let count = unsafe { self.registry.add_ggml_context(ctx)? };
        self.registry.claim(&mut self.claim)?;
        Ok(count)
    }

    /// The budget this engine plans with: the user's figure, else the device's free memory.
    pub fn budget(&self) -> Budget {
        budget_for(&self.params, &self.device, self.reserve_bytes)
    }

    fn layer_images(&mut self) -> Result<(Vec<LayerImage>, LayerImage)> {
        self.registry.freeze();
        let layers = self.registry.grouped_layers()?.to_vec();
        let global = self.registry.global_tensors().to_vec();
        let mut images = Vec::with_capacity(layers.len());
        for layer in &layers {
            images.push(layout_file_layer(&layer.name, self.places(&layer.tensors)?));
        }
        let global_image = layout_layer("global", self.places(&global)?);
        Ok((images, global_image))
    }

    fn places(&self, ids: &[TensorId]) -> Result<Vec<TensorPlace>> {
        ids.iter()
            .map(|&id| {
                let entry = self.registry.tensor(id)?;
                match entry.source {
                    Source::Ggml(tensor) => {
                        // SAFETY: registered tensors are valid for the engine's lifetime.
                        let t = unsafe { &*tensor };
                        Ok(TensorPlace {
                            tensor,
                            home_data: t.data,
                            source: TensorSource::Memory(t.data as *const u8),
                            home_buffer: t.buffer,
                            offset: 0,
                            bytes: entry.bytes,
                        })
                    }
                    // Disk tier: copies read the file. The home is whatever the tensor had
                    // (nothing, for a no_alloc context's tensor).
                    Source::GgmlFile { tensor, file, offset } => {
                        // SAFETY: as above.
                        let t = unsafe { &*tensor };
                        Ok(TensorPlace {
                            tensor,
                            home_data: t.data,
                            source: TensorSource::File { file, offset },
                            home_buffer: t.buffer,
                            offset: 0,
                            bytes: entry.bytes,
                        })
                    }
                    _ => Err(Error::new(
                        Status::Unsupported,
                        format!(
                            "tensor '{}' is a descriptor only; streaming needs ggml tensors registered from the host",
                            entry.name
                        ),
                    )),
                }
            })
            .collect()
    }

    /// Plans residency for `workload`, allocates the device arena once and places the
    /// resident layers. Returns the plan; an impossible budget is `InsufficientMemory`.
    ///
    /// Calling it again between runs re-plans: free device memory is measured anew, and the
    /// per-layer compute times and copy bandwidth measured so far replace table values.
    pub fn prepare(&mut self, workload: &Workload, link: &Link) -> Result<&Plan> {
        self.prepare_within(workload, link, None)
    }

    /// As `prepare`, with `budget` (free memory, margins, reserves) for this placement only
    /// instead of the engine's own budget; later placements use the engine's budget again.
    pub fn prepare_within(
        &mut self,
        workload: &Workload,
        link: &Link,
        budget: Option<Budget>,
    ) -> Result<&Plan> {
        if let Some(streamer) = &self.streamer {
            if streamer.in_pass() {
                return Err(Error::state(
                    "cannot re-plan while a pass is open (end it first)",
                ));
            }
            self.measured = Measured::from_stats(&streamer.stats()).or(self.measured.take());
        }
        if workload.prefetch_depth > 64 {
            return Err(Error::invalid(format!(
                "prefetch depth {} is larger than 64",
                workload.prefetch_depth
            )));
        }
        // Restores every tensor's home and frees the old arena before the new one is sized.
        self.streamer = None;
        self.plan = None;
        let (images, global_image) = self.layer_images()?;
        let mut model = self.model_cost()?;
        let mut link = link.clone();
        if let Some(measured) = &self.measured {
            if measured.layer_compute_seconds.len() == model.layers.len() {
                planner::calibrate(&mut model, &measured.layer_compute_seconds)?;
            }
            if let Some(measured_link) = &measured.link {
                link = measured_link.clone();
            }
        }
        let mut budget = budget.unwrap_or_else(|| self.budget());
        let files = Arc::new(FileSet::open(self.registry.files())?);
        // The device may refuse the arena even when the numbers said it fits (fragmentation,
        // another process): plan again for less memory, one resident layer's worth at a time.
        loop {
            let mut plan = planner::plan(&model, &budget, workload, &link)?.into_result()?;
            let mut resident = vec![false; images.len()];
            for &l in &plan.resident_layers {
                resident[l] = true;
            }
            let mut all_images = images.clone();
            let staging = self.stage_streamed(&mut all_images, &plan.streamed_layers);
            all_images.push(global_image.clone());
            resident.push(true);
            // The plan may have shrunk the ring to fit; prefetch as deep as the slots allow.
            let config = StreamConfig {
                parked: self.params.park_streamed,
                staging,
                prefetch_depth: plan.prefetch_depth(workload.prefetch_depth),
                trace: self.trace.clone(),
            };
            match Streamer::new(
                &self.device,
                Some(self.compute_backend()),
                all_images,
                &resident,
                plan.slot_count as usize,
                config,
                files.clone(),
            ) {
                Ok(streamer) => {
                    plan.host_bytes =
                        host_memory_bytes(&images, &global_image, &resident, &streamer);
                    plan.message.push_str(&format!(
                        "; host memory for weights: {}",
                        crate::units::format_bytes(plan.host_bytes)
                    ));
                    for (layer, &is_resident) in resident.iter().enumerate().take(images.len()) {
                        let location = if is_resident {
                            Location::Device
                        } else {
                            Location::Host
                        };
                        self.registry.set_layer_location(layer, location)?;
                    }
                    log::debug!(
                        "placed on {}: arena {} ({} resident, {} of {}), {} copied; {}",
                        self.device.name,
                        crate::units::format_bytes(streamer.arena_bytes()),
                        plan.resident_layers.len(),
                        plan.slot_count,
                        crate::units::format_bytes(plan.slot_bytes),
                        crate::units::format_bytes(streamer.stats().placement_bytes),
                        plan.message
                    );
                    self.streamer = Some(streamer);
                    self.profile_mark = None;
                    self.plan = Some(plan);
                    return Ok(self.plan.as_ref().expect("just set"));
                }
                Err(err)
                    if err.status == Status::OutOfMemory && !plan.resident_layers.is_empty() =>
                {
                    let largest = plan
                        .resident_layers
                        .iter()
                        .map(|&l| images[l].image_bytes)
                        .max()
                        .unwrap_or(0);
                    // Plan again for at most what failed minus its largest resident layer:
                    // the free memory whose usable part (after fraction, margin and reserves)
                    // is exactly that.
                    let target =
                        (plan.global_bytes + plan.arena_bytes).saturating_sub(largest.max(1));
                    let reserves = budget
                        .compute_reserve_bytes
                        .saturating_add(budget.persistent_bytes);
                    let wanted = target.saturating_add(reserves);
                    let by_fraction = (wanted as f64 / budget.safety_fraction).ceil() as u64;
                    let free = by_fraction.max(wanted.saturating_add(budget.min_free_bytes));
                    log::warn!(
                        "device allocation failed ({}); planning again for {} of device memory",
                        err.message,
                        crate::units::format_bytes(target)
                    );
                    budget.free_bytes = free.min(budget.free_bytes.saturating_sub(1));
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Copies streamed layers' data into engine-owned staging memory (pinned where the device
    /// has it, so copies can run asynchronously), in execution order up to the limit. A failed
    /// allocation is not fatal: copies then read the host's pageable memory.
    fn stage_streamed(&self, images: &mut [LayerImage], streamed: &[usize]) -> Option<Buffer> {
        let limit = match self.params.pinned_limit_bytes {
            Some(limit) => limit,
            None if self.device.pinned_host => u64::MAX,
            None => 0,
        };
        let mut chosen = Vec::new();
        let mut total = 0u64;
        let pinned_type = self.device.pinned_buffer_type();
        for &layer in streamed {
            if images[layer]
                .tensors
                .iter()
                .any(|t| !matches!(t.source, TensorSource::Memory(_)))
            {
                continue; // disk tier: the file is the home, nothing is held in host memory
            }
            let home_is_pinned = |t: &TensorPlace| match pinned_type {
                Some(pinned) if !t.home_buffer.is_null() => {
                    // SAFETY: a home buffer the host keeps alive with its tensors.
                    unsafe { sys::ggml_backend_buffer_get_type(t.home_buffer) == pinned }
                }
                _ => false,
            };
            if images[layer].tensors.iter().all(home_is_pinned) {
                continue; // the host's home is the device's pinned memory already
            }
            let bytes = images[layer].image_bytes;
            if total + bytes > limit {
                break;
            }
            total += bytes;
            chosen.push(layer);
        }
        if total == 0 {
            return None;
        }
        let buffer = match self.device.alloc_pinned(total) {
            Some(result) => result,
            None => Device::select(Some("CPU")).and_then(|cpu| cpu.alloc(total)),
        };
        let buffer = match buffer {
            Ok(buffer) => buffer,
            Err(err) => {
                log::warn!(
                    "staging {} of streamed layers failed ({}); copying from pageable host memory",
                    crate::units::format_bytes(total),
                    err.message
                );
                return None;
            }
        };
        let mut offset = 0u64;
        for layer in chosen {
            for t in &mut images[layer].tensors {
                // SAFETY: the staging buffer holds `total` bytes and each layer's image fits in
                // its share; the source is the tensor's live host data of `t.bytes` bytes.
                unsafe {
                    let dst = buffer.base().add((offset + t.offset) as usize);
                    std::ptr::copy_nonoverlapping(t.home_data as *const u8, dst, t.bytes as usize);
                    t.source = TensorSource::Memory(dst);
                }
            }
            offset += images[layer].image_bytes;
        }
        Some(buffer)
    }

    fn streamer(&mut self) -> Result<&mut Streamer> {
        self.streamer
            .as_mut()
            .ok_or_else(|| Error::state("the engine has no plan yet (call prepare first)"))
    }

    pub fn streamer_ref(&self) -> Option<&Streamer> {
        self.streamer.as_ref()
    }

    /// Number of host-visible layers (the global group is not one).
    pub fn layer_count(&mut self) -> usize {
        self.registry.layer_count()
    }

    pub fn begin_pass(&mut self) -> Result<()> {
        self.streamer()?.begin_pass()?;
        self.pass_started = Some(Instant::now());
        Ok(())
    }

    pub fn end_pass(&mut self) -> Result<()> {
        self.streamer()?.end_pass()?;
        if self.profile {
            let elapsed = self.pass_started.map(|t| t.elapsed()).unwrap_or_default();
            let now = self.streamer()?.stats();
            // This pass's figures: the counters minus where they stood when it began.
            let before = self.profile_mark.replace(now.clone()).unwrap_or_default();
            let d = |a: u64, b: u64| a.saturating_sub(b);
            eprintln!(
                "offload-engine: pass {} {:.2} ms: {} loads, {} streamed, wait {} us, copy {} us, compute {} us",
                now.passes,
                elapsed.as_secs_f64() * 1e3,
                d(now.layer_loads, before.layer_loads),
                crate::units::format_bytes(d(now.streamed_bytes, before.streamed_bytes)),
                d(now.wait_us, before.wait_us),
                d(now.copy_us, before.copy_us),
                d(now.compute_us, before.compute_us)
            );
        }
        Ok(())
    }

    fn check_host_layer(&mut self, layer: usize) -> Result<()> {
        let count = self.registry.layer_count();
        if layer >= count {
            return Err(Error::not_found(format!(
                "layer {layer} out of range (model has {count} layers)"
            )));
        }
        Ok(())
    }

    pub fn begin_layer(&mut self, layer: usize) -> Result<()> {
        self.begin_layers(layer, 1)
    }

    pub fn end_layer(&mut self, layer: usize) -> Result<()> {
        self.end_layers(layer, 1)
    }

    /// Opens layers `first..first + count` together (a host that computes consecutive layers
    /// as one graph); see `Streamer::begin_layers`.
    pub fn begin_layers(&mut self, first: usize, count: usize) -> Result<()> {
        self.check_host_range(first, count)?;
        self.streamer()?.begin_layers(first, count)
    }

    pub fn end_layers(&mut self, first: usize, count: usize) -> Result<()> {
        self.check_host_range(first, count)?;
        self.streamer()?.end_layers(first, count)
    }

    fn check_host_range(&mut self, first: usize, count: usize) -> Result<()> {
        self.check_host_layer(first)?;
        let layers = self.registry.layer_count();
        if count == 0 || first.checked_add(count).is_none_or(|end| end > layers) {
            return Err(Error::not_found(format!(
                "layers {first}..{first}+{count} out of range (model has {layers} layers)"
            )));
        }
        Ok(())
    }

    /// Records the slots' compute-done events on the host's own backend (its stream), the
    /// one it computes the layers on, instead of the engine's; `None` goes back to the
    /// engine's. The backend must belong to the engine's device and outlive its use here.
    pub fn set_compute_backend(&mut self, backend: Option<sys::ggml_backend_t>) -> Result<()> {
        if let Some(raw) = backend {
            if raw.is_null() {
                return Err(Error::new(Status::NullPointer, "backend is NULL"));
            }
            // SAFETY: a non-null backend the caller vouches for.
            let device = unsafe { sys::ggml_backend_get_device(raw) };
            if device != self.device.raw() {
                return Err(Error::invalid(format!(
                    "the backend is not on the engine's device {}",
                    self.device.name
                )));
            }
        }
        if self.streamer.as_ref().is_some_and(|s| s.in_pass()) {
            return Err(Error::state(
                "cannot change the compute backend while a pass is open",
            ));
        }
        self.host_backend = backend;
        let compute = self.compute_backend();
        if let Some(streamer) = &mut self.streamer {
            streamer.set_compute_backend(compute);
        }
        Ok(())
    }

    /// The backend slots' compute-done events are recorded on.
    fn compute_backend(&self) -> sys::ggml_backend_t {
        self.host_backend.unwrap_or_else(|| self.backend.raw())
    }

    /// Waits for in-flight copies and points streamed layers back at their host homes.
    pub fn offload_all(&mut self) -> Result<()> {
        self.streamer()?.offload_all();
        Ok(())
    }

    /// The current placement's counters; off the device, those of the last placement.
    pub fn stats(&self) -> Result<StreamStats> {
        self.streamer
            .as_ref()
            .map(Streamer::stats)
            .or_else(|| self.released_stats.clone())
            .ok_or_else(|| Error::state("the engine has no plan yet (call prepare first)"))
    }

    pub fn reset_stats(&mut self) -> Result<()> {
        self.streamer()?.reset_stats();
        self.profile_mark = None;
        Ok(())
    }

    pub fn write_trace(&self, path: &std::path::Path) -> Result<()> {
        if !self.trace.enabled() {
            return Err(Error::state(
                "tracing is off (enable it in the engine parameters)",
            ));
        }
        if self.streamer.is_none() && self.released_stats.is_none() {
            return Err(Error::state("no trace: the engine has no plan yet"));
        }
        self.trace.write(path)
    }
}

/// Host memory the weights occupy during a run: homes in host memory (the host's buffers or
/// a mapping it made), the engine's staging copies, and for file-backed layers bound for
/// device memory one bounce buffer of a slot. File-backed layers cost nothing more: the file
/// is their home. On a host-visible device the arena itself is host memory too.
/// The budget an engine with `params` on `device` plans with, the device's memory measured
/// now: the user's figure (already net of headroom), else free memory less the margins;
/// `reserve_bytes` of it are the host's (compute buffers, KV cache).
pub fn budget_for(params: &EngineParams, device: &Device, reserve_bytes: u64) -> Budget {
    let (free_now, total) = device.memory();
    let mut free = params.budget_bytes.unwrap_or(free_now);
    // The CPU device's memory is the process's: a cgroup limit caps even a given budget,
    // so a plan that could not live under it is refused now, not killed later.
    if device.kind == crate::backend::DeviceKind::Cpu && crate::backend::cgroup_memory().is_some() {
        free = free.min(free_now);
    }
    let mut budget = Budget::from_free(free);
    budget.total_bytes = total.max(free);
    let explicit = params.budget_bytes.is_some();
    budget.min_free_bytes = if explicit { 0 } else { params.min_free_bytes };
    budget.safety_fraction = if explicit {
        1.0
    } else {
        params.safety_fraction
    };
    budget.compute_reserve_bytes = reserve_bytes;
    budget
}

fn host_memory_bytes(
    images: &[LayerImage],
    global: &LayerImage,
    resident: &[bool],
    streamer: &Streamer,
) -> u64 {
    let in_memory = |image: &LayerImage| -> u64 {
        image
            .tensors
            .iter()
            .filter(|t| !t.home_data.is_null())
            .map(|t| t.bytes)
            .sum()
    };
    let homes: u64 = images
        .iter()
        .chain(std::iter::once(global))
        .map(in_memory)
        .sum();
    let stats = streamer.stats();
    let streams_from_file = images.iter().zip(resident).any(|(image, &is_resident)| {
        !is_resident && image.tensors.iter().any(|t| t.home_data.is_null())
    });
    let bounce = if streams_from_file && !streamer.arena_is_host() {
        streamer.slot_bytes()
    } else {
        0
    };
    let arena = if streamer.arena_is_host() {
        streamer.arena_bytes()
    } else {
        0
    };
    homes + stats.staged_bytes + bounce + arena
}

/// What a run measured: the inputs a re-plan uses instead of table values.
#[derive(Debug, Clone)]
struct Measured {
    layer_compute_seconds: Vec<f64>,
    link: Option<Link>,
}

impl Measured {
    fn from_stats(stats: &StreamStats) -> Option<Measured> {
        if stats.passes == 0 {
            return None;
        }
        let host_layers = &stats.layers[..stats.layers.len().saturating_sub(1)];
        let layer_compute_seconds = host_layers
            .iter()
            .map(|l| l.compute_us as f64 / 1e6 / l.begin_count.max(1) as f64)
            .collect();
        let link = (stats.copy_us > 0 && stats.layer_loads > 0)
            .then(|| {
                let streamed: u64 = host_layers.iter().map(|l| l.bytes).sum();
                Link::from_measurement(streamed as f64 / (stats.copy_us as f64 / 1e6), 0.0).ok()
            })
            .flatten();
        Some(Measured {
            layer_compute_seconds,
            link,
        })
    }
}

/// Host-to-device copy bandwidth (bytes per second) from pageable memory, and from pinned
/// memory where the device has it; best of a few copies of `bytes`.
pub fn measure_link(device: &Device, bytes: u64) -> Result<(f64, Option<f64>)> {
    let bytes = bytes.clamp(1 << 20, 1 << 30);
    let target = device.alloc(bytes)?;
    let (_ctx, shadow) = crate::stream::shadow_tensor(&target)?;
    let time_copies = |src: *const u8| -> f64 {
        let mut best = f64::MAX;
        for _ in 0..3 {
            let start = Instant::now();
            // SAFETY: the shadow spans `bytes` of device memory and `src` holds `bytes` bytes;
            // the synchronous set returns when the copy is complete.
            unsafe { sys::ggml_backend_tensor_set(shadow, src.cast(), 0, bytes as usize) };
            best = best.min(start.elapsed().as_secs_f64());
        }
        bytes as f64 / best.max(1e-9)
    };
    let pageable = vec![1u8; bytes as usize];
    let pageable_bw = time_copies(pageable.as_ptr());
    let pinned_bw = match device.alloc_pinned(bytes) {
        Some(Ok(pinned)) => Some(time_copies(pinned.base())),
        _ => None,
    };
    Ok((pageable_bw, pinned_bw))
}

impl Engine {
    /// Bytes ggml's graph allocator would need for `graph` on this engine's backend: the
    /// compute reserve to declare before planning, measured by a dry run (nothing computed).
    ///
    /// # Safety
    /// `graph` must be a valid graph built by the host.
    pub unsafe fn measure_graph(&self, graph: *mut sys::ggml_cgraph) -> Result<u64> {
        if graph.is_null() {
            return Err(Error::new(Status::NullPointer, "graph is NULL"));
        }
        // SAFETY: valid backend.
        let buft = unsafe { sys::ggml_backend_get_default_buffer_type(self.backend.raw()) };
        // SAFETY: valid buffer type; freed below.
        let allocator = unsafe { sys::ggml_gallocr_new(buft) };
        if allocator.is_null() {
            return Err(Error::new(
                Status::OutOfMemory,
                "cannot create a graph allocator",
            ));
        }
        // SAFETY: the caller guarantees a valid graph; reserving computes sizes only.
        let ok = unsafe { sys::ggml_gallocr_reserve(allocator, graph) };
        // SAFETY: buffer 0 exists for a single-buffer-type allocator.
        let bytes = unsafe { sys::ggml_gallocr_get_buffer_size(allocator, 0) } as u64;
        // SAFETY: we own the allocator.
        unsafe { sys::ggml_gallocr_free(allocator) };
        if ok {
            Ok(bytes)
        } else {
            Err(Error::new(
                Status::OutOfMemory,
                "the graph allocator could not reserve the graph",
            ))
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // The streamer restores every tensor to its host home and joins the copy thread
        // before the arena and backends go.
        self.streamer.take();
    }
}
