//! The command's built-in models (deterministic weights, realistic names), included by path so
//! the tests use exactly what `offload-engine demo`, `bench` and `pipeline` run, while the
//! library's public API carries none of it. Each test binary uses a part of them.
#![allow(dead_code)]

#[path = "../../rust/bin/offload_engine/models/mod.rs"]
mod models;

pub use models::*;
