//! Pipelines: the components of a job (text encoder, diffusion model, decoder, adapters)
//! placed on and off one device between its stages, under one budget.
//!
//! Each component is an [`Engine`]. The mode says which components may leave the device after
//! their stage; memory decides whether they do: a component leaves only when the stage about
//! to run would not fit otherwise (its weights, its declared need and a margin), so a device
//! with room keeps everything and pays nothing. `aggressive` and the per-component `Offload`
//! override leave as soon as their stage ends. In `layer_streaming` mode a component that does
//! not fit resident (a diffusion model, or a text encoder as large as T5-XXL) streams layer
//! by layer. The next component in stage order is placed
//! ahead of its stage, in the background, as soon as it fits: beside the running stage, or
//! at its end in the memory that stage no longer needs.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::engine::Engine;
use crate::error::{Error, Result, Status};
use crate::planner::{Link, Mode, Workload};
use crate::units::format_bytes;

/// Target of the move log, on by default in the stderr logger when the pipeline logs moves.
pub const MOVE_LOG_TARGET: &str = "offload_engine::moves";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffloadMode {
    None,
    CondOnly,
    CondDiffusion,
    Aggressive,
    LayerStreaming,
}

impl OffloadMode {
    pub const ALL: [OffloadMode; 5] = [
        OffloadMode::None,
        OffloadMode::CondOnly,
        OffloadMode::CondDiffusion,
        OffloadMode::Aggressive,
        OffloadMode::LayerStreaming,
    ];

    pub fn from_code(code: i32) -> Option<OffloadMode> {
        usize::try_from(code)
            .ok()
            .and_then(|i| OffloadMode::ALL.get(i).copied())
    }

    pub fn name(self) -> &'static str {
        match self {
            OffloadMode::None => "none",
            OffloadMode::CondOnly => "cond_only",
            OffloadMode::CondDiffusion => "cond_diffusion",
            OffloadMode::Aggressive => "aggressive",
            OffloadMode::LayerStreaming => "layer_streaming",
        }
    }

    pub fn parse(text: &str) -> Result<OffloadMode> {
        OffloadMode::ALL
            .into_iter()
            .find(|m| m.name() == text)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "unknown offload mode '{text}' (none, cond_only, cond_diffusion, aggressive, layer_streaming)"
                ))
            })
    }

    /// Whether a component of `role` may leave the device after its stage in this mode.
    fn may_evict(self, role: Role) -> bool {
        match self {
            OffloadMode::None => false,
            OffloadMode::CondOnly => role == Role::Conditioner,
            OffloadMode::CondDiffusion | OffloadMode::LayerStreaming => {
                matches!(role, Role::Conditioner | Role::Diffusion)
            }
            OffloadMode::Aggressive => true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Conditioner,
    Diffusion,
    Decoder,
    Adapter,
    Control,
    Other,
}

impl Role {
    const ALL: [Role; 6] = [
        Role::Conditioner,
        Role::Diffusion,
        Role::Decoder,
        Role::Adapter,
        Role::Control,
        Role::Other,
    ];

    pub fn from_code(code: i32) -> Option<Role> {
        usize::try_from(code)
            .ok()
            .and_then(|i| Role::ALL.get(i).copied())
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Conditioner => "conditioner",
            Role::Diffusion => "diffusion",
            Role::Decoder => "decoder",
            Role::Adapter => "adapter",
            Role::Control => "control",
            Role::Other => "other",
        }
    }
}

/// A per-component override of what the mode says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Override {
    Auto,
    /// Never leaves the device once placed.
    Keep,
    /// Leaves as soon as its stage ends.
    Offload,
}

impl Override {
    pub fn from_code(code: i32) -> Option<Override> {
        [Override::Auto, Override::Keep, Override::Offload]
            .get(usize::try_from(code).ok()?)
            .copied()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    Off,
    Resident,
    Streaming,
}

#[derive(Debug, Clone)]
pub struct PipelineParams {
    pub mode: OffloadMode,
    /// Device memory for all components; `None` measures free memory at each run.
    pub budget_bytes: Option<u64>,
    /// Left free on the device.
    pub min_free_bytes: u64,
    /// A stage's need is met with this much to spare.
    pub margin_bytes: u64,
    pub prefetch_depth: u32,
    /// The diffusion stage's workload, which sizes its streaming plan.
    pub steps: u32,
    pub passes_per_step: u32,
    /// At most this many resident layers in a streamed component (`--resident-layers N`);
    /// `None`: as many as its room holds.
    pub max_resident_layers: Option<u32>,
    /// At the end of a run, put an evicted diffusion model back when it fits.
    pub reload_diffusion: bool,
    pub log_moves: bool,
}

impl Default for PipelineParams {
    fn default() -> Self {
        PipelineParams {
            mode: OffloadMode::None,
            budget_bytes: None,
            min_free_bytes: 512 << 20,
            margin_bytes: 300 << 20,
            prefetch_depth: 1,
            steps: 1,
            passes_per_step: 1,
            max_resident_layers: None,
            reload_diffusion: true,
            log_moves: false,
        }
    }
}

/// An engine shared by the host and a pipeline (the C handle holds one too).
pub type SharedEngine = Arc<EngineCell>;

pub struct EngineCell {
    engine: Mutex<Engine>,
    /// Set while a pipeline places the engine on its helper thread.
    placing: AtomicBool,
    /// Serial of the pipeline the engine is a component of; 0: none.
    owner: AtomicU64,
    /// The host freed its handle: no pipeline places this engine again.
    retired: AtomicBool,
}

static NEXT_PIPELINE_SERIAL: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The engines this thread holds locked (a call on them is running here, perhaps with a
    /// host callback on top of it that calls back into the library).
    static HELD: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

/// A locked engine; while it lives, `EngineCell::held_here` is true on this thread.
pub struct EngineGuard<'a> {
    guard: MutexGuard<'a, Engine>,
    cell: usize,
}

impl<'a> EngineGuard<'a> {
    fn new(guard: MutexGuard<'a, Engine>, cell: &EngineCell) -> EngineGuard<'a> {
        let cell = cell as *const EngineCell as usize;
        HELD.with(|held| held.borrow_mut().push(cell));
        EngineGuard { guard, cell }
    }
}

impl Drop for EngineGuard<'_> {
    fn drop(&mut self) {
        HELD.with(|held| {
            let mut held = held.borrow_mut();
            if let Some(i) = held.iter().rposition(|&c| c == self.cell) {
                held.swap_remove(i);
            }
        });
    }
}

impl Deref for EngineGuard<'_> {
    type Target = Engine;
    fn deref(&self) -> &Engine {
        &self.guard
    }
}

impl DerefMut for EngineGuard<'_> {
    fn deref_mut(&mut self) -> &mut Engine {
        &mut self.guard
    }
}

impl EngineCell {
    pub fn new(engine: Engine) -> SharedEngine {
        Arc::new(EngineCell {
            engine: Mutex::new(engine),
            placing: AtomicBool::new(false),
            owner: AtomicU64::new(0),
            retired: AtomicBool::new(false),
        })
    }

    /// One caller at a time: an overlapping call is an error instead of a race, except that a
    /// call finding the engine busy with a pipeline's background placement waits for it.
    pub fn lock(&self) -> Result<EngineGuard<'_>> {
        match self.engine.try_lock() {
            Ok(guard) => Ok(EngineGuard::new(guard, self)),
            // A panic was caught at the boundary; the engine's state is still consistent.
            Err(TryLockError::Poisoned(p)) => Ok(EngineGuard::new(p.into_inner(), self)),
            Err(TryLockError::WouldBlock) if self.placing.load(Ordering::SeqCst) => {
                Ok(self.lock_waiting())
            }
            Err(TryLockError::WouldBlock) => Err(Error::state(
                "handle is in use by another thread (calls on one handle must not overlap)",
            )),
        }
    }

    fn lock_waiting(&self) -> EngineGuard<'_> {
        EngineGuard::new(self.engine.lock().unwrap_or_else(|p| p.into_inner()), self)
    }

    /// Whether a call on this engine is running on this thread (its lock is held here).
    pub fn held_here(&self) -> bool {
        let me = self as *const EngineCell as usize;
        HELD.with(|held| held.borrow().contains(&me))
    }

    /// Whether a pipeline places this engine (the host's own `prepare` is then refused).
    pub fn is_managed(&self) -> bool {
        self.owner.load(Ordering::SeqCst) != 0
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }

    /// The host is done with this engine (its handle is freed). A pipeline that still holds
    /// it stops placing it, and the engine leaves the device now, so the host may free its
    /// model right after. From inside a call on the engine (a callback), the leaving waits
    /// for that call to end: the pipeline or the last reference takes it off then.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
        if !self.is_managed() || self.held_here() {
            return;
        }
        self.put_away();
    }

    /// Takes a retired engine off the device for good and lets go of its tensors.
    fn put_away(&self) {
        let mut engine = self.lock_waiting();
        let _ = engine.offload_all();
        if let Err(err) = engine.release() {
            log::warn!("taking a freed engine off the device: {}", err.message);
        }
        engine.release_claim();
    }
}

/// `repr(C)`: the C ABI hands it out as is.
#[repr(C)]
#[derive(Debug, Clone, Default)]
pub struct PipelineStats {
    pub budget_bytes: u64,
    pub loads: u64,
    pub unloads: u64,
    pub bytes_loaded: u64,
    pub load_us: u64,
    pub unload_us: u64,
    /// Placements made ahead of their stage.
    pub prefetched_loads: u64,
    pub device_bytes: u64,
    pub peak_device_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct ComponentInfo {
    pub name: String,
    pub role: Role,
    pub placement: Placement,
    pub device_bytes: u64,
    pub resident_bytes: u64,
    pub stage_need_bytes: u64,
    pub loads: u64,
    pub unloads: u64,
    pub streamed_layers: u64,
}

struct Component {
    name: String,
    role: Role,
    engine: SharedEngine,
    override_: Override,
    stage_need: u64,
    placement: Placement,
    device_bytes: u64,
    resident_bytes: Option<u64>,
    streamed_layers: u64,
    loads: u64,
    unloads: u64,
    /// When its stage last ended (a counter); the least recently used leaves first.
    last_used: u64,
}

/// What a placement produced (on this thread or the background one).
struct Placed {
    placement: Placement,
    device_bytes: u64,
    streamed_layers: u64,
    micros: u64,
}

/// A placement running on a helper thread while the host works.
struct Background {
    component: usize,
    /// Bytes held for it until it is joined.
    reserved: u64,
    handle: JoinHandle<Result<Placed>>,
}

pub struct Pipeline {
    /// What the components' `EngineCell::owner` holds while they belong to this pipeline.
    serial: u64,
    params: PipelineParams,
    components: Vec<Component>,
    budget: u64,
    in_run: bool,
    stage: Option<usize>,
    background: Option<Background>,
    stats: PipelineStats,
    clock: u64,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("mode", &self.params.mode)
            .field("components", &self.components.len())
            .finish()
    }
}

fn lock_engine<'a>(engine: &'a SharedEngine, name: &str) -> Result<EngineGuard<'a>> {
    engine
        .lock()
        .map_err(|e| Error::new(e.status, format!("component '{name}': {}", e.message)))
}

/// Places `engine` within `room` bytes: fully resident, or (when `may_stream`) streaming.
fn place_engine(
    engine: &mut Engine,
    name: &str,
    room: u64,
    may_stream: bool,
    workload: &Workload,
) -> Result<Placed> {
    let started = Instant::now();
    engine.set_budget(room);
    engine.set_reserve(0)?;
    // Table figures until the engine has measured its own (it re-plans with those).
    let link = if engine.device().kind == crate::backend::DeviceKind::Cpu {
        Link::named("ddr4")?
    } else {
        Link::named("pcie4-x16")?
    };
    let plan = engine.prepare(workload, &link).map_err(|e| {
        Error::new(
            e.status,
            format!(
                "placing component '{name}' in {}: {}",
                format_bytes(room),
                e.message
            ),
        )
    })?;
    let streaming = plan.mode != Mode::Full;
    let streamed_layers = plan.streamed_layers.len() as u64;
    if streaming && !may_stream {
        engine.release()?;
        return Err(Error::new(
            Status::InsufficientMemory,
            format!(
                "component '{name}' does not fit resident in {}",
                format_bytes(room)
            ),
        ));
    }
    Ok(Placed {
        placement: if streaming {
            Placement::Streaming
        } else {
            Placement::Resident
        },
        device_bytes: engine.device_bytes(),
        streamed_layers: if streaming { streamed_layers } else { 0 },
        micros: started.elapsed().as_micros() as u64,
    })
}

impl Pipeline {
    pub fn new(params: PipelineParams) -> Result<Pipeline> {
        if params.steps == 0 || params.passes_per_step == 0 {
            return Err(Error::invalid(
                "steps and passes per step must be at least 1",
            ));
        }
        if params.prefetch_depth > 64 {
            return Err(Error::invalid(format!(
                "prefetch depth {} is larger than 64",
                params.prefetch_depth
            )));
        }
        Ok(Pipeline {
            serial: NEXT_PIPELINE_SERIAL.fetch_add(1, Ordering::Relaxed),
            params,
            components: Vec::new(),
            budget: 0,
            in_run: false,
            stage: None,
            background: None,
            stats: PipelineStats::default(),
            clock: 0,
        })
    }

    pub fn params(&self) -> &PipelineParams {
        &self.params
    }

    fn index(&self, name: &str) -> Result<usize> {
        self.components
            .iter()
            .position(|c| c.name == name)
            .ok_or_else(|| {
                let known: Vec<&str> = self.components.iter().map(|c| c.name.as_str()).collect();
                Error::not_found(format!(
                    "no component '{name}' in the pipeline (components: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ))
            })
    }

    /// Refuses a call made from inside a call on one of the components (a host callback of
    /// `run_pass`, or a log callback): it would wait for that call, which waits for it.
    fn refuse_reentry(&self, what: &str) -> Result<()> {
        match self.components.iter().find(|c| c.engine.held_here()) {
            Some(c) => Err(Error::state(format!(
                "{what} from inside a call on component '{}' (a callback of that call): make it after the call returns",
                c.name
            ))),
            None => Ok(()),
        }
    }

    /// Components whose engine the host freed leave the device (if a call of ours held them
    /// when the host freed them, they leave now) and are placed no more.
    fn sweep_retired(&mut self) {
        for c in &mut self.components {
            if c.engine.is_retired() && !c.engine.held_here() {
                if c.placement != Placement::Off || c.engine.lock_waiting().device_bytes() > 0 {
                    c.engine.put_away();
                }
                c.placement = Placement::Off;
                c.device_bytes = 0;
                c.streamed_layers = 0;
            }
        }
    }

    fn check_not_retired(&self, i: usize) -> Result<()> {
        if self.components[i].engine.is_retired() {
            return Err(Error::state(format!(
                "component '{}': the host freed its engine; the pipeline no longer places it",
                self.components[i].name
            )));
        }
        Ok(())
    }

    /// Adds a component; components are added in the order their stages run. An engine
    /// belongs to one pipeline at a time.
    pub fn add(&mut self, name: &str, role: Role, engine: SharedEngine) -> Result<()> {
        self.refuse_reentry("pipeline add")?;
        if engine.is_retired() {
            return Err(Error::state(format!(
                "component '{name}': the engine was freed"
            )));
        }
        if self.in_run {
            return Err(Error::state("cannot add a component during a run"));
        }
        if name.is_empty() {
            return Err(Error::invalid("component name is empty"));
        }
        if self.components.iter().any(|c| c.name == name) {
            return Err(Error::new(
                Status::AlreadyExists,
                format!("the pipeline already has a component '{name}'"),
            ));
        }
        if self
            .components
            .iter()
            .any(|c| Arc::ptr_eq(&c.engine, &engine))
        {
            return Err(Error::new(
                Status::AlreadyExists,
                format!("component '{name}': this engine is already in the pipeline"),
            ));
        }
        {
            let mut e = lock_engine(&engine, name)?;
            if let Some(first) = self.components.first() {
                let first_device = lock_engine(&first.engine, &first.name)?
                    .device()
                    .name
                    .clone();
                if e.device().name != first_device {
                    return Err(Error::invalid(format!(
                        "component '{name}' is on device {}, the pipeline on {first_device}",
                        e.device().name
                    )));
                }
            }
            if engine
                .owner
                .compare_exchange(0, self.serial, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
            {
                return Err(Error::state(format!(
                    "component '{name}': this engine is already a component of another pipeline (an engine belongs to one pipeline at a time)"
                )));
            }
            // The pipeline plans it from now on.
            if let Err(err) = e.release() {
                engine.owner.store(0, Ordering::SeqCst);
                return Err(err);
            }
        }
        self.components.push(Component {
            name: name.to_string(),
            role,
            engine,
            override_: Override::Auto,
            stage_need: 0,
            placement: Placement::Off,
            device_bytes: 0,
            resident_bytes: None,
            streamed_layers: 0,
            loads: 0,
            unloads: 0,
            last_used: 0,
        });
        Ok(())
    }

    pub fn set_override(&mut self, name: &str, value: Override) -> Result<()> {
        let i = self.index(name)?;
        self.components[i].override_ = value;
        Ok(())
    }

    pub fn set_stage_need(&mut self, name: &str, bytes: u64) -> Result<()> {
        let i = self.index(name)?;
        self.components[i].stage_need = bytes;
        Ok(())
    }

    pub fn stats(&self) -> PipelineStats {
        let mut stats = self.stats.clone();
        stats.device_bytes = self.held(None);
        stats
    }

    pub fn component(&mut self, name: &str) -> Result<ComponentInfo> {
        let i = self.index(name)?;
        let resident_bytes = self.resident_bytes(i).unwrap_or(0);
        let c = &self.components[i];
        Ok(ComponentInfo {
            name: c.name.clone(),
            role: c.role,
            placement: c.placement,
            device_bytes: c.device_bytes,
            resident_bytes,
            stage_need_bytes: c.stage_need,
            loads: c.loads,
            unloads: c.unloads,
            streamed_layers: c.streamed_layers,
        })
    }

    /// Starts a job: free device memory is measured again (unless the budget is fixed).
    pub fn run_begin(&mut self) -> Result<()> {
        let result = self.run_begin_now();
        // A component freed from a log callback during this call leaves the device now.
        self.sweep_retired();
        result
    }

    fn run_begin_now(&mut self) -> Result<()> {
        self.refuse_reentry("run_begin")?;
        if self.in_run {
            return Err(Error::state(
                "run_begin: a run is already open (call run_end)",
            ));
        }
        if self.components.is_empty() {
            return Err(Error::state("the pipeline has no components"));
        }
        // A reload started by the last run_end must land before memory is measured.
        self.join_background();
        self.sweep_retired();
        self.budget = match self.params.budget_bytes {
            Some(bytes) => bytes,
            None => {
                let engine = lock_engine(&self.components[0].engine, &self.components[0].name)?;
                // Our own placements are not free, but they are ours to use.
                engine.device().memory().0 + self.held(None)
            }
        };
        self.stats.budget_bytes = self.budget;
        self.in_run = true;
        self.log(format_args!(
            "run: budget {} ({} kept free), mode {}",
            format_bytes(self.budget),
            format_bytes(self.params.min_free_bytes),
            self.params.mode.name()
        ));
        Ok(())
    }

    /// Ends a job and applies the reload policy.
    pub fn run_end(&mut self) -> Result<()> {
        let result = self.run_end_now();
        // A component freed from a log callback during this call leaves the device now.
        self.sweep_retired();
        result
    }

    fn run_end_now(&mut self) -> Result<()> {
        self.refuse_reentry("run_end")?;
        if !self.in_run {
            return Err(Error::state("run_end without run_begin"));
        }
        if let Some(open) = self.stage {
            return Err(Error::state(format!(
                "run_end while stage '{}' is open (call stage_end first)",
                self.components[open].name
            )));
        }
        self.join_background();
        self.sweep_retired();
        self.in_run = false;
        if self.params.reload_diffusion && self.params.mode != OffloadMode::LayerStreaming {
            if let Some(i) = self.components.iter().position(|c| {
                c.role == Role::Diffusion && c.placement == Placement::Off && !c.engine.is_retired()
            }) {
                // Only into free room, and only if the next job's first stage will not push
                // it straight out again.
                let bytes = self.resident_bytes(i)?;
                let first_stage = match self.components[0].placement {
                    Placement::Off if i != 0 => self.stage_bytes(0)?,
                    _ => 0,
                };
                let wanted = bytes
                    .saturating_add(first_stage)
                    .saturating_add(self.params.margin_bytes);
                if self.free(Some(i)) >= wanted {
                    self.start_background(i, bytes, "reload after the run");
                } else {
                    self.log(format_args!(
                        "reload of '{}' skipped: {} does not fit in {}",
                        self.components[i].name,
                        format_bytes(bytes),
                        format_bytes(self.free(Some(i)))
                    ));
                }
            }
        }
        Ok(())
    }

    /// Makes component `name` usable on the device for its stage.
    pub fn stage_begin(&mut self, name: &str) -> Result<()> {
        let result = self.stage_begin_now(name);
        // A component freed from a log callback during this call leaves the device now.
        self.sweep_retired();
        result
    }

    fn stage_begin_now(&mut self, name: &str) -> Result<()> {
        self.refuse_reentry("stage_begin")?;
        let i = self.index(name)?;
        self.check_not_retired(i)?;
        if !self.in_run {
            return Err(Error::state(
                "stage_begin outside a run (call run_begin first)",
            ));
        }
        if let Some(open) = self.stage {
            return Err(Error::state(format!(
                "stage_begin('{name}') while stage '{}' is open (call stage_end first)",
                self.components[open].name
            )));
        }
        self.join_background();
        self.sweep_retired();
        self.make_room(i)?;
        if self.components[i].placement == Placement::Off {
            let may_stream = self.streaming_allowed();
            let room = self
                .free(Some(i))
                .saturating_sub(self.components[i].stage_need);
            if !may_stream && room < self.resident_bytes(i)? {
                return Err(self.placement_error(i, room, None));
            }
            let placed = {
                let workload = self.workload();
                let c = &self.components[i];
                let mut engine = lock_engine(&c.engine, &c.name)?;
                place_engine(&mut engine, &c.name, room, may_stream, &workload)
            };
            let placed = placed.map_err(|e| self.placement_error(i, room, Some(e)))?;
            self.record_load(i, placed, "its stage");
        }
        self.stage = Some(i);
        // Stage needs come from the host as any u64: every sum with one saturates.
        let in_use = self
            .held(None)
            .saturating_add(self.components[i].stage_need);
        self.stats.peak_device_bytes = self.stats.peak_device_bytes.max(in_use);
        // The next stage's component goes on now if it fits beside this stage.
        self.prefetch_next(i, self.components[i].stage_need, false);
        Ok(())
    }

    /// Ends component `name`'s stage; it leaves now if the mode or its override says so.
    pub fn stage_end(&mut self, name: &str) -> Result<()> {
        let result = self.stage_end_now(name);
        // A component freed from a log callback during this call leaves the device now.
        self.sweep_retired();
        result
    }

    fn stage_end_now(&mut self, name: &str) -> Result<()> {
        self.refuse_reentry("stage_end")?;
        let i = self.index(name)?;
        self.sweep_retired();
        if self.stage != Some(i) {
            return Err(Error::state(format!(
                "stage_end('{name}') does not match the open stage"
            )));
        }
        {
            let c = &self.components[i];
            let engine = lock_engine(&c.engine, &c.name)?;
            if engine.streamer_ref().is_some_and(|s| s.in_pass()) {
                return Err(Error::state(format!(
                    "stage_end('{name}') while a pass is open on its engine (end it first)"
                )));
            }
        }
        self.stage = None;
        self.clock += 1;
        self.components[i].last_used = self.clock;
        let c = &self.components[i];
        let eager = match c.override_ {
            Override::Keep => false,
            Override::Offload => true,
            Override::Auto => self.params.mode == OffloadMode::Aggressive,
        };
        if eager {
            self.unload(i, "its stage ended")?;
        }
        // In the memory this stage no longer needs, the next component starts loading.
        self.prefetch_next(i, 0, true);
        Ok(())
    }

    fn workload(&self) -> Workload {
        Workload {
            steps: self.params.steps,
            passes_per_step: self.params.passes_per_step,
            prefetch_depth: self.params.prefetch_depth,
            max_resident_layers: self.params.max_resident_layers,
            ..Workload::default()
        }
    }

    /// Whether a component may stream when it does not fit resident: any component in
    /// `layer_streaming` mode.
    fn streaming_allowed(&self) -> bool {
        self.params.mode == OffloadMode::LayerStreaming
    }

    fn resident_bytes(&mut self, i: usize) -> Result<u64> {
        if let Some(bytes) = self.components[i].resident_bytes {
            return Ok(bytes);
        }
        let c = &self.components[i];
        let bytes = lock_engine(&c.engine, &c.name)?.resident_bytes()?;
        self.components[i].resident_bytes = Some(bytes);
        Ok(bytes)
    }

    /// Device bytes held by components (other than `except`), including placements in flight.
    fn held(&self, except: Option<usize>) -> u64 {
        let placed: u64 = self
            .components
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != except)
            .fold(0u64, |sum, (_, c)| sum.saturating_add(c.device_bytes));
        let pending = self
            .background
            .as_ref()
            .filter(|b| Some(b.component) != except)
            .map_or(0, |b| b.reserved);
        placed.saturating_add(pending)
    }

    /// Budget left for component `i` (its own placement not counted as used).
    fn free(&self, except: Option<usize>) -> u64 {
        self.budget
            .saturating_sub(self.params.min_free_bytes)
            .saturating_sub(self.held(except))
    }

    /// What component `i`'s stage needs on the device: its weights (resident, or for a
    /// streaming component as much as can be had) and its declared stage need.
    fn stage_bytes(&mut self, i: usize) -> Result<u64> {
        let weights = match self.components[i].placement {
            Placement::Off => self.resident_bytes(i)?,
            _ => self.components[i].device_bytes,
        };
        Ok(weights.saturating_add(self.components[i].stage_need))
    }

    /// Moves out components the mode lets leave, least recently used first, until component
    /// `i`'s stage fits with the margin. Stops early when it already fits.
    fn make_room(&mut self, i: usize) -> Result<()> {
        let wanted = self
            .stage_bytes(i)?
            .saturating_add(self.params.margin_bytes);
        while self.free(Some(i)) < wanted {
            let victim = self
                .components
                .iter()
                .enumerate()
                .filter(|&(j, c)| {
                    j != i
                        && c.placement != Placement::Off
                        && Some(j) != self.stage
                        && match c.override_ {
                            Override::Keep => false,
                            Override::Offload => true,
                            Override::Auto => self.params.mode.may_evict(c.role),
                        }
                })
                .min_by_key(|(_, c)| (c.last_used, std::cmp::Reverse(c.device_bytes)))
                .map(|(j, _)| j);
            let Some(victim) = victim else {
                break;
            };
            let reason = format!("'{}' needs the room", self.components[i].name);
            self.unload(victim, &reason)?;
        }
        Ok(())
    }

    fn unload(&mut self, i: usize, reason: &str) -> Result<()> {
        let started = Instant::now();
        let freed = {
            let c = &self.components[i];
            lock_engine(&c.engine, &c.name)?.release()?
        };
        let micros = started.elapsed().as_micros() as u64;
        let c = &mut self.components[i];
        if c.placement == Placement::Off {
            return Ok(());
        }
        c.placement = Placement::Off;
        c.device_bytes = 0;
        c.streamed_layers = 0;
        c.unloads += 1;
        self.stats.unloads += 1;
        self.stats.unload_us += micros;
        let line = format!(
            "unload '{}' ({}): {} freed in {:.2} ms ({reason})",
            c.name,
            c.role.name(),
            format_bytes(freed),
            micros as f64 / 1e3
        );
        self.log(format_args!("{line}"));
        Ok(())
    }

    fn record_load(&mut self, i: usize, placed: Placed, reason: &str) {
        let c = &mut self.components[i];
        c.placement = placed.placement;
        c.device_bytes = placed.device_bytes;
        c.streamed_layers = placed.streamed_layers;
        c.loads += 1;
        self.stats.loads += 1;
        self.stats.bytes_loaded = self.stats.bytes_loaded.saturating_add(placed.device_bytes);
        self.stats.load_us += placed.micros;
        let line = format!(
            "load '{}' ({}): {} {} in {:.2} ms ({reason})",
            c.name,
            c.role.name(),
            format_bytes(placed.device_bytes),
            match placed.placement {
                Placement::Streaming => format!("streaming {} layers", placed.streamed_layers),
                _ => "resident".to_string(),
            },
            placed.micros as f64 / 1e3
        );
        self.log(format_args!("{line}"));
        let held = self.held(None);
        self.stats.peak_device_bytes = self.stats.peak_device_bytes.max(held);
    }

    /// Why component `i` cannot be placed in `room` bytes; `cause`: the engine's error.
    fn placement_error(&mut self, i: usize, room: u64, cause: Option<Error>) -> Error {
        let c = &self.components[i];
        let needed = c.resident_bytes.unwrap_or(0);
        let others: Vec<String> = self
            .components
            .iter()
            .filter(|o| o.placement != Placement::Off && o.name != c.name)
            .map(|o| format!("'{}' {}", o.name, format_bytes(o.device_bytes)))
            .collect();
        let hint = if self.streaming_allowed() {
            "a larger budget, or a smaller --streaming-min-vram".to_string()
        } else if c.role == Role::Diffusion {
            "--offload-mode layer_streaming, a mode that moves more components out, or a larger budget".to_string()
        } else {
            "a mode that moves more components out, or a larger budget".to_string()
        };
        let (status, detail) = match cause {
            Some(err) => (err.status, format!(" [{}]", err.message)),
            None => (Status::InsufficientMemory, String::new()),
        };
        Error::new(
            status,
            format!(
                "stage '{}' ({} mode) cannot be placed: it needs {} resident, and {} of the {} budget is left for it after {} for the stage and {} kept free (still on the device: {}). Try {hint}.{detail}",
                c.name,
                self.params.mode.name(),
                format_bytes(needed),
                format_bytes(room),
                format_bytes(self.budget),
                format_bytes(c.stage_need),
                format_bytes(self.params.min_free_bytes),
                if others.is_empty() {
                    "nothing".to_string()
                } else {
                    others.join(", ")
                },
            ),
        )
    }

    /// Places the component after `i` in the background when it fits now beside `in_use`
    /// bytes of running stage. At a stage's end, components the mode lets leave make room
    /// first, as they would at the next stage's begin.
    fn prefetch_next(&mut self, i: usize, in_use: u64, at_stage_end: bool) {
        let next = i + 1;
        if next >= self.components.len()
            || self.components[next].placement != Placement::Off
            || self.components[next].engine.is_retired()
            || self.background.is_some()
        {
            return;
        }
        if at_stage_end {
            if let Err(err) = self.make_room(next) {
                log::warn!(
                    "making room for '{}' ahead of its stage: {}",
                    self.components[next].name,
                    err.message
                );
                return;
            }
        }
        let Ok(resident) = self.resident_bytes(next) else {
            return;
        };
        let need = self.components[next].stage_need;
        let free = self.free(Some(next)).saturating_sub(in_use);
        let room = free.saturating_sub(need);
        let fits_resident = room >= resident.saturating_add(self.params.margin_bytes);
        // A streaming component takes what is there; ahead of its stage only once nothing
        // else could leave for it (the end of the stage before it).
        let stream_now = at_stage_end && self.streaming_allowed() && room > 0;
        if fits_resident || stream_now {
            let budget = if fits_resident { resident } else { room };
            self.start_background(next, budget, "ahead of its stage");
        }
    }

    fn start_background(&mut self, i: usize, room: u64, reason: &'static str) {
        let engine = self.components[i].engine.clone();
        let name = self.components[i].name.clone();
        let may_stream = self.streaming_allowed();
        let workload = self.workload();
        engine.placing.store(true, Ordering::SeqCst);
        let cell = engine.clone();
        let spawned = std::thread::Builder::new()
            .name("offload-place".into())
            .spawn(move || {
                crate::log::mark_library_thread();
                let placed = {
                    // The host's calls on this engine wait for us (see EngineCell::lock).
                    let mut guard = engine.lock_waiting();
                    place_engine(&mut guard, &name, room, may_stream, &workload)
                };
                engine.placing.store(false, Ordering::SeqCst);
                placed
            });
        match spawned {
            Ok(handle) => {
                self.log(format_args!(
                    "placing '{}' in the background ({reason})",
                    self.components[i].name
                ));
                self.background = Some(Background {
                    component: i,
                    reserved: room,
                    handle,
                })
            }
            Err(err) => {
                cell.placing.store(false, Ordering::SeqCst);
                log::warn!("cannot start a placement thread: {err}")
            }
        }
    }

    /// Waits for a background placement. A failed one is only logged: the component is then
    /// placed when its stage begins, and an error there is that call's error.
    fn join_background(&mut self) {
        let Some(job) = self.background.take() else {
            return;
        };
        let result = job.handle.join().unwrap_or_else(|panic| {
            Err(Error::new(
                Status::Internal,
                format!(
                    "placement thread panicked: {}",
                    crate::error::panic_text(&*panic)
                ),
            ))
        });
        match result {
            Ok(placed) => {
                self.stats.prefetched_loads += 1;
                self.record_load(job.component, placed, "placed ahead of its stage");
            }
            Err(err) => log::warn!(
                "loading component '{}' ahead of its stage failed ({}); it loads when its stage begins",
                self.components[job.component].name,
                err.message
            ),
        }
    }

    fn log(&self, args: std::fmt::Arguments<'_>) {
        if self.params.log_moves {
            log::info!(target: MOVE_LOG_TARGET, "{args}");
        } else {
            log::debug!(target: MOVE_LOG_TARGET, "{args}");
        }
    }
}

impl Drop for Pipeline {
    /// Puts every component back in host memory and hands its engine back to the host. A
    /// component busy in a call on another thread is waited for; one whose call is running
    /// on this thread (the free came from its callback) keeps its placement until the host
    /// frees or prepares it.
    fn drop(&mut self) {
        self.join_background();
        for c in &self.components {
            c.engine.owner.store(0, Ordering::SeqCst);
            if c.engine.held_here() {
                log::warn!(
                    "pipeline freed from inside a call on component '{}': it stays placed until that engine is freed or prepared",
                    c.name
                );
                continue;
            }
            let mut engine = c.engine.lock_waiting();
            let _ = engine.offload_all();
            let _ = engine.release();
        }
    }
}
