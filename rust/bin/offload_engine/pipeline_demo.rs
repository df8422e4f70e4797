//! `offload-engine pipeline`: the built-in three-stage pipeline in every offload mode.

use crate::args::count;
use crate::models::checksum;
use std::time::Instant;

use crate::models::pipeline::{components, reference_outputs, DemoPipeline, CFG_PASSES};
use offload_engine::error::{Error, Result, Status};
use offload_engine::pipeline::{OffloadMode, PipelineParams};
use offload_engine::units::format_bytes;

#[derive(clap::Args)]
pub struct PipelineDemoOptions {
    /// none, cond_only, cond_diffusion, aggressive, layer_streaming; default: each in turn.
    #[arg(long = "offload-mode", value_parser = parse_mode)]
    pub mode: Option<OffloadMode>,
    /// Device memory for all components (default: the diffusion model and the decoder fit,
    /// the text encoder does not fit beside them).
    #[arg(long = "vram-budget", value_parser = crate::args::size)]
    pub budget: Option<u64>,
    /// Sampling steps of the diffusion stage (two passes each, for classifier-free guidance).
    #[arg(long, default_value_t = 4)]
    pub steps: u32,
    /// Jobs per mode (the reload policy acts between them).
    #[arg(long, default_value_t = 2)]
    pub runs: u32,
    /// Layers copied ahead in a streamed diffusion model.
    #[arg(long = "streaming-prefetch", default_value_t = 1)]
    pub prefetch: u32,
    /// Device memory left free, a size (subtracted from the budget).
    #[arg(long = "streaming-min-vram", default_value = "0", value_parser = crate::args::size)]
    pub min_free: u64,
    /// Log every component move with bytes and time.
    #[arg(long = "offload-log")]
    pub log_moves: bool,
    /// Leave an evicted diffusion model off the device between jobs.
    #[arg(long = "no-reload-diffusion", action = clap::ArgAction::SetFalse)]
    pub reload_diffusion: bool,
    /// ggml device ("CPU", "CUDA0", ...); default: the first GPU, else the CPU.
    #[arg(long)]
    pub device: Option<String>,
    /// Compute threads on the CPU backend.
    #[arg(long, default_value_t = 1)]
    pub threads: i32,
    /// Smaller models (tests, quick looks).
    #[arg(long)]
    pub tiny: bool,
}

fn parse_mode(text: &str) -> std::result::Result<OffloadMode, String> {
    OffloadMode::parse(text).map_err(|e| e.message)
}

/// `offload-engine pipeline`: the demo pipeline in each mode under one budget; outputs are
/// compared with the engine-free run. A mode that cannot fit is reported, not fatal.
pub fn run_pipeline_demo(options: &PipelineDemoOptions) -> Result<()> {
    let components = components(options.tiny, options.steps)?;
    for c in &components {
        // The layers the engine streams (a Flux-style model has its single blocks besides
        // the double blocks its config counts).
        println!(
            "{:<16} {:<12} {:>10}  {:>10}  {} per job",
            c.name,
            c.role.name(),
            count(
                offload_engine::executor::LayeredModel::layer_count(&c.model) as u64,
                "layer"
            ),
            format_bytes(c.model.weight_bytes()),
            count(c.passes, "pass")
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
            ..Default::default()
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
