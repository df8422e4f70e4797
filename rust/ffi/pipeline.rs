//! Pipeline objects: whole components placed on and off one device between a job's stages.

use std::ffi::{c_char, c_int, CString};
use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::ffi::boundary::{
    boundary, boundary_void, c_string, input, out, result_slot, sized_structs, text,
};
use crate::ffi::engine::EngineHandle;
use crate::ffi::handles::{checked, lock, publish, retire, Kind};
use crate::pipeline::{OffloadMode, Override, Pipeline, PipelineParams, Placement, Role};

sized_structs!(PipelineParamsC, ComponentInfoC, PipelineStatsC);

#[repr(C)]
pub struct PipelineParamsC {
    pub size: usize,
    pub offload_mode: c_int,
    pub budget_bytes: u64,
    pub min_free_bytes: u64,
    pub margin_bytes: u64,
    pub prefetch_depth: u32,
    pub steps: u32,
    pub passes_per_step: u32,
    pub reload_diffusion: c_int,
    pub log_moves: c_int,
    pub max_resident_layers: u32,
}

#[repr(C)]
pub struct ComponentInfoC {
    pub size: usize,
    pub name: *const c_char,
    pub role: c_int,
    pub placement: c_int,
    pub device_bytes: u64,
    pub resident_bytes: u64,
    pub stage_need_bytes: u64,
    pub loads: u64,
    pub unloads: u64,
    pub streamed_layers: u64,
}

#[repr(C)]
pub struct PipelineStatsC {
    pub size: usize,
    /// Laid out exactly as the header's fields after `size` (all u64).
    pub stats: crate::pipeline::PipelineStats,
}

pub struct PipelineHandle {
    inner: Mutex<PipelineState>,
}

struct PipelineState {
    pipeline: Pipeline,
    /// Backs the `name` of the last component_info.
    last_name: CString,
}

/// Runs `f` on a live pipeline, held and locked for the call.
fn with_pipeline<R>(
    handle: *const PipelineHandle,
    f: impl FnOnce(&mut PipelineState) -> Result<R>,
) -> Result<R> {
    let held = checked(handle, Kind::Pipeline)?;
    let mut state = lock(&held.inner)?;
    f(&mut state)
}

#[no_mangle]
pub extern "C" fn offload_engine_pipeline_params_init(params: *mut PipelineParamsC) {
    boundary_void(|| {
        if let Ok(p) = out(params, "params") {
            let d = PipelineParams::default();
            *p = PipelineParamsC {
                size: std::mem::size_of::<PipelineParamsC>(),
                offload_mode: 0,
                budget_bytes: 0,
                min_free_bytes: d.min_free_bytes,
                margin_bytes: d.margin_bytes,
                prefetch_depth: d.prefetch_depth,
                steps: d.steps,
                passes_per_step: d.passes_per_step,
                reload_diffusion: c_int::from(d.reload_diffusion),
                log_moves: 0,
                max_resident_layers: u32::MAX,
            };
        }
    });
}

#[no_mangle]
pub extern "C" fn offload_engine_pipeline_new(
    params: *const PipelineParamsC,
    pipeline_out: *mut *mut PipelineHandle,
) -> c_int {
    boundary(|| {
        let p = input(params, "pipeline params")?;
        let slot = out(pipeline_out, "pipeline_out")?;
        let mode = OffloadMode::from_code(p.offload_mode).ok_or_else(|| {
            Error::invalid(format!(
                "offload mode {} is not one of 0..4",
                p.offload_mode
            ))
        })?;
        let pipeline = Pipeline::new(PipelineParams {
            mode,
            budget_bytes: (p.budget_bytes > 0).then_some(p.budget_bytes),
            min_free_bytes: p.min_free_bytes,
            margin_bytes: p.margin_bytes,
            prefetch_depth: p.prefetch_depth,
            steps: p.steps,
            passes_per_step: p.passes_per_step,
            max_resident_layers: (p.max_resident_layers != u32::MAX)
                .then_some(p.max_resident_layers),
            reload_diffusion: p.reload_diffusion != 0,
            log_moves: p.log_moves != 0,
        })?;
        *slot = publish(
            PipelineHandle {
                inner: Mutex::new(PipelineState {
                    pipeline,
                    last_name: CString::default(),
                }),
            },
            Kind::Pipeline,
        );
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_pipeline_free(handle: *mut PipelineHandle) {
    boundary_void(|| retire(handle, Kind::Pipeline));
}

#[no_mangle]
pub extern "C" fn offload_engine_pipeline_add(
    handle: *mut PipelineHandle,
    name: *const c_char,
    role: c_int,
    engine_handle: *mut EngineHandle,
) -> c_int {
    boundary(|| {
        with_pipeline(handle, |state| {
            let name = text(name, "name")?;
            let role = Role::from_code(role).ok_or_else(|| {
                Error::invalid(format!("component role {role} is not one of 0..5"))
            })?;
            let engine = checked(engine_handle, Kind::Engine)?.inner.clone();
            state.pipeline.add(name, role, engine)
        })
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_pipeline_set_override(
    handle: *mut PipelineHandle,
    name: *const c_char,
    override_: c_int,
) -> c_int {
    boundary(|| {
        with_pipeline(handle, |state| {
            let value = Override::from_code(override_).ok_or_else(|| {
                Error::invalid(format!("placement override {override_} is not one of 0..2"))
            })?;
            state.pipeline.set_override(text(name, "name")?, value)
        })
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_pipeline_set_stage_need(
    handle: *mut PipelineHandle,
    name: *const c_char,
    bytes: u64,
) -> c_int {
    boundary(|| {
        with_pipeline(handle, |state| {
            state.pipeline.set_stage_need(text(name, "name")?, bytes)
        })
    })
}

macro_rules! pipeline_call {
    ($name:ident, $method:ident) => {
        #[no_mangle]
        pub extern "C" fn $name(handle: *mut PipelineHandle) -> c_int {
            boundary(|| with_pipeline(handle, |state| state.pipeline.$method()))
        }
    };
}

macro_rules! pipeline_stage_call {
    ($name:ident, $method:ident) => {
        #[no_mangle]
        pub extern "C" fn $name(handle: *mut PipelineHandle, name: *const c_char) -> c_int {
            boundary(|| with_pipeline(handle, |state| state.pipeline.$method(text(name, "name")?)))
        }
    };
}

pipeline_call!(offload_engine_pipeline_run_begin, run_begin);
pipeline_call!(offload_engine_pipeline_run_end, run_end);
pipeline_stage_call!(offload_engine_pipeline_stage_begin, stage_begin);
pipeline_stage_call!(offload_engine_pipeline_stage_end, stage_end);

#[no_mangle]
pub extern "C" fn offload_engine_pipeline_component_info(
    handle: *mut PipelineHandle,
    name: *const c_char,
    info_out: *mut ComponentInfoC,
) -> c_int {
    boundary(|| {
        with_pipeline(handle, |state| {
            let slot = result_slot(info_out, "component info")?;
            let info = state.pipeline.component(text(name, "name")?)?;
            state.last_name = c_string(&info.name);
            *slot = ComponentInfoC {
                size: slot.size,
                name: state.last_name.as_ptr(),
                role: info.role as c_int,
                placement: match info.placement {
                    Placement::Off => 0,
                    Placement::Resident => 1,
                    Placement::Streaming => 2,
                },
                device_bytes: info.device_bytes,
                resident_bytes: info.resident_bytes,
                stage_need_bytes: info.stage_need_bytes,
                loads: info.loads,
                unloads: info.unloads,
                streamed_layers: info.streamed_layers,
            };
            Ok(())
        })
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_pipeline_get_stats(
    handle: *mut PipelineHandle,
    stats_out: *mut PipelineStatsC,
) -> c_int {
    boundary(|| {
        with_pipeline(handle, |state| {
            let slot = result_slot(stats_out, "pipeline stats")?;
            slot.stats = state.pipeline.stats();
            Ok(())
        })
    })
}
