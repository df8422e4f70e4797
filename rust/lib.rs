//! offload-engine: run ggml models larger than device memory by streaming weights layer by
//! layer, with outputs identical to a fully resident run. See docs/ARCHITECTURE.md.
pub mod backend;
pub mod diskio;
pub mod engine;
pub mod error;
pub mod executor;
pub mod faults;
pub mod ffi;
pub mod ggml;
pub mod gguf;
pub mod layout;
pub mod llama;
pub mod log;
pub mod patterns;
pub mod pipeline;
pub mod planner;
pub mod registry;
pub mod stream;
pub mod trace;
pub mod units;

// Links the pinned ggml build (its link directives live in that crate).
#[cfg(feature = "vendored-ggml")]
extern crate llama_cpp_sys_2 as _;
