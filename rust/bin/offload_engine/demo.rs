//! `offload-engine demo`: the README's main job.

use crate::models::{checksum, run_with_engine, Architecture, DemoConfig, DemoModel};
use offload_engine::error::{Error, Result, Status};

pub struct DemoOptions {
    pub budget: Option<u64>,
    pub prefetch: u32,
    pub passes: usize,
    pub trace: Option<std::path::PathBuf>,
    pub device: Option<String>,
    pub threads: i32,
    pub tiny: bool,
}

fn mean_ms(seconds: &[f64]) -> f64 {
    seconds.iter().sum::<f64>() / seconds.len().max(1) as f64 * 1e3
}

/// The README's main job: the demo model fully resident, then streamed, outputs compared.
pub fn run_demo(options: &DemoOptions) -> Result<()> {
    use offload_engine::units::format_bytes;
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
        "plan: {}: {} layers resident, {} streamed through {} slots of {} (prefetch depth {})",
        plan.mode.as_str(),
        plan.resident_layers.len(),
        plan.streamed_layers.len(),
        plan.slot_count,
        format_bytes(plan.slot_bytes),
        options.prefetch
    );
    println!("      {}", plan.message);
    for (i, s) in streamed.pass_seconds.iter().enumerate() {
        println!("  pass {i}: {:.1} ms", s * 1e3);
    }
    let stats = &streamed.stats;
    println!(
        "moved {} in {} layer loads ({} per pass); copy {:.1} ms, waited {:.1} ms, compute {:.1} ms; arena {}",
        format_bytes(stats.bytes_copied),
        stats.layer_loads,
        format_bytes(stats.bytes_copied / stats.passes.max(1)),
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
