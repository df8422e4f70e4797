//! Engine objects: streaming a registered model on a ggml device.

use std::ffi::{c_char, c_int, c_void};
use std::path::PathBuf;
use std::sync::Mutex;

use crate::engine::{Engine, EngineParams};
use crate::error::{Error, Result, Status};
use crate::executor::Executor;
use crate::ffi::boundary::{
    boundary, boundary_void, input, optional_out, optional_text, out, result_slot, sized_structs,
    text,
};
use crate::ffi::handles::{checked, publish, retire, Kind};
use crate::ffi::plan::{plan_inputs, publish_plan, PlanHandle, PlanParams};
use crate::ffi::registry::{with_registry, RegistryHandle};
use crate::ggml as sys;

sized_structs!(EngineParamsC, StatsC, LayerStatsC);

#[repr(C)]
pub struct EngineParamsC {
    pub size: usize,
    pub device: *const c_char,
    pub budget_bytes: u64,
    pub min_free_bytes: u64,
    pub safety_fraction: f64,
    pub prefetch_depth: u32,
    pub compute_threads: c_int,
    pub trace: c_int,
    pub pinned_limit_bytes: u64,
}

#[repr(C)]
pub struct StatsC {
    pub size: usize,
    pub passes: u64,
    pub layer_loads: u64,
    pub bytes_copied: u64,
    pub copy_us: u64,
    pub wait_us: u64,
    pub compute_us: u64,
    pub prefetch_hits: u64,
    pub prefetch_misses: u64,
    pub arena_bytes: u64,
    pub arena_peak_bytes: u64,
    pub placement_bytes: u64,
    pub streamed_bytes: u64,
    pub prefetch_unused_bytes: u64,
}

impl From<&crate::stream::StreamStats> for StatsC {
    fn from(s: &crate::stream::StreamStats) -> StatsC {
        StatsC {
            size: std::mem::size_of::<StatsC>(),
            passes: s.passes,
            layer_loads: s.layer_loads,
            bytes_copied: s.bytes_copied,
            copy_us: s.copy_us,
            wait_us: s.wait_us,
            compute_us: s.compute_us,
            prefetch_hits: s.prefetch_hits,
            prefetch_misses: s.prefetch_misses,
            arena_bytes: s.arena_bytes,
            arena_peak_bytes: s.arena_peak_bytes,
            placement_bytes: s.placement_bytes,
            streamed_bytes: s.streamed_bytes,
            prefetch_unused_bytes: s.prefetch_unused_bytes,
        }
    }
}

#[repr(C)]
pub struct LayerStatsC {
    pub size: usize,
    pub resident: c_int,
    pub loads: u64,
    pub bytes: u64,
    pub wait_us: u64,
    pub compute_us: u64,
    pub evict_us: u64,
    pub load_bytes: u64,
}

pub struct EngineHandle {
    /// Declared first: dropped before the engine whose backend it borrows.
    pub(crate) executor: Mutex<Option<(StagedShape, Executor)>>,
    /// Shared with the pipelines the engine is a component of.
    pub(crate) inner: crate::pipeline::SharedEngine,
}

pub(crate) type StagedShape = [i64; 2];

impl Drop for EngineHandle {
    /// The host is done with the engine: it leaves the device now even when a pipeline still
    /// holds it, so the host may free its model once engine_free returns.
    fn drop(&mut self) {
        *self.executor.get_mut().unwrap_or_else(|p| p.into_inner()) = None;
        self.inner.retire();
    }
}

/// Runs `f` on a live engine, held and locked for the call.
pub(crate) fn with_engine<R>(
    handle: *const EngineHandle,
    f: impl FnOnce(&mut Engine) -> Result<R>,
) -> Result<R> {
    let held = checked(handle, Kind::Engine)?;
    let mut engine = held.inner.lock()?;
    f(&mut engine)
}

#[no_mangle]
pub extern "C" fn offload_engine_engine_params_init(params: *mut EngineParamsC) {
    boundary_void(|| {
        if let Ok(p) = out(params, "params") {
            let d = EngineParams::default();
            *p = EngineParamsC {
                size: std::mem::size_of::<EngineParamsC>(),
                device: std::ptr::null(),
                budget_bytes: 0,
                min_free_bytes: d.min_free_bytes,
                safety_fraction: d.safety_fraction,
                prefetch_depth: d.prefetch_depth,
                compute_threads: d.compute_threads,
                trace: 0,
                pinned_limit_bytes: u64::MAX,
            };
        }
    });
}

#[no_mangle]
pub extern "C" fn offload_engine_engine_new(
    params: *const EngineParamsC,
    registry_handle: *mut RegistryHandle,
    engine_out: *mut *mut EngineHandle,
) -> c_int {
    boundary(|| {
        let p = input(params, "engine params")?;
        let slot = out(engine_out, "engine_out")?;
        let params = EngineParams {
            device: optional_text(p.device, "device")?.map(str::to_string),
            budget_bytes: (p.budget_bytes > 0).then_some(p.budget_bytes),
            min_free_bytes: p.min_free_bytes,
            safety_fraction: p.safety_fraction,
            prefetch_depth: p.prefetch_depth,
            compute_threads: p.compute_threads,
            trace: p.trace != 0,
            pinned_limit_bytes: (p.pinned_limit_bytes != u64::MAX).then_some(p.pinned_limit_bytes),
            pattern: None,
            park_streamed: false,
        };
        let registry = with_registry(registry_handle, |state| Ok(state.registry.clone()))?;
        let engine = Engine::with_registry(params, registry)?;
        *slot = publish(
            EngineHandle {
                executor: Mutex::new(None),
                inner: crate::pipeline::EngineCell::new(engine),
            },
            Kind::Engine,
        );
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_engine_free(handle: *mut EngineHandle) {
    boundary_void(|| retire(handle, Kind::Engine));
}

#[no_mangle]
pub extern "C" fn offload_engine_engine_backend(
    handle: *mut EngineHandle,
    backend_out: *mut sys::ggml_backend_t,
) -> c_int {
    boundary(|| {
        with_engine(handle, |e| {
            *out(backend_out, "backend_out")? = e.backend().raw();
            Ok(())
        })
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_engine_prepare(
    handle: *mut EngineHandle,
    params: *const PlanParams,
    plan_out: *mut *mut PlanHandle,
) -> c_int {
    boundary(|| {
        let held = checked(handle, Kind::Engine)?;
        if held.inner.is_managed() {
            return Err(Error::state(
                "this engine is a pipeline component: the pipeline places it (stage_begin)",
            ));
        }
        let mut e = held.inner.lock()?;
        let (budget_from_params, mut workload, link) = plan_inputs(params)?;
        // The engine's own depth; the plan params' depth is for simulations.
        workload.prefetch_depth = e.params().prefetch_depth;
        // free_bytes given: this placement plans exactly as plan_new would with these params;
        // 0: the engine's budget (or the device's free memory) with these reserves.
        let budget = if budget_from_params.free_bytes > 0 {
            Some(budget_from_params)
        } else {
            e.set_reserve(
                budget_from_params
                    .compute_reserve_bytes
                    .saturating_add(budget_from_params.persistent_bytes),
            )?;
            None
        };
        let layer_count = e.layer_count();
        let plan = e.prepare_within(&workload, &link, budget)?.clone();
        if !plan_out.is_null() {
            publish_plan(plan, layer_count, plan_out)?;
        }
        Ok(())
    })
}

macro_rules! engine_layer_call {
    ($name:ident, $method:ident) => {
        #[no_mangle]
        pub extern "C" fn $name(handle: *mut EngineHandle, layer: u64) -> c_int {
            boundary(|| {
                with_engine(handle, |e| {
                    e.$method(usize::try_from(layer).unwrap_or(usize::MAX))
                })
            })
        }
    };
}

macro_rules! engine_range_call {
    ($name:ident, $method:ident) => {
        #[no_mangle]
        pub extern "C" fn $name(handle: *mut EngineHandle, first: u64, count: u64) -> c_int {
            boundary(|| {
                with_engine(handle, |e| {
                    e.$method(
                        usize::try_from(first).unwrap_or(usize::MAX),
                        usize::try_from(count).unwrap_or(usize::MAX),
                    )
                })
            })
        }
    };
}

engine_range_call!(offload_engine_engine_layers_begin, begin_layers);
engine_range_call!(offload_engine_engine_layers_end, end_layers);

#[no_mangle]
pub extern "C" fn offload_engine_engine_set_compute_backend(
    handle: *mut EngineHandle,
    backend: sys::ggml_backend_t,
) -> c_int {
    boundary(|| {
        with_engine(handle, |e| {
            e.set_compute_backend((!backend.is_null()).then_some(backend))
        })
    })
}

macro_rules! engine_call {
    ($name:ident, $method:ident) => {
        #[no_mangle]
        pub extern "C" fn $name(handle: *mut EngineHandle) -> c_int {
            boundary(|| with_engine(handle, |e| e.$method()))
        }
    };
}

engine_call!(offload_engine_engine_pass_begin, begin_pass);
engine_call!(offload_engine_engine_pass_end, end_pass);
engine_call!(offload_engine_engine_offload_all, offload_all);
engine_call!(offload_engine_engine_stats_reset, reset_stats);
engine_layer_call!(offload_engine_engine_layer_begin, begin_layer);
engine_layer_call!(offload_engine_engine_layer_end, end_layer);

#[no_mangle]
pub extern "C" fn offload_engine_engine_stats(
    handle: *mut EngineHandle,
    stats_out: *mut StatsC,
) -> c_int {
    boundary(|| {
        with_engine(handle, |e| {
            let slot = result_slot(stats_out, "stats")?;
            *slot = StatsC::from(&e.stats()?);
            Ok(())
        })
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_engine_layer_stats(
    handle: *mut EngineHandle,
    layer: u64,
    stats_out: *mut LayerStatsC,
) -> c_int {
    boundary(|| {
        with_engine(handle, |e| {
            let slot = result_slot(stats_out, "layer stats")?;
            let s = e.stats()?;
            let host_layers = s.layers.len().saturating_sub(1); // the last image is the global group
            let l = usize::try_from(layer)
                .ok()
                .filter(|&l| l < host_layers)
                .and_then(|l| s.layers.get(l))
                .ok_or_else(|| {
                    Error::not_found(format!(
                        "layer {layer} out of range (model has {host_layers} layers)"
                    ))
                })?;
            *slot = LayerStatsC {
                size: std::mem::size_of::<LayerStatsC>(),
                resident: c_int::from(l.resident),
                loads: l.loads,
                bytes: l.bytes,
                wait_us: l.wait_us,
                compute_us: l.compute_us,
                evict_us: l.evict_us,
                load_bytes: l.load_bytes,
            };
            Ok(())
        })
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_engine_trace_write(
    handle: *mut EngineHandle,
    path: *const c_char,
) -> c_int {
    boundary(|| {
        with_engine(handle, |e| {
            let path = PathBuf::from(text(path, "path")?);
            e.write_trace(&path)
        })
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_engine_measure_link(
    handle: *mut EngineHandle,
    bytes: u64,
    pageable_gbps_out: *mut f64,
    pinned_gbps_out: *mut f64,
) -> c_int {
    boundary(|| {
        with_engine(handle, |e| {
            let pageable_slot = out(pageable_gbps_out, "pageable_gbps_out")?;
            let (pageable, pinned) = crate::engine::measure_link(e.device(), bytes)?;
            *pageable_slot = pageable / 1e9;
            if let Some(slot) = optional_out(pinned_gbps_out) {
                *slot = pinned.unwrap_or(0.0) / 1e9;
            }
            Ok(())
        })
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_engine_measure_graph(
    handle: *mut EngineHandle,
    graph: *mut sys::ggml_cgraph,
    bytes_out: *mut u64,
) -> c_int {
    boundary(|| {
        with_engine(handle, |e| {
            let slot = out(bytes_out, "bytes_out")?;
            // SAFETY: the header requires a valid graph built by the host.
            *slot = unsafe { e.measure_graph(graph)? };
            Ok(())
        })
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_engine_tensor_set(
    handle: *mut EngineHandle,
    name: *const c_char,
    data: *const c_void,
    offset: u64,
    size: u64,
) -> c_int {
    boundary(|| {
        with_engine(handle, |e| {
            let name = text(name, "name")?;
            if data.is_null() && size > 0 {
                return Err(Error::new(Status::NullPointer, "data is NULL"));
            }
            // The range is checked against the tensor before any slice of the host's bytes
            // exists: a slice longer than the tensor (or than isize::MAX) is never made.
            e.check_tensor_write(name, offset, size)?;
            let len = usize::try_from(size).map_err(|_| Error::invalid("size too large"))?;
            let bytes = if len == 0 {
                &[][..]
            } else {
                // SAFETY: the caller provides `size` readable bytes at `data` (checked non-NULL).
                unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) }
            };
            e.update_tensor(name, offset, bytes)
        })
    })
}
