//! `offload-engine plan`: what stays on the device and what streams, for a GGUF file or a
//! set of transformer hyperparameters, with every knob of the library's budget.

use std::path::PathBuf;

use crate::args::{count, size};
use crate::inspect::load_registry;
use offload_engine::error::{Error, Result, Status};
use offload_engine::planner::{self, Budget, Hparams, Link, Mode, Workload};
use offload_engine::units::format_bytes;

#[derive(clap::Args)]
pub struct PlanArgs {
    /// GGUF model file (or give --hparams).
    pub model: Option<PathBuf>,
    /// Transformer hyperparameters instead of a file, e.g.
    /// hidden=1536,layers=28,heads=12,kv_heads=2,vocab=151936,ffn=8960,context=2048,type=f32
    #[arg(long)]
    pub hparams: Option<String>,
    /// Free device memory (what other programs leave). The plan keeps --min-free of it free
    /// and uses --safety of the rest, as an engine does when it measures the device.
    /// --vram is the same option.
    #[arg(long, visible_alias = "vram", value_parser = size)]
    pub free_vram: Option<u64>,
    /// Exactly the device memory the engine may use (the engine's budget_bytes): no margin
    /// is taken off.
    #[arg(long, value_parser = size, conflicts_with = "free_vram")]
    pub budget: Option<u64>,
    /// Device memory kept free when planning from --free-vram.
    #[arg(long, default_value = "512MiB", value_parser = size)]
    pub min_free: u64,
    /// Fraction of the free memory (after --min-free) the plan may use, with --free-vram.
    #[arg(long, default_value_t = 0.90)]
    pub safety: f64,
    /// Device memory the host's compute buffers take (ggml's graph allocator).
    #[arg(long, default_value = "0", value_parser = size)]
    pub compute_reserve: u64,
    /// Device memory of the KV cache and other persistent buffers.
    #[arg(long, default_value = "0", value_parser = size)]
    pub kv_cache: u64,
    /// Plan the disk tier: the weights stream from the model file, in the file's layout.
    #[arg(long)]
    pub file_backed: bool,
    /// Host-to-device link: a name (`--link list` shows them) or a bandwidth in GB/s.
    #[arg(long, default_value = "pcie4-x16")]
    pub link: String,
    /// Steps of the job (diffusion sampling steps; decoded tokens).
    #[arg(long, default_value_t = 1)]
    pub steps: u32,
    /// Forward passes per step (2 with classifier-free guidance).
    #[arg(long, default_value_t = 1)]
    pub passes_per_step: u32,
    /// Layers copied ahead of the one computing.
    #[arg(long, default_value_t = 1)]
    pub prefetch: u32,
    /// At most this many resident layers (the ones that save the most traffic); the rest
    /// stream.
    #[arg(long)]
    pub max_resident_layers: Option<u32>,
    /// Built-in pattern name or a regex with one capture group for the layer index.
    #[arg(long)]
    pub pattern: Option<String>,
    /// For a language model's advice: tokens per prefill pass (llama.cpp's n_ubatch).
    #[arg(long, default_value_t = 512)]
    pub ubatch: u32,
    /// For the advice: host memory bandwidth in GB/s (where the CPU reads the layers that
    /// do not fit).
    #[arg(long)]
    pub host_memory_gbps: Option<f64>,
    /// For the advice: CPU compute in GFLOPS (sustained quantized matmul, not peak).
    #[arg(long)]
    pub host_gflops: Option<f64>,
    /// For the advice: device compute in GFLOPS.
    #[arg(long)]
    pub device_gflops: Option<f64>,
    /// Print the plan as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Stream or compute on the CPU, for decode and for prefill.
#[derive(serde::Serialize)]
struct LanguageModelAdvice {
    overflow_bytes: u64,
    bits_per_weight: f64,
    machine: planner::Machine,
    decode: planner::Advice,
    prefill: planner::Advice,
    prefill_tokens: u32,
}

/// For a language model whose plan streams: the streamed layers' bytes, computed on the
/// device after copies or on the CPU where they are (llama.cpp's -ngl).
fn language_model_advice(
    args: &PlanArgs,
    cost: &planner::ModelCost,
    plan: &planner::Plan,
    link: &Link,
) -> Result<Option<LanguageModelAdvice>> {
    if plan.mode != Mode::Streaming {
        return Ok(None);
    }
    let overflow: u64 = plan
        .streamed_layers
        .iter()
        .map(|&l| cost.layers[l].bytes)
        .sum();
    let bits = cost.bits_per_weight.unwrap_or(4.5);
    let defaults = planner::Machine::default();
    let machine = planner::Machine {
        host_memory_bandwidth: args
            .host_memory_gbps
            .map_or(defaults.host_memory_bandwidth, |g| g * 1e9),
        host_flops: args.host_gflops.map_or(defaults.host_flops, |g| g * 1e9),
        device_flops: args
            .device_gflops
            .map_or(defaults.device_flops, |g| g * 1e9),
    };
    Ok(Some(LanguageModelAdvice {
        overflow_bytes: overflow,
        bits_per_weight: bits,
        decode: planner::advise_llm(overflow, bits, 1, link, &machine)?,
        prefill: planner::advise_llm(overflow, bits, args.ubatch, link, &machine)?,
        prefill_tokens: args.ubatch,
        machine,
    }))
}

fn print_advice(advice: &LanguageModelAdvice, plan: &planner::Plan) {
    let m = &advice.machine;
    println!(
        "stream or CPU: the {} streamed ({} at {:.2} bits per weight), one pass, with {:.0} GB/s \
         host memory, {:.0} GFLOPS CPU, {:.0} GFLOPS device (--host-memory-gbps, --host-gflops, \
         --device-gflops):",
        count(plan.streamed_layers.len() as u64, "layer"),
        format_bytes(advice.overflow_bytes),
        advice.bits_per_weight,
        m.host_memory_bandwidth / 1e9,
        m.host_flops / 1e9,
        m.device_flops / 1e9
    );
    for (what, a) in [
        ("decode (1 token)".to_string(), &advice.decode),
        (
            format!("prefill ({} tokens)", advice.prefill_tokens),
            &advice.prefill,
        ),
    ] {
        let verdict = if a.prefer == "cpu" {
            format!(
                "faster on the CPU: llama.cpp with -ngl {} (those layers computed in host memory)",
                plan.resident_layers.len()
            )
        } else {
            "faster streamed".to_string()
        };
        println!(
            "  {what:<22} streamed {:.2} ms, CPU {:.2} ms: {verdict}",
            a.stream_seconds * 1e3,
            a.cpu_seconds * 1e3
        );
    }
}

fn print_links() {
    println!("{:<12} {:>9} {:>11}  source", "link", "GB/s", "latency us");
    for spec in Link::table() {
        println!(
            "{:<12} {:>9.3} {:>11.1}  {}",
            spec.name, spec.gb_per_s, spec.latency_us, spec.note
        );
    }
}

/// The budget the options describe: free memory with margins, or an exact budget.
fn budget(args: &PlanArgs) -> Result<Budget> {
    let mut budget = match (args.free_vram, args.budget) {
        (Some(free), None) => {
            let mut b = Budget::from_free(free);
            b.total_bytes = free;
            b.min_free_bytes = args.min_free;
            b.safety_fraction = args.safety;
            b
        }
        (None, Some(exact)) => {
            let mut b = Budget::from_free(exact);
            b.min_free_bytes = 0;
            b.safety_fraction = 1.0;
            b
        }
        _ => return Err(Error::invalid(
            "give --free-vram SIZE (free device memory) or --budget SIZE (what the engine may use)",
        )),
    };
    budget.compute_reserve_bytes = args.compute_reserve;
    budget.persistent_bytes = args.kv_cache;
    Ok(budget)
}

pub fn plan(args: PlanArgs) -> Result<()> {
    if args.link == "list" {
        print_links();
        return Ok(());
    }
    let cost = match (&args.model, &args.hparams) {
        (Some(path), None) => {
            load_registry(path, args.pattern.as_deref())?.model_cost(args.file_backed)
        }
        (None, Some(spec)) => Hparams::parse(spec)?.to_model_cost(),
        _ => {
            return Err(Error::invalid(
                "give a MODEL.gguf or --hparams (one of them)",
            ))
        }
    };
    let budget = budget(&args)?;
    let link = match args.link.parse::<f64>() {
        Ok(gbps) => Link::from_gbps(gbps)?,
        Err(_) => Link::named(&args.link)?,
    };
    let workload = Workload {
        steps: args.steps,
        passes_per_step: args.passes_per_step,
        prefetch_depth: args.prefetch,
        max_resident_layers: args.max_resident_layers,
        ..Workload::default()
    };
    let plan = planner::plan(&cost, &budget, &workload, &link)?;
    let language_model = args.hparams.is_some()
        || args
            .model
            .as_ref()
            .is_some_and(|path| is_language_model(path, args.pattern.as_deref()));
    let advice = if language_model {
        language_model_advice(&args, &cost, &plan, &link)?
    } else {
        None
    };
    if args.json {
        let mut value = serde_json::to_value(&plan).map_err(|e| Error::invalid(e.to_string()))?;
        if let Some(advice) = &advice {
            value["advice"] =
                serde_json::to_value(advice).map_err(|e| Error::invalid(e.to_string()))?;
        }
        println!("{value}");
    } else {
        print_plan(&plan, &budget, &workload, &link);
        if let Some(advice) = &advice {
            print_advice(advice, &plan);
        }
    }
    if plan.mode == Mode::Insufficient {
        // The reasons and options, once: on stderr, or in the JSON above.
        return Err(Error::new(
            Status::InsufficientMemory,
            if args.json {
                "the model does not fit (the plan's message says what each mode needs)".to_string()
            } else {
                plan.message
            },
        ));
    }
    Ok(())
}

/// A llama.cpp-style language model (its layers grouped as `blk.N`).
fn is_language_model(path: &std::path::Path, pattern: Option<&str>) -> bool {
    load_registry(path, pattern).is_ok_and(|mut r| r.architecture() == "llama_gguf")
}

fn print_plan(plan: &planner::Plan, budget: &Budget, workload: &Workload, link: &Link) {
    println!("mode:                {}", plan.mode.as_str());
    println!(
        "layers:              {} resident, {} streamed",
        plan.resident_layers.len(),
        plan.streamed_layers.len()
    );
    println!(
        "slots:               {} x {}",
        plan.slot_count,
        format_bytes(plan.slot_bytes)
    );
    println!(
        "full cache needs:    {}",
        format_bytes(plan.full_cache_bytes)
    );
    println!(
        "streaming needs:     {}",
        format_bytes(plan.streaming_bytes)
    );
    println!("usable:              {}", format_bytes(plan.usable_bytes));
    println!(
        "largest layer:       {}",
        format_bytes(plan.layer_bytes_max)
    );
    if plan.mode != Mode::Insufficient {
        println!(
            "placed once:         {} (the global group and the resident layers)",
            format_bytes(plan.placement_bytes)
        );
        println!("streamed per pass:   {}", format_bytes(plan.bytes_per_pass));
        println!(
            "streamed per step:   {} ({})",
            format_bytes(plan.bytes_per_step),
            count(workload.passes_per_step, "pass")
        );
        println!(
            "moved per run:       {} (placement, then {} of {})",
            format_bytes(plan.bytes_per_run),
            count(workload.steps, "step"),
            count(workload.passes_per_step, "pass")
        );
        println!(
            "predicted step:      {:.3} s over {}",
            plan.predicted_step_seconds,
            link.describe()
        );
    }
    println!("{}", planner::memory_bar(plan, budget, 60));
    if plan.mode != Mode::Insufficient {
        println!("{}", plan.message);
    }
}
