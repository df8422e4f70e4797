//! Pipelines on the CPU backend: three components (conditioner, diffusion model, decoder)
//! through every offload mode and several budgets give the outputs of the engine-free run,
//! move components only when the next stage needs the room, and fail cleanly when nothing
//! fits. Also: run-time weight changes and GGUF files loaded by the registry.

mod builtin_models;

use builtin_models::pipeline::{components, reference, DemoComponent, DemoPipeline};
use builtin_models::{run_reference, Architecture, DemoConfig, DemoModel};
use offload_engine::engine::{Engine, EngineParams};
use offload_engine::error::Status;
use offload_engine::executor::{Executor, LayeredModel};
use offload_engine::pipeline::{OffloadMode, Override, PipelineParams, Placement, Role};
use offload_engine::planner::{Link, Workload};
use offload_engine::registry::Registry;

const STEPS: u32 = 2;
const NAMES: [&str; 3] = ["text_encoder", "diffusion_model", "vae"];

fn cpu_backend() -> offload_engine::backend::Backend {
    let backend = offload_engine::backend::Device::select(Some("CPU"))
        .unwrap()
        .init_backend()
        .unwrap();
    backend.set_threads(1);
    backend
}

fn models() -> Vec<DemoComponent> {
    components(true, STEPS).unwrap()
}

fn setup(m: &[DemoComponent], params: PipelineParams) -> DemoPipeline<'_> {
    DemoPipeline::new(m, params, Some("CPU"), 1).unwrap()
}

fn resident(m: &[DemoComponent]) -> [u64; 3] {
    let mut s = setup(m, PipelineParams::default());
    NAMES.map(|n| s.pipeline.component(n).unwrap().resident_bytes)
}

fn params(mode: OffloadMode, budget: u64) -> PipelineParams {
    PipelineParams {
        mode,
        budget_bytes: Some(budget),
        min_free_bytes: 0,
        margin_bytes: 0,
        steps: STEPS,
        passes_per_step: builtin_models::pipeline::CFG_PASSES,
        ..Default::default()
    }
}

fn unloads(s: &mut DemoPipeline) -> [u64; 3] {
    NAMES.map(|n| s.pipeline.component(n).unwrap().unloads)
}

fn engine_for(model: &DemoModel) -> offload_engine::pipeline::SharedEngine {
    let mut engine = Engine::new(EngineParams {
        device: Some("CPU".into()),
        ..Default::default()
    })
    .unwrap();
    // SAFETY: the models outlive every engine of the test.
    unsafe { engine.register_context(model.context()).unwrap() };
    offload_engine::pipeline::EngineCell::new(engine)
}

#[test]
fn roomy_budget_moves_nothing_in_any_mode_but_aggressive() {
    let m = models();
    let want = reference(&m, 1).unwrap();
    let sizes = resident(&m);
    let roomy = sizes.iter().sum::<u64>() * 2;
    for mode in OffloadMode::ALL {
        let mut s = setup(&m, params(mode, roomy));
        for _ in 0..2 {
            assert_eq!(s.run_job().unwrap(), want, "mode {mode:?}");
        }
        let stats = s.pipeline.stats();
        if mode == OffloadMode::Aggressive {
            assert_eq!(
                unloads(&mut s),
                [2, 2, 2],
                "aggressive leaves after every stage"
            );
        } else {
            assert_eq!(
                unloads(&mut s),
                [0, 0, 0],
                "mode {mode:?} moved with room to spare"
            );
            assert_eq!(stats.loads, 3, "mode {mode:?}: each component loaded once");
        }
        // The decoder (and the diffusion model) went on ahead of their stages.
        assert!(stats.prefetched_loads >= 1, "mode {mode:?}: {stats:?}");
    }
}

#[test]
fn tight_budget_moves_what_the_mode_allows_and_refuses_the_rest() {
    let m = models();
    let want = reference(&m, 1).unwrap();
    let [te, dit, vae] = resident(&m);
    // The diffusion model fits with the decoder but not beside the text encoder.
    let budget = dit + vae.max(te.min(dit) / 2).max(vae);
    assert!(
        budget < te + dit,
        "test sizes: te {te}, dit {dit}, vae {vae}"
    );

    let mut s = setup(&m, params(OffloadMode::None, budget));
    let err = s.run_job().unwrap_err();
    assert_eq!(err.status, Status::InsufficientMemory, "{}", err.message);
    assert!(
        err.message.contains("diffusion_model") && err.message.contains("layer_streaming"),
        "{}",
        err.message
    );
    // The pipeline stays usable: the failed stage never opened, the job closed its run.
    s.pipeline.run_begin().unwrap();
    s.pipeline.stage_begin("text_encoder").unwrap();
    s.pipeline.stage_end("text_encoder").unwrap();
    s.pipeline.run_end().unwrap();
    drop(s); // a model's tensors belong to one live engine at a time

    for mode in [OffloadMode::CondOnly, OffloadMode::CondDiffusion] {
        let mut s = setup(&m, params(mode, budget));
        assert_eq!(s.run_job().unwrap(), want, "mode {mode:?}");
        assert_eq!(unloads(&mut s)[0], 1, "mode {mode:?}: te left for the dit");
        let stats = s.pipeline.stats();
        assert!(stats.peak_device_bytes <= budget, "{stats:?}");
        assert!(stats.prefetched_loads >= 1, "{stats:?}");
    }

    // Overrides: keeping the text encoder makes cond_only fail like none.
    let mut s = setup(&m, params(OffloadMode::CondOnly, budget));
    s.pipeline
        .set_override("text_encoder", Override::Keep)
        .unwrap();
    assert_eq!(s.run_job().unwrap_err().status, Status::InsufficientMemory);
    drop(s);
    // ...and offloading it makes none work.
    let mut s = setup(&m, params(OffloadMode::None, budget));
    s.pipeline
        .set_override("text_encoder", Override::Offload)
        .unwrap();
    assert_eq!(s.run_job().unwrap(), want);
}

#[test]
fn layer_streaming_runs_a_diffusion_model_larger_than_the_budget() {
    let m = models();
    let want = reference(&m, 1).unwrap();
    let [te, dit, vae] = resident(&m);
    for depth in [0, 1, 3] {
        let budget = (dit * 2 / 3).max(te).max(vae);
        let mut p = params(OffloadMode::LayerStreaming, budget);
        p.prefetch_depth = depth;
        let mut s = setup(&m, p);
        assert_eq!(s.run_job().unwrap(), want, "depth {depth}");
        let info = s.pipeline.component("diffusion_model").unwrap();
        assert_eq!(info.loads, 1);
        assert_eq!(
            s.seen,
            [
                Placement::Resident,
                Placement::Streaming,
                Placement::Resident
            ]
        );
        let stats = s.pipeline.stats();
        assert!(stats.peak_device_bytes <= budget, "{stats:?}");
    }
    // Other modes cannot place it at all.
    let budget = (dit * 2 / 3).max(te).max(vae);
    let mut s = setup(&m, params(OffloadMode::CondDiffusion, budget));
    assert_eq!(s.run_job().unwrap_err().status, Status::InsufficientMemory);
}

#[test]
fn layer_streaming_streams_any_component_that_does_not_fit_and_keeps_the_resident_limit() {
    let m = models();
    let want = reference(&m, 1).unwrap();
    let [te, dit, vae] = resident(&m);
    // The text encoder's stage needs all but two thirds of its size: it streams as the
    // diffusion model would.
    let budget = (dit * 2 / 3).max(te).max(vae);
    let mut s = setup(&m, params(OffloadMode::LayerStreaming, budget));
    s.pipeline
        .set_stage_need("text_encoder", budget - te * 2 / 3)
        .unwrap();
    assert_eq!(s.run_job().unwrap(), want);
    assert_eq!(s.seen[0], Placement::Streaming, "{:?}", s.seen);
    assert!(s.pipeline.stats().peak_device_bytes <= budget);
    drop(s);

    // --resident-layers: the diffusion model streams more layers under a limit of 0.
    let budget = (dit * 2 / 3).max(te).max(vae);
    let streamed = |limit: Option<u32>| {
        let mut p = params(OffloadMode::LayerStreaming, budget);
        p.max_resident_layers = limit;
        let mut s = setup(&m, p);
        assert_eq!(s.run_job().unwrap(), want, "limit {limit:?}");
        assert_eq!(s.seen[1], Placement::Streaming, "limit {limit:?}");
        s.pipeline
            .component("diffusion_model")
            .unwrap()
            .streamed_layers
    };
    let (free, none) = (streamed(None), streamed(Some(0)));
    assert!(
        none > free,
        "{none} streamed layers with no resident layer, {free} without a limit"
    );
}

#[test]
fn reload_policy_between_runs() {
    let m = models();
    let want = reference(&m, 1).unwrap();
    let sizes = resident(&m);
    let roomy = sizes.iter().sum::<u64>() * 2;
    for reload in [true, false] {
        let mut p = params(OffloadMode::Aggressive, roomy);
        p.reload_diffusion = reload;
        let mut s = setup(&m, p);
        assert_eq!(s.run_job().unwrap(), want);
        // run_begin joins the reload the last run_end started.
        s.pipeline.run_begin().unwrap();
        let dit = s.pipeline.component("diffusion_model").unwrap();
        let expected = if reload {
            Placement::Resident
        } else {
            Placement::Off
        };
        assert_eq!(dit.placement, expected, "reload {reload}");
        s.pipeline.run_end().unwrap();
        assert_eq!(s.run_job().unwrap(), want);
    }
}

#[test]
fn sequence_errors_are_reported() {
    let m = models();
    let mut s = setup(&m, params(OffloadMode::None, 1 << 30));
    assert_eq!(
        s.pipeline.stage_begin("text_encoder").unwrap_err().status,
        Status::InvalidState
    );
    s.pipeline.run_begin().unwrap();
    assert_eq!(
        s.pipeline.stage_begin("nope").unwrap_err().status,
        Status::NotFound
    );
    s.pipeline.stage_begin("text_encoder").unwrap();
    assert_eq!(
        s.pipeline
            .stage_begin("diffusion_model")
            .unwrap_err()
            .status,
        Status::InvalidState
    );
    assert_eq!(
        s.pipeline.stage_end("diffusion_model").unwrap_err().status,
        Status::InvalidState
    );
    assert_eq!(
        s.pipeline.run_end().unwrap_err().status,
        Status::InvalidState
    );
    s.pipeline.stage_end("text_encoder").unwrap();
    s.pipeline.run_end().unwrap();
    let other = DemoModel::new(DemoConfig::tiny(Architecture::Llama)).unwrap();
    let dup = s
        .pipeline
        .add("text_encoder", Role::Other, engine_for(&other));
    assert_eq!(dup.unwrap_err().status, Status::AlreadyExists);
    let same = s.pipeline.add("again", Role::Other, s.engines[0].clone());
    assert_eq!(same.unwrap_err().status, Status::AlreadyExists);
}

/// A weight changed at run time (a LoRA merged into it) reaches the next outputs whether its
/// layer is resident or streamed: the engine's output equals the engine-free run over the
/// changed host weights.
#[test]
fn changed_weights_are_not_lost() {
    let backend = cpu_backend();
    for budget_fraction in [1.0, 0.4] {
        let model = DemoModel::new(DemoConfig::tiny(Architecture::Llama)).unwrap();
        let before = run_reference(&model, &backend, 1).unwrap();
        let mut engine = Engine::new(EngineParams {
            device: Some("CPU".into()),
            budget_bytes: Some((model.weight_bytes() as f64 * budget_fraction) as u64 + (1 << 20)),
            ..Default::default()
        })
        .unwrap();
        // SAFETY: the model outlives the engine.
        unsafe { engine.register_context(model.context()).unwrap() };
        let workload = Workload::default();
        engine
            .prepare(&workload, &Link::named("ddr4").unwrap())
            .unwrap();
        let name = "blk.1.ffn_up.weight";
        let id = engine.registry().find(name).unwrap();
        let bytes = engine.registry().tensor(id).unwrap().bytes as usize;
        // f16 zeros: the layer's up projection is switched off.
        engine.update_tensor(name, 0, &vec![0u8; bytes]).unwrap();
        let mut executor = Executor::new(engine.backend(), model.activation_shape()).unwrap();
        let streamed = executor.run_pass(&model, Some(&mut engine)).unwrap();
        drop(executor);
        let after = run_reference(&model, &backend, 1).unwrap();
        assert_ne!(before, after, "the change must matter");
        assert_eq!(streamed, after, "budget fraction {budget_fraction}");
        let err = engine
            .update_tensor(name, bytes as u64, &[0u8; 2])
            .unwrap_err();
        assert_eq!(err.status, Status::InvalidArgument);
        assert_eq!(
            engine
                .update_tensor("no.such.weight", 0, &[0])
                .unwrap_err()
                .status,
            Status::NotFound
        );
    }
}

#[test]
fn registry_loads_gguf_weights_in_memory_or_from_the_file() {
    let dir = std::env::temp_dir().join(format!("oe-pipeline-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny.gguf");
    let model = DemoModel::new(DemoConfig::tiny(Architecture::Llama)).unwrap();
    model.write_gguf(&path).unwrap();
    let expected = {
        let mut r = Registry::new(None);
        r.add_gguf(&path).unwrap()
    };
    let file_bytes = std::fs::read(&path).unwrap();
    let infos = offload_engine::gguf::read_path(&path).unwrap().tensors;
    for file_backed in [false, true] {
        let mut registry = Registry::new(None);
        assert_eq!(registry.load_gguf(&path, file_backed).unwrap(), expected);
        // Loaded weights hold exactly the file's bytes; file-backed ones hold none.
        for info in &infos {
            let entry = registry.tensor(registry.find(&info.name).unwrap()).unwrap();
            let tensor = match entry.source {
                offload_engine::registry::Source::Ggml(t) => t,
                offload_engine::registry::Source::GgmlFile { tensor, .. } => tensor,
                _ => panic!("{} has no ggml tensor", info.name),
            };
            // SAFETY: the registry owns the tensor and its data.
            let data = unsafe { (*tensor).data };
            if file_backed {
                assert!(data.is_null());
            } else {
                // SAFETY: the tensor's data holds `info.bytes` bytes.
                let loaded =
                    unsafe { std::slice::from_raw_parts(data as *const u8, info.bytes as usize) };
                let at = info.offset as usize;
                assert_eq!(
                    loaded,
                    &file_bytes[at..at + info.bytes as usize],
                    "{}",
                    info.name
                );
            }
        }
        let layers = registry.layer_count();
        let mut engine = Engine::with_registry(
            EngineParams {
                device: Some("CPU".into()),
                budget_bytes: Some(model.weight_bytes() / 2),
                ..Default::default()
            },
            registry,
        )
        .unwrap();
        let plan = engine
            .prepare(&Workload::default(), &Link::named("ddr4").unwrap())
            .unwrap()
            .clone();
        assert!(!plan.streamed_layers.is_empty());
        for _ in 0..2 {
            engine.begin_pass().unwrap();
            for l in 0..layers {
                engine.begin_layer(l).unwrap();
                engine.end_layer(l).unwrap();
            }
            engine.end_pass().unwrap();
        }
        let stats = engine.stats().unwrap();
        assert_eq!(stats.layer_loads, 2 * plan.streamed_layers.len() as u64);
        let name = "blk.0.attn_q.weight";
        let status = engine.update_tensor(name, 0, &[0, 0]).map_err(|e| e.status);
        if file_backed {
            assert_eq!(status, Err(Status::Unsupported));
        } else {
            assert_eq!(status, Ok(()));
        }
    }
    let corrupt = dir.join("corrupt.gguf");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.truncate(bytes.len() / 3);
    bytes[8] = 0xff;
    std::fs::write(&corrupt, bytes).unwrap();
    let err = Registry::new(None).load_gguf(&corrupt, false).unwrap_err();
    assert_eq!(err.status, Status::CorruptFile, "{}", err.message);
    std::fs::remove_dir_all(&dir).ok();
}
