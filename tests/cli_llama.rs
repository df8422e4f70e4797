//! `offload-engine generate` and `bench --llama` on the real test model, and the figures they
//! print agreeing with `offload-engine plan`'s.

#[path = "common/gemma.rs"]
mod gemma;

use std::process::Command;

use gemma::gemma;

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_offload-engine"))
        .args(args)
        .output()
        .expect("the binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

/// `generate` on Gemma on the CPU under `budget`, no reserves beside the weights, then `extra`.
fn generate(budget: &str, extra: &[&str]) -> (bool, String, String) {
    let model = gemma();
    let mut args = vec![
        "generate",
        model.to_str().unwrap(),
        "--device",
        "CPU",
        "--vram-budget",
        budget,
        "--compute-reserve",
        "0",
        "--kv-cache",
        "0",
    ];
    args.extend_from_slice(extra);
    run(&args)
}

#[test]
fn generate_compares_with_unmodified_llama_and_agrees_with_plan() {
    let model = gemma().to_str().unwrap();
    let budget = "200MiB";
    let (ok, stdout, stderr) = generate(
        budget,
        &["--n-predict", "8", "--threads", "2", "--compare", "--json"],
    );
    assert!(ok, "{stderr}");
    let g = json(&stdout);
    for key in [
        "tokens",
        "reference_tokens",
        "logits_identical",
        "resident_layers",
        "streamed_layers",
        "bytes_per_token",
        "prefill_tokens_per_second",
        "decode_tokens_per_second",
        "reference_prefill_tokens_per_second",
        "reference_decode_tokens_per_second",
        "prefetch_hits",
        "prefetch_misses",
    ] {
        assert!(!g[key].is_null(), "generate --json lacks {key}:\n{stdout}");
    }
    assert_eq!(g["tokens"], g["reference_tokens"]);
    assert_eq!(g["logits_identical"], true);
    assert_eq!(g["mode"], "streaming");
    // The plan's bytes per token is what streamed per pass.
    assert_eq!(g["bytes_per_token"], g["measured_bytes_per_pass"]);
    assert!(g["bytes_per_token"].as_u64().unwrap() > 0);

    // `plan` with the same budget and reserves gives the same placement and traffic.
    let (ok, stdout, stderr) = run(&[
        "plan",
        model,
        "--budget",
        budget,
        "--compute-reserve",
        "0",
        "--kv-cache",
        "0",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let p = json(&stdout);
    assert_eq!(p["resident_layers"], g["resident_layers"]);
    assert_eq!(p["streamed_layers"], g["streamed_layers"]);
    assert_eq!(p["bytes_per_pass"], g["bytes_per_token"]);
    assert_eq!(p["placement_bytes"], g["placement_bytes"]);
    // A language model that streams gets the stream-or-CPU advice.
    assert_eq!(p["advice"]["decode"]["prefer"], "cpu", "{stdout}");
    assert_eq!(p["advice"]["prefill"]["prefer"], "stream", "{stdout}");

    // Human output: the plan, the text, the comparison, a progress line on stderr.
    let (ok, stdout, stderr) =
        generate(budget, &["--n-predict", "4", "--threads", "2", "--compare"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("plan: streaming"), "{stdout}");
    assert!(stdout.contains("tokens and logits identical"), "{stdout}");
    assert!(stderr.contains("generating: [4/4]"), "{stderr}");
}

#[test]
fn generate_refuses_an_impossible_budget_before_loading() {
    let (ok, _, stderr) = generate("100MiB", &[]);
    assert!(!ok);
    assert!(
        stderr.contains("insufficient device memory") || stderr.contains("need"),
        "{stderr}"
    );
    assert!(!stderr.contains("generating"), "{stderr}");
}

#[test]
fn quick_llama_bench_reports_every_budget() {
    let (ok, stdout, stderr) = run(&[
        "bench",
        "--llama",
        gemma().to_str().unwrap(),
        "--device",
        "CPU",
        "--quick",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let b = json(&stdout);
    let budgets = b["budgets"].as_array().unwrap();
    assert_eq!(budgets.len(), 3);
    assert_eq!(budgets[0]["mode"], "full");
    for budget in budgets {
        assert_eq!(budget["identical"], true, "{budget}");
        for key in ["prefill_ratio", "decode_ratio"] {
            assert!(budget[key].as_f64().unwrap() > 0.0, "{budget}");
        }
    }
    assert!(stderr.contains("bench: [13/13]"), "{stderr}");
}

/// The memory-limited comparison, where this machine lets the test make a memory cgroup: a
/// limit below the global tensors plus two slots is refused before loading, with the numbers;
/// a roomier one runs both ways with the unlimited run's tokens.
#[test]
fn memory_limited_runs_refuse_or_match() {
    let model = gemma().to_str().unwrap();
    let (ok, stdout, stderr) = run(&[
        "bench",
        "--llama",
        model,
        "--memory-limit",
        "150MiB",
        "--quick",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    if stdout.starts_with("memory-limited comparison skipped") {
        println!("note: {stdout}");
        return;
    }
    let report = json(&stdout);
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 3);
    let engine = &runs[2];
    assert_eq!(engine["exit"], "exit 2", "{engine}");
    let error = engine["error"].as_str().unwrap();
    assert!(
        error.contains("insufficient device memory") && error.contains("MiB"),
        "{error}"
    );
    // Unmodified llama.cpp pages its mmap'd weights in and out, and still computes the same.
    assert_eq!(runs[1]["tokens_identical"], true, "{}", runs[1]);

    let (ok, stdout, stderr) = run(&[
        "bench",
        "--llama",
        model,
        "--memory-limit",
        "300MiB",
        "--quick",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let report = json(&stdout);
    for r in report["runs"].as_array().unwrap() {
        assert_eq!(r["exit"], "exit 0", "{r}");
        assert_eq!(r["tokens_identical"], true, "{r}");
    }
}
