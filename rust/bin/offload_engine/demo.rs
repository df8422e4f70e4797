//! `offload-engine demo`: the README's main job.

use crate::args::count;
use crate::models::{checksum, run_with_engine, Architecture, DemoConfig, DemoModel};
use offload_engine::error::{Error, Result, Status};
use offload_engine::units::format_bytes;

#[derive(clap::Args)]
pub struct DemoOptions {
    /// Device memory the streamed run may use (default: about a third of the model).
    #[arg(long, value_parser = crate::args::size)]
    pub budget: Option<u64>,
    /// Layers copied ahead of the one computing.
    #[arg(long, default_value_t = 1)]
    pub prefetch: u32,
    /// Forward passes per run.
    #[arg(long, default_value_t = 3)]
    pub passes: usize,
    /// Write a Chrome trace-event JSON of the streamed run (open in Perfetto).
    #[arg(long)]
    pub trace: Option<std::path::PathBuf>,
    /// ggml device ("CPU", "CUDA0", ...); default: the first GPU, else the CPU.
    #[arg(long)]
    pub device: Option<String>,
    /// Compute threads on the CPU backend.
    #[arg(long, default_value_t = 1)]
    pub threads: i32,
    /// A smaller model (tests, quick looks).
    #[arg(long)]
    pub tiny: bool,
}

/// What a run copied, beside what its plan predicted: the placement once, the streamed layers
/// per pass, and what was copied ahead for a pass that did not come.
fn print_traffic(run: &crate::models::RunResult) {
    let (plan, stats) = (&run.plan, &run.stats);
    let passes = stats.passes.max(1);
    println!(
        "placed once: {} (planned {}); streamed {} per pass in {} (planned {} per pass); copied ahead and unused: {}",
        format_bytes(stats.placement_bytes),
        format_bytes(plan.placement_bytes),
        format_bytes(stats.streamed_bytes / passes),
        count(stats.layer_loads / passes, "layer load"),
        format_bytes(plan.bytes_per_pass),
        format_bytes(stats.prefetch_unused_bytes)
    );
}

fn mean_ms(seconds: &[f64]) -> f64 {
    seconds.iter().sum::<f64>() / seconds.len().max(1) as f64 * 1e3
}

/// The README's main job: the demo model fully resident, then streamed, outputs compared.
pub fn run_demo(options: &DemoOptions) -> Result<()> {
    let config = if options.tiny {
        DemoConfig::tiny(Architecture::Llama)
    } else {
        DemoConfig::default_llama()
    };
    println!(
        "building the demo model: {} layers, hidden {}, ffn {}, {} tokens",
        config.layers, config.hidden, config.ffn, config.tokens
    );
    let model = DemoModel::new(config)?;
    let weights = model.weight_bytes();
    println!(
        "weights: {} (f16 matrices, f32 norms)",
        format_bytes(weights)
    );
    let params = |budget: u64, depth: u32| offload_engine::engine::EngineParams {
        device: options.device.clone(),
        budget_bytes: Some(budget),
        prefetch_depth: depth,
        compute_threads: options.threads,
        ..Default::default()
    };
    let workload = offload_engine::planner::Workload {
        steps: options.passes.max(1) as u32,
        passes_per_step: 1,
        prefetch_depth: options.prefetch,
        ..Default::default()
    };

    println!("\n== fully resident run ==");
    let resident = run_with_engine(
        &model,
        params(weights.saturating_mul(2), options.prefetch),
        &workload,
        options.passes,
        None,
    )?;
    println!(
        "plan: {} ({})",
        resident.plan.mode.as_str(),
        resident.plan.message
    );
    for (i, s) in resident.pass_seconds.iter().enumerate() {
        println!("  pass {i}: {:.1} ms", s * 1e3);
    }
    print_traffic(&resident);

    let budget = options.budget.unwrap_or(weights / 3);
    println!("\n== streamed run, budget {} ==", format_bytes(budget));
    let streamed = run_with_engine(
        &model,
        params(budget, options.prefetch),
        &workload,
        options.passes,
        options.trace.as_deref(),
    )?;
    let plan = &streamed.plan;
    println!(
        "plan: {}: {} resident, {} streamed through {} of {} (prefetch depth {})",
        plan.mode.as_str(),
        count(plan.resident_layers.len() as u64, "layer"),
        count(plan.streamed_layers.len() as u64, "layer"),
        count(plan.slot_count, "slot"),
        format_bytes(plan.slot_bytes),
        plan.prefetch_depth(options.prefetch)
    );
    println!("      {}", plan.message);
    for (i, s) in streamed.pass_seconds.iter().enumerate() {
        println!("  pass {i}: {:.1} ms", s * 1e3);
    }
    print_traffic(&streamed);
    let stats = &streamed.stats;
    println!(
        "copy {:.1} ms, waited {:.1} ms, compute {:.1} ms; arena {}",
        stats.copy_us as f64 / 1e3,
        stats.wait_us as f64 / 1e3,
        stats.compute_us as f64 / 1e3,
        format_bytes(stats.arena_bytes)
    );
    if let Some(path) = &options.trace {
        println!(
            "trace written to {} (copy/compute overlap {:.1} ms)",
            path.display(),
            streamed.overlap_us as f64 / 1e3
        );
    }
    let identical = resident.output == streamed.output;
    println!(
        "\nresident {:.1} ms/pass, streamed {:.1} ms/pass; output checksum {:016x} vs {:016x}: {}",
        mean_ms(&resident.pass_seconds),
        mean_ms(&streamed.pass_seconds),
        checksum(&resident.output),
        checksum(&streamed.output),
        if identical {
            "bit-identical"
        } else {
            "DIFFERENT"
        }
    );
    if identical {
        Ok(())
    } else {
        Err(Error::new(
            Status::Internal,
            "streamed output differs from the resident run",
        ))
    }
}
