//! The command's built-in models (deterministic weights, realistic names), included by path so
//! the tests use exactly what `offload-engine demo`, `bench` and `pipeline` run, while the
//! library's public API carries none of it. Each test binary uses a part of them.
#![allow(dead_code)]

#[path = "../../rust/bin/offload_engine/models/mod.rs"]
mod models;

pub use models::*;

use offload_engine::engine::EngineParams;
use offload_engine::planner::Workload;

/// An engine on `device` with an exact budget and prefetch depth, the rest at defaults.
pub fn engine_params(device: &str, budget: u64, depth: u32) -> EngineParams {
    EngineParams {
        device: Some(device.into()),
        budget_bytes: Some(budget),
        prefetch_depth: depth,
        ..Default::default()
    }
}

/// `steps` steps of `passes_per_step` passes at prefetch depth `depth`.
pub fn workload(steps: u32, passes_per_step: u32, depth: u32) -> Workload {
    Workload {
        steps,
        passes_per_step,
        prefetch_depth: depth,
        ..Default::default()
    }
}
