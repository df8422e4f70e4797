//! `offload-engine`: inspect and plan models, run the streaming demo and the benchmarks.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod args;
mod bench;
#[cfg(feature = "vendored-ggml")]
mod bench_cgroup;
#[cfg(feature = "vendored-ggml")]
mod bench_llama;
mod demo;
#[cfg(feature = "vendored-ggml")]
mod generate;
mod inspect;
#[cfg(feature = "vendored-ggml")]
mod llama_run;
mod models;
mod pipeline_demo;
mod plan;
mod soak;

#[derive(Parser)]
#[command(
    name = "offload-engine",
    version,
    about = "Stream ggml model weights layer by layer",
    after_help = "Sizes take decimal or binary units as written: 12GB = 12*10^9 bytes, \
                  12GiB = 12*2^30; a bare number is bytes."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a built-in model fully resident, then streamed under a budget, and compare outputs.
    Demo(demo::DemoOptions),
    /// Run a built-in three-stage pipeline (text encoder, diffusion model with CFG, decoder)
    /// in each offload mode under one budget and compare outputs with the engine-free run.
    Pipeline(pipeline_demo::PipelineDemoOptions),
    /// Measure streaming overlap, copy throughput and engine overhead in one run.
    Bench(bench::BenchArgs),
    /// List a GGUF model's layers in execution order.
    Inspect(inspect::InspectArgs),
    /// Generate text with llama.cpp through the engine; --compare checks it against
    /// unmodified llama.cpp bit for bit.
    #[cfg(feature = "vendored-ggml")]
    Generate(generate::GenerateArgs),
    /// Decide what stays on the device and what streams.
    Plan(plan::PlanArgs),
    /// Many engines with random budgets, depths and layer sizes; outputs checked bit for bit.
    Soak(soak::SoakArgs),
    /// List the ggml devices with their memory.
    Devices,
}

fn main() -> ExitCode {
    // Output piped into `head` and the like ends the program quietly, as in other tools,
    // instead of a panic on the first write after the pipe closed.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread is started.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    offload_engine::log::init();
    let result = match Cli::parse().command {
        Command::Demo(options) => demo::run_demo(&options),
        Command::Pipeline(options) => pipeline_demo::run_pipeline_demo(&options),
        Command::Bench(args) => bench::bench(&args),
        Command::Inspect(args) => inspect::inspect(&args),
        Command::Plan(args) => plan::plan(args),
        #[cfg(feature = "vendored-ggml")]
        Command::Generate(args) => generate::generate(&args),
        Command::Soak(args) => soak::soak(&args),
        Command::Devices => {
            for line in offload_engine::backend::describe_devices() {
                println!("{line}");
            }
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("offload-engine: error: {}", err.message);
            ExitCode::from(2)
        }
    }
}
