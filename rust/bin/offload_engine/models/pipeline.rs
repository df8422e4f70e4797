//! A built-in three-stage pipeline (conditioner, diffusion model run with classifier-free
//! guidance, decoder) on the demo models: `offload-engine pipeline`, and the harness the
//! pipeline tests share.

use std::time::Instant;

use super::{run_reference, Architecture, DemoConfig, DemoModel};
use offload_engine::engine::{Engine, EngineParams};
use offload_engine::error::Result;
use offload_engine::executor::{Executor, LayeredModel};
use offload_engine::pipeline::{
    EngineCell, Pipeline, PipelineParams, Placement, Role, SharedEngine,
};

/// Passes per sampling step: the conditional and the unconditional prediction.
pub const CFG_PASSES: u32 = 2;

/// One component of the demo pipeline and the forward passes its stage runs.
pub struct DemoComponent {
    pub name: &'static str,
    pub role: Role,
    pub model: DemoModel,
    pub passes: u32,
}

/// The three components: a llama-style text encoder, a Flux-style diffusion transformer
/// (run `steps` times two passes) and a small decoder. `tiny` gives models of a few MB.
pub fn components(tiny: bool, steps: u32) -> Result<Vec<DemoComponent>> {
    let mut te = DemoConfig::tiny(Architecture::Llama);
    let mut dit = DemoConfig::tiny(Architecture::Flux);
    let mut vae = DemoConfig::tiny(Architecture::Llama);
    if tiny {
        te.layers = 3;
        (dit.hidden, dit.ffn, dit.layers) = (128, 384, 3);
        vae.layers = 2;
    } else {
        (te.hidden, te.ffn, te.layers) = (512, 1408, 4);
        (dit.hidden, dit.ffn, dit.layers, dit.tokens) = (768, 2048, 4, 16);
        (vae.hidden, vae.ffn, vae.layers) = (256, 704, 3);
    }
    (te.seed, dit.seed, vae.seed) = (11, 12, 13);
    let steps = steps.max(1);
    Ok(vec![
        DemoComponent {
            name: "text_encoder",
            role: Role::Conditioner,
            model: DemoModel::new(te)?,
            passes: 1,
        },
        DemoComponent {
            name: "diffusion_model",
            role: Role::Diffusion,
            model: DemoModel::new(dit)?,
            passes: steps * CFG_PASSES,
        },
        DemoComponent {
            name: "vae",
            role: Role::Decoder,
            model: DemoModel::new(vae)?,
            passes: 1,
        },
    ])
}

/// Each stage's output without any engine.
pub fn reference(components: &[DemoComponent], threads: i32) -> Result<Vec<Vec<u8>>> {
    let backend = offload_engine::backend::Device::select(Some("CPU"))?.init_backend()?;
    backend.set_threads(threads);
    components
        .iter()
        .map(|c| run_reference(&c.model, &backend, c.passes as usize))
        .collect()
}

/// The outputs every mode must reproduce on `device`: on the CPU the engine-free run; on
/// another device (whose kernels round differently) everything resident there, moving
/// nothing.
pub fn reference_outputs(
    components: &[DemoComponent],
    device: Option<&str>,
    threads: i32,
) -> Result<Vec<Vec<u8>>> {
    if offload_engine::backend::Device::select(device)?.kind
        == offload_engine::backend::DeviceKind::Cpu
    {
        return reference(components, threads);
    }
    let all: u64 = components.iter().map(|c| c.model.weight_bytes()).sum();
    let params = PipelineParams {
        budget_bytes: Some(all.saturating_mul(2)),
        min_free_bytes: 0,
        margin_bytes: 0,
        ..Default::default()
    };
    DemoPipeline::new(components, params, device, threads)?.run_job()
}

/// The components' engines in a pipeline, and a job runner.
pub struct DemoPipeline<'a> {
    pub pipeline: Pipeline,
    pub engines: Vec<SharedEngine>,
    components: &'a [DemoComponent],
    /// Each stage's placement when it began, in order, over all jobs.
    pub seen: Vec<Placement>,
    /// Wall time of each stage of the last job.
    pub stage_seconds: Vec<f64>,
}

impl<'a> DemoPipeline<'a> {
    pub fn new(
        components: &'a [DemoComponent],
        params: PipelineParams,
        device: Option<&str>,
        threads: i32,
    ) -> Result<DemoPipeline<'a>> {
        let mut pipeline = Pipeline::new(params)?;
        let mut engines = Vec::new();
        for c in components {
            let mut engine = Engine::new(EngineParams {
                device: device.map(str::to_string),
                compute_threads: threads,
                ..Default::default()
            })?;
            // SAFETY: the components outlive this pipeline (borrowed for 'a), so their tensors
            // outlive the engines.
            unsafe { engine.register_context(c.model.context())? };
            let engine = EngineCell::new(engine);
            pipeline.add(c.name, c.role, engine.clone())?;
            engines.push(engine);
        }
        Ok(DemoPipeline {
            pipeline,
            engines,
            components,
            seen: Vec::new(),
            stage_seconds: Vec::new(),
        })
    }

    /// One job: every stage runs its passes through its engine. Returns each stage's output.
    pub fn run_job(&mut self) -> Result<Vec<Vec<u8>>> {
        self.pipeline.run_begin()?;
        let result = self.run_stages();
        // A failed stage leaves the run open; close it so the pipeline stays usable.
        let closed = self.pipeline.run_end();
        let outputs = result?;
        closed?;
        Ok(outputs)
    }

    fn run_stages(&mut self) -> Result<Vec<Vec<u8>>> {
        let mut outputs = Vec::new();
        self.stage_seconds.clear();
        for (c, engine) in self.components.iter().zip(&self.engines) {
            let started = Instant::now();
            self.pipeline.stage_begin(c.name)?;
            self.seen.push(self.pipeline.component(c.name)?.placement);
            let ran = (|| {
                let mut engine = engine.lock()?;
                let mut executor = Executor::new(engine.backend(), c.model.activation_shape())?;
                let mut out = Vec::new();
                for _ in 0..c.passes {
                    out = executor.run_pass(&c.model, Some(&mut engine))?;
                }
                Ok(out)
            })();
            let ended = self.pipeline.stage_end(c.name);
            outputs.push(ran?);
            ended?;
            self.stage_seconds.push(started.elapsed().as_secs_f64());
        }
        Ok(outputs)
    }
}
