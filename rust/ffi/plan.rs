//! Plan objects: what stays on the device, what streams, and what it costs.

use std::ffi::{c_char, c_int, CString};

use crate::error::{Error, Result};
use crate::ffi::boundary::{
    boundary, boundary_void, c_string, input, optional_text, out, result_slot, sized_structs,
};
use crate::ffi::handles::{checked, publish, retire, Kind};
use crate::ffi::registry::{with_registry, RegistryHandle};
use crate::planner::{self, Budget, Link, Plan, Workload};

sized_structs!(PlanParams, PlanSummary);

#[repr(C)]
pub struct PlanParams {
    pub size: usize,
    pub free_bytes: u64,
    pub total_bytes: u64,
    pub min_free_bytes: u64,
    pub safety_fraction: f64,
    pub compute_reserve_bytes: u64,
    pub persistent_bytes: u64,
    pub steps: u32,
    pub passes_per_step: u32,
    pub prefetch_depth: u32,
    pub link: *const c_char,
    pub link_gbps: f64,
    pub max_resident_layers: u32,
}

#[repr(C)]
pub struct PlanSummary {
    pub size: usize,
    pub mode: c_int,
    pub resident_layer_count: u64,
    pub streamed_layer_count: u64,
    pub slot_count: u32,
    pub slot_bytes: u64,
    pub arena_bytes: u64,
    pub device_bytes: u64,
    pub usable_bytes: u64,
    pub full_cache_bytes: u64,
    pub streaming_bytes: u64,
    pub layer_bytes_max: u64,
    pub bytes_per_pass: u64,
    pub bytes_per_step: u64,
    pub bytes_per_run: u64,
    pub predicted_step_seconds: f64,
    pub placement_bytes: u64,
}

pub struct PlanHandle {
    plan: Plan,
    message: CString,
    layer_count: usize,
}

pub(crate) fn plan_inputs(params: *const PlanParams) -> Result<(Budget, Workload, Link)> {
    let p = input(params, "plan params")?;
    let mut budget = Budget::from_free(p.free_bytes);
    budget.total_bytes = p.total_bytes.max(p.free_bytes);
    budget.min_free_bytes = p.min_free_bytes;
    budget.safety_fraction = p.safety_fraction;
    budget.compute_reserve_bytes = p.compute_reserve_bytes;
    budget.persistent_bytes = p.persistent_bytes;
    let workload = Workload {
        steps: p.steps,
        passes_per_step: p.passes_per_step,
        prefetch_depth: p.prefetch_depth,
        max_resident_layers: (p.max_resident_layers != u32::MAX).then_some(p.max_resident_layers),
        ..Workload::default()
    };
    let link = if p.link_gbps != 0.0 {
        Link::from_gbps(p.link_gbps)?
    } else {
        Link::named(optional_text(p.link, "link")?.unwrap_or("pcie4-x16"))?
    };
    Ok((budget, workload, link))
}

pub(crate) fn publish_plan(
    plan: Plan,
    layer_count: usize,
    plan_out: *mut *mut PlanHandle,
) -> Result<()> {
    let slot = out(plan_out, "plan_out")?;
    let message = c_string(&plan.message);
    *slot = publish(
        PlanHandle {
            plan,
            message,
            layer_count,
        },
        Kind::Plan,
    );
    Ok(())
}

#[no_mangle]
pub extern "C" fn offload_engine_plan_params_init(params: *mut PlanParams) {
    boundary_void(|| {
        if let Ok(p) = out(params, "params") {
            let workload = Workload::default();
            *p = PlanParams {
                size: std::mem::size_of::<PlanParams>(),
                free_bytes: 0,
                total_bytes: 0,
                min_free_bytes: 512 << 20,
                safety_fraction: 0.90,
                compute_reserve_bytes: 0,
                persistent_bytes: 0,
                steps: workload.steps,
                passes_per_step: workload.passes_per_step,
                prefetch_depth: workload.prefetch_depth,
                link: std::ptr::null(),
                link_gbps: 0.0,
                max_resident_layers: u32::MAX,
            };
        }
    });
}

#[no_mangle]
pub extern "C" fn offload_engine_plan_new(
    handle: *mut RegistryHandle,
    params: *const PlanParams,
    plan_out: *mut *mut PlanHandle,
) -> c_int {
    boundary(|| {
        with_registry(handle, |state| {
            let (budget, workload, link) = plan_inputs(params)?;
            out(plan_out, "plan_out")?;
            let model = state.registry.model_cost(false);
            let plan = planner::plan(&model, &budget, &workload, &link)?.into_result()?;
            publish_plan(plan, model.layers.len(), plan_out)
        })
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_plan_free(plan: *mut PlanHandle) {
    boundary_void(|| retire(plan, Kind::Plan));
}

#[no_mangle]
pub extern "C" fn offload_engine_plan_get_summary(
    plan: *const PlanHandle,
    summary_out: *mut PlanSummary,
) -> c_int {
    boundary(|| {
        let h = checked(plan, Kind::Plan)?;
        let slot = result_slot(summary_out, "plan summary")?;
        let p = &h.plan;
        *slot = PlanSummary {
            size: std::mem::size_of::<PlanSummary>(),
            mode: p.mode as c_int,
            resident_layer_count: p.resident_layers.len() as u64,
            streamed_layer_count: p.streamed_layers.len() as u64,
            slot_count: p.slot_count,
            slot_bytes: p.slot_bytes,
            arena_bytes: p.arena_bytes,
            device_bytes: p.device_bytes,
            usable_bytes: p.usable_bytes,
            full_cache_bytes: p.full_cache_bytes,
            streaming_bytes: p.streaming_bytes,
            layer_bytes_max: p.layer_bytes_max,
            bytes_per_pass: p.bytes_per_pass,
            bytes_per_step: p.bytes_per_step,
            bytes_per_run: p.bytes_per_run,
            predicted_step_seconds: p.predicted_step_seconds,
            placement_bytes: p.placement_bytes,
        };
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_plan_layer_resident(
    plan: *const PlanHandle,
    layer: u64,
    resident_out: *mut c_int,
) -> c_int {
    boundary(|| {
        let h = checked(plan, Kind::Plan)?;
        let slot = out(resident_out, "resident_out")?;
        let layer = usize::try_from(layer).unwrap_or(usize::MAX);
        if layer >= h.layer_count {
            return Err(Error::not_found(format!(
                "layer {layer} out of range (plan has {} layers)",
                h.layer_count
            )));
        }
        *slot = c_int::from(h.plan.resident_layers.contains(&layer));
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_plan_message(plan: *const PlanHandle) -> *const c_char {
    let mut result: *const c_char = c"".as_ptr();
    boundary_void(|| {
        if let Ok(h) = checked(plan, Kind::Plan) {
            result = h.message.as_ptr();
        }
    });
    result
}

sized_structs!(AdviceParams, AdviceC);

#[repr(C)]
pub struct AdviceParams {
    pub size: usize,
    pub overflow_bytes: u64,
    pub bits_per_weight: f64,
    pub tokens_per_pass: u32,
    pub link: *const c_char,
    pub link_gbps: f64,
    pub host_memory_gbps: f64,
    pub host_gflops: f64,
    pub device_gflops: f64,
}

#[repr(C)]
pub struct AdviceC {
    pub size: usize,
    pub prefer_cpu: c_int,
    pub stream_seconds: f64,
    pub cpu_seconds: f64,
}

#[no_mangle]
pub extern "C" fn offload_engine_advice_params_init(params: *mut AdviceParams) {
    boundary_void(|| {
        if let Ok(p) = out(params, "params") {
            let machine = planner::Machine::default();
            *p = AdviceParams {
                size: std::mem::size_of::<AdviceParams>(),
                overflow_bytes: 0,
                bits_per_weight: 4.5,
                tokens_per_pass: 1,
                link: std::ptr::null(),
                link_gbps: 0.0,
                host_memory_gbps: machine.host_memory_bandwidth / 1e9,
                host_gflops: machine.host_flops / 1e9,
                device_gflops: machine.device_flops / 1e9,
            };
        }
    });
}

#[no_mangle]
pub extern "C" fn offload_engine_advise(
    params: *const AdviceParams,
    advice_out: *mut AdviceC,
) -> c_int {
    boundary(|| {
        let p = input(params, "advice params")?;
        let slot = result_slot(advice_out, "advice")?;
        let link = if p.link_gbps != 0.0 {
            Link::from_gbps(p.link_gbps)?
        } else {
            Link::named(optional_text(p.link, "link")?.unwrap_or("pcie4-x16"))?
        };
        let machine = planner::Machine {
            host_memory_bandwidth: p.host_memory_gbps * 1e9,
            host_flops: p.host_gflops * 1e9,
            device_flops: p.device_gflops * 1e9,
        };
        let advice = planner::advise_llm(
            p.overflow_bytes,
            p.bits_per_weight,
            p.tokens_per_pass,
            &link,
            &machine,
        )?;
        *slot = AdviceC {
            size: std::mem::size_of::<AdviceC>(),
            prefer_cpu: c_int::from(advice.prefer == "cpu"),
            stream_seconds: advice.stream_seconds,
            cpu_seconds: advice.cpu_seconds,
        };
        Ok(())
    })
}
