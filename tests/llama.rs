//! The llama.cpp drop-in on a real model (Gemma 3 270M Q4_K_M, fetched once into the target
//! directory by tests/models/fetch_gemma.sh) with the llama.cpp this crate builds: tokens and
//! logits bit-identical to unmodified llama.cpp for prefill and decode, at three budgets and
//! prefetch depths 0, 1 and 2, with mmap on and off, from the model file, with a host
//! callback chained, with two contexts one after the other; and the misuse the header names.

#[path = "common/gemma.rs"]
mod gemma;
#[path = "../rust/bin/offload_engine/llama_run.rs"]
#[allow(dead_code)]
mod llama_run;

use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use gemma::gemma;

use llama_run::{HostEval, LoadedModel, RunOptions, RunResult, Session};
use offload_engine::engine::EngineParams;
use offload_engine::error::Status;
use offload_engine::ggml as sys;
use offload_engine::llama::{Hook, LlamaParams};
use offload_engine::planner::{Mode, Plan};

/// One llama.cpp run at a time: each takes the machine's cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn options() -> RunOptions {
    RunOptions {
        prompt: "The three primary colors are".into(),
        n_predict: 8,
        n_ctx: 256,
        n_ubatch: 256,
        threads: 2,
        mmap: true,
        threadpool: true,
        progress: false,
        trace: None,
    }
}

/// The engine on the CPU device with exactly `budget` bytes for weights (no reserves).
fn params(budget: u64, depth: u32) -> LlamaParams {
    LlamaParams {
        engine: EngineParams {
            device: Some("CPU".into()),
            budget_bytes: Some(budget),
            prefetch_depth: depth,
            ..EngineParams::default()
        },
        compute_reserve_bytes: Some(0),
        kv_cache_bytes: Some(0),
        n_ctx: 256,
        n_ubatch: 256,
        ..LlamaParams::default()
    }
}

fn reference(options: &RunOptions) -> RunResult {
    llama_run::run(gemma(), options, None)
        .expect("unmodified llama.cpp runs")
        .0
}

fn assert_identical(reference: &RunResult, streamed: &RunResult, what: &str) {
    assert_eq!(reference.prompt_tokens, streamed.prompt_tokens, "{what}");
    assert_eq!(reference.tokens, streamed.tokens, "{what}: tokens");
    assert_eq!(reference.logits.len(), streamed.logits.len(), "{what}");
    // Digests of every logit's bits (llama_run::logits_digest), per step.
    for (step, (a, b)) in reference.logits.iter().zip(&streamed.logits).enumerate() {
        assert_eq!(
            a, b,
            "{what}: logits differ at step {step} (0 is the prefill)"
        );
    }
}

/// The three budgets: every layer resident, about half streamed, only the global tensors
/// plus the two slots a prefetching ring needs.
fn budgets() -> [(&'static str, u64); 3] {
    let roomy = Hook::new(params(4 << 30, 1), gemma()).expect("the file plans");
    let plan = roomy.plan().expect("a plan");
    let half = plan.global_bytes + (plan.full_cache_bytes - plan.global_bytes) / 2;
    [
        ("all resident", plan.full_cache_bytes),
        ("about half", half),
        ("global + 2 slots", plan.streaming_bytes),
    ]
}

#[test]
fn tokens_and_logits_match_unmodified_llama_at_three_budgets_and_depths() {
    let _serial = serial();
    let options = options();
    let reference = reference(&options);
    assert_eq!(reference.logits.len(), options.n_predict as usize);
    for (name, budget) in budgets() {
        for depth in [0, 1, 2] {
            let what = format!("{name} ({budget} bytes), prefetch depth {depth}");
            let (streamed, report) =
                llama_run::run(gemma(), &options, Some(params(budget, depth))).expect(&what);
            let report = report.expect("a streamed run reports");
            assert_identical(&reference, &streamed, &what);
            let (plan, stats) = (&report.plan, &report.stats);
            // One pass per graph: the prompt, then each decoded token.
            assert_eq!(stats.passes, 1 + streamed.decode_steps as u64, "{what}");
            assert_eq!(
                stats.streamed_bytes,
                plan.bytes_per_pass * stats.passes,
                "{what}: the plan's bytes per pass is what streamed"
            );
            assert_eq!(stats.placement_bytes, plan.placement_bytes, "{what}");
            match name {
                "all resident" => {
                    assert_eq!(plan.mode, Mode::Full, "{what}");
                    assert_eq!(stats.streamed_bytes, 0, "{what}");
                }
                _ => {
                    assert_eq!(plan.mode, Mode::Streaming, "{what}");
                    // The engine really moved the weights the graph read: several layers
                    // share each slot, so a layer not copied in just before it ran would
                    // have computed with another layer's weights.
                    assert!(stats.bytes_copied > plan.placement_bytes, "{what}");
                    assert!(
                        plan.streamed_layers.len() > plan.slot_count as usize,
                        "{what}"
                    );
                    if depth > 0 {
                        assert_eq!(stats.prefetch_misses, 0, "{what}: in-order passes prefetch");
                    }
                }
            }
            if name == "global + 2 slots" {
                // Depth 0 needs one slot, and the other slot's room holds a resident layer.
                let (streamed, slots) = if depth == 0 { (17, 1) } else { (18, 2) };
                assert_eq!(plan.streamed_layers.len(), streamed, "{what}");
                assert_eq!(plan.slot_count, slots, "{what}");
            }
        }
    }
}

#[test]
fn mmap_off_and_the_disk_tier_match_too() {
    let _serial = serial();
    let [_, (_, half), (_, tight)] = budgets();
    let mmap_off = RunOptions {
        mmap: false,
        ..options()
    };
    let reference = reference(&mmap_off);
    let (streamed, _) = llama_run::run(gemma(), &mmap_off, Some(params(half, 1))).unwrap();
    assert_identical(&reference, &streamed, "mmap off, half streamed");

    // The disk tier: every weight read from the file. At adopt the engine drops the pages of
    // llama.cpp's own copies (which the no-mmap load wrote): they read as zeros from then
    // on, so identical outputs show every weight the graph read came through the engine.
    for (options, what) in [
        (options(), "file-backed, mmap"),
        (mmap_off, "file-backed, no mmap"),
    ] {
        let file_backed = LlamaParams {
            file_backed: true,
            ..params(tight, 1)
        };
        let (streamed, report) = llama_run::run(gemma(), &options, Some(file_backed)).unwrap();
        assert_identical(&reference, &streamed, what);
        let report = report.unwrap();
        assert!(
            report.stats.bytes_copied > report.plan.placement_bytes,
            "{what}"
        );
    }
}

/// A host callback (imatrix-like) counting the nodes it is asked about and reading every
/// layer output it asks for.
struct Watcher {
    asked: AtomicU64,
    read: AtomicU64,
    checksum: AtomicU64,
}

unsafe extern "C" fn watch(t: *mut sys::ggml_tensor, ask: bool, data: *mut c_void) -> bool {
    // SAFETY: the test passes a live Watcher; ggml passes a valid node.
    let (watcher, tensor) = unsafe { (&*(data as *const Watcher), &*t) };
    // SAFETY: a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(tensor.name.as_ptr()) }.to_string_lossy();
    let wanted = name.starts_with("l_out-");
    if ask {
        watcher.asked.fetch_add(1, Ordering::Relaxed);
        return wanted;
    }
    if wanted {
        // The node was computed: its data is readable (the CPU backend's host memory).
        // SAFETY: an f32 node of ggml_nelements floats in host memory.
        let values = unsafe {
            std::slice::from_raw_parts(tensor.data as *const f32, sys::ggml_nelements(t) as usize)
        };
        let sum = values
            .iter()
            .fold(0u64, |h, v| h.rotate_left(5) ^ u64::from(v.to_bits()));
        watcher.checksum.fetch_xor(sum, Ordering::Relaxed);
        watcher.read.fetch_add(1, Ordering::Relaxed);
    }
    true
}

#[test]
fn a_host_callback_is_chained_and_sees_what_it_would_alone() {
    let _serial = serial();
    let [_, (_, half), _] = budgets();
    let options = options();
    let run_watched = |engine: Option<LlamaParams>| {
        let watcher = Box::new(Watcher {
            asked: AtomicU64::new(0),
            read: AtomicU64::new(0),
            checksum: AtomicU64::new(0),
        });
        let host = HostEval {
            callback: watch,
            data: (&*watcher as *const Watcher).cast_mut().cast(),
        };
        let hook = engine.map(|p| Hook::new(p, gemma()).unwrap());
        let model = LoadedModel::load(gemma(), &options, hook).unwrap();
        if let Some(hook) = model.hook() {
            hook.adopt().unwrap();
        }
        let result = Session::new(&model, &options, Some(host))
            .unwrap()
            .generate(&options)
            .unwrap();
        drop(model);
        (result, watcher)
    };
    let (alone, watched_alone) = run_watched(None);
    let (chained, watched_chained) = run_watched(Some(params(half, 1)));
    assert_identical(&alone, &chained, "host callback chained");
    let passes = 1 + chained.decode_steps as u64;
    assert_eq!(watched_chained.read.load(Ordering::Relaxed), 18 * passes);
    for (a, b, what) in [
        (&watched_alone.asked, &watched_chained.asked, "nodes asked"),
        (
            &watched_alone.read,
            &watched_chained.read,
            "layer outputs read",
        ),
        (
            &watched_alone.checksum,
            &watched_chained.checksum,
            "their contents",
        ),
    ] {
        assert_eq!(
            a.load(Ordering::Relaxed),
            b.load(Ordering::Relaxed),
            "{what}"
        );
    }
}

#[test]
fn two_contexts_one_after_the_other_on_one_model() {
    let _serial = serial();
    let [_, (_, half), _] = budgets();
    let options = options();
    let reference = reference(&options);
    let model = LoadedModel::load(
        gemma(),
        &options,
        Some(Hook::new(params(half, 2), gemma()).unwrap()),
    )
    .unwrap();
    let hook = model.hook().unwrap();
    let plan = hook.adopt().unwrap();
    for round in 0..2 {
        let mut session = Session::new(&model, &options, None).unwrap();
        // The same context twice, then a fresh one.
        for again in 0..2 - round {
            let result = session.generate(&options).unwrap();
            assert_identical(
                &reference,
                &result,
                &format!("context {round}, run {again}"),
            );
        }
        drop(session);
    }
    let stats = hook.stats().unwrap();
    assert_eq!(stats.streamed_bytes, plan.bytes_per_pass * stats.passes);
    assert_eq!(
        hook.resyncs().unwrap(),
        0,
        "every graph ran to its last layer"
    );
}

fn status_of<T: std::fmt::Debug>(result: offload_engine::error::Result<T>) -> Status {
    result.expect_err("an error").status
}

#[test]
fn misuse_gets_a_status_and_breaks_nothing() {
    let _serial = serial();
    let options = options();
    let [_, (_, half), (_, tight)] = budgets();

    // A budget too small: the planner's message, before llama.cpp allocates anything.
    let err = Hook::new(params(tight / 2, 1), gemma()).unwrap_err();
    assert_eq!(err.status, Status::InsufficientMemory);
    assert!(err.message.contains("need"), "{}", err.message);

    // Adopt before the load, twice after it; detach while a context lives.
    let hook = Hook::new(params(half, 1), gemma()).unwrap();
    assert_eq!(status_of(hook.adopt()), Status::InvalidState);
    assert_eq!(status_of(hook.detach()), Status::InvalidState);
    let model = LoadedModel::load(gemma(), &options, Some(hook)).unwrap();
    let hook = model.hook().unwrap();

    // A context whose model is not adopted: a sticky error, and llama.cpp still computes
    // (from the weights' home, in host memory), correctly.
    {
        let mut session = Session::new(&model, &options, None).unwrap();
        let err = session.generate(&options).unwrap_err();
        assert_eq!(err.status, Status::InvalidState, "{}", err.message);
        assert!(err.message.contains("adopt"), "{}", err.message);
    }
    hook.adopt().unwrap();
    assert_eq!(status_of(hook.adopt()), Status::InvalidState);
    let reference = reference(&options);
    {
        let mut session = Session::new(&model, &options, None).unwrap();
        assert_identical(
            &reference,
            &session.generate(&options).unwrap(),
            "after misuse",
        );
        assert_eq!(
            status_of(hook.detach()),
            Status::InvalidState,
            "a context lives"
        );
        assert!(
            hook.is_adopted().unwrap(),
            "the refused detach changed nothing"
        );
    }
    hook.detach().unwrap();
    assert_eq!(status_of(hook.detach()), Status::InvalidState);
    drop(model);

    // llama_model_free before detach: the engine detaches then; nothing is freed twice.
    let model = LoadedModel::load(
        gemma(),
        &options,
        Some(Hook::new(params(half, 1), gemma()).unwrap()),
    )
    .unwrap();
    model.hook().unwrap().adopt().unwrap();
    let hook = model.free_before_detach().unwrap();
    assert!(!hook.is_adopted().unwrap());
    assert_eq!(status_of(hook.adopt()), Status::InvalidState);
    assert_eq!(status_of(hook.stats()), Status::InvalidState);
}

#[test]
fn the_hooks_plan_is_the_one_carried_out() {
    let _serial = serial();
    let options = options();
    for (name, budget) in budgets() {
        for file_backed in [false, true] {
            let params = LlamaParams {
                file_backed,
                ..params(budget, 1)
            };
            let hook = Hook::new(params, gemma()).unwrap();
            let before: Plan = hook.plan().unwrap();
            let model = LoadedModel::load(gemma(), &options, Some(hook)).unwrap();
            let after = model.hook().unwrap().adopt().unwrap();
            let what = format!("{name}, file-backed {file_backed}");
            assert_eq!(before.mode, after.mode, "{what}");
            assert_eq!(before.resident_layers, after.resident_layers, "{what}");
            assert_eq!(before.slot_count, after.slot_count, "{what}");
            assert_eq!(before.slot_bytes, after.slot_bytes, "{what}");
            assert_eq!(before.arena_bytes, after.arena_bytes, "{what}");
            assert_eq!(before.placement_bytes, after.placement_bytes, "{what}");
            assert_eq!(before.bytes_per_pass, after.bytes_per_pass, "{what}");
        }
    }
}
