//! A built-in three-stage pipeline (conditioner, diffusion model run with classifier-free
//! guidance, decoder) on the demo models: `offload-engine pipeline`, and the harness the
//! pipeline tests share.

use std::time::Instant;

use crate::demo::{checksum, run_reference, Architecture, DemoConfig, DemoModel};
use crate::engine::{Engine, EngineParams};
use crate::error::{Error, Result, Status};
use crate::executor::{Executor, LayeredModel};
use crate::pipeline::{
    EngineCell, OffloadMode, Pipeline, PipelineParams, Placement, Role, SharedEngine,
};
use crate::units::format_bytes;

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
    let backend = crate::backend::Device::select(Some("CPU"))?.init_backend()?;
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
    if crate::backend::Device::select(device)?.kind == crate::backend::DeviceKind::Cpu {
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

pub struct PipelineDemoOptions {
    /// `None`: every mode in turn.
    pub mode: Option<OffloadMode>,
    /// `None`: room for the diffusion model and the decoder, not the text encoder besides.
    pub budget: Option<u64>,
    pub steps: u32,
    pub runs: u32,
    pub prefetch: u32,
    pub min_free: u64,
    pub log_moves: bool,
    pub reload_diffusion: bool,
    pub device: Option<String>,
    pub threads: i32,
    pub tiny: bool,
}

/// `offload-engine pipeline`: the demo pipeline in each mode under one budget; outputs are
/// compared with the engine-free run. A mode that cannot fit is reported, not fatal.
pub fn run_pipeline_demo(options: &PipelineDemoOptions) -> Result<()> {
    let components = components(options.tiny, options.steps)?;
    for c in &components {
        println!(
            "{:<16} {:<12} {:>2} layers  {:>10}  {} passes per job",
            c.name,
            c.role.name(),
            c.model.config.layers,
            format_bytes(c.model.weight_bytes()),
            c.passes
        );
    }
    let want = reference_outputs(&components, options.device.as_deref(), options.threads)?;
    let want_sum = checksum(&want.concat());
    let budget = match options.budget {
        Some(b) => b,
        None => {
            // Probe the placement sizes once (an unplaced pipeline allocates nothing).
            let mut probe = DemoPipeline::new(
                &components,
                PipelineParams::default(),
                options.device.as_deref(),
                options.threads,
            )?;
            let size = |p: &mut DemoPipeline, i: usize| {
                p.pipeline
                    .component(components[i].name)
                    .map(|c| c.resident_bytes)
            };
            let (dit, vae) = (size(&mut probe, 1)?, size(&mut probe, 2)?);
            dit + vae + options.min_free
        }
    };
    println!(
        "budget {} ({} kept free), {} sampling steps x {CFG_PASSES} passes, {} job(s) per mode\n",
        format_bytes(budget),
        format_bytes(options.min_free),
        options.steps,
        options.runs
    );
    println!(
        "{:<16} {:>9} {:>6} {:>8} {:>10} {:>11} {:>10} {:>10}  checksum",
        "mode", "job ms", "loads", "unloads", "loaded", "prefetched", "peak", "dit"
    );
    let modes = match options.mode {
        Some(m) => vec![m],
        None => OffloadMode::ALL.to_vec(),
    };
    let mut mismatches = 0;
    for mode in modes {
        let params = PipelineParams {
            mode,
            budget_bytes: Some(budget),
            min_free_bytes: options.min_free,
            margin_bytes: 0,
            prefetch_depth: options.prefetch,
            steps: options.steps.max(1),
            passes_per_step: CFG_PASSES,
            reload_diffusion: options.reload_diffusion,
            log_moves: options.log_moves,
        };
        let mut demo = DemoPipeline::new(
            &components,
            params,
            options.device.as_deref(),
            options.threads,
        )?;
        let mut job_ms = Vec::new();
        let mut outcome = Ok(());
        for _ in 0..options.runs.max(1) {
            let started = Instant::now();
            match demo.run_job() {
                Ok(outputs) => {
                    job_ms.push(started.elapsed().as_secs_f64() * 1e3);
                    if outputs != want {
                        mismatches += 1;
                        outcome = Err("DIFFERENT".to_string());
                    }
                }
                Err(err) => {
                    outcome = Err(format!("refused: {}", err.message));
                    break;
                }
            }
        }
        let stats = demo.pipeline.stats();
        let dit_placement = demo
            .seen
            .get(1)
            .map(|p| format!("{p:?}").to_lowercase())
            .unwrap_or_else(|| "-".into());
        match outcome {
            Ok(()) => println!(
                "{:<16} {:>9.1} {:>6} {:>8} {:>10} {:>11} {:>10} {:>10}  {want_sum:016x} (identical)",
                mode.name(),
                job_ms.last().copied().unwrap_or(0.0),
                stats.loads,
                stats.unloads,
                format_bytes(stats.bytes_loaded),
                stats.prefetched_loads,
                format_bytes(stats.peak_device_bytes),
                dit_placement,
            ),
            Err(why) => println!("{:<16} {why}", mode.name()),
        }
    }
    if mismatches > 0 {
        return Err(Error::new(
            Status::Internal,
            format!("{mismatches} job(s) gave outputs different from the engine-free run"),
        ));
    }
    Ok(())
}
