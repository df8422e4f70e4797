//! Streaming correctness on the CPU backend: every budget and prefetch depth gives outputs
//! bit-identical to the fully resident run.

mod builtin_models;

use std::sync::Mutex;

use builtin_models::{run_reference, run_with_engine, Architecture, DemoConfig, DemoModel};
use offload_engine::engine::{Engine, EngineParams};
use offload_engine::error::Status;
use offload_engine::faults::{self, Fault};
use offload_engine::planner::{Link, Mode, Workload};

/// Fault injection is process-wide: engine tests run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The device under test: the CPU unless OFFLOAD_ENGINE_TEST_DEVICE names another
/// (tests/gpu/run.sh sets CUDA0).
fn test_device() -> String {
    std::env::var("OFFLOAD_ENGINE_TEST_DEVICE").unwrap_or_else(|_| "CPU".into())
}

/// The outputs every streamed run must match bit for bit: on the CPU the run without any
/// engine; on another device the fully resident run there (kernels differ between devices).
fn reference(model: &DemoModel, passes: usize) -> Vec<u8> {
    if test_device() == "CPU" {
        return run_reference(model, &cpu_backend(), passes).unwrap();
    }
    let roomy = params(model.weight_bytes() * 4, 1);
    let run = run_with_engine(model, roomy, &workload(1, 1), passes, None).unwrap();
    assert_eq!(run.plan.mode, Mode::Full);
    run.output
}

fn params(budget: u64, depth: u32) -> EngineParams {
    builtin_models::engine_params(&test_device(), budget, depth)
}

fn workload(depth: u32, passes_per_step: u32) -> Workload {
    builtin_models::workload(2, passes_per_step, depth)
}

fn cpu_backend() -> offload_engine::backend::Backend {
    let backend = offload_engine::backend::Device::select(Some("CPU"))
        .unwrap()
        .init_backend()
        .unwrap();
    backend.set_threads(1);
    backend
}

/// Budgets covering: everything fits, some layers resident, only the global group plus slots.
fn budgets(model: &DemoModel) -> Vec<(&'static str, u64)> {
    let w = model.weight_bytes();
    vec![("full", w * 2), ("partial", w * 2 / 3), ("tight", w / 3)]
}

fn check_bit_identical(architecture: Architecture) {
    let _guard = serial();
    let model = DemoModel::new(DemoConfig::tiny(architecture)).unwrap();
    let reference = reference(&model, 3);
    let mut modes = Vec::new();
    for (label, budget) in budgets(&model) {
        for depth in [0u32, 1, 3] {
            let run = run_with_engine(&model, params(budget, depth), &workload(depth, 1), 3, None)
                .unwrap_or_else(|e| panic!("{label} budget, depth {depth}: {e}"));
            assert!(
                run.output == reference,
                "{architecture:?}: output differs at {label} budget, prefetch depth {depth}"
            );
            assert!(run.stats.arena_peak_bytes <= run.stats.arena_bytes);
            assert!(
                run.plan.arena_bytes <= budget,
                "arena {} over budget {budget}",
                run.plan.arena_bytes
            );
            modes.push((label, run.plan.mode, run.plan.resident_layers.len()));
        }
    }
    // The budgets really exercised each regime.
    assert!(modes.iter().any(|m| m.1 == Mode::Full));
    assert!(
        modes.iter().any(|m| m.1 == Mode::Streaming && m.2 > 0),
        "{modes:?}"
    );
    // (Zero resident layers is covered by only_two_slots_still_bit_identical.)
}

#[test]
fn llama_style_streaming_is_bit_identical() {
    check_bit_identical(Architecture::Llama);
}

#[test]
fn flux_style_streaming_is_bit_identical() {
    check_bit_identical(Architecture::Flux);
}

#[test]
fn only_two_slots_still_bit_identical() {
    let _guard = serial();
    let model = DemoModel::new(DemoConfig::tiny(Architecture::Flux)).unwrap();
    let reference = reference(&model, 2);
    // Find the smallest budget that still plans: global + two slots of the largest layer.
    let mut budget = model.weight_bytes() / 8;
    let run = loop {
        match run_with_engine(&model, params(budget, 1), &workload(1, 1), 2, None) {
            Ok(run) => break run,
            Err(e) if e.status == Status::InsufficientMemory => budget += budget / 16,
            Err(e) => panic!("{e}"),
        }
    };
    assert!(run.plan.slot_count <= 2, "slots {}", run.plan.slot_count);
    assert_eq!(run.plan.resident_layers.len(), 0);
    assert_eq!(run.output, reference);
}

#[test]
fn impossible_budget_is_refused_before_any_compute() {
    let _guard = serial();
    let model = DemoModel::new(DemoConfig::tiny(Architecture::Llama)).unwrap();
    let mut engine = Engine::new(params(4096, 1)).unwrap();
    // SAFETY: the model outlives the engine.
    unsafe { engine.register_context(model.context()).unwrap() };
    let err = engine
        .prepare(&workload(1, 1), &Link::named("ddr4").unwrap())
        .unwrap_err();
    assert_eq!(err.status, Status::InsufficientMemory);
    assert!(
        err.message.contains("B"),
        "message names sizes: {}",
        err.message
    );
    assert_eq!(
        engine.begin_pass().unwrap_err().status,
        Status::InvalidState
    );
}

#[test]
fn second_pass_of_a_step_recopies_no_resident_layer() {
    let _guard = serial();
    let model = DemoModel::new(DemoConfig::tiny(Architecture::Llama)).unwrap();
    let budget = model.weight_bytes() * 2 / 3;
    let run = run_with_engine(&model, params(budget, 1), &workload(1, 2), 4, None).unwrap();
    assert_eq!(run.plan.mode, Mode::Streaming);
    assert!(!run.plan.resident_layers.is_empty());
    for (i, layer) in run.stats.layers.iter().enumerate() {
        if layer.resident {
            assert_eq!(
                layer.loads, 0,
                "resident layer {i} was copied during the run"
            );
        } else if i < model_layers(&model) {
            assert_eq!(layer.loads, 4, "streamed layer {i} loads once per pass");
        }
    }
}

fn model_layers(model: &DemoModel) -> usize {
    use offload_engine::executor::LayeredModel;
    model.layer_count()
}

#[test]
fn misuse_of_the_pass_protocol_is_an_error() {
    let _guard = serial();
    let model = DemoModel::new(DemoConfig::tiny(Architecture::Llama)).unwrap();
    let mut engine = Engine::new(params(model.weight_bytes() / 2, 1)).unwrap();
    // SAFETY: the model outlives the engine.
    unsafe { engine.register_context(model.context()).unwrap() };
    assert_eq!(
        engine.begin_layer(0).unwrap_err().status,
        Status::InvalidState
    );
    engine
        .prepare(&workload(1, 1), &Link::named("ddr4").unwrap())
        .unwrap();
    assert_eq!(
        engine.begin_layer(0).unwrap_err().status,
        Status::InvalidState
    );
    assert_eq!(engine.end_pass().unwrap_err().status, Status::InvalidState);
    engine.begin_pass().unwrap();
    assert_eq!(
        engine.begin_pass().unwrap_err().status,
        Status::InvalidState
    );
    assert_eq!(
        engine.end_layer(0).unwrap_err().status,
        Status::InvalidState
    );
    assert_eq!(
        engine.begin_layer(999).unwrap_err().status,
        Status::NotFound
    );
    engine.begin_layer(0).unwrap();
    assert_eq!(
        engine.begin_layer(1).unwrap_err().status,
        Status::InvalidState
    );
    assert_eq!(
        engine.end_layer(1).unwrap_err().status,
        Status::InvalidState
    );
    // Dropping the engine with a layer open and prefetches in flight must be clean.
}

#[test]
fn failed_copy_leaves_the_engine_usable() {
    let _guard = serial();
    let model = DemoModel::new(DemoConfig::tiny(Architecture::Llama)).unwrap();
    let reference = reference(&model, 1);
    for fault in [Fault::Copy, Fault::CopyThreadPanic] {
        let mut engine = Engine::new(params(model.weight_bytes() / 3, 1)).unwrap();
        // SAFETY: the model outlives the engine.
        unsafe { engine.register_context(model.context()).unwrap() };
        engine
            .prepare(&workload(1, 1), &Link::named("ddr4").unwrap())
            .unwrap();
        faults::arm(fault, 2);
        let mut executor =
            offload_engine::executor::Executor::new(engine.backend(), [64, 4]).unwrap();
        let err = executor.run_pass(&model, Some(&mut engine)).unwrap_err();
        faults::disarm_all();
        assert!(
            matches!(err.status, Status::Backend | Status::Internal),
            "{err}"
        );
        engine.offload_all().unwrap();
        // After the failure, a full pass works and gives the reference output.
        let out = executor.run_pass(&model, Some(&mut engine)).unwrap();
        assert_eq!(out, reference, "{fault:?}");
    }
}

#[test]
fn device_allocation_failure_retries_with_fewer_resident_layers() {
    let _guard = serial();
    let model = DemoModel::new(DemoConfig::tiny(Architecture::Llama)).unwrap();
    let reference = reference(&model, 1);
    faults::arm(Fault::DeviceAlloc, 1);
    let run = run_with_engine(
        &model,
        params(model.weight_bytes() * 2 / 3, 1),
        &workload(1, 1),
        1,
        None,
    );
    faults::disarm_all();
    let run = run.unwrap();
    assert_eq!(run.output, reference);
    // The plan returned is the one carried out, re-made for less memory.
    assert!(
        run.plan.message.starts_with(run.plan.mode.as_str()),
        "{}",
        run.plan.message
    );
    assert!(run.plan.slot_bytes > 0 || run.plan.mode == Mode::Full);
    assert_eq!(
        run.plan.resident_layers.len() + run.plan.streamed_layers.len(),
        run.stats.layers.len() - 1
    );
}

#[test]
fn staged_homes_are_bit_identical_and_a_failed_staging_falls_back() {
    let _guard = serial();
    let model = DemoModel::new(DemoConfig::tiny(Architecture::Llama)).unwrap();
    let reference = reference(&model, 2);
    let budget = model.weight_bytes() / 3;
    let mut staged = params(budget, 1);
    staged.pinned_limit_bytes = Some(model.weight_bytes() / 4);
    let run = run_with_engine(&model, staged.clone(), &workload(1, 1), 2, None).unwrap();
    assert_eq!(run.output, reference);
    assert!(
        run.stats.staged_bytes > 0,
        "some streamed layers copy from staging"
    );
    assert!(run.stats.staged_bytes <= model.weight_bytes() / 4);

    staged.pinned_limit_bytes = Some(u64::MAX);
    faults::arm(Fault::DeviceAlloc, 1); // the staging allocation comes first
    let run = run_with_engine(&model, staged, &workload(1, 1), 2, None);
    faults::disarm_all();
    let run = run.unwrap();
    assert_eq!(run.stats.staged_bytes, 0, "fell back to the host's memory");
    assert_eq!(run.output, reference);
}

#[test]
fn copies_overlap_compute_in_the_trace() {
    let _guard = serial();
    let config = DemoConfig {
        hidden: 256,
        ffn: 704,
        layers: 8,
        tokens: 32,
        ..DemoConfig::tiny(Architecture::Llama)
    };
    let model = DemoModel::new(config).unwrap();
    let mut p = params(model.weight_bytes() / 3, 2);
    p.trace = true;
    // Whether the copy thread gets a core while a layer computes is up to the scheduler; on a
    // machine busy with other work one run may see no overlap, so a few runs get the chance.
    let mut overlapped = false;
    for _ in 0..5 {
        let run = run_with_engine(&model, p.clone(), &workload(2, 1), 3, None).unwrap();
        assert_eq!(run.plan.mode, Mode::Streaming);
        assert!(run.stats.prefetch_hits > 0);
        if run.overlap_us > 0 {
            overlapped = true;
            break;
        }
    }
    assert!(overlapped, "no copy ran while a layer computed in 5 runs");
}

#[test]
fn replanning_between_runs_uses_measured_figures() {
    let _guard = serial();
    let model = DemoModel::new(DemoConfig::tiny(Architecture::Llama)).unwrap();
    let reference = reference(&model, 1);
    let mut engine = Engine::new(params(model.weight_bytes() / 2, 1)).unwrap();
    // SAFETY: the model outlives the engine.
    unsafe { engine.register_context(model.context()).unwrap() };
    let link = Link::named("pcie4-x16").unwrap();
    let first = engine.prepare(&workload(1, 1), &link).unwrap().clone();
    assert!(!first.compute_measured);
    let mut executor = offload_engine::executor::Executor::new(engine.backend(), [64, 4]).unwrap();
    executor.run_pass(&model, Some(&mut engine)).unwrap();
    engine.begin_pass().unwrap();
    assert_eq!(
        engine.prepare(&workload(1, 1), &link).unwrap_err().status,
        Status::InvalidState,
        "no re-plan with a pass open"
    );
    engine.offload_all().unwrap();
    let second = engine.prepare(&workload(1, 1), &link).unwrap().clone();
    assert!(second.compute_measured, "{}", second.message);
    assert!(second.link.measured, "{}", second.message);
    assert!(second.message.contains("measured"), "{}", second.message);
    assert_eq!(
        executor.run_pass(&model, Some(&mut engine)).unwrap(),
        reference
    );
}

#[test]
fn link_and_graph_measurements() {
    let _guard = serial();
    let device = offload_engine::backend::Device::select(Some(&test_device())).unwrap();
    let (pageable, pinned) = offload_engine::engine::measure_link(&device, 8 << 20).unwrap();
    assert!(pageable.is_finite() && pageable > 0.0);
    // Pinned figures exactly where the device offers pinned host memory (not the CPU).
    assert_eq!(pinned.is_some(), device.pinned_host, "{pinned:?}");
    if let Some(pinned) = pinned {
        println!(
            "{}: pageable {pageable:.2} GB/s, pinned {pinned:.2} GB/s",
            device.name
        );
    }

    use offload_engine::executor::LayeredModel;
    use offload_engine::ggml as sys;
    let model = DemoModel::new(DemoConfig::tiny(Architecture::Llama)).unwrap();
    let engine = Engine::new(params(model.weight_bytes(), 1)).unwrap();
    // SAFETY: a metadata-only context for one layer's graph, freed below.
    unsafe {
        let ctx = sys::ggml_init(sys::ggml_init_params {
            mem_size: 1 << 20,
            mem_buffer: std::ptr::null_mut(),
            no_alloc: true,
        });
        let x = sys::ggml_new_tensor_2d(ctx, sys::GGML_TYPE_F32, 64, 4);
        let y = model.build_layer(ctx, 0, x);
        let graph = sys::ggml_new_graph(ctx);
        sys::ggml_build_forward_expand(graph, y);
        let bytes = engine.measure_graph(graph).unwrap();
        assert!(bytes >= 64 * 4 * 4, "at least the activation: {bytes}");
        assert!(bytes < 16 << 20, "{bytes}");
        sys::ggml_free(ctx);
    }
}

/// A pipeline component whose device allocation fails when it is placed again: the stage
/// that needed it gets the error, nothing crashes, and the next job runs normally.
#[test]
fn a_failed_component_reload_is_its_stage_error_and_the_pipeline_recovers() {
    use builtin_models::pipeline::{components, reference_outputs, DemoPipeline, CFG_PASSES};
    use offload_engine::pipeline::{OffloadMode, PipelineParams};
    let _guard = serial();
    let parts = components(true, 1).unwrap();
    let want = reference_outputs(&parts, Some(&test_device()), 1).unwrap();
    let params = PipelineParams {
        mode: OffloadMode::Aggressive,
        budget_bytes: Some(1 << 30),
        min_free_bytes: 0,
        margin_bytes: 0,
        passes_per_step: CFG_PASSES,
        // No background reload racing with the armed fault.
        reload_diffusion: false,
        ..Default::default()
    };
    let mut demo = DemoPipeline::new(&parts, params, Some(&test_device()), 1).unwrap();
    assert_eq!(demo.run_job().unwrap(), want);
    faults::arm(Fault::DeviceAlloc, 1);
    let failed = demo.run_job();
    faults::disarm_all();
    let err = failed.unwrap_err();
    assert!(
        matches!(err.status, Status::OutOfMemory | Status::InsufficientMemory),
        "{err:?}"
    );
    assert!(err.message.contains("text_encoder"), "{}", err.message);
    assert_eq!(demo.run_job().unwrap(), want);
    let info = demo.pipeline.component("text_encoder").unwrap();
    assert_eq!(
        info.loads, 2,
        "the failed placement is not counted as a load"
    );
}
