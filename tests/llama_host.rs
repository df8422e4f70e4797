//! examples/llama_host, a C++ llama.cpp program built with CMake against the static library
//! (which bundles llama.cpp and ggml) and cpp/offload_engine_llama.hpp, run on Gemma 3 270M:
//! unmodified (--no-engine), then streamed at three budgets and from the model file; every
//! run must print the same checksum over its tokens and logits. A budget too small exits 1
//! with the planner's message, before llama.cpp loads anything.

mod common;
#[path = "common/example.rs"]
mod example;
#[path = "common/gemma.rs"]
mod gemma;

use std::process::Command;

use example::{build_example, have, static_library, work_dir, RUN_TIMEOUT};
use gemma::gemma;

fn run(exe: &std::path::Path, args: &[&str]) -> common::Finished {
    let what = format!("llama_host {}", args.join(" "));
    let log_dir = work_dir("llama_host")
        .join("logs")
        .join(args.join("_").replace(['/', ' '], "_"));
    let mut command = Command::new(exe);
    command
        .arg("-m")
        .arg(gemma())
        .args(["--device", "CPU", "-n", "8", "--threads", "2"])
        .args(args);
    common::execute(&what, &mut command, &log_dir, Some(RUN_TIMEOUT))
}

fn checksum(finished: &common::Finished, what: &str) -> String {
    assert!(
        finished.success(),
        "{what} failed:\n{}\n{}",
        finished.stdout,
        finished.stderr
    );
    finished
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("checksum: "))
        .unwrap_or_else(|| panic!("{what}: no checksum in\n{}", finished.stdout))
        .to_string()
}

#[test]
fn llama_host_streams_with_the_checksum_of_unmodified_llama() {
    if !have("cmake") {
        println!("note: cmake not found; skipping the llama host test");
        return;
    }
    let exe = build_example("llama_host", &static_library());
    let reference = checksum(&run(&exe, &["--no-engine"]), "unmodified");
    // Whole budgets for weights only (no reserves): all resident, about half, global + 2 slots.
    for budget in ["300MiB", "205MiB", "178MiB"] {
        for extra in [
            &[][..],
            &["--file-backed"][..],
            &["--no-mmap", "--prefetch", "2"][..],
        ] {
            let mut args = vec![
                "--vram-budget",
                budget,
                "--compute-reserve",
                "0",
                "--kv-cache",
                "0",
            ];
            args.extend_from_slice(extra);
            let finished = run(&exe, &args);
            let what = args.join(" ");
            assert_eq!(checksum(&finished, &what), reference, "{what}");
            assert!(finished.stdout.contains("plan: "), "{what}");
            if budget != "300MiB" {
                assert!(
                    finished.stdout.contains("plan: streaming"),
                    "{what}: {}",
                    finished.stdout
                );
            }
        }
    }
    let too_small = run(
        &exe,
        &[
            "--vram-budget",
            "100MiB",
            "--compute-reserve",
            "0",
            "--kv-cache",
            "0",
        ],
    );
    assert_eq!(
        too_small.status.and_then(|s| s.code()),
        Some(1),
        "{}",
        too_small.stderr
    );
    assert!(
        too_small.stderr.contains("offload-engine: "),
        "{}",
        too_small.stderr
    );
    assert!(
        !too_small.stderr.contains("llama_model_load"),
        "it failed before loading"
    );
}
