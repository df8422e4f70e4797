//! `offload-engine pipeline`: the built-in three-stage pipeline in every offload mode.

use crate::models::checksum;
use std::time::Instant;

use crate::models::pipeline::{components, reference_outputs, DemoPipeline, CFG_PASSES};
use offload_engine::error::{Error, Result, Status};
use offload_engine::pipeline::{OffloadMode, PipelineParams};
use offload_engine::units::format_bytes;

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
