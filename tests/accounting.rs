//! One accounting of bytes moved. A plan's prediction equals what the engine then measures:
//! the placement (global group and resident layers, copied once) and the streamed traffic
//! per pass, with prefetches that no pass used counted apart. And a plan made from a GGUF
//! file's descriptors, by the library or by `offload-engine plan`, is the plan an engine over
//! the loaded file carries out with the same numbers.

mod builtin_models;

use std::path::PathBuf;
use std::process::Command;

use builtin_models::{run_streamed, Architecture, DemoConfig, DemoModel};
use offload_engine::engine::{Engine, EngineParams};
use offload_engine::planner::{Budget, Link, Mode, ModelCost, Workload};
use offload_engine::registry::Registry;

const PASSES: u64 = 3;

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("accounting");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn params(budget: u64, depth: u32) -> EngineParams {
    builtin_models::engine_params("CPU", budget, depth)
}

fn workload(depth: u32) -> Workload {
    builtin_models::workload(PASSES as u32, 1, depth)
}

/// Budgets that make a plan full, about half resident, and only the global group plus two
/// slots.
fn budgets(cost: &ModelCost) -> [u64; 3] {
    let layers: u64 = cost.layers.iter().map(|l| l.bytes).sum();
    let largest = cost.layers.iter().map(|l| l.bytes).max().unwrap();
    [
        cost.global_bytes + layers,
        cost.global_bytes + layers / 2 + 2 * largest,
        cost.global_bytes + 2 * largest,
    ]
}

fn cost_of(model: &DemoModel, from_file: Option<&PathBuf>) -> ModelCost {
    let mut registry = Registry::new(None);
    // SAFETY: the model outlives the registry (dropped at the end of this function).
    unsafe {
        match from_file {
            Some(path) => registry.add_file_backed_context(model.context(), path),
            None => registry.add_ggml_context(model.context()),
        }
    }
    .unwrap();
    registry.model_cost(false)
}

#[test]
fn the_plan_predicts_exactly_the_bytes_the_engine_moves() {
    let mut checked = 0;
    for architecture in [Architecture::Llama, Architecture::Flux] {
        let config = DemoConfig::tiny(architecture);
        let model = DemoModel::new(config.clone()).unwrap();
        let path = scratch(&format!("{architecture:?}.gguf"));
        model.write_gguf(&path).unwrap();
        let twin = DemoModel::unallocated(config).unwrap();
        for (subject, file) in [(&model, None), (&twin, Some(&path))] {
            for budget in budgets(&cost_of(subject, file)) {
                for depth in [0, 1, 2] {
                    let what = format!(
                        "{architecture:?}, {}, budget {budget}, depth {depth}",
                        if file.is_some() {
                            "from the file"
                        } else {
                            "in memory"
                        }
                    );
                    let run = run_streamed(
                        subject,
                        file.map(PathBuf::as_path),
                        params(budget, depth),
                        &workload(depth),
                        PASSES as usize,
                        None,
                    )
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                    let (plan, stats) = (&run.plan, &run.stats);
                    assert_eq!(stats.placement_bytes, plan.placement_bytes, "{what}");
                    assert_eq!(stats.streamed_bytes, PASSES * plan.bytes_per_pass, "{what}");
                    assert_eq!(
                        stats.layer_loads,
                        PASSES * plan.streamed_layers.len() as u64,
                        "{what}"
                    );
                    assert_eq!(
                        stats.bytes_copied,
                        stats.placement_bytes + stats.streamed_bytes + stats.prefetch_unused_bytes,
                        "{what}"
                    );
                    assert_eq!(
                        plan.bytes_per_run,
                        plan.placement_bytes + PASSES * plan.bytes_per_pass,
                        "{what}"
                    );
                    if plan.mode == Mode::Full {
                        assert_eq!(stats.bytes_copied, stats.placement_bytes, "{what}");
                    }
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 2 * 2 * 3 * 3);
}

/// What a plan's JSON and the engine's plan must agree on.
fn figures(plan: &serde_json::Value) -> serde_json::Value {
    let keys = [
        "mode",
        "resident_layers",
        "streamed_layers",
        "slot_count",
        "slot_bytes",
        "arena_bytes",
        "device_bytes",
        "placement_bytes",
        "bytes_per_pass",
        "bytes_per_step",
        "bytes_per_run",
        "layer_loads_per_run",
    ];
    serde_json::Value::Object(
        keys.iter()
            .map(|k| (k.to_string(), plan[*k].clone()))
            .collect(),
    )
}

#[test]
fn the_command_lines_plan_is_the_plan_the_engine_carries_out() {
    let config = DemoConfig::tiny(Architecture::Llama);
    let model = DemoModel::new(config).unwrap();
    let path = scratch("cli.gguf");
    model.write_gguf(&path).unwrap();
    drop(model);
    let mut descriptors = Registry::new(None);
    descriptors.add_gguf(&path).unwrap();
    let cost = descriptors.model_cost(false);
    let link = Link::named("pcie4-x16").unwrap();
    for budget in budgets(&cost) {
        let workload = Workload {
            steps: 4,
            passes_per_step: 2,
            prefetch_depth: 1,
            ..Default::default()
        };
        let mut registry = Registry::new(None);
        registry.load_gguf(&path, false).unwrap();
        let mut engine = Engine::with_registry(params(budget, 1), registry).unwrap();
        let carried = engine.prepare(&workload, &link).unwrap().clone();
        let carried = serde_json::to_value(&carried).unwrap();

        // The library's planner on the file's descriptors, with the engine's budget rule.
        let mut exact = Budget::from_free(budget);
        exact.min_free_bytes = 0;
        exact.safety_fraction = 1.0;
        let planned = offload_engine::planner::plan(&cost, &exact, &workload, &link).unwrap();
        assert_eq!(
            figures(&serde_json::to_value(&planned).unwrap()),
            figures(&carried),
            "budget {budget}"
        );

        // And the command line.
        let out = Command::new(env!("CARGO_BIN_EXE_offload-engine"))
            .arg("plan")
            .arg(&path)
            .args(["--budget", &format!("{budget}"), "--steps", "4"])
            .args(["--passes-per-step", "2", "--prefetch", "1", "--json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(figures(&printed), figures(&carried), "budget {budget}");
    }
}
