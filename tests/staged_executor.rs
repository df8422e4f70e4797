//! The C ABI's three-stage executor, driven through the exported functions with callbacks
//! that build the demo model's graphs: streamed output equals the engine-free reference.
// C structs are filled field by field after `Default`, as C callers do after `_init`.
#![allow(clippy::field_reassign_with_default)]

mod builtin_models;

use std::cell::RefCell;
use std::ffi::{c_int, c_void, CStr};
use std::ptr;

use builtin_models::{run_reference, Architecture, DemoConfig, DemoModel};
use offload_engine::executor::{InputFill, LayeredModel};
use offload_engine::ffi::*;
use offload_engine::ggml as sys;

struct Host {
    model: DemoModel,
    pending: RefCell<Vec<InputFill>>,
}

/// The `user` pointer every callback gets is the test's `Host`.
fn host<'a>(user: *mut c_void) -> &'a Host {
    // SAFETY: the tests pass a pointer to a `Host` that outlives the run_pass call the
    // callbacks are invoked from.
    unsafe { &*(user as *const Host) }
}

unsafe extern "C" fn build_input(
    user: *mut c_void,
    ctx: *mut sys::ggml_context,
) -> *mut sys::ggml_tensor {
    let host = host(user);
    // SAFETY: the engine hands a valid no-alloc context for this callback.
    let (x, fills) = unsafe { host.model.build_input(ctx) };
    *host.pending.borrow_mut() = fills;
    x
}

unsafe extern "C" fn set_inputs(user: *mut c_void) -> c_int {
    let host = host(user);
    for fill in host.pending.borrow_mut().drain(..) {
        // SAFETY: the input graph is allocated (set_inputs runs after that); the bytes match
        // the tensor they were made for.
        unsafe {
            sys::ggml_backend_tensor_set(
                fill.tensor,
                fill.bytes.as_ptr().cast(),
                0,
                fill.bytes.len(),
            )
        };
    }
    0
}

unsafe extern "C" fn build_layer(
    user: *mut c_void,
    ctx: *mut sys::ggml_context,
    layer: u64,
    x: *mut sys::ggml_tensor,
) -> *mut sys::ggml_tensor {
    // SAFETY: a valid no-alloc context and the activation tensor the engine built.
    unsafe { host(user).model.build_layer(ctx, layer as usize, x) }
}

unsafe extern "C" fn build_output(
    user: *mut c_void,
    ctx: *mut sys::ggml_context,
    x: *mut sys::ggml_tensor,
) -> *mut sys::ggml_tensor {
    // SAFETY: as in build_layer.
    unsafe { host(user).model.build_output(ctx, x) }
}

unsafe extern "C" fn build_layer_null(
    _: *mut c_void,
    _: *mut sys::ggml_context,
    _: u64,
    _: *mut sys::ggml_tensor,
) -> *mut sys::ggml_tensor {
    ptr::null_mut()
}

fn last_error() -> String {
    // SAFETY: the library returns a NUL-terminated string valid until the next failure here.
    unsafe { CStr::from_ptr(offload_engine_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn staged(host: &Host) -> StagedModelC {
    StagedModelC {
        size: std::mem::size_of::<StagedModelC>(),
        user: host as *const Host as *mut c_void,
        layer_count: host.model.layer_count() as u64,
        activation_ne: host.model.activation_shape(),
        build_input: Some(build_input),
        set_inputs: Some(set_inputs),
        build_layer: Some(build_layer),
        build_output: Some(build_output),
    }
}

#[test]
fn staged_executor_through_the_c_abi_matches_the_reference() {
    let host = Host {
        model: DemoModel::new(DemoConfig::tiny(Architecture::Flux)).unwrap(),
        pending: RefCell::new(Vec::new()),
    };
    let backend = offload_engine::backend::Device::select(Some("CPU"))
        .unwrap()
        .init_backend()
        .unwrap();
    backend.set_threads(1);
    let reference = run_reference(&host.model, &backend, 1).unwrap();

    let mut rp = RegistryParams::default();
    offload_engine_registry_params_init(&mut rp);
    let mut registry = ptr::null_mut();
    assert_eq!(offload_engine_registry_new(&rp, &mut registry), 0);
    assert_eq!(
        offload_engine_registry_add_context(registry, host.model.context(), ptr::null_mut()),
        0,
        "{}",
        last_error()
    );

    let mut ep = EngineParamsC::default();
    offload_engine_engine_params_init(&mut ep);
    ep.device = c"CPU".as_ptr();
    ep.budget_bytes = host.model.weight_bytes() / 3;
    let mut engine = ptr::null_mut();
    assert_eq!(
        offload_engine_engine_new(&ep, registry, &mut engine),
        0,
        "{}",
        last_error()
    );
    offload_engine_registry_free(registry);

    let mut pp = PlanParams::default();
    offload_engine_plan_params_init(&mut pp);
    pp.prefetch_depth = 2;
    let mut plan = ptr::null_mut();
    assert_eq!(
        offload_engine_engine_prepare(engine, &pp, &mut plan),
        0,
        "{}",
        last_error()
    );
    let mut summary = PlanSummary::default();
    summary.size = std::mem::size_of::<PlanSummary>();
    assert_eq!(offload_engine_plan_get_summary(plan, &mut summary), 0);
    assert_eq!(summary.mode, 1, "streaming");
    offload_engine_plan_free(plan);

    let model = staged(&host);
    let mut size = 0usize;
    assert_eq!(
        offload_engine_engine_run_pass(engine, &model, ptr::null_mut(), 0, &mut size),
        0,
        "{}",
        last_error()
    );
    assert_eq!(size, reference.len());
    for _ in 0..2 {
        let mut out = vec![0u8; size];
        let status = offload_engine_engine_run_pass(
            engine,
            &model,
            out.as_mut_ptr().cast(),
            out.len(),
            ptr::null_mut(),
        );
        assert_eq!(status, 0, "{}", last_error());
        assert!(out == reference, "streamed output differs");
    }
    let mut small = vec![0u8; 4];
    assert_eq!(
        offload_engine_engine_run_pass(
            engine,
            &model,
            small.as_mut_ptr().cast(),
            4,
            ptr::null_mut()
        ),
        1
    );

    // A callback that returns NULL is an error, not an abort, and the engine stays usable.
    let mut broken = staged(&host);
    broken.build_layer = Some(build_layer_null);
    assert_eq!(
        offload_engine_engine_run_pass(engine, &broken, ptr::null_mut(), 0, ptr::null_mut()),
        1
    );
    assert!(last_error().contains("NULL"), "{}", last_error());
    let mut wrong_count = staged(&host);
    wrong_count.layer_count += 1;
    assert_eq!(
        offload_engine_engine_run_pass(engine, &wrong_count, ptr::null_mut(), 0, ptr::null_mut()),
        1
    );
    let mut wrong_shape = staged(&host);
    wrong_shape.activation_ne[0] *= 2;
    assert_eq!(
        offload_engine_engine_run_pass(engine, &wrong_shape, ptr::null_mut(), 0, ptr::null_mut()),
        1
    );
    assert!(last_error().contains("elements"), "{}", last_error());
    let mut out = vec![0u8; size];
    assert_eq!(
        offload_engine_engine_run_pass(
            engine,
            &model,
            out.as_mut_ptr().cast(),
            out.len(),
            ptr::null_mut()
        ),
        0,
        "{}",
        last_error()
    );
    assert!(out == reference);

    let mut stats = StatsC::default();
    stats.size = std::mem::size_of::<StatsC>();
    assert_eq!(offload_engine_engine_stats(engine, &mut stats), 0);
    assert_eq!(
        stats.passes, 5,
        "size query, two runs, the too-small buffer, the last run"
    );
    assert!(stats.layer_loads > 0);
    offload_engine_engine_free(engine);
}

/// The header's rule: calls on one handle must not overlap. An overlapping call gets
/// OFFLOAD_ENGINE_ERR_INVALID_STATE instead of a data race.
#[test]
fn overlapping_calls_on_one_engine_are_refused_not_raced() {
    let host = Host {
        model: DemoModel::new(DemoConfig::tiny(Architecture::Llama)).unwrap(),
        pending: RefCell::new(Vec::new()),
    };
    let mut rp = RegistryParams::default();
    offload_engine_registry_params_init(&mut rp);
    let mut registry = ptr::null_mut();
    assert_eq!(offload_engine_registry_new(&rp, &mut registry), 0);
    assert_eq!(
        offload_engine_registry_add_context(registry, host.model.context(), ptr::null_mut()),
        0
    );
    let mut ep = EngineParamsC::default();
    offload_engine_engine_params_init(&mut ep);
    ep.device = c"CPU".as_ptr();
    ep.budget_bytes = host.model.weight_bytes() / 3;
    let mut engine = ptr::null_mut();
    assert_eq!(offload_engine_engine_new(&ep, registry, &mut engine), 0);
    offload_engine_registry_free(registry);
    let mut pp = PlanParams::default();
    offload_engine_plan_params_init(&mut pp);
    assert_eq!(
        offload_engine_engine_prepare(engine, &pp, ptr::null_mut()),
        0
    );

    // One thread runs passes while others hammer the same handle with stats queries.
    let handle = engine as usize;
    let model = staged(&host);
    let model_ptr = &model as *const StagedModelC as usize;
    let statuses: Vec<Vec<c_int>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..3)
            .map(|_| {
                scope.spawn(move || {
                    (0..2000)
                        .map(|_| {
                            let mut stats = StatsC::default();
                            stats.size = std::mem::size_of::<StatsC>();
                            offload_engine_engine_stats(handle as *mut EngineHandle, &mut stats)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let runner = scope.spawn(move || {
            (0..20)
                .map(|_| {
                    // SAFETY: points at the StagedModelC this test built, alive during the call.
                    let m = unsafe { &*(model_ptr as *const StagedModelC) };
                    offload_engine_engine_run_pass(
                        handle as *mut EngineHandle,
                        m,
                        ptr::null_mut(),
                        0,
                        ptr::null_mut(),
                    )
                })
                .collect::<Vec<_>>()
        });
        let mut all: Vec<Vec<c_int>> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        all.push(runner.join().unwrap());
        all
    });
    let flat: Vec<c_int> = statuses.into_iter().flatten().collect();
    assert!(
        flat.iter().all(|&s| s == 0 || s == 10),
        "only OK or INVALID_STATE: {flat:?}"
    );
    assert!(flat.contains(&0));
    offload_engine_engine_free(engine);
    // A freed handle is recognised as such from any thread.
    let mut stats = StatsC::default();
    stats.size = std::mem::size_of::<StatsC>();
    assert_eq!(offload_engine_engine_stats(engine, &mut stats), 3);
}
