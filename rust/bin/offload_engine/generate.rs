//! `offload-engine generate`: runs a llama.cpp model through the engine's drop-in, and with
//! `--compare` unmodified llama.cpp first, every weight resident, to check tokens and logits.

use std::path::PathBuf;

use crate::args::{count, size};
use crate::llama_run::{run, RunOptions, RunResult, StreamReport};
use offload_engine::engine::EngineParams;
use offload_engine::error::{Error, Result};
use offload_engine::llama::LlamaParams;
use offload_engine::planner::Mode;
use offload_engine::units::format_bytes;

#[derive(clap::Args, Debug, Clone)]
pub struct GenerateArgs {
    /// GGUF model file llama.cpp can load.
    pub model: PathBuf,
    /// Text to continue.
    #[arg(long, default_value = "The three primary colors are")]
    pub prompt: String,
    /// Tokens to generate (greedy).
    #[arg(long, default_value_t = 32)]
    pub n_predict: u32,
    /// Device memory for the weights and llama.cpp's reserves (--compute-reserve,
    /// --kv-cache); default: the device's free memory, measured.
    #[arg(long, value_parser = size)]
    pub vram_budget: Option<u64>,
    /// Layers copied ahead of the one computing.
    #[arg(long, default_value_t = 1)]
    pub prefetch: u32,
    /// llama.cpp's compute buffers on the device; default: estimated from the model.
    #[arg(long, value_parser = size)]
    pub compute_reserve: Option<u64>,
    /// llama.cpp's KV cache on the device; default: estimated from the model and --ctx-size.
    #[arg(long, value_parser = size)]
    pub kv_cache: Option<u64>,
    /// Stream every layer from the model file; no weight is held in host memory.
    #[arg(long)]
    pub file_backed: bool,
    /// First run unmodified llama.cpp (every weight resident), then compare tokens and logits.
    #[arg(long)]
    pub compare: bool,
    /// ggml device (`offload-engine devices`); default: the first GPU, else the CPU.
    #[arg(long)]
    pub device: Option<String>,
    /// CPU threads for llama.cpp.
    #[arg(long, default_value_t = default_threads())]
    pub threads: i32,
    /// Context length.
    #[arg(long, default_value_t = 512)]
    pub ctx_size: u32,
    /// Tokens per graph (llama.cpp's n_ubatch); llama.cpp's compute buffers grow with it
    /// (the logits alone take ubatch x vocabulary floats).
    #[arg(long, default_value_t = 512)]
    pub ubatch: u32,
    /// Run only unmodified llama.cpp (for comparisons made elsewhere, e.g. under a memory
    /// limit).
    #[arg(long, conflicts_with = "compare")]
    pub no_engine: bool,
    /// Load with plain reads instead of llama.cpp's mmap.
    #[arg(long)]
    pub no_mmap: bool,
    /// Let the CPU backend start its threads for every graph (llama.cpp's default for a
    /// context without an attached threadpool) instead of keeping a threadpool.
    #[arg(long)]
    pub no_threadpool: bool,
    /// Write the engine's timeline (Chrome trace JSON) here.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

fn default_threads() -> i32 {
    std::thread::available_parallelism().map_or(4, |n| n.get() as i32)
}

impl GenerateArgs {
    pub fn run_options(&self) -> RunOptions {
        RunOptions {
            prompt: self.prompt.clone(),
            n_predict: self.n_predict,
            n_ctx: self.ctx_size,
            n_ubatch: self.ubatch,
            threads: self.threads,
            mmap: !self.no_mmap,
            threadpool: !self.no_threadpool,
            progress: !self.json,
            trace: self.trace.clone(),
        }
    }

    pub fn llama_params(&self) -> LlamaParams {
        let defaults = LlamaParams::default();
        LlamaParams {
            engine: EngineParams {
                device: self.device.clone(),
                budget_bytes: self.vram_budget,
                prefetch_depth: self.prefetch,
                trace: self.trace.is_some(),
                ..EngineParams::default()
            },
            compute_reserve_bytes: self.compute_reserve,
            kv_cache_bytes: self.kv_cache,
            n_ctx: self.ctx_size,
            n_ubatch: self.ubatch.min(self.ctx_size),
            file_backed: self.file_backed,
            layer_output_pattern: None,
            link: defaults.link,
        }
    }
}

/// How two runs compare: the first step whose token or logits differ.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Comparison {
    pub tokens_identical: bool,
    pub logits_identical: bool,
    pub steps_compared: usize,
    pub first_difference: Option<usize>,
}

pub fn compare(reference: &RunResult, streamed: &RunResult) -> Comparison {
    let steps = reference.logits.len().max(streamed.logits.len());
    let first_logits = (0..steps).find(|&i| reference.logits.get(i) != streamed.logits.get(i));
    let first_token = (0..reference.tokens.len().max(streamed.tokens.len()))
        .find(|&i| reference.tokens.get(i) != streamed.tokens.get(i));
    Comparison {
        tokens_identical: first_token.is_none(),
        logits_identical: first_logits.is_none(),
        steps_compared: steps,
        first_difference: match (first_token, first_logits) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        },
    }
}

#[derive(serde::Serialize)]
struct Output {
    model: String,
    prompt: String,
    prompt_tokens: usize,
    text: String,
    tokens: Vec<i32>,
    reference_tokens: Option<Vec<i32>>,
    tokens_identical: Option<bool>,
    logits_identical: Option<bool>,
    first_difference: Option<usize>,
    mode: &'static str,
    resident_layers: Vec<usize>,
    streamed_layers: Vec<usize>,
    slot_count: u32,
    placement_bytes: u64,
    /// Streamed bytes per pass (one token in decode): the plan's bytes_per_pass.
    bytes_per_token: u64,
    /// The same, measured: streamed bytes over passes.
    measured_bytes_per_pass: u64,
    passes: u64,
    prefill_tokens_per_second: f64,
    decode_tokens_per_second: f64,
    reference_prefill_tokens_per_second: Option<f64>,
    reference_decode_tokens_per_second: Option<f64>,
    prefetch_hits: u64,
    prefetch_misses: u64,
    wait_us: u64,
    bytes_copied: u64,
}

pub fn generate(args: &GenerateArgs) -> Result<()> {
    if args.n_predict == 0 {
        return Err(Error::invalid("--n-predict must be at least 1"));
    }
    let options = args.run_options();
    if args.no_engine {
        let (result, _) = run(&args.model, &options, None)?;
        if args.json {
            let output = serde_json::json!({
                "model": args.model.display().to_string(),
                "prompt_tokens": result.prompt_tokens,
                "text": result.text,
                "tokens": result.tokens,
                "prefill_tokens_per_second": result.prefill_tokens_per_second(),
                "decode_tokens_per_second": result.decode_tokens_per_second(),
            });
            println!("{output:#}");
        } else {
            println!("{}", result.text.trim_start());
            println!(
                "prefill: {:.1} tokens/s; decode: {:.1} tokens/s (unmodified llama.cpp)",
                result.prefill_tokens_per_second(),
                result.decode_tokens_per_second()
            );
        }
        return Ok(());
    }
    let reference = if args.compare {
        if !args.json {
            eprintln!("reference: unmodified llama.cpp, every weight resident");
        }
        Some(run(&args.model, &options, None)?.0)
    } else {
        None
    };
    if !args.json {
        eprintln!("streamed: through offload-engine");
    }
    let (streamed, report) = run(&args.model, &options, Some(args.llama_params()))?;
    let report = report.expect("a streamed run reports its engine");
    let comparison = reference.as_ref().map(|r| compare(r, &streamed));
    if args.json {
        print_json(
            args,
            &streamed,
            reference.as_ref(),
            comparison.as_ref(),
            &report,
        );
    } else {
        print_human(&streamed, reference.as_ref(), comparison.as_ref(), &report);
    }
    match comparison {
        Some(c) if !(c.tokens_identical && c.logits_identical) => Err(Error::new(
            offload_engine::error::Status::Internal,
            format!(
                "the streamed run differs from unmodified llama.cpp at step {}",
                c.first_difference.unwrap_or(0)
            ),
        )),
        _ => Ok(()),
    }
}

fn measured_bytes_per_pass(report: &StreamReport) -> u64 {
    report.stats.streamed_bytes / report.stats.passes.max(1)
}

fn print_json(
    args: &GenerateArgs,
    streamed: &RunResult,
    reference: Option<&RunResult>,
    comparison: Option<&Comparison>,
    report: &StreamReport,
) {
    let plan = &report.plan;
    let output = Output {
        model: args.model.display().to_string(),
        prompt: args.prompt.clone(),
        prompt_tokens: streamed.prompt_tokens,
        text: streamed.text.clone(),
        tokens: streamed.tokens.clone(),
        reference_tokens: reference.map(|r| r.tokens.clone()),
        tokens_identical: comparison.map(|c| c.tokens_identical),
        logits_identical: comparison.map(|c| c.logits_identical),
        first_difference: comparison.and_then(|c| c.first_difference),
        mode: plan.mode.as_str(),
        resident_layers: plan.resident_layers.clone(),
        streamed_layers: plan.streamed_layers.clone(),
        slot_count: plan.slot_count,
        placement_bytes: plan.placement_bytes,
        bytes_per_token: plan.bytes_per_pass,
        measured_bytes_per_pass: measured_bytes_per_pass(report),
        passes: report.stats.passes,
        prefill_tokens_per_second: streamed.prefill_tokens_per_second(),
        decode_tokens_per_second: streamed.decode_tokens_per_second(),
        reference_prefill_tokens_per_second: reference.map(RunResult::prefill_tokens_per_second),
        reference_decode_tokens_per_second: reference.map(RunResult::decode_tokens_per_second),
        prefetch_hits: report.stats.prefetch_hits,
        prefetch_misses: report.stats.prefetch_misses,
        wait_us: report.stats.wait_us,
        bytes_copied: report.stats.bytes_copied,
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&output).expect("plain data serializes")
    );
}

fn print_human(
    streamed: &RunResult,
    reference: Option<&RunResult>,
    comparison: Option<&Comparison>,
    report: &StreamReport,
) {
    let plan = &report.plan;
    let layers = plan.resident_layers.len() + plan.streamed_layers.len();
    println!("plan: {}", plan.message);
    match plan.mode {
        Mode::Full => println!(
            "  every layer resident ({}).",
            count(layers as u64, "layer")
        ),
        _ => println!(
            "  {} of {} streamed through {} of {}; {} per token",
            plan.streamed_layers.len(),
            count(layers as u64, "layer"),
            count(plan.slot_count, "slot"),
            format_bytes(plan.slot_bytes),
            format_bytes(plan.bytes_per_pass)
        ),
    }
    println!();
    println!("{}", streamed.text.trim_start());
    println!();
    if let (Some(reference), Some(c)) = (reference, comparison) {
        if c.tokens_identical && c.logits_identical {
            println!(
                "comparison: tokens and logits identical to unmodified llama.cpp ({} steps, {})",
                c.steps_compared,
                count(streamed.tokens.len() as u64, "token")
            );
        } else {
            println!(
                "comparison: DIFFERENT from unmodified llama.cpp, first at step {} (tokens {}, logits {})",
                c.first_difference.unwrap_or(0),
                if c.tokens_identical { "same" } else { "differ" },
                if c.logits_identical { "same" } else { "differ" }
            );
        }
        println!(
            "prefill: {:.1} tokens/s streamed, {:.1} unmodified ({:.3}x)",
            streamed.prefill_tokens_per_second(),
            reference.prefill_tokens_per_second(),
            streamed.prefill_tokens_per_second() / reference.prefill_tokens_per_second()
        );
        println!(
            "decode:  {:.1} tokens/s streamed, {:.1} unmodified ({:.3}x)",
            streamed.decode_tokens_per_second(),
            reference.decode_tokens_per_second(),
            streamed.decode_tokens_per_second() / reference.decode_tokens_per_second()
        );
    } else {
        println!(
            "prefill: {:.1} tokens/s; decode: {:.1} tokens/s",
            streamed.prefill_tokens_per_second(),
            streamed.decode_tokens_per_second()
        );
    }
    let s = &report.stats;
    println!(
        "engine: {} passes, {} streamed ({} per pass), prefetch hits {} misses {}, waited {:.1} ms",
        s.passes,
        format_bytes(s.streamed_bytes),
        format_bytes(measured_bytes_per_pass(report)),
        s.prefetch_hits,
        s.prefetch_misses,
        s.wait_us as f64 / 1e3
    );
}
