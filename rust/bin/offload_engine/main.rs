//! `offload-engine`: inspect and plan models, run the streaming demo and the benchmarks.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use offload_engine::pipeline::OffloadMode;
use offload_engine::planner::Workload;
use offload_engine::units::parse_size;

mod bench;
mod demo;
mod inspect;
mod models;
mod pipeline_demo;
mod plan;
mod soak;

#[derive(Parser)]
#[command(
    name = "offload-engine",
    version,
    about = "Stream ggml model weights layer by layer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a built-in model fully resident, then streamed under a budget, and compare outputs.
    Demo {
        /// Device memory the streamed run may use (default: about a third of the model).
        #[arg(long, value_parser = parse_size_arg)]
        budget: Option<u64>,
        /// Layers copied ahead of the one computing.
        #[arg(long, default_value_t = 1)]
        prefetch: u32,
        /// Forward passes per run.
        #[arg(long, default_value_t = 3)]
        passes: usize,
        /// Write a Chrome trace-event JSON of the streamed run (open in Perfetto).
        #[arg(long)]
        trace: Option<PathBuf>,
        /// ggml device ("CPU", "CUDA0", ...); default: first GPU, else CPU.
        #[arg(long)]
        device: Option<String>,
        /// Compute threads on the CPU backend.
        #[arg(long, default_value_t = 1)]
        threads: i32,
        /// Smaller model (tests, quick looks).
        #[arg(long)]
        tiny: bool,
    },
    /// Run a built-in three-stage pipeline (text encoder, diffusion model with CFG, decoder)
    /// in each offload mode under one budget and compare outputs with the engine-free run.
    Pipeline {
        /// none, cond_only, cond_diffusion, aggressive, layer_streaming; default: all in turn.
        #[arg(long)]
        offload_mode: Option<String>,
        /// Device memory for all components (default: the diffusion model and the decoder
        /// fit, the text encoder does not fit beside them).
        #[arg(long, value_parser = parse_size_arg)]
        vram_budget: Option<u64>,
        /// Left free on the device, in MB (subtracted from the budget).
        #[arg(long, default_value_t = 0)]
        streaming_min_vram: u64,
        /// Layers copied ahead in a streamed diffusion model.
        #[arg(long, default_value_t = 1)]
        streaming_prefetch: u32,
        #[arg(long, default_value_t = 4)]
        steps: u32,
        /// Jobs per mode (the reload policy acts between them).
        #[arg(long, default_value_t = 2)]
        runs: u32,
        /// Leave an evicted diffusion model off the device between jobs.
        #[arg(long)]
        no_reload_diffusion: bool,
        /// Log every component move with bytes and time.
        #[arg(long)]
        offload_log: bool,
        #[arg(long)]
        device: Option<String>,
        #[arg(long, default_value_t = 1)]
        threads: i32,
        #[arg(long)]
        tiny: bool,
    },
    /// Measure streaming overlap, copy throughput and engine overhead in one run.
    Bench {
        #[arg(long)]
        json: bool,
        #[arg(long)]
        device: Option<String>,
        /// Smaller model and fewer repetitions (tests).
        #[arg(long)]
        quick: bool,
        /// Stream from the model file (disk tier): read throughput and peak RSS.
        #[arg(long)]
        disk: bool,
    },
    /// List a GGUF model's layers in execution order.
    Inspect {
        model: PathBuf,
        /// Built-in pattern name or a regex with one capture group for the layer index.
        #[arg(long)]
        pattern: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Decide what stays on the device and what streams.
    Plan {
        /// GGUF model file (or use --hparams).
        model: Option<PathBuf>,
        /// Transformer hyperparameters, e.g. hidden=1536,layers=28,heads=12,kv_heads=2,vocab=151936,ffn=8960,context=2048,type=f32
        #[arg(long)]
        hparams: Option<String>,
        /// Device memory capacity (simulated device, all free).
        #[arg(long, value_parser = parse_size_arg)]
        vram: Option<u64>,
        /// Free device memory (what is left after other programs).
        #[arg(long, value_parser = parse_size_arg)]
        free_vram: Option<u64>,
        /// Link name (see `--link list`) or a bandwidth in GB/s.
        #[arg(long, default_value = "pcie4-x16")]
        link: String,
        #[arg(long, default_value_t = 1)]
        steps: u32,
        #[arg(long, default_value_t = 1)]
        passes_per_step: u32,
        #[arg(long, default_value_t = 1)]
        prefetch: u32,
        #[arg(long)]
        pattern: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Many engines with random budgets, depths and layer sizes; outputs checked bit for bit.
    Soak {
        #[arg(long, default_value_t = 300)]
        engines: u64,
        #[arg(long, default_value_t = 10)]
        passes: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        json: bool,
    },
    /// List the ggml devices with their memory.
    Devices,
}

fn parse_size_arg(text: &str) -> std::result::Result<u64, String> {
    parse_size(text).map_err(|e| e.message)
}

fn main() -> ExitCode {
    offload_engine::log::init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo {
            budget,
            prefetch,
            passes,
            trace,
            device,
            threads,
            tiny,
        } => demo::run_demo(&demo::DemoOptions {
            budget,
            prefetch,
            passes,
            trace,
            device,
            threads,
            tiny,
        }),
        Command::Pipeline {
            offload_mode,
            vram_budget,
            streaming_min_vram,
            streaming_prefetch,
            steps,
            runs,
            no_reload_diffusion,
            offload_log,
            device,
            threads,
            tiny,
        } => offload_mode
            .as_deref()
            .map(OffloadMode::parse)
            .transpose()
            .and_then(|mode| {
                pipeline_demo::run_pipeline_demo(&pipeline_demo::PipelineDemoOptions {
                    mode,
                    budget: vram_budget,
                    steps,
                    runs,
                    prefetch: streaming_prefetch,
                    min_free: streaming_min_vram << 20,
                    log_moves: offload_log,
                    reload_diffusion: !no_reload_diffusion,
                    device,
                    threads,
                    tiny,
                })
            }),
        Command::Bench {
            json,
            device,
            quick,
            disk,
        } => {
            if disk {
                bench::run_disk_bench(json, quick)
            } else {
                bench::run_bench(json, device.as_deref(), quick)
            }
        }
        Command::Inspect {
            model,
            pattern,
            json,
        } => inspect::inspect(&model, pattern.as_deref(), json),
        Command::Plan {
            model,
            hparams,
            vram,
            free_vram,
            link,
            steps,
            passes_per_step,
            prefetch,
            pattern,
            json,
        } => plan::plan(plan::PlanArgs {
            model,
            hparams,
            vram,
            free_vram,
            link,
            workload: Workload {
                steps,
                passes_per_step,
                prefetch_depth: prefetch,
                ..Workload::default()
            },
            pattern,
            json,
        }),
        Command::Soak {
            engines,
            passes,
            seed,
            json,
        } => soak::soak(engines, passes, seed, json),
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
