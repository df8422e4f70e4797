//! Feeds decoded models, budgets, workloads and links to the planner. Beyond "never panics"
//! (overflow checks are on), it checks that `plan` rejects exactly the invalid inputs, and what
//! an accepted plan promises: the resident and streamed layers partition the model, the arena
//! and global tensors fit the usable budget, every streamed layer fits a slot, predicted times
//! are finite and non-negative, and an insufficient plan explains itself. The cache simulations,
//! `Hparams::parse`, `Link` constructors, `calibrate`, `advise` and `memory_bar` ride along.
//!
//! Input layout (see input.rs for how numbers are drawn): layer count, per layer (bytes,
//! read-once part, compute time), global bytes, budget, workload, link, extras, then the
//! hparams spec last so that mutating it does not shift the model.
#![no_main]

// The modules under test, compiled standalone: the planner depends only on std, serde and
// crate::{error, units}.
#[allow(dead_code)]
#[path = "../../rust/error.rs"]
mod error;
#[allow(dead_code)]
#[path = "input.rs"]
mod input;
#[allow(dead_code, unused_imports)]
#[path = "../../rust/planner/mod.rs"]
mod planner;
#[allow(dead_code)]
#[path = "../../rust/units.rs"]
mod units;

use error::Status;
use input::Input;
use libfuzzer_sys::fuzz_target;
use planner::{Budget, Hparams, LayerCost, Link, Mode, ModelCost, Plan, Regime, Traffic, Workload};

const MAX_LAYERS: usize = 64;
/// Cache simulations walk every (pass, layer); beyond this they cost more than they find.
const MAX_SIMULATED_ACCESSES: u64 = 4096;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mut model = decode_model(&mut input);
    let budget = decode_budget(&mut input);
    let workload = decode_workload(&mut input);
    let link = decode_link(&mut input);

    let calibration = decode_calibration(&mut input, model.layers.len());
    if let Some(times) = calibration {
        check_calibrate(&mut model, &times);
    }
    let bar_width = usize::from(input.u8());

    let result = planner::plan(&model, &budget, &workload, &link);
    let valid = inputs_valid(&model, &budget, &workload, &link);
    if show() {
        match &result {
            Ok(p) => eprintln!("plan: {}", p.message),
            Err(e) => eprintln!("plan: {e}"),
        }
    }
    match &result {
        Ok(plan) => check_plan(&model, &budget, &workload, plan, bar_width),
        Err(e) => {
            assert_eq!(e.status, Status::InvalidArgument, "{e}");
            assert!(!e.message.is_empty());
        }
    }
    assert_eq!(
        result.is_ok(),
        valid,
        "plan accepted/rejected the wrong inputs: {:?}",
        result.as_ref().err()
    );

    check_simulations(&model, &workload, &budget, result.as_ref().ok());
    check_advise(&mut input, &link);

    let spec = decode_hparams(&mut input);
    check_hparams(&spec, &budget, &workload, &link, bar_width);
    if let Ok(bytes) = units::parse_size(&spec) {
        // Zero only from a number that is zero, never from one that rounds to it.
        if bytes == 0 {
            let number: String = spec
                .trim()
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            assert_eq!(
                number.parse::<f64>().ok(),
                Some(0.0),
                "{spec:?} parsed as 0 bytes"
            );
        }
    }
});

/// FUZZ_PLAN_LOG=1 prints what each input decoded to (for replaying one input).
fn show() -> bool {
    static SHOW: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SHOW.get_or_init(|| std::env::var_os("FUZZ_PLAN_LOG").is_some_and(|v| v == "1"))
}

fn decode_model(input: &mut Input) -> ModelCost {
    let n = usize::from(input.u8()) % (MAX_LAYERS + 1);
    let layers = (0..n)
        .map(|i| {
            let bytes = input.size();
            let once_bytes = match input.u8() % 5 {
                0 => 0,
                1 => bytes,
                2 => bytes / 2,
                3 => bytes.saturating_add(1), // invalid unless it saturates
                _ => input.size(),
            };
            let compute_seconds = match input.u8() % 3 {
                0 => None,
                _ => Some(input.float()),
            };
            // Loads move their data, a little less than the aligned image; sometimes more,
            // which plan must refuse.
            let copy_bytes = match input.u8() % 4 {
                0 => bytes - bytes / 16,
                1 => bytes.saturating_add(1),
                _ => bytes,
            };
            LayerCost {
                copy_bytes,
                once_bytes,
                compute_seconds,
                ..LayerCost::new(format!("blk.{i}"), bytes)
            }
        })
        .collect();
    let global_bytes = input.size();
    ModelCost {
        layers,
        global_bytes,
        global_copy_bytes: global_bytes - global_bytes / 8,
        bits_per_weight: input.bool().then(|| input.float()),
    }
}

fn decode_budget(input: &mut Input) -> Budget {
    Budget {
        free_bytes: input.size(),
        total_bytes: input.size(),
        min_free_bytes: input.size(),
        safety_fraction: input.float(),
        compute_reserve_bytes: input.size(),
        persistent_bytes: input.size(),
    }
}

fn decode_workload(input: &mut Input) -> Workload {
    let mut workload = Workload {
        steps: input.count(),
        passes_per_step: input.count(),
        prefetch_depth: input.count(),
        activation_bytes_per_layer: input.size(),
        max_resident_layers: (input.u8() % 4 == 0).then(|| input.count()),
    };
    workload
}

const LINK_NAMES: [&str; 6] = ["pcie4-x16", "PCIE3_X16", "usb2", "nvme", "unified", "bogus"];

fn decode_link(input: &mut Input) -> Link {
    let fallback = Link {
        name: "fallback".into(),
        bandwidth_bytes_per_s: 24e9,
        latency_s: 10e-6,
        measured: false,
    };
    match input.u8() % 4 {
        0 => {
            let gbps = input.float();
            let link = Link::from_gbps(gbps);
            let valid = (gbps * 1e9).is_finite() && gbps * 1e9 > 0.0;
            assert_eq!(link.is_ok(), valid, "from_gbps({gbps})");
            link.unwrap_or(fallback)
        }
        1 => {
            let name = LINK_NAMES[usize::from(input.u8()) % LINK_NAMES.len()];
            Link::named(name).unwrap_or(fallback)
        }
        2 => Link::from_measurement(input.float(), input.float()).unwrap_or(fallback),
        // Unvalidated figures straight into the struct: plan must reject them itself.
        _ => Link {
            name: "raw".into(),
            bandwidth_bytes_per_s: input.float(),
            latency_s: input.float(),
            measured: input.bool(),
        },
    }
}

fn decode_calibration(input: &mut Input, n: usize) -> Option<Vec<f64>> {
    let len = match input.u8() % 5 {
        0 | 1 => return None,
        2 => 1,
        3 => n,
        _ => usize::from(input.u8() % 4) + n.saturating_sub(1),
    };
    Some((0..len).map(|_| input.float()).collect())
}

/// The documented preconditions of `plan`, restated independently.
fn inputs_valid(model: &ModelCost, budget: &Budget, workload: &Workload, link: &Link) -> bool {
    let layers_ok = !model.layers.is_empty()
        && model.layers.iter().all(|l| {
            l.copy_bytes <= l.bytes
                && l.once_bytes <= l.copy_bytes
                && l.compute_seconds.is_none_or(|c| c.is_finite() && c >= 0.0)
        })
        && model.global_copy_bytes <= model.global_bytes
        && model
            .bits_per_weight
            .is_none_or(|b| b.is_finite() && b > 0.0);
    let total: u128 = model.layers.iter().map(|l| u128::from(l.bytes)).sum();
    let sizes_ok = total > 0
        && total <= u128::from(u64::MAX)
        && total + u128::from(model.global_bytes) <= u128::from(u64::MAX);
    let s = budget.safety_fraction;
    let budget_ok = budget.free_bytes > 0
        && (budget.total_bytes == 0 || budget.total_bytes >= budget.free_bytes)
        && s.is_finite()
        && s > 0.0
        && s <= 1.0;
    let workload_ok = workload.steps > 0 && workload.passes_per_step > 0;
    let bw = link.bandwidth_bytes_per_s;
    let link_ok = bw.is_finite() && bw > 0.0 && link.latency_s.is_finite() && link.latency_s >= 0.0;
    layers_ok && sizes_ok && budget_ok && workload_ok && link_ok
}

fn check_plan(model: &ModelCost, budget: &Budget, workload: &Workload, plan: &Plan, width: usize) {
    let n = model.layers.len();
    let bytes = |i: usize| u128::from(model.layers[i].bytes);
    assert!(!plan.message.is_empty());
    assert!(plan.resident_layers.windows(2).all(|w| w[0] < w[1]));
    assert!(plan.streamed_layers.windows(2).all(|w| w[0] < w[1]));
    let global = u128::from(model.global_bytes);
    let layer_max = (0..n).map(bytes).max().unwrap_or(0);
    let usable = u128::from(plan.usable_bytes);

    match plan.mode {
        Mode::Insufficient => {
            assert!(plan.resident_layers.is_empty());
            assert_eq!(plan.streamed_layers, (0..n).collect::<Vec<_>>());
            // Documented: insufficient only when global + one slot of the largest layer do not fit.
            assert!(
                global + layer_max > usable,
                "insufficient although global {global} + largest layer {layer_max} fit {usable}: {}",
                plan.message
            );
            let err = plan
                .clone()
                .into_result()
                .expect_err("insufficient is an error");
            assert_eq!(err.status, Status::InsufficientMemory);
            assert_eq!(err.message, plan.message);
        }
        Mode::Full | Mode::Streaming => {
            // Every layer exactly once, resident or streamed.
            let mut seen = vec![0u8; n];
            for &i in plan.resident_layers.iter().chain(&plan.streamed_layers) {
                assert!(i < n, "layer index {i} out of range {n}");
                seen[i] += 1;
            }
            assert!(seen.iter().all(|&c| c == 1), "not a partition: {seen:?}");
            assert!(plan.arena_bytes <= plan.usable_bytes);
            let arena = u128::from(plan.arena_bytes);
            assert!(
                global + arena <= usable,
                "global {global} + arena {arena} exceed usable {usable}"
            );
            let resident: u128 = plan.resident_layers.iter().map(|&i| bytes(i)).sum();
            assert_eq!(
                arena,
                resident + u128::from(plan.slot_count) * u128::from(plan.slot_bytes)
            );
            if let Some(max) = workload.max_resident_layers {
                let nonempty = plan
                    .resident_layers
                    .iter()
                    .filter(|&&i| model.layers[i].bytes > 0)
                    .count();
                assert!(
                    nonempty <= max as usize,
                    "{nonempty} resident layers past the cap of {max}"
                );
            }
            if plan.mode == Mode::Full {
                assert!(plan.streamed_layers.is_empty());
                assert_eq!(plan.slot_count, 0);
            } else {
                assert!(plan.slot_count >= 1);
                let wanted = (u64::from(workload.prefetch_depth) + 1).max(1);
                assert!(u64::from(plan.slot_count) <= wanted);
                for &i in &plan.streamed_layers {
                    assert!(
                        bytes(i) <= u128::from(plan.slot_bytes),
                        "streamed layer {i} ({}) larger than a slot ({})",
                        bytes(i),
                        plan.slot_bytes
                    );
                }
            }
            for (what, t) in [
                ("step", plan.predicted_step_seconds),
                ("compute", plan.predicted_compute_seconds),
                ("transfer", plan.predicted_transfer_seconds),
            ] {
                assert!(
                    t.is_finite() && t >= 0.0,
                    "predicted {what} seconds {t}: link {:?}, compute times {:?}, passes {}",
                    plan.link,
                    model
                        .layers
                        .iter()
                        .map(|l| l.compute_seconds)
                        .collect::<Vec<_>>(),
                    workload.passes_per_step
                );
            }
            assert_eq!(
                u128::from(plan.bytes_per_step),
                (u128::from(plan.bytes_per_pass) * u128::from(workload.passes_per_step))
                    .min(u128::from(u64::MAX))
            );
            let resident_flags: Vec<bool> = (0..n)
                .map(|i| plan.resident_layers.binary_search(&i).is_ok())
                .collect();
            let traffic = planner::static_traffic(model, workload, &resident_flags);
            assert_eq!(
                traffic.bytes_moved.saturating_add(model.global_copy_bytes),
                plan.bytes_per_run
            );
            let placement: u128 = u128::from(model.global_copy_bytes)
                + plan
                    .resident_layers
                    .iter()
                    .map(|&i| u128::from(model.layers[i].copy_bytes))
                    .sum::<u128>();
            assert_eq!(
                u128::from(plan.placement_bytes),
                placement.min(u128::from(u64::MAX))
            );
            assert_eq!(traffic.loads, plan.layer_loads_per_run);
            plan.clone().into_result().expect("a fitting plan is Ok");
        }
    }

    let bar = planner::memory_bar(plan, budget, width);
    let cells = bar
        .strip_prefix('[')
        .and_then(|b| b.split(']').next())
        .expect("bar in brackets");
    assert_eq!(cells.chars().count(), width.max(10), "{bar}");
}

fn total_passes(workload: &Workload) -> u64 {
    u64::from(workload.steps) * u64::from(workload.passes_per_step)
}

fn check_traffic(what: &str, t: Traffic, nonzero: u64, passes: u64) {
    assert_eq!(
        t.first_pass_loads,
        if passes > 0 { nonzero } else { 0 },
        "{what}"
    );
    assert!(t.first_pass_loads <= t.loads, "{what}");
    assert!(t.first_pass_bytes <= t.bytes_moved, "{what}");
    assert!(t.loads <= nonzero * passes, "{what}");
}

fn check_simulations(model: &ModelCost, workload: &Workload, budget: &Budget, plan: Option<&Plan>) {
    let passes = total_passes(workload);
    let n = model.layers.len() as u64;
    if passes.saturating_mul(n.max(1)) > MAX_SIMULATED_ACCESSES {
        return;
    }
    let nonzero = model.layers.iter().filter(|l| l.bytes > 0).count() as u64;
    let capacity = plan.map_or(budget.free_bytes, |p| {
        p.arena_bytes
            .saturating_sub(u64::from(p.slot_count).saturating_mul(p.slot_bytes))
    });
    // With unbounded capacity every layer is loaded once, unless the layers together overflow
    // u64 (then even u64::MAX bytes cannot hold them all).
    let fits_u64 = model
        .layers
        .iter()
        .try_fold(0u64, |acc, l| acc.checked_add(l.bytes))
        .is_some();
    for cap in [0, capacity, u64::MAX] {
        let belady = planner::simulate_belady(model, workload, cap);
        let lru = planner::simulate_lru(model, workload, cap);
        check_traffic("belady", belady, nonzero, passes);
        check_traffic("lru", lru, nonzero, passes);
        let expected_loads = match cap {
            0 => Some(nonzero * passes),
            u64::MAX if fits_u64 => Some(nonzero.min(nonzero * passes)),
            _ => None,
        };
        if let Some(loads) = expected_loads {
            assert_eq!(belady.loads, loads, "belady, capacity {cap}");
            assert_eq!(lru.loads, loads, "lru, capacity {cap}");
        }
    }
    if let Some(p) = plan {
        let t = planner::simulate_belady_with_slot(model, workload, capacity, p.slot_bytes);
        check_traffic("belady with slot", t, nonzero, passes);
    }
}

fn check_calibrate(model: &mut ModelCost, times: &[f64]) {
    let before: Vec<Option<u64>> = model
        .layers
        .iter()
        .map(|l| l.compute_seconds.map(f64::to_bits))
        .collect();
    match planner::calibrate(model, times) {
        Ok(()) => {
            for l in &model.layers {
                let c = l.compute_seconds.expect("calibrated");
                // A finite total spread by byte share stays finite and non-negative.
                assert!(c.is_finite() && c >= 0.0, "calibrated to {c}");
            }
        }
        Err(e) => {
            assert_eq!(e.status, Status::InvalidArgument, "{e}");
            let after: Vec<Option<u64>> = model
                .layers
                .iter()
                .map(|l| l.compute_seconds.map(f64::to_bits))
                .collect();
            assert_eq!(before, after, "a rejected calibration changed the model");
        }
    }
}

fn check_advise(input: &mut Input, link: &Link) {
    let regime = if input.bool() {
        Regime::BandwidthBound
    } else {
        Regime::ComputeBound
    };
    let result = planner::advise(
        input.size(),
        link,
        input.float(),
        input.float(),
        input.float(),
        input.float(),
        regime,
    );
    match result {
        Ok(a) => {
            assert!(a.prefer == "stream" || a.prefer == "cpu");
            assert!(!a.stream_seconds.is_nan() && !a.cpu_seconds.is_nan());
            assert!(!a.reason.is_empty());
        }
        Err(e) => assert_eq!(e.status, Status::InvalidArgument, "{e}"),
    }
}

const HPARAM_KEYS: [&str; 13] = [
    "hidden", "layers", "heads", "kv_heads", "vocab", "ffn", "context", "type", "kv_type", "tied",
    "wtype", "HIDDEN", "bogus",
];
const HPARAM_TYPES: [&str; 12] = [
    "f32", "f16", "bf16", "q8_0", "Q4_K_M", "q2_k", "5.5", "0", "64", "64.5", "nan", "x",
];

/// Either raw text, or `key=value` pairs built from the keys and types the parser knows, so
/// that valid specs are reachable without a dictionary.
fn decode_hparams(input: &mut Input) -> String {
    let mode = input.u8();
    if mode % 2 == 0 {
        let len = usize::from(input.u8());
        return String::from_utf8_lossy(input.bytes(len)).into_owned();
    }
    let mut spec = String::new();
    for _ in 0..(mode >> 1) % 12 {
        let key = HPARAM_KEYS[usize::from(input.u8()) % HPARAM_KEYS.len()];
        let value = match input.u8() % 8 {
            0 => HPARAM_TYPES[usize::from(input.u8()) % HPARAM_TYPES.len()].to_string(),
            1 => ["true", "no", "maybe"][usize::from(input.u8()) % 3].to_string(),
            2 => (1u64 << 32).to_string(),
            3 => ((1u64 << 32) + 1).to_string(),
            4 => input.u64().to_string(),
            5 => input.u16().to_string(),
            _ => (u64::from(input.u8()) * 64).to_string(),
        };
        let sep = [",", " ", "\t", ",,"][usize::from(input.u8()) % 4];
        spec.push_str(&format!("{key}={value}{sep}"));
    }
    spec
}

fn check_hparams(spec: &str, budget: &Budget, workload: &Workload, link: &Link, width: usize) {
    let parsed = Hparams::parse(spec);
    if show() {
        eprintln!(
            "hparams {spec:?}: {:?}",
            parsed.as_ref().map(|hp| hp.layers)
        );
    }
    let hp = match parsed {
        Ok(hp) => hp,
        Err(e) => {
            assert_eq!(e.status, Status::InvalidArgument, "{e}");
            assert!(!e.message.is_empty());
            return;
        }
    };
    hp.validate().expect("a parsed spec is valid");
    assert!(hp.full_cache_bytes() >= hp.streaming_bytes(1), "{spec}");
    let _ = hp.prefill_bytes();
    let _ = hp.streaming_bytes(u32::MAX);
    // to_model_cost makes one entry per layer; keep it to what a fuzz iteration can afford.
    if hp.layers <= MAX_LAYERS as u64 {
        let model = hp.to_model_cost();
        assert_eq!(model.layers.len() as u64, hp.layers);
        assert!(model.layers.iter().all(|l| l.bytes == hp.layer_bytes()));
        if let Ok(plan) = planner::plan(&model, budget, workload, link) {
            check_plan(&model, budget, workload, &plan, width);
        }
    }
}
