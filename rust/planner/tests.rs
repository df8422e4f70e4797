//! Planner tests: the required Qwen2-1.5B mode test, traffic against cache simulations on random
//! models, the time model, bad input, and speed.

use super::*;

const GIB: u64 = 1 << 30;
const QWEN2_1_5B_F32: &str =
    "hidden=1536,layers=28,heads=12,kv_heads=2,vocab=151936,ffn=8960,context=2048,type=f32,kv_type=f32";

fn pcie4() -> Link {
    Link::named("pcie4-x16").unwrap()
}

fn layers(sizes: &[u64]) -> ModelCost {
    ModelCost {
        layers: sizes
            .iter()
            .enumerate()
            .map(|(i, &b)| LayerCost::new(format!("blk.{i}"), b))
            .collect(),
        ..Default::default()
    }
}

/// A budget with no margins: `usable_bytes() == free`.
fn exact_budget(free: u64) -> Budget {
    Budget {
        min_free_bytes: 0,
        safety_fraction: 1.0,
        ..Budget::from_free(free)
    }
}

fn invalid<T: std::fmt::Debug>(r: Result<T>) -> String {
    let err = r.unwrap_err();
    assert_eq!(err.status, Status::InvalidArgument, "{}", err.message);
    err.message
}

/// splitmix64: a tiny deterministic generator for the randomized tests.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

#[test]
fn qwen2_1_5b_f32_is_full_at_12g_streaming_at_2g_insufficient_at_512m() {
    let hp = Hparams::parse(QWEN2_1_5B_F32).unwrap();
    let model = hp.to_model_cost();
    let w = Workload::default();

    // 12 GiB: usable = min(0.9 * 12 GiB, 12 GiB - 512 MiB) = 11_596_411_699 >= 6_292_068_352.
    let p = plan(&model, &Budget::from_free(12 * GIB), &w, &pcie4()).unwrap();
    assert_eq!(p.mode, Mode::Full, "{}", p.message);
    assert_eq!(p.usable_bytes, 11_596_411_699);
    assert_eq!(p.full_cache_bytes, 6_292_068_352);
    assert_eq!(p.resident_layers.len(), 28);
    assert_eq!(p.bytes_per_step, 0);
    assert!(p.message.starts_with("full"));

    // 2 GiB: usable = min(1_932_735_283, 1_610_612_736) = 1_610_612_736 (1.5 GiB).
    // Full needs 6_292_068_352; streaming with 2 slots needs 933_500_928 + 117_440_512
    // + 2 * 187_183_104 = 1_425_307_648. The 185_305_088 left over is 1_878_016 short of a
    // layer, so all 28 layers stream.
    let p = plan(&model, &Budget::from_free(2 * GIB), &w, &pcie4()).unwrap();
    assert_eq!(p.mode, Mode::Streaming, "{}", p.message);
    assert_eq!(p.usable_bytes, 1_610_612_736);
    assert_eq!(p.streaming_bytes, 1_425_307_648);
    assert_eq!(p.slot_count, 2);
    assert_eq!(p.slot_bytes, 187_183_104);
    assert_eq!(p.streamed_layers.len(), 28);
    assert_eq!(p.device_bytes, 1_425_307_648);
    assert_eq!(p.bytes_per_step, 28 * 187_183_104);
    assert_eq!(p.layer_loads_per_run, 28);
    // Transfer-bound (no compute times): 28 copies of 187 MB at 24 GB/s plus 10 us each.
    let t = 28.0 * (187_183_104.0 / 24e9 + 10e-6);
    assert!((p.predicted_step_seconds - t).abs() < 1e-9);
    assert!(!p.compute_measured);

    // 512 MiB: free - min_free = 0, so nothing is usable.
    let p = plan(&model, &Budget::from_free(512 << 20), &w, &pcie4()).unwrap();
    assert_eq!(p.mode, Mode::Insufficient);
    assert_eq!(p.usable_bytes, 0);
    assert!(
        p.message.contains("Full mode needs 5.86 GiB"),
        "{}",
        p.message
    );
    assert!(
        p.message.contains("streaming needs 1.33 GiB"),
        "{}",
        p.message
    );
    let err = p.into_result().unwrap_err();
    assert_eq!(err.status, Status::InsufficientMemory);
}

#[test]
fn usable_bytes_applies_fraction_min_free_and_reserves() {
    let mut b = Budget::from_free(10 * GIB);
    // 0.9 * 10 GiB = 9_663_676_416 < 10 GiB - 512 MiB = 10_200_547_328.
    assert_eq!(b.usable_bytes(), 9_663_676_416);
    b.compute_reserve_bytes = GIB;
    b.persistent_bytes = GIB;
    assert_eq!(b.usable_bytes(), 9_663_676_416 - 2 * GIB);
    // Small free: the 512 MiB floor decides: min(0.9 GiB, 0.5 GiB) = 0.5 GiB.
    assert_eq!(Budget::from_free(GIB).usable_bytes(), 512 << 20);
    // Reserves larger than what is left saturate at 0.
    let tiny = Budget {
        compute_reserve_bytes: 10 * GIB,
        ..Budget::from_free(GIB)
    };
    assert_eq!(tiny.usable_bytes(), 0);
}

/// A random model: `n` layers, sizes from `size`, a quarter of them with a read-once part.
fn random_model(rng: &mut Rng, n: usize, size: &mut dyn FnMut(&mut Rng) -> u64) -> ModelCost {
    let mut model = layers(&vec![0; n]);
    for l in &mut model.layers {
        l.bytes = size(rng);
        l.copy_bytes = l.bytes;
        if rng.range(0, 3) == 0 {
            l.once_bytes = l.bytes / 4;
        }
    }
    model.global_bytes = rng.range(0, 256) << 20;
    model.global_copy_bytes = model.global_bytes;
    model
}

fn random_workload(rng: &mut Rng) -> Workload {
    Workload {
        steps: rng.range(1, 6) as u32,
        passes_per_step: rng.range(1, 2) as u32,
        prefetch_depth: rng.range(0, 2) as u32,
        activation_bytes_per_layer: 0,
        max_resident_layers: None,
    }
}

/// Free memory between "global + one layer" and "everything + one layer".
fn random_budget(rng: &mut Rng, model: &ModelCost) -> Budget {
    let total: u64 = model.layers.iter().map(|l| l.bytes).sum();
    let biggest = model.layers.iter().map(|l| l.bytes).max().unwrap();
    exact_budget(model.global_bytes + rng.range(biggest, total + biggest))
}

/// Checks the plan's own accounting against a static placement and returns the Belady
/// capacity (usable - global - slots) for streaming plans.
fn check_accounting(
    model: &ModelCost,
    workload: &Workload,
    budget: &Budget,
    p: &Plan,
) -> Option<u64> {
    assert_ne!(p.mode, Mode::Insufficient);
    let mut resident = vec![false; model.layers.len()];
    for &i in &p.resident_layers {
        resident[i] = true;
    }
    let own = static_traffic(model, workload, &resident);
    // The run moves the global group once, then what the layers' traffic says.
    assert_eq!(own.bytes_moved + model.global_copy_bytes, p.bytes_per_run);
    assert_eq!(own.loads, p.layer_loads_per_run);
    assert!(p.device_bytes <= budget.free_bytes);
    if p.mode == Mode::Full {
        assert_eq!(
            p.bytes_per_run,
            model.layer_bytes_total().unwrap() + model.global_copy_bytes
        );
        assert_eq!(p.placement_bytes, p.bytes_per_run);
        return None;
    }
    Some(p.usable_bytes - p.global_bytes - p.slot_count as u64 * p.slot_bytes)
}

#[test]
fn plan_never_moves_more_than_belady_on_equal_sized_layers() {
    // With equal sizes every layer fits the slot, and a static set is optimal: each pass
    // touches every layer, so whatever is not cached at a pass's start must be loaded in it,
    // and the best cache content is the knapsack the plan solves. Belady can only match it.
    let mut rng = Rng(0xe9a1);
    let mut streaming = 0;
    for case in 0..200 {
        let n = rng.range(2, 24) as usize;
        let size = rng.range(1, 64) << 20;
        let model = random_model(&mut rng, n, &mut |_| size);
        let workload = random_workload(&mut rng);
        let budget = random_budget(&mut rng, &model);
        let p = plan(&model, &budget, &workload, &pcie4()).unwrap();
        let Some(capacity) = check_accounting(&model, &workload, &budget, &p) else {
            continue;
        };
        streaming += 1;
        let belady = simulate_belady(&model, &workload, capacity);
        let lru = simulate_lru(&model, &workload, capacity);
        let layer_traffic = p.bytes_per_run - model.global_copy_bytes;
        assert!(
            layer_traffic <= belady.bytes_moved,
            "case {case}: plan {layer_traffic} > belady {}",
            belady.bytes_moved
        );
        assert!(belady.bytes_moved <= lru.bytes_moved, "case {case}");
    }
    assert!(streaming > 50, "{streaming}");
}

#[test]
fn plan_versus_belady_on_random_models() {
    // With unequal sizes a static set is no longer always optimal: Belady may keep different
    // layers at different times. Compared under the same layout (layers bigger than the plan's
    // slot cannot bypass the cache), the plan is at least as good almost always and strictly
    // better often (Belady here mostly amounts to first-fit in execution order). Over 5,000
    // models from this generator (3,830 streaming plans): 2,167 moved fewer bytes than
    // Belady, 42 (1.1%) moved more, at most 3.4% more.
    // Unconstrained Belady is not a fair yardstick: it may stream a layer larger than any
    // slot the plan could afford (case: 60 MiB layer, two 49 MiB slots).
    let mut rng = Rng(0x5eed);
    let (mut streaming, mut better, mut worse) = (0, 0, 0);
    for case in 0..400 {
        let n = rng.range(2, 18) as usize;
        let model = random_model(&mut rng, n, &mut |r| r.range(1, 64) << 20);
        let workload = random_workload(&mut rng);
        let budget = random_budget(&mut rng, &model);
        let p = plan(&model, &budget, &workload, &pcie4()).unwrap();
        let Some(capacity) = check_accounting(&model, &workload, &budget, &p) else {
            continue;
        };
        streaming += 1;
        let belady = simulate_belady_with_slot(&model, &workload, capacity, p.slot_bytes);
        let lru = simulate_lru(&model, &workload, capacity);
        assert!(belady.bytes_moved <= lru.bytes_moved, "case {case}");
        let layer_traffic = p.bytes_per_run - model.global_copy_bytes;
        if layer_traffic < belady.bytes_moved {
            better += 1;
        } else if layer_traffic > belady.bytes_moved {
            worse += 1;
            assert!(
                layer_traffic as f64 <= 1.05 * belady.bytes_moved as f64,
                "case {case}: plan {layer_traffic} vs belady {}",
                belady.bytes_moved
            );
        }
    }
    assert!(streaming > 200, "{streaming}");
    assert!(worse * 100 <= 3 * streaming, "{worse} of {streaming} worse");
    assert!(better * 4 >= streaming, "{better} of {streaming} better");
}

/// Best re-read bytes kept resident over all 2^n placements that fit with `slots` slots.
fn brute_force_best(model: &ModelCost, capacity: u64, slots: u32) -> u64 {
    let n = model.layers.len();
    let mut best = 0;
    for mask in 0u32..(1 << n) {
        let (mut kept, mut value, mut slot) = (0u64, 0u64, 0u64);
        for (i, l) in model.layers.iter().enumerate() {
            if mask >> i & 1 == 1 {
                kept += l.bytes;
                value += l.bytes - l.once_bytes;
            } else {
                slot = slot.max(l.bytes);
            }
        }
        if slot > 0 && kept + slots as u64 * slot <= capacity {
            best = best.max(value);
        }
    }
    best
}

#[test]
fn knapsack_matches_brute_force() {
    let mut rng = Rng(0xb00f);
    let (mut checked, mut rounded_exact) = (0, 0);
    for case in 0..300 {
        let n = rng.range(2, 10) as usize;
        // Half the models have MiB-aligned sizes (exact table), half arbitrary byte counts
        // (rounded table plus greedy top-up).
        let aligned = case % 2 == 0;
        let mut size = |r: &mut Rng| {
            if aligned {
                r.range(1, 64) << 20
            } else {
                r.range(1 << 20, 64 << 20)
            }
        };
        let model = random_model(&mut rng, n, &mut size);
        let workload = random_workload(&mut rng);
        let budget = random_budget(&mut rng, &model);
        let p = plan(&model, &budget, &workload, &pcie4()).unwrap();
        if p.mode != Mode::Streaming {
            continue;
        }
        checked += 1;
        let value: u64 = p
            .resident_layers
            .iter()
            .map(|&i| model.layers[i].bytes - model.layers[i].once_bytes)
            .sum();
        let best = brute_force_best(&model, p.usable_bytes - p.global_bytes, p.slot_count);
        assert!(value <= best, "case {case}");
        if aligned {
            assert_eq!(value, best, "case {case}");
        } else {
            assert!(
                value as f64 >= 0.99 * best as f64,
                "case {case}: {value} vs {best}"
            );
            rounded_exact += (value == best) as u32;
        }
    }
    assert!(checked > 100, "{checked}");
    assert!(rounded_exact * 10 >= checked / 2 * 9, "{rounded_exact}");
}

#[test]
fn full_capacity_means_no_loads_after_warm_up() {
    let model = layers(&[100, 200, 300]);
    let workload = Workload {
        steps: 50,
        passes_per_step: 2,
        ..Workload::default()
    };
    let p = plan(&model, &exact_budget(1000), &workload, &pcie4()).unwrap();
    assert_eq!(p.mode, Mode::Full);
    assert_eq!(p.layer_loads_per_run, 3);
    assert_eq!(p.bytes_per_run, 600);
    assert_eq!(p.bytes_per_pass, 0);
    for t in [
        simulate_belady(&model, &workload, 600),
        simulate_lru(&model, &workload, 600),
    ] {
        assert_eq!(t.loads, t.first_pass_loads);
        assert_eq!(t.bytes_moved, 600);
    }
}

#[test]
fn once_bytes_are_paid_once_per_run() {
    // An action expert in miniature: 10 steps; layer 1 carries 4 MB of cross-attention
    // K/V read once. Nothing fits beyond the two slots.
    let mut model = layers(&[6_000_000, 10_000_000, 6_000_000]);
    model.layers[1].once_bytes = 4_000_000;
    let workload = Workload {
        steps: 10,
        ..Workload::default()
    };
    let p = plan(&model, &exact_budget(20_000_000), &workload, &pcie4()).unwrap();
    assert_eq!(p.mode, Mode::Streaming);
    assert_eq!(p.slot_bytes, 10_000_000);
    assert!(p.resident_layers.is_empty());
    assert_eq!(p.bytes_per_pass, 6_000_000 + 6_000_000 + 6_000_000);
    assert_eq!(p.bytes_per_step, 18_000_000);
    // First pass 22 MB, then 9 passes of 18 MB.
    assert_eq!(p.bytes_per_run, 22_000_000 + 9 * 18_000_000);
    assert_eq!(p.layer_loads_per_run, 30);
}

#[test]
fn residents_are_chosen_by_reread_bytes_not_size() {
    // 43 bytes of layers in 36: two slots of 10 leave 16 for residents. Keeping the two 8s
    // (16 re-read bytes per pass) beats keeping a 10 (at best 10, and only 2 for layer 0,
    // which is mostly read once) and beats size-greedy 10 + 5-ish fills.
    let mut model = layers(&[10, 8, 8, 7, 10]);
    model.layers[0].once_bytes = 8;
    let workload = Workload {
        steps: 5,
        ..Workload::default()
    };
    let p = plan(&model, &exact_budget(36), &workload, &pcie4()).unwrap();
    assert_eq!(p.resident_layers, vec![1, 2]);
    assert_eq!(p.streamed_layers, vec![0, 3, 4]);
    assert_eq!(p.bytes_per_pass, 2 + 7 + 10);
}

#[test]
fn time_model_overlaps_with_prefetch_and_serialises_without() {
    // Ten 1 GB layers, 1 s of compute each, a 1 GB/s link without latency: c = t = 1 s.
    let mut model = layers(&[1_000_000_000; 10]);
    calibrate(&mut model, &[1.0; 10]).unwrap();
    let link = Link {
        name: "test".into(),
        bandwidth_bytes_per_s: 1e9,
        latency_s: 0.0,
        measured: true,
    };
    let depth1 = Workload::default();
    // Usable 2.5 GB: two slots and no room for a resident layer.
    let p = plan(&model, &exact_budget(2_500_000_000), &depth1, &link).unwrap();
    assert!(p.resident_layers.is_empty());
    assert!(p.compute_measured);
    // N * max(c, t) + one copy to fill the pipeline.
    assert!(
        (p.predicted_step_seconds - 11.0).abs() < 1e-9,
        "{}",
        p.predicted_step_seconds
    );
    assert!((p.predicted_compute_seconds - 10.0).abs() < 1e-9);
    assert!((p.predicted_transfer_seconds - 10.0).abs() < 1e-9);
    assert!(p.message.contains("measured"), "{}", p.message);
    // Depth 0: one slot, copies and compute alternate: N * (c + t).
    let depth0 = Workload {
        prefetch_depth: 0,
        ..Workload::default()
    };
    let p = plan(&model, &exact_budget(1_500_000_000), &depth0, &link).unwrap();
    assert_eq!(p.slot_count, 1);
    assert!(
        (p.predicted_step_seconds - 20.0).abs() < 1e-9,
        "{}",
        p.predicted_step_seconds
    );
    // Guidance doubles the step: 2 passes, the second overlapping the first's tail.
    let cfg = Workload {
        passes_per_step: 2,
        ..Workload::default()
    };
    let p = plan(&model, &exact_budget(2_500_000_000), &cfg, &link).unwrap();
    assert!(
        (p.predicted_step_seconds - 21.0).abs() < 1e-9,
        "{}",
        p.predicted_step_seconds
    );
}

#[test]
fn prefetch_depth_is_reduced_when_only_one_slot_fits() {
    let model = layers(&[100, 100, 100]);
    let workload = Workload {
        prefetch_depth: 3,
        ..Workload::default()
    };
    let p = plan(&model, &exact_budget(150), &workload, &pcie4()).unwrap();
    assert_eq!(p.mode, Mode::Streaming);
    assert_eq!(p.slot_count, 1);
    assert_eq!(p.streaming_bytes, 300); // depth 3 wants 3 slots (clamped to 3 layers)
    assert!(
        p.message.contains("prefetch depth reduced from 3 to 0"),
        "{}",
        p.message
    );
}

#[test]
fn budget_smaller_than_global_tensors_is_insufficient_with_options() {
    let mut model = layers(&[100 << 20; 4]);
    model.global_bytes = 3 * GIB;
    let budget = Budget {
        total_bytes: 8 * GIB,
        ..Budget::from_free(2 * GIB)
    };
    let p = plan(&model, &budget, &Workload::default(), &pcie4()).unwrap();
    assert_eq!(p.mode, Mode::Insufficient);
    assert!(
        p.message
            .contains("always-resident tensors alone need 3.00 GiB"),
        "{}",
        p.message
    );
    assert!(p.message.contains("free "), "{}", p.message);
    assert!(p.message.contains("more device memory"), "{}", p.message);
    assert!(p.message.contains("bits per weight"), "{}", p.message);
    assert!(p.message.contains("CPU"), "{}", p.message);
    assert!(p.message.contains("disk"), "{}", p.message);
    assert_eq!(p.device_bytes, 0);
    assert!(p.predicted_step_seconds == 0.0);
    let err = p.into_result().unwrap_err();
    assert_eq!(err.status, Status::InsufficientMemory);
    // The quoted shortfall is right: with that much more free memory, streaming works.
    let more = err
        .message
        .split("(1) free ")
        .nth(1)
        .and_then(|s| s.split(" more").next())
        .unwrap()
        .to_string();
    assert!(more.ends_with("GiB"), "{more}");
}

#[test]
fn shortfall_figure_is_enough_and_tight() {
    let mut model = layers(&[1 << 30, 1 << 30]);
    model.global_bytes = 1 << 30;
    let budget = Budget::from_free(2 * GIB);
    let p = plan(&model, &budget, &Workload::default(), &pcie4()).unwrap();
    assert_eq!(p.mode, Mode::Insufficient);
    let target = free_needed(&budget, 2 << 30, 0) as u64;
    let enough = Budget::from_free(target);
    let w = Workload {
        prefetch_depth: 0,
        ..Workload::default()
    };
    assert_eq!(
        plan(&model, &enough, &w, &pcie4()).unwrap().mode,
        Mode::Streaming
    );
    let short = Budget::from_free(target - 4096);
    assert_eq!(
        plan(&model, &short, &w, &pcie4()).unwrap().mode,
        Mode::Insufficient
    );
}

#[test]
fn layer_larger_than_any_slot_is_named() {
    let mut model = layers(&[10 << 20, 900 << 20, 10 << 20]);
    model.layers[1].name = "double_blocks.7".into();
    let p = plan(
        &model,
        &exact_budget(500 << 20),
        &Workload::default(),
        &pcie4(),
    )
    .unwrap();
    assert_eq!(p.mode, Mode::Insufficient);
    assert!(p.message.contains("\"double_blocks.7\""), "{}", p.message);
    assert!(
        p.message.contains("does not fit in a single slot"),
        "{}",
        p.message
    );
}

#[test]
fn bad_inputs_are_clear_errors() {
    let model = layers(&[100, 100]);
    let b = exact_budget(1000);
    let w = Workload::default();
    let l = pcie4();
    assert!(invalid(plan(
        &model,
        &b,
        &Workload {
            steps: 0,
            ..w.clone()
        },
        &l
    ))
    .contains("steps"));
    assert!(invalid(plan(
        &model,
        &b,
        &Workload {
            passes_per_step: 0,
            ..w.clone()
        },
        &l
    ))
    .contains("passes"));
    for bw in [0.0, -5.0, f64::NAN, f64::INFINITY] {
        let link = Link {
            bandwidth_bytes_per_s: bw,
            ..l.clone()
        };
        assert!(invalid(plan(&model, &b, &w, &link)).contains("bandwidth"));
    }
    let nan_latency = Link {
        latency_s: f64::NAN,
        ..l.clone()
    };
    invalid(plan(&model, &b, &w, &nan_latency));
    assert!(invalid(plan(&model, &exact_budget(0), &w, &l)).contains("free"));
    for s in [f64::NAN, 0.0, 1.5, -0.1] {
        let budget = Budget {
            safety_fraction: s,
            ..b.clone()
        };
        assert!(invalid(plan(&model, &budget, &w, &l)).contains("safety"));
    }
    let budget = Budget {
        total_bytes: 10,
        ..b.clone()
    };
    invalid(plan(&model, &budget, &w, &l));
    assert!(invalid(plan(&layers(&[]), &b, &w, &l)).contains("no layers"));
    assert!(invalid(plan(&layers(&[0, 0]), &b, &w, &l)).contains("0 bytes"));
    let mut once = layers(&[100]);
    once.layers[0].once_bytes = 101;
    invalid(plan(&once, &b, &w, &l));
    let mut nan = layers(&[100]);
    nan.layers[0].compute_seconds = Some(f64::NAN);
    invalid(plan(&nan, &b, &w, &l));
    let huge = layers(&[u64::MAX, 1]);
    invalid(plan(&huge, &b, &w, &l));
    // Zero-byte layers are fine next to real ones.
    let p = plan(&layers(&[0, 100, 0]), &b, &w, &l).unwrap();
    assert_eq!(p.mode, Mode::Full);
    assert_eq!(p.layer_loads_per_run, 1);
    // Hparams with a negative value.
    invalid(Hparams::parse(
        "hidden=-1536,layers=28,heads=12,vocab=10,ffn=10,context=10",
    ));
    let mut m = layers(&[1, 2]);
    invalid(calibrate(&mut m, &[1.0]).and(calibrate(&mut m, &[1.0, f64::NAN])));
    invalid(calibrate(&mut m, &[1.0, 2.0, 3.0]));
    invalid(plan_pipeline(&[], &b, &l));
}

#[test]
fn outputs_are_finite_for_extreme_inputs() {
    // (model, budget, steps): a 1-byte model, layers near the 64-bit limit run for u32::MAX
    // steps, and a budget that streams through one slot beside a 0-byte layer.
    let cases = [
        (layers(&[1]), exact_budget(1), 1u32),
        (
            layers(&[u64::MAX / 4, u64::MAX / 4]),
            exact_budget(u64::MAX),
            u32::MAX,
        ),
        (layers(&[5, 0, 5]), exact_budget(7), 1),
    ];
    for (model, budget, steps) in cases {
        let w = Workload {
            steps,
            passes_per_step: 3,
            prefetch_depth: u32::MAX,
            ..Workload::default()
        };
        let link = Link::named("usb2").unwrap();
        let p = plan(&model, &budget, &w, &link).unwrap();
        for v in [
            p.predicted_step_seconds,
            p.predicted_compute_seconds,
            p.predicted_transfer_seconds,
        ] {
            assert!(v.is_finite() && v >= 0.0, "{v}");
        }
        let json = serde_json::to_string(&p).unwrap();
        assert!(!json.contains("NaN") && !json.contains("null,\"predicted"));
    }
}

#[test]
fn calibration_and_measured_links_show_in_the_message() {
    let mut model = layers(&[100, 300]);
    calibrate(&mut model, &[0.4]).unwrap();
    assert_eq!(model.layers[0].compute_seconds, Some(0.1));
    assert_eq!(model.layers[1].compute_seconds, Some(0.30000000000000004));
    let link = Link::from_measurement(3.5e9, 15e-6).unwrap();
    let p = plan(&model, &exact_budget(350), &Workload::default(), &link).unwrap();
    assert!(p.compute_measured);
    assert!(p.message.contains("measured, 3.500 GB/s"), "{}", p.message);
    assert!(p.message.contains("compute times given for every layer"));
    let p = plan(
        &layers(&[100, 300]),
        &exact_budget(350),
        &Workload::default(),
        &pcie4(),
    )
    .unwrap();
    assert!(p.message.contains("table value"), "{}", p.message);
    assert!(p.message.contains("transfer-bound"), "{}", p.message);
}

#[test]
fn pipeline_stages_share_the_budget() {
    // Encoder: 400 MB of layers + 100 MB global, run once. Denoiser: 8 x 100 MB, 20 steps, CFG.
    let mut encoder = layers(&[100_000_000; 4]);
    encoder.global_bytes = 100_000_000;
    let denoiser = layers(&[100_000_000; 8]);
    let budget = exact_budget(700_000_000);
    let stages = vec![
        ("encoder".to_string(), encoder, Workload::default()),
        (
            "denoiser".to_string(),
            denoiser,
            Workload {
                steps: 20,
                passes_per_step: 2,
                ..Workload::default()
            },
        ),
    ];
    let plans = plan_pipeline(&stages, &budget, &pcie4()).unwrap();
    assert_eq!(plans[0].mode, Mode::Full);
    // The denoiser sees 700 - 100 (encoder globals) = 600 MB: 2 slots + 4 resident.
    assert_eq!(plans[1].mode, Mode::Streaming);
    assert_eq!(plans[1].usable_bytes, 600_000_000);
    assert_eq!(plans[1].resident_layers.len(), 4);
    assert_eq!(plans[1].bytes_per_step, 2 * 4 * 100_000_000);
    assert!(plans[1].message.starts_with("stage \"denoiser\""));
    // A broken stage names itself.
    let bad = vec![(
        "vae".to_string(),
        layers(&[1]),
        Workload {
            steps: 0,
            ..Workload::default()
        },
    )];
    assert!(invalid(plan_pipeline(&bad, &budget, &pcie4())).starts_with("stage \"vae\""));
}

#[test]
fn memory_bar_shows_each_segment() {
    let mut model = layers(&[100, 100, 100, 100, 100]);
    model.global_bytes = 100;
    let budget = Budget {
        total_bytes: 1000,
        compute_reserve_bytes: 50,
        ..exact_budget(600)
    };
    let p = plan(&model, &budget, &Workload::default(), &pcie4()).unwrap();
    assert_eq!(p.mode, Mode::Streaming);
    let bar = memory_bar(&p, &budget, 40);
    let inner = &bar[1..bar.find(']').unwrap()];
    assert_eq!(inner.chars().count(), 40, "{bar}");
    // 400 elsewhere, 100 global, 200 resident (2 layers), 200 slots, 50 reserve, 50 free.
    assert_eq!(inner.matches('x').count(), 16, "{bar}");
    assert_eq!(inner.matches('#').count(), 4, "{bar}");
    assert_eq!(inner.matches('=').count(), 8, "{bar}");
    assert_eq!(inner.matches('~').count(), 8, "{bar}");
    assert_eq!(inner.matches('+').count(), 2, "{bar}");
    assert_eq!(inner.matches('.').count(), 2, "{bar}");
    assert!(bar.contains("~ slots 2 x 100 B"), "{bar}");
    assert!(!bar.contains('\n'));
    // Tiny widths still give a bar, and insufficient plans say so.
    let p = plan(&model, &exact_budget(150), &Workload::default(), &pcie4()).unwrap();
    let bar = memory_bar(&p, &exact_budget(150), 0);
    assert!(bar.contains("nothing placed"), "{bar}");
}

#[test]
fn plan_serializes_with_the_cli_keys() {
    let hp = Hparams::parse(QWEN2_1_5B_F32).unwrap();
    let p = plan(
        &hp.to_model_cost(),
        &Budget::from_free(2 * GIB),
        &Workload::default(),
        &pcie4(),
    )
    .unwrap();
    let v = serde_json::to_value(&p).unwrap();
    for key in [
        "mode",
        "resident_layers",
        "streamed_layers",
        "full_cache_bytes",
        "streaming_bytes",
        "layer_bytes_max",
        "bytes_per_step",
        "bytes_per_run",
        "predicted_step_seconds",
        "message",
    ] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    assert_eq!(v["mode"], "streaming");
    assert_eq!(v["link"]["name"], "pcie4-x16");
}

#[test]
fn planning_1000_layers_for_100_steps_is_fast() {
    let (model, budget, workload) = bench_case();
    let p = plan(&model, &budget, &workload, &pcie4()).unwrap();
    assert_eq!(p.mode, Mode::Streaming);
    assert!(!p.resident_layers.is_empty() && !p.streamed_layers.is_empty());
    assert!(p.device_bytes <= budget.free_bytes);
    // The rounded knapsack stays close to the capacity: less than one layer left unused.
    let slack = p.usable_bytes - p.global_bytes - p.arena_bytes;
    assert!(slack < 40 << 20, "{slack}");
    let seconds = bench_plan_1000_layers();
    let limit = if cfg!(debug_assertions) { 1.0 } else { 0.010 };
    assert!(seconds < limit, "{seconds} s per plan");
}

#[test]
fn a_resident_cap_streams_the_layers_that_save_least() {
    // Six layers that all fit: capped at 2 resident, the two largest stay (they save the most
    // traffic per pass) and the others stream through a ring that fits beside them.
    let sizes = [8u64, 32, 16, 64, 24, 48].map(|m| m << 20);
    let model = ModelCost {
        global_bytes: 4 << 20,
        global_copy_bytes: 4 << 20,
        layers: sizes
            .iter()
            .enumerate()
            .map(|(i, &b)| LayerCost::new(format!("l{i}"), b))
            .collect(),
        ..ModelCost::default()
    };
    let budget = Budget {
        min_free_bytes: 0,
        safety_fraction: 1.0,
        ..Budget::from_free(1 << 30)
    };
    let free = plan(&model, &budget, &Workload::default(), &pcie4()).unwrap();
    assert_eq!(free.mode, Mode::Full);
    for max in [0u32, 1, 2, 5, 6, 9] {
        let workload = Workload {
            max_resident_layers: Some(max),
            ..Workload::default()
        };
        let p = plan(&model, &budget, &workload, &pcie4()).unwrap();
        let kept = (max as usize).min(6);
        assert_eq!(p.resident_layers.len(), kept, "cap {max}");
        let mut expected: Vec<usize> = vec![3, 5, 1, 4, 2, 0][..kept].to_vec();
        expected.sort_unstable();
        assert_eq!(p.resident_layers, expected, "cap {max}");
        if kept < 6 {
            assert_eq!(p.mode, Mode::Streaming, "cap {max}");
            assert_eq!(p.slot_count, 2.min(6 - kept as u32), "cap {max}");
            let largest_streamed = p.streamed_layers.iter().map(|&i| sizes[i]).max().unwrap();
            assert!(p.slot_bytes >= largest_streamed, "cap {max}");
            check_accounting(&model, &workload, &budget, &p);
        } else {
            assert_eq!(p.mode, Mode::Full);
        }
    }
}
