//! The modules of offload-engine that never call into ggml, with their own unit tests, built
//! standalone so Miri can interpret them: `cargo +nightly miri test` in this directory.
#![allow(dead_code)]

#[path = "../../../rust/error.rs"]
pub mod error;
#[path = "../../../rust/gguf.rs"]
pub mod gguf;
#[path = "../../../rust/units.rs"]
pub mod units;
