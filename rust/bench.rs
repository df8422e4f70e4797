//! `offload-engine bench`: every streaming figure measured in one run, printed as ratios so
//! a noisy shared machine does not turn them into flaky pass/fail tests.

use std::time::Instant;

use crate::demo::{run_with_engine, Architecture, DemoConfig, DemoModel};
use crate::engine::{Engine, EngineParams};
use crate::error::Result;
use crate::executor::{Executor, LayeredModel};
use crate::planner::{Link, Workload};
use crate::units::format_bytes;

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub device: String,
    pub model_bytes: u64,
    pub tokens: i64,
    pub compute_alone_ms: f64,
    pub copies_alone_ms: f64,
    pub streamed_ms: f64,
    pub naive_ms: f64,
    pub overlap_ratio: f64,
    pub naive_ratio: f64,
    pub memcpy_gbps: f64,
    pub streaming_copy_gbps: f64,
    pub copy_fraction_of_memcpy: f64,
    pub overhead_us_per_layer: f64,
    pub reference_ms: f64,
    pub resident_through_engine_ms: f64,
    pub resident_overhead_fraction: f64,
    pub trace_overlap_ms: f64,
    pub plan_1000_layers_ms: f64,
    pub registry_100k_ms: f64,
    pub registry_bytes_per_tensor: f64,
    pub bit_identical: bool,
}

/// Plain single-threaded memcpy bandwidth, bytes per second (best of a few rounds).
pub fn memcpy_bandwidth(bytes: usize, rounds: usize) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    let mut best = f64::MAX;
    for _ in 0..rounds.max(1) {
        let start = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
        best = best.min(start.elapsed().as_secs_f64());
    }
    bytes as f64 / best
}

fn min(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::MAX, f64::min)
}

/// Fastest pass after the first (warm-up) one.
fn steady(values: &[f64]) -> f64 {
    if values.len() > 1 {
        min(&values[1..])
    } else {
        min(values)
    }
}

/// Time of a pass that brackets every layer but computes nothing: the copies alone.
fn copies_alone(
    model: &DemoModel,
    params: EngineParams,
    workload: &Workload,
    passes: usize,
) -> Result<f64> {
    let mut engine = Engine::new(params)?;
    // SAFETY: the model outlives this engine.
    unsafe { engine.register_context(model.context())? };
    engine.prepare(workload, &Link::named("ddr4")?)?;
    let layers = model.layer_count();
    let mut times = Vec::new();
    for _ in 0..passes {
        let start = Instant::now();
        engine.begin_pass()?;
        for l in 0..layers {
            engine.begin_layer(l)?;
            engine.end_layer(l)?;
        }
        engine.end_pass()?;
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(steady(&times))
}

/// Per-layer cost of begin/end on resident layers (no copy, no compute).
fn bookkeeping_us(model: &DemoModel, params: EngineParams, workload: &Workload) -> Result<f64> {
    let mut engine = Engine::new(params)?;
    // SAFETY: the model outlives this engine.
    unsafe { engine.register_context(model.context())? };
    engine.prepare(workload, &Link::named("ddr4")?)?;
    let layers = model.layer_count();
    let rounds = 2000;
    let start = Instant::now();
    for _ in 0..rounds {
        engine.begin_pass()?;
        for l in 0..layers {
            engine.begin_layer(l)?;
            engine.end_layer(l)?;
        }
        engine.end_pass()?;
    }
    Ok(start.elapsed().as_secs_f64() * 1e6 / (rounds * layers) as f64)
}

fn registry_figures() -> Result<(f64, f64)> {
    let names: Vec<String> = (0..100_000)
        .map(|i| {
            format!(
                "model.diffusion_model.double_blocks.{}.img_attn.qkv_{}.weight",
                i / 50,
                i % 50
            )
        })
        .collect();
    let start = Instant::now();
    let mut registry = crate::registry::Registry::new(None);
    for name in &names {
        registry.add(crate::registry::TensorDesc {
            name,
            ggml_type: 1,
            dims: &[64, 64],
            bytes: 8192,
            source: crate::registry::Source::Descriptor,
            location: crate::registry::Location::Host,
        })?;
    }
    registry.finalize();
    let ms = start.elapsed().as_secs_f64() * 1e3;
    Ok((ms, registry.approx_heap_bytes() as f64 / names.len() as f64))
}

pub fn measure(device: Option<&str>, quick: bool) -> Result<BenchReport> {
    let mut config = if quick {
        DemoConfig {
            hidden: 256,
            ffn: 704,
            layers: 8,
            vocab: 256,
            ..DemoConfig::tiny(Architecture::Llama)
        }
    } else {
        DemoConfig::default_llama()
    };
    config.tokens = 8;
    let passes = if quick { 4 } else { 6 };
    let memcpy = memcpy_bandwidth(if quick { 16 << 20 } else { 128 << 20 }, 5);

    let params = |budget: u64, depth: u32| EngineParams {
        device: device.map(str::to_string),
        budget_bytes: Some(budget),
        prefetch_depth: depth,
        compute_threads: 1,
        ..Default::default()
    };
    let workload = |depth: u32| Workload {
        steps: passes as u32,
        passes_per_step: 1,
        prefetch_depth: depth,
        ..Default::default()
    };

    // Size the batch so one layer's compute takes about as long as its copy.
    let probe = DemoModel::new(config.clone())?;
    let weights = probe.weight_bytes();
    let budget = weights / 3;
    let compute_probe = steady(
        &run_with_engine(&probe, params(weights * 2, 1), &workload(1), 3, None)?.pass_seconds,
    );
    let copy_probe = copies_alone(&probe, params(budget, 1), &workload(1), 3)?;
    drop(probe);
    let scale = (copy_probe / compute_probe.max(1e-9)).clamp(0.125, 64.0);
    config.tokens = ((config.tokens as f64 * scale).round() as i64).clamp(1, 512);
    let model = DemoModel::new(config.clone())?;

    let full = run_with_engine(&model, params(weights * 2, 1), &workload(1), passes, None)?;
    let streamed = run_with_engine(&model, params(budget, 1), &workload(1), passes, None)?;
    let traced = run_with_engine(
        &model,
        params(budget, 1),
        &workload(1),
        2,
        Some(&std::env::temp_dir().join("offload-engine-bench-trace.json")),
    )?;
    let naive = run_with_engine(&model, params(budget, 0), &workload(0), passes, None)?;
    let copy_time = copies_alone(&model, params(budget, 1), &workload(1), passes)?;
    let compute_time = steady(&full.pass_seconds);

    let backend = crate::backend::Device::select(device)?.init_backend()?;
    backend.set_threads(1);
    let mut executor = Executor::new(&backend, model.activation_shape())?;
    let mut reference_times = Vec::new();
    let mut reference_out = Vec::new();
    for _ in 0..passes {
        let start = Instant::now();
        reference_out = executor.run_pass(&model, None)?;
        reference_times.push(start.elapsed().as_secs_f64());
    }
    let reference = steady(&reference_times);
    let bookkeeping = bookkeeping_us(&model, params(weights * 2, 1), &workload(1))?;
    let (registry_ms, bytes_per_tensor) = registry_figures()?;

    let streaming_copy =
        streamed.stats.bytes_copied as f64 / (streamed.stats.copy_us.max(1) as f64 / 1e6);
    let limit = compute_time.max(copy_time);
    let device_name = crate::backend::Device::select(device)?.name;
    Ok(BenchReport {
        device: device_name,
        model_bytes: weights,
        tokens: config.tokens,
        compute_alone_ms: compute_time * 1e3,
        copies_alone_ms: copy_time * 1e3,
        streamed_ms: steady(&streamed.pass_seconds) * 1e3,
        naive_ms: steady(&naive.pass_seconds) * 1e3,
        overlap_ratio: steady(&streamed.pass_seconds) / limit,
        naive_ratio: steady(&naive.pass_seconds) / limit,
        memcpy_gbps: memcpy / 1e9,
        streaming_copy_gbps: streaming_copy / 1e9,
        copy_fraction_of_memcpy: streaming_copy / memcpy,
        overhead_us_per_layer: bookkeeping,
        reference_ms: reference * 1e3,
        resident_through_engine_ms: compute_time * 1e3,
        resident_overhead_fraction: compute_time / reference - 1.0,
        trace_overlap_ms: traced.overlap_us as f64 / 1e3,
        plan_1000_layers_ms: crate::planner::bench_plan_1000_layers() * 1e3,
        registry_100k_ms: registry_ms,
        registry_bytes_per_tensor: bytes_per_tensor,
        bit_identical: full.output == streamed.output
            && streamed.output == naive.output
            && naive.output == reference_out,
    })
}

pub fn run_bench(json: bool, device: Option<&str>, quick: bool) -> Result<()> {
    let r = measure(device, quick)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
        return Ok(());
    }
    println!(
        "device {}, model {}, batch {} tokens, 1 compute thread + 1 copy thread",
        r.device,
        format_bytes(r.model_bytes),
        r.tokens
    );
    println!(
        "compute alone (all resident)      {:9.2} ms/pass",
        r.compute_alone_ms
    );
    println!(
        "copies alone (streamed layers)    {:9.2} ms/pass",
        r.copies_alone_ms
    );
    println!("streamed, prefetch 1              {:9.2} ms/pass   ratio to max(compute, copies) {:.3} (target <= 1.15)", r.streamed_ms, r.overlap_ratio);
    println!(
        "naive synchronous loads           {:9.2} ms/pass   ratio {:.3}",
        r.naive_ms, r.naive_ratio
    );
    println!("copy throughput while streaming   {:9.2} GB/s = {:.1}% of memcpy {:.2} GB/s (target >= 80%)", r.streaming_copy_gbps, r.copy_fraction_of_memcpy * 100.0, r.memcpy_gbps);
    println!(
        "engine bookkeeping                {:9.3} us/layer (target <= 10)",
        r.overhead_us_per_layer
    );
    println!(
        "resident via engine vs without    {:9.2} ms vs {:.2} ms: {:+.2}% (target <= 1%)",
        r.resident_through_engine_ms,
        r.reference_ms,
        r.resident_overhead_fraction * 100.0
    );
    println!(
        "copy/compute overlap in trace     {:9.2} ms",
        r.trace_overlap_ms
    );
    println!(
        "plan 1000 layers x 100 steps      {:9.3} ms (target < 10)",
        r.plan_1000_layers_ms
    );
    println!(
        "register 100k tensors             {:9.2} ms (target < 100), {:.0} B/tensor (target < 256)",
        r.registry_100k_ms, r.registry_bytes_per_tensor
    );
    println!("outputs bit-identical             {}", r.bit_identical);
    Ok(())
}
