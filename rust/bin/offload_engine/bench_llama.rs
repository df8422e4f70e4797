//! `offload-engine bench --llama MODEL`: llama.cpp through the drop-in against unmodified
//! llama.cpp, prefill and decode tokens per second at three budgets, as ratios from runs
//! interleaved in one process (reference, streamed, reference, ...; medians), after a warm-up.

use std::path::Path;

use crate::generate::compare;
use crate::llama_run::{run, RunOptions, RunResult};
use offload_engine::engine::EngineParams;
use offload_engine::error::{Error, Result, Status};
use offload_engine::llama::{Hook, LlamaParams};
use offload_engine::units::format_bytes;

/// The prompt is long enough for prefill to be measurable (about 60 tokens).
const PROMPT: &str = "Streaming weights layer by layer lets a program run a model that is larger \
than the memory of its accelerator: while one layer computes, the next one is copied into a \
slot of a device arena that was allocated once, so that copies and compute overlap. Explain \
in simple words why this works";

/// All resident through the engine: the overhead the drop-in may add (3%).
const RESIDENT_TARGET: f64 = 0.97;

#[derive(Debug, Clone, serde::Serialize)]
pub struct BudgetResult {
    pub name: &'static str,
    pub budget_bytes: u64,
    pub mode: &'static str,
    pub resident_layers: usize,
    pub streamed_layers: usize,
    pub bytes_per_token: u64,
    pub identical: bool,
    pub prefill_tokens_per_second: f64,
    pub decode_tokens_per_second: f64,
    pub reference_prefill_tokens_per_second: f64,
    pub reference_decode_tokens_per_second: f64,
    pub prefill_ratio: f64,
    pub decode_ratio: f64,
    pub prefetch_hits: u64,
    pub prefetch_misses: u64,
    pub wait_ms_per_pass: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LlamaBenchReport {
    pub model: String,
    pub device: String,
    pub rounds: usize,
    pub n_predict: u32,
    pub prompt_tokens: usize,
    pub budgets: Vec<BudgetResult>,
    pub resident_overhead_target_met: bool,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn params(device: &str, budget: u64, depth: u32) -> LlamaParams {
    LlamaParams {
        engine: EngineParams {
            device: Some(device.to_string()),
            budget_bytes: Some(budget),
            prefetch_depth: depth,
            ..EngineParams::default()
        },
        // Exact budgets for the weights: llama.cpp's own buffers are outside the comparison.
        compute_reserve_bytes: Some(0),
        kv_cache_bytes: Some(0),
        n_ctx: 256,
        n_ubatch: 256,
        ..LlamaParams::default()
    }
}

pub fn measure(model: &Path, device: Option<&str>, quick: bool) -> Result<LlamaBenchReport> {
    let device = device.unwrap_or("CPU");
    let rounds = if quick { 2 } else { 5 };
    let options = RunOptions {
        prompt: PROMPT.into(),
        n_predict: if quick { 16 } else { 48 },
        n_ctx: 256,
        n_ubatch: 256,
        threads: std::thread::available_parallelism().map_or(2, |n| n.get() as i32),
        mmap: true,
        threadpool: true,
        progress: false,
        trace: None,
    };
    let roomy = Hook::new(params(device, 1 << 40, 1), model)?.plan()?;
    let half = roomy.global_bytes + (roomy.full_cache_bytes - roomy.global_bytes) / 2;
    let budgets = [
        ("all resident", roomy.full_cache_bytes),
        ("about half", half),
        ("global + 2 slots", roomy.streaming_bytes),
    ];
    let steps = 1 + budgets.len() * rounds * 2;
    let mut step = 0;
    let mut progress = |what: &str| {
        step += 1;
        eprintln!("bench: [{step}/{steps}] {what}");
    };
    progress("warm-up (unmodified llama.cpp)");
    let warm = run(model, &options, None)?.0;
    let mut results = Vec::new();
    for (name, budget) in budgets {
        let mut reference: Vec<RunResult> = Vec::new();
        let mut streamed: Vec<RunResult> = Vec::new();
        let mut report = None;
        for round in 0..rounds {
            progress(&format!("{name}: unmodified, round {}", round + 1));
            reference.push(run(model, &options, None)?.0);
            progress(&format!("{name}: streamed, round {}", round + 1));
            let (result, stats) = run(model, &options, Some(params(device, budget, 1)))?;
            streamed.push(result);
            report = stats;
        }
        let report = report.expect("a streamed run reports its engine");
        let identical = streamed.iter().chain(&reference).all(|r| {
            let c = compare(&warm, r);
            c.tokens_identical && c.logits_identical
        });
        let rate =
            |runs: &[RunResult], f: fn(&RunResult) -> f64| median(runs.iter().map(f).collect());
        let prefill = rate(&streamed, RunResult::prefill_tokens_per_second);
        let decode = rate(&streamed, RunResult::decode_tokens_per_second);
        let reference_prefill = rate(&reference, RunResult::prefill_tokens_per_second);
        let reference_decode = rate(&reference, RunResult::decode_tokens_per_second);
        let s = &report.stats;
        results.push(BudgetResult {
            name,
            budget_bytes: budget,
            mode: report.plan.mode.as_str(),
            resident_layers: report.plan.resident_layers.len(),
            streamed_layers: report.plan.streamed_layers.len(),
            bytes_per_token: report.plan.bytes_per_pass,
            identical,
            prefill_tokens_per_second: prefill,
            decode_tokens_per_second: decode,
            reference_prefill_tokens_per_second: reference_prefill,
            reference_decode_tokens_per_second: reference_decode,
            prefill_ratio: prefill / reference_prefill,
            decode_ratio: decode / reference_decode,
            prefetch_hits: s.prefetch_hits,
            prefetch_misses: s.prefetch_misses,
            wait_ms_per_pass: s.wait_us as f64 / 1e3 / s.passes.max(1) as f64,
        });
    }
    let resident = &results[0];
    Ok(LlamaBenchReport {
        model: model.display().to_string(),
        device: device.to_string(),
        rounds,
        n_predict: options.n_predict,
        prompt_tokens: warm.prompt_tokens,
        resident_overhead_target_met: resident.prefill_ratio >= RESIDENT_TARGET
            && resident.decode_ratio >= RESIDENT_TARGET,
        budgets: results,
    })
}

pub fn run_llama_bench(model: &Path, device: Option<&str>, json: bool, quick: bool) -> Result<()> {
    let r = measure(model, device, quick)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&r).expect("plain data serializes")
        );
    } else {
        println!(
            "llama.cpp through offload-engine vs unmodified llama.cpp on {}: {} ({} prompt tokens, {} generated, median of {} interleaved rounds)",
            r.device, r.model, r.prompt_tokens, r.n_predict, r.rounds
        );
        for b in &r.budgets {
            println!(
                "{:<17} {:>10}  {:<9} {:>2} resident {:>2} streamed, {:>10} per token; outputs {}",
                b.name,
                format_bytes(b.budget_bytes),
                b.mode,
                b.resident_layers,
                b.streamed_layers,
                format_bytes(b.bytes_per_token),
                if b.identical {
                    "identical"
                } else {
                    "DIFFERENT"
                }
            );
            println!(
                "    prefill {:8.1} tok/s vs {:8.1} unmodified: ratio {:.3}",
                b.prefill_tokens_per_second, b.reference_prefill_tokens_per_second, b.prefill_ratio
            );
            println!(
                "    decode  {:8.1} tok/s vs {:8.1} unmodified: ratio {:.3}; prefetch hits {} misses {}, wait {:.3} ms per pass",
                b.decode_tokens_per_second,
                b.reference_decode_tokens_per_second,
                b.decode_ratio,
                b.prefetch_hits,
                b.prefetch_misses,
                b.wait_ms_per_pass
            );
        }
        println!(
            "all resident through the engine: overhead target <= 3% (ratios >= {RESIDENT_TARGET}): {}",
            if r.resident_overhead_target_met { "met" } else { "NOT MET" }
        );
    }
    if r.budgets.iter().any(|b| !b.identical) {
        return Err(Error::new(
            Status::Internal,
            "a streamed run's tokens or logits differ from unmodified llama.cpp",
        ));
    }
    Ok(())
}
