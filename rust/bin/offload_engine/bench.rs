//! `offload-engine bench`: every streaming figure measured in one run, printed as ratios so
//! a noisy shared machine does not turn them into flaky pass/fail tests.

use std::time::Instant;

use crate::models::{run_with_engine, Architecture, DemoConfig, DemoModel};
use offload_engine::engine::{Engine, EngineParams};
use offload_engine::error::Result;
use offload_engine::executor::{Executor, LayeredModel};
use offload_engine::planner::{Link, Workload};
use offload_engine::units::format_bytes;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// ggml device ("CPU", "CUDA0", ...); default: the first GPU, else the CPU.
    #[arg(long)]
    pub device: Option<String>,
    /// A smaller model and fewer repetitions (tests, quick looks).
    #[arg(long)]
    pub quick: bool,
    /// Stream from the model file (disk tier): read throughput and peak RSS, on the CPU.
    #[arg(long)]
    pub disk: bool,
    /// llama.cpp on this GGUF model through the drop-in against unmodified llama.cpp:
    /// prefill and decode tokens/s at three budgets (all resident, about half, global + 2
    /// slots), as ratios from interleaved runs.
    #[cfg(feature = "vendored-ggml")]
    #[arg(long, value_name = "MODEL", conflicts_with = "disk")]
    pub llama: Option<std::path::PathBuf>,
    /// With --llama: run llama.cpp on the CPU in a memory cgroup of this size (below the
    /// model's), unmodified (mmap) and through the engine from the file, side by side.
    #[cfg(feature = "vendored-ggml")]
    #[arg(long, value_parser = crate::args::size, requires = "llama")]
    pub memory_limit: Option<u64>,
    /// Write the traced run's timeline (copy, wait and compute lanes) as Chrome trace-event
    /// JSON (open in Perfetto).
    #[arg(long)]
    pub trace: Option<std::path::PathBuf>,
}

/// `offload-engine bench`: the streaming benchmark, or the disk tier's with `--disk`.
pub fn bench(args: &BenchArgs) -> Result<()> {
    let load_start = load_average();
    #[cfg(feature = "vendored-ggml")]
    if let Some(model) = &args.llama {
        let outcome = match args.memory_limit {
            Some(limit) => {
                crate::bench_cgroup::run_memory_limited(model, limit, args.json, args.quick)
            }
            None => crate::bench_llama::run_llama_bench(
                model,
                args.device.as_deref(),
                args.json,
                args.quick,
            ),
        };
        if !args.json {
            report_load(load_start, load_average());
        }
        return outcome;
    }
    let outcome = if args.disk {
        if args.device.as_deref().is_some_and(|d| d != "CPU") {
            return Err(offload_engine::error::Error::invalid(
                "bench --disk measures the disk tier on the CPU device; --device applies to the streaming benchmark",
            ));
        }
        run_disk_bench(args.json, args.quick)
    } else {
        run_bench(
            args.json,
            args.device.as_deref(),
            args.quick,
            args.trace.as_deref(),
        )
    };
    let load_end = load_average();
    if !args.json {
        report_load(load_start, load_end);
    }
    outcome
}

/// The 1-minute load average and the number of cores (None where /proc has none).
fn load_average() -> Option<(f64, usize)> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let load = text.split_whitespace().next()?.parse().ok()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some((load, cores))
}

/// Ratios from one run hold only if nothing else used the machine: say how busy it was.
fn report_load(start: Option<(f64, usize)>, end: Option<(f64, usize)>) {
    let (Some((start, cores)), Some((end, _))) = (start, end) else {
        return;
    };
    println!("load average {start:.2} before the run, {end:.2} after ({cores} cores)");
    if start > cores as f64 / 2.0 {
        println!(
            "warning: the machine was busy before the benchmark started (load {start:.2} on {cores} cores): the figures may be off; run it again on an idle machine"
        );
    }
}

/// One benchmark phase at a time on stderr, so a run of many seconds is never silent.
struct Progress {
    step: usize,
    steps: usize,
}

impl Progress {
    fn new(steps: usize) -> Progress {
        Progress { step: 0, steps }
    }

    fn next(&mut self, what: &str) {
        self.step += 1;
        eprintln!("bench: [{}/{}] {what}", self.step, self.steps);
    }
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT MET"
    }
}

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
    /// Pinned host-to-device bandwidth (devices with pinned memory), GB/s.
    pub pinned_link_gbps: Option<f64>,
    /// Copy throughput while streaming as a fraction of the pinned link bandwidth.
    pub link_utilisation: Option<f64>,
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

/// A fully resident run through the engine against the same run without it, pass by pass in
/// alternation on two identical models (the engine redirects its model's tensors), so drift
/// in the machine's speed hits both. Returns the best pass of each, in seconds.
fn resident_overhead(
    model: &DemoModel,
    config: &DemoConfig,
    params: EngineParams,
    passes: usize,
) -> Result<(f64, f64)> {
    let mut engine = Engine::new(params)?;
    // The same model loaded straight into the device's memory by the host, no engine.
    let twin = DemoModel::on_device(config.clone(), engine.device())?;
    // SAFETY: the model outlives this engine.
    unsafe { engine.register_context(model.context())? };
    let plan = engine.prepare(&Workload::default(), &Link::named("ddr4")?)?;
    if plan.mode != offload_engine::planner::Mode::Full {
        return Err(offload_engine::error::Error::new(
            offload_engine::error::Status::Internal,
            "resident run did not plan full",
        ));
    }
    let mut with_engine = Executor::new(engine.backend(), model.activation_shape())?;
    let backend =
        offload_engine::backend::Device::select(Some(&engine.device().name))?.init_backend()?;
    backend.set_threads(1);
    let mut without = Executor::new(&backend, twin.activation_shape())?;
    let (mut engine_best, mut plain_best) = (f64::MAX, f64::MAX);
    for round in 0..passes.max(2) * 2 {
        // Alternate which goes first, so neither always runs on the other's warm caches.
        for engine_turn in [round % 2 == 0, round % 2 == 1] {
            let start = Instant::now();
            if engine_turn {
                with_engine.run_pass(model, Some(&mut engine))?;
                engine_best = engine_best.min(start.elapsed().as_secs_f64());
            } else {
                without.run_pass(&twin, None)?;
                plain_best = plain_best.min(start.elapsed().as_secs_f64());
            }
        }
    }
    Ok((engine_best, plain_best))
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
    let mut registry = offload_engine::registry::Registry::new(None);
    for name in &names {
        registry.add(offload_engine::registry::TensorDesc {
            name,
            ggml_type: 1,
            dims: &[64, 64],
            bytes: 8192,
            source: offload_engine::registry::Source::Descriptor,
            location: offload_engine::registry::Location::Host,
        })?;
    }
    registry.finalize();
    let ms = start.elapsed().as_secs_f64() * 1e3;
    Ok((ms, registry.approx_heap_bytes() as f64 / names.len() as f64))
}

pub fn measure(
    device: Option<&str>,
    quick: bool,
    trace: Option<&std::path::Path>,
) -> Result<BenchReport> {
    let rounds = if quick { 2 } else { 3 };
    let mut progress = Progress::new(3 + rounds);
    progress.next("sizing the batch so a layer computes about as long as it copies");
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

    // The machine is shared: every configuration runs once per round, rounds interleaved, and
    // each figure is the best pass over all rounds, so slow spells hit all of them alike.
    let bench_device = offload_engine::backend::Device::select(device)?;
    let backend = bench_device.init_backend()?;
    backend.set_threads(1);
    let mut executor = Executor::new(&backend, model.activation_shape())?;
    let on_device = DemoModel::on_device(config.clone(), &bench_device)?;
    // Where the device has pinned host memory (a GPU), the link is the yardstick.
    let (_, pinned) = offload_engine::engine::measure_link(
        &bench_device,
        if quick { 16 << 20 } else { 256 << 20 },
    )?;
    let (mut full_t, mut streamed_t, mut naive_t, mut copy_t) = (vec![], vec![], vec![], vec![]);
    let mut outputs = Vec::new();
    let mut streamed_stats = None;
    for round in 0..rounds {
        progress.next(&format!(
            "round {} of {rounds}: resident, streamed, synchronous and copy-only runs",
            round + 1
        ));
        let full = run_with_engine(&model, params(weights * 2, 1), &workload(1), passes, None)?;
        full_t.push(steady(&full.pass_seconds));
        let streamed = run_with_engine(&model, params(budget, 1), &workload(1), passes, None)?;
        streamed_t.push(steady(&streamed.pass_seconds));
        let naive = run_with_engine(&model, params(budget, 0), &workload(0), passes, None)?;
        naive_t.push(steady(&naive.pass_seconds));
        copy_t.push(copies_alone(
            &model,
            params(budget, 1),
            &workload(1),
            passes,
        )?);
        outputs.push(executor.run_pass(&on_device, None)?);
        outputs.extend([full.output, streamed.output, naive.output]);
        streamed_stats = Some(streamed.stats);
    }
    let streamed = streamed_stats.expect("at least one round");
    progress.next("a traced streamed run");
    let traced_params = EngineParams {
        trace: true,
        ..params(budget, 1)
    };
    let traced = run_with_engine(&model, traced_params, &workload(1), 2, trace)?;
    progress.next("resident overhead, bookkeeping, planner and registry figures");
    let (compute_time, streamed_time, naive_time, copy_time) =
        (min(&full_t), min(&streamed_t), min(&naive_t), min(&copy_t));
    let (resident_time, reference) =
        resident_overhead(&model, &config, params(weights * 2, 1), passes * rounds)?;
    let bookkeeping = bookkeeping_us(&model, params(weights * 2, 1), &workload(1))?;
    let (registry_ms, bytes_per_tensor) = (0..3)
        .map(|_| registry_figures())
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .fold((f64::MAX, 0.0), |(best, _), (ms, bytes)| {
            (best.min(ms), bytes)
        });

    // The copy thread's bytes over its time (the placement is copied before, synchronously).
    let streaming_copy = (streamed.bytes_copied - streamed.placement_bytes) as f64
        / (streamed.copy_us.max(1) as f64 / 1e6);
    let limit = compute_time.max(copy_time);
    let device_name = offload_engine::backend::Device::select(device)?.name;
    Ok(BenchReport {
        device: device_name,
        model_bytes: weights,
        tokens: config.tokens,
        compute_alone_ms: compute_time * 1e3,
        copies_alone_ms: copy_time * 1e3,
        streamed_ms: streamed_time * 1e3,
        naive_ms: naive_time * 1e3,
        overlap_ratio: streamed_time / limit,
        naive_ratio: naive_time / limit,
        memcpy_gbps: memcpy / 1e9,
        streaming_copy_gbps: streaming_copy / 1e9,
        copy_fraction_of_memcpy: streaming_copy / memcpy,
        pinned_link_gbps: pinned,
        link_utilisation: pinned.map(|gbps| streaming_copy / 1e9 / gbps),
        overhead_us_per_layer: bookkeeping,
        reference_ms: reference * 1e3,
        resident_through_engine_ms: resident_time * 1e3,
        resident_overhead_fraction: resident_time / reference - 1.0,
        trace_overlap_ms: traced.overlap_us as f64 / 1e3,
        plan_1000_layers_ms: offload_engine::planner::bench_plan_1000_layers() * 1e3,
        registry_100k_ms: registry_ms,
        registry_bytes_per_tensor: bytes_per_tensor,
        bit_identical: outputs.windows(2).all(|w| w[0] == w[1]) && traced.output == outputs[0],
    })
}

pub fn run_bench(
    json: bool,
    device: Option<&str>,
    quick: bool,
    trace: Option<&std::path::Path>,
) -> Result<()> {
    let r = measure(device, quick, trace)?;
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
    println!("streamed, prefetch 1              {:9.2} ms/pass   ratio to max(compute, copies) {:.3} (target <= 1.15: {})", r.streamed_ms, r.overlap_ratio, verdict(r.overlap_ratio <= 1.15));
    println!(
        "naive synchronous loads           {:9.2} ms/pass   ratio {:.3}",
        r.naive_ms, r.naive_ratio
    );
    println!("copy throughput while streaming   {:9.2} GB/s = {:.1}% of memcpy {:.2} GB/s (target >= 80%: {})", r.streaming_copy_gbps, r.copy_fraction_of_memcpy * 100.0, r.memcpy_gbps, verdict(r.copy_fraction_of_memcpy >= 0.8));
    if let (Some(link), Some(used)) = (r.pinned_link_gbps, r.link_utilisation) {
        println!(
            "link utilisation while streaming  {:8.1}% of pinned host-to-device {link:.2} GB/s",
            used * 100.0
        );
    }
    println!(
        "engine bookkeeping                {:9.3} us/layer (target <= 10: {})",
        r.overhead_us_per_layer,
        verdict(r.overhead_us_per_layer <= 10.0)
    );
    println!(
        "resident via engine vs without    {:9.2} ms vs {:.2} ms: {:+.2}% (target <= 1%: {})",
        r.resident_through_engine_ms,
        r.reference_ms,
        r.resident_overhead_fraction * 100.0,
        verdict(r.resident_overhead_fraction <= 0.01)
    );
    println!(
        "copy/compute overlap in trace     {:9.2} ms",
        r.trace_overlap_ms
    );
    println!(
        "plan 1000 layers x 100 steps      {:9.3} ms (target < 10: {})",
        r.plan_1000_layers_ms,
        verdict(r.plan_1000_layers_ms < 10.0)
    );
    println!(
        "register 100k tensors             {:9.2} ms (target < 100: {}), {:.0} B/tensor (target < 256: {})",
        r.registry_100k_ms,
        verdict(r.registry_100k_ms < 100.0),
        r.registry_bytes_per_tensor,
        verdict(r.registry_bytes_per_tensor < 256.0)
    );
    println!("outputs bit-identical             {}", r.bit_identical);
    Ok(())
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DiskBenchReport {
    pub model_bytes: u64,
    pub ring_bytes: u64,
    pub arena_bytes: u64,
    pub model_over_ring: f64,
    pub direct_io: bool,
    pub sequential_warm_gbps: f64,
    pub streaming_warm_gbps: f64,
    pub read_fraction_warm: f64,
    /// The engine's reads with no compute beside them (passes without compute, warm).
    pub streaming_alone_warm_gbps: f64,
    pub sequential_cold_gbps: f64,
    pub streaming_cold_gbps: f64,
    pub read_fraction_cold: f64,
    /// The lower of the cold and warm fractions.
    pub read_fraction_of_sequential: f64,
    pub peak_rss_bytes: u64,
    pub rss_bound_bytes: u64,
    pub bit_identical: bool,
}

fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// Streams a model at least 8 times larger than its slot ring from its GGUF file.
pub fn measure_disk(quick: bool) -> Result<DiskBenchReport> {
    use crate::models::run_streamed;
    let mut progress = Progress::new(6);
    progress.next("writing the model file");
    let config = if quick {
        DemoConfig {
            hidden: 256,
            ffn: 704,
            layers: 24,
            vocab: 256,
            tokens: 4,
            ..DemoConfig::tiny(Architecture::Llama)
        }
    } else {
        DemoConfig {
            layers: 24,
            tokens: 4,
            ..DemoConfig::default_llama()
        }
    };
    let dir =
        std::env::temp_dir().join(format!("offload-engine-disk-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| offload_engine::error::Error::io(dir.display(), e))?;
    let path = dir.join("model.gguf");
    let reference = {
        let model = DemoModel::new(config.clone())?;
        let backend = offload_engine::backend::Device::select(Some("CPU"))?.init_backend()?;
        backend.set_threads(1);
        let out = crate::models::run_reference(&model, &backend, 1)?;
        model.write_gguf(&path)?;
        out
    };
    let twin = DemoModel::unallocated(config.clone())?;
    let weights = twin.weight_bytes();
    let workload = Workload {
        steps: 1,
        passes_per_step: 1,
        prefetch_depth: 1,
        ..Default::default()
    };
    // Room for the global tensors and the two slots a prefetch of one needs, as the file's
    // layout sizes them, and less than a third slot: nothing resident, the ring is tiny.
    let streaming_need = {
        let mut files = offload_engine::registry::Registry::new(None);
        files.add_gguf(&path)?;
        let cost = files.model_cost(true);
        let roomy = offload_engine::planner::Budget::from_free(u64::MAX / 4);
        offload_engine::planner::plan(&cost, &roomy, &workload, &Link::named("nvme")?)?
            .streaming_bytes
    };
    let params = EngineParams {
        device: Some("CPU".into()),
        budget_bytes: Some(streaming_need + (1 << 20)),
        prefetch_depth: 1,
        compute_threads: 1,
        ..Default::default()
    };
    // Peak RSS from here on: the model in memory above is gone.
    let _ = std::fs::write("/proc/self/clear_refs", "5");

    progress.next("sequential read, warm page cache");
    let sequential_warm = offload_engine::diskio::sequential_read_bandwidth(&path, 8 << 20)?;
    progress.next("streaming from the file, warm page cache");
    let warm = run_streamed(&twin, Some(&path), params.clone(), &workload, 1, None)?;
    progress.next("streaming from the file with no compute, warm page cache");
    let alone = streaming_alone(&path, params.clone(), &workload)?;
    offload_engine::diskio::drop_page_cache(&path)?;
    progress.next("sequential read, cold page cache");
    let sequential_cold = offload_engine::diskio::sequential_read_bandwidth(&path, 8 << 20)?;
    offload_engine::diskio::drop_page_cache(&path)?;
    progress.next("streaming from the file, cold page cache");
    let cold = run_streamed(&twin, Some(&path), params, &workload, 1, None)?;
    let peak = peak_rss();

    // What the copy thread read over its time (the placement was read before it started).
    let throughput = |r: &crate::models::RunResult| {
        (r.stats.bytes_copied - r.stats.placement_bytes) as f64
            / (r.stats.copy_us.max(1) as f64 / 1e6)
    };
    let ring = u64::from(warm.plan.slot_count) * warm.plan.slot_bytes;
    let direct = offload_engine::diskio::FileSet::open(&[offload_engine::diskio::ModelFile {
        path: path.clone(),
        stamp: None,
    }])?
    .direct(0);
    let (fw, fc) = (
        throughput(&warm) / sequential_warm,
        throughput(&cold) / sequential_cold,
    );
    std::fs::remove_dir_all(&dir).ok();
    Ok(DiskBenchReport {
        model_bytes: weights,
        ring_bytes: ring,
        arena_bytes: warm.stats.arena_bytes,
        model_over_ring: weights as f64 / ring.max(1) as f64,
        direct_io: direct,
        sequential_warm_gbps: sequential_warm / 1e9,
        streaming_warm_gbps: throughput(&warm) / 1e9,
        read_fraction_warm: fw,
        streaming_alone_warm_gbps: alone / 1e9,
        sequential_cold_gbps: sequential_cold / 1e9,
        streaming_cold_gbps: throughput(&cold) / 1e9,
        read_fraction_cold: fc,
        read_fraction_of_sequential: fw.min(fc),
        peak_rss_bytes: peak,
        rss_bound_bytes: warm.stats.arena_bytes + (64 << 20),
        bit_identical: warm.output == reference && cold.output == reference,
    })
}

/// The copy thread's read throughput over two passes that compute nothing: the disk tier's
/// reads with the memory bandwidth to themselves.
fn streaming_alone(
    path: &std::path::Path,
    params: EngineParams,
    workload: &Workload,
) -> Result<f64> {
    let mut registry = offload_engine::registry::Registry::new(None);
    registry.load_gguf(path, true)?;
    let mut engine = Engine::with_registry(params, registry)?;
    engine.prepare(workload, &Link::named("nvme")?)?;
    let layers = engine.layer_count();
    for _ in 0..2 {
        engine.begin_pass()?;
        for layer in 0..layers {
            engine.begin_layer(layer)?;
            engine.end_layer(layer)?;
        }
        engine.end_pass()?;
    }
    let s = engine.stats()?;
    Ok((s.bytes_copied - s.placement_bytes) as f64 / (s.copy_us.max(1) as f64 / 1e6))
}

pub fn run_disk_bench(json: bool, quick: bool) -> Result<()> {
    let r = measure_disk(quick)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
        return Ok(());
    }
    println!(
        "model {} streamed from its file through a ring of {} ({:.1}x smaller); direct I/O: {}",
        format_bytes(r.model_bytes),
        format_bytes(r.ring_bytes),
        r.model_over_ring,
        r.direct_io
    );
    println!(
        "warm page cache: streaming {:.2} GB/s vs sequential read {:.2} GB/s = {:.1}%",
        r.streaming_warm_gbps,
        r.sequential_warm_gbps,
        r.read_fraction_warm * 100.0
    );
    println!(
        "  the same reads with no compute beside them: {:.2} GB/s = {:.1}% of sequential",
        r.streaming_alone_warm_gbps,
        r.streaming_alone_warm_gbps / r.sequential_warm_gbps.max(1e-9) * 100.0
    );
    println!(
        "cold page cache: streaming {:.2} GB/s vs sequential read {:.2} GB/s = {:.1}%",
        r.streaming_cold_gbps,
        r.sequential_cold_gbps,
        r.read_fraction_cold * 100.0
    );
    println!(
        "target: both >= 80% of sequential: {}",
        verdict(r.read_fraction_of_sequential >= 0.8)
    );
    println!(
        "peak RSS {} vs bound {} (ring + resident + global + 64 MiB)",
        format_bytes(r.peak_rss_bytes),
        format_bytes(r.rss_bound_bytes)
    );
    println!("outputs bit-identical: {}", r.bit_identical);
    Ok(())
}
