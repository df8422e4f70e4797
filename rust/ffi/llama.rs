//! llama.cpp drop-in objects: a hook per model, an eval-callback object per context.

use std::ffi::{c_char, c_int, c_void};
use std::path::Path;

use crate::engine::EngineParams;
use crate::error::Result;
use crate::ffi::boundary::{
    boundary, boundary_void, input, optional_text, out, result_slot, sized_structs, text,
};
use crate::ffi::engine::StatsC;
use crate::ffi::handles::{checked, publish, retire, Kind};
use crate::ffi::plan::{publish_plan, PlanHandle};
use crate::ggml as sys;
use crate::llama::{EvalContext, EvalFn, Hook, LlamaParams};
use crate::planner::Link;

sized_structs!(LlamaParamsC);

/// "Estimate it from the model" for the reserve fields.
const ESTIMATE: u64 = u64::MAX;

#[repr(C)]
pub struct LlamaParamsC {
    pub size: usize,
    pub device: *const c_char,
    pub budget_bytes: u64,
    pub min_free_bytes: u64,
    pub safety_fraction: f64,
    pub prefetch_depth: u32,
    pub trace: c_int,
    pub compute_reserve_bytes: u64,
    pub kv_cache_bytes: u64,
    pub n_ctx: u32,
    pub n_ubatch: u32,
    pub file_backed: c_int,
    pub layer_output_pattern: *const c_char,
    pub tensor_pattern: *const c_char,
    pub link: *const c_char,
    pub link_gbps: f64,
}

pub struct LlamaHandle {
    hook: Hook,
}

pub struct LlamaContextHandle {
    context: EvalContext,
}

fn llama_params(p: &LlamaParamsC) -> Result<LlamaParams> {
    let defaults = LlamaParams::default();
    let link = if p.link_gbps != 0.0 {
        Link::from_gbps(p.link_gbps)?
    } else {
        match optional_text(p.link, "link")? {
            Some(name) => Link::named(name)?,
            None => defaults.link,
        }
    };
    Ok(LlamaParams {
        engine: EngineParams {
            device: optional_text(p.device, "device")?.map(str::to_string),
            budget_bytes: (p.budget_bytes > 0).then_some(p.budget_bytes),
            min_free_bytes: p.min_free_bytes,
            safety_fraction: p.safety_fraction,
            prefetch_depth: p.prefetch_depth,
            trace: p.trace != 0,
            pattern: optional_text(p.tensor_pattern, "tensor_pattern")?.map(str::to_string),
            ..defaults.engine
        },
        compute_reserve_bytes: (p.compute_reserve_bytes != ESTIMATE)
            .then_some(p.compute_reserve_bytes),
        kv_cache_bytes: (p.kv_cache_bytes != ESTIMATE).then_some(p.kv_cache_bytes),
        n_ctx: p.n_ctx,
        n_ubatch: p.n_ubatch,
        file_backed: p.file_backed != 0,
        layer_output_pattern: optional_text(p.layer_output_pattern, "layer_output_pattern")?
            .map(str::to_string),
        link,
    })
}

fn with_hook<R>(handle: *const LlamaHandle, f: impl FnOnce(&Hook) -> Result<R>) -> Result<R> {
    let held = checked(handle, Kind::Llama)?;
    f(&held.hook)
}

#[no_mangle]
pub extern "C" fn offload_engine_llama_params_init(params: *mut LlamaParamsC) {
    boundary_void(|| {
        if let Ok(p) = out(params, "params") {
            let d = LlamaParams::default();
            *p = LlamaParamsC {
                size: std::mem::size_of::<LlamaParamsC>(),
                device: std::ptr::null(),
                budget_bytes: 0,
                min_free_bytes: d.engine.min_free_bytes,
                safety_fraction: d.engine.safety_fraction,
                prefetch_depth: d.engine.prefetch_depth,
                trace: 0,
                compute_reserve_bytes: ESTIMATE,
                kv_cache_bytes: ESTIMATE,
                n_ctx: d.n_ctx,
                n_ubatch: d.n_ubatch,
                file_backed: 0,
                layer_output_pattern: std::ptr::null(),
                tensor_pattern: std::ptr::null(),
                link: std::ptr::null(),
                link_gbps: 0.0,
            };
        }
    });
}

#[no_mangle]
pub extern "C" fn offload_engine_llama_new(
    params: *const LlamaParamsC,
    model_path: *const c_char,
    hook_out: *mut *mut LlamaHandle,
) -> c_int {
    boundary(|| {
        let params = llama_params(input(params, "llama params")?)?;
        let path = text(model_path, "model_path")?;
        let slot = out(hook_out, "hook_out")?;
        let hook = Hook::new(params, Path::new(path))?;
        *slot = publish(LlamaHandle { hook }, Kind::Llama);
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_llama_free(hook: *mut LlamaHandle) {
    boundary_void(|| retire(hook, Kind::Llama));
}

#[no_mangle]
pub extern "C" fn offload_engine_llama_buffer_type(
    hook: *mut LlamaHandle,
    buft_out: *mut sys::ggml_backend_buffer_type_t,
) -> c_int {
    boundary(|| {
        with_hook(hook, |h| {
            *out(buft_out, "buft_out")? = h.buffer_type();
            Ok(())
        })
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_llama_plan(
    hook: *mut LlamaHandle,
    plan_out: *mut *mut PlanHandle,
) -> c_int {
    boundary(|| {
        with_hook(hook, |h| {
            let plan = h.plan()?;
            let layers = plan.resident_layers.len() + plan.streamed_layers.len();
            publish_plan(plan, layers, plan_out)
        })
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_llama_adopt(
    hook: *mut LlamaHandle,
    plan_out: *mut *mut PlanHandle,
) -> c_int {
    boundary(|| {
        with_hook(hook, |h| {
            let plan = h.adopt()?;
            if !plan_out.is_null() {
                let layers = plan.resident_layers.len() + plan.streamed_layers.len();
                publish_plan(plan, layers, plan_out)?;
            }
            Ok(())
        })
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_llama_detach(hook: *mut LlamaHandle) -> c_int {
    boundary(|| with_hook(hook, Hook::detach))
}

#[no_mangle]
pub extern "C" fn offload_engine_llama_stats(
    hook: *mut LlamaHandle,
    stats_out: *mut StatsC,
) -> c_int {
    boundary(|| {
        with_hook(hook, |h| {
            let slot = result_slot(stats_out, "stats")?;
            *slot = StatsC::from(&h.stats()?);
            Ok(())
        })
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_llama_trace_write(
    hook: *mut LlamaHandle,
    path: *const c_char,
) -> c_int {
    boundary(|| {
        let path = text(path, "path")?;
        with_hook(hook, |h| h.write_trace(Path::new(path)))
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_llama_context_new(
    hook: *mut LlamaHandle,
    host_callback: Option<EvalFn>,
    host_user_data: *mut c_void,
    context_out: *mut *mut LlamaContextHandle,
) -> c_int {
    boundary(|| {
        let slot = out(context_out, "context_out")?;
        let context = with_hook(hook, |h| EvalContext::new(h, host_callback, host_user_data))?;
        *slot = publish(LlamaContextHandle { context }, Kind::LlamaContext);
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_llama_context_free(context: *mut LlamaContextHandle) {
    boundary_void(|| retire(context, Kind::LlamaContext));
}

#[no_mangle]
pub extern "C" fn offload_engine_llama_context_status(context: *mut LlamaContextHandle) -> c_int {
    boundary(|| {
        let held = checked(context, Kind::LlamaContext)?;
        held.context.status()
    })
}

/// ggml's eval callback. It cannot return an error, so a bad user pointer is logged (once)
/// and the graph runs on without the engine.
#[no_mangle]
pub extern "C" fn offload_engine_llama_eval(
    tensor: *mut sys::ggml_tensor,
    ask: bool,
    user_data: *mut c_void,
) -> bool {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    // Going on is the answer that changes nothing: do not ask for the node, do not stop.
    let neutral = !ask;
    let mut answer = neutral;
    boundary(|| {
        let held = match checked(user_data as *const LlamaContextHandle, Kind::LlamaContext) {
            Ok(held) => held,
            Err(err) => {
                if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    log::error!(
                        "offload_engine_llama_eval: cb_eval_user_data must be a live \
                         offload_engine_llama_context ({}); graphs run without the engine",
                        err.message
                    );
                }
                return Err(err);
            }
        };
        // SAFETY: ggml's scheduler passes a node of the graph it computes (or NULL, which
        // `eval` handles).
        answer = unsafe { held.context.eval(tensor, ask) };
        Ok(())
    });
    answer
}
