//! The `offload-engine` command as a person runs it.

use std::process::Command;

use offload_engine::gguf::{Value, Writer};

fn run(args: &[&str]) -> (bool, String, String) {
    run_in(Command::new(env!("CARGO_BIN_EXE_offload-engine")).args(args))
}

fn run_in(command: &mut Command) -> (bool, String, String) {
    let out = command.output().expect("the binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn flux_fixture(path: &std::path::Path) {
    let mut w = Writer::new();
    w.add_kv("general.architecture", Value::Str("flux".into()));
    for i in (0..3).rev() {
        w.add_tensor_zeroed(
            &format!("model.diffusion_model.double_blocks.{i}.img_attn.qkv.weight"),
            0,
            &[16, 48],
        )
        .unwrap();
    }
    for i in 0..4 {
        w.add_tensor_zeroed(
            &format!("model.diffusion_model.single_blocks.{i}.linear1.weight"),
            1,
            &[16, 32],
        )
        .unwrap();
    }
    w.add_tensor_zeroed("model.diffusion_model.img_in.weight", 0, &[16, 16])
        .unwrap();
    w.write_path(path).unwrap();
}

#[test]
fn inspect_lists_layers_in_execution_order() {
    let dir = std::env::temp_dir().join(format!("oe-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("flux.gguf");
    flux_fixture(&model);
    let (ok, stdout, stderr) = run(&["inspect", model.to_str().unwrap(), "--json"]);
    assert!(ok, "{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(doc["architecture"], "flux");
    let names: Vec<&str> = doc["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(names[0], "double_blocks.0");
    assert_eq!(names[3], "single_blocks.0");
    assert_eq!(names.len(), 7);
    assert_eq!(doc["layers"][0]["bytes"], 16 * 48 * 4);
    assert_eq!(doc["global_bytes"], 16 * 16 * 4);
    assert_eq!(doc["tensor_count"], 8);
    assert_eq!(
        doc["total_bytes"],
        3 * 16 * 48 * 4 + 4 * 16 * 32 * 2 + 16 * 16 * 4
    );
    let (ok, table, _) = run(&["inspect", model.to_str().unwrap()]);
    assert!(ok && table.contains("single_blocks.3") && table.contains("(global)"));

    let bytes = std::fs::read(&model).unwrap();
    let truncated = dir.join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let (ok, _, stderr) = run(&["inspect", truncated.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("truncated.gguf"), "{stderr}");
    let (ok, _, stderr) = run(&["inspect", dir.join("missing.gguf").to_str().unwrap()]);
    assert!(!ok && stderr.contains("missing.gguf"), "{stderr}");
    let (ok, _, stderr) = run(&[
        "inspect",
        model.to_str().unwrap(),
        "--pattern",
        "blocks\\.((",
    ]);
    assert!(!ok && !stderr.is_empty());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn plan_modes_follow_the_free_memory() {
    let hparams = "hidden=1536,layers=28,heads=12,kv_heads=2,vocab=151936,ffn=8960,context=2048,type=f32,kv_type=f32";
    for (free, mode) in [
        ("12G", "full"),
        ("2G", "streaming"),
        ("512M", "insufficient"),
    ] {
        let (ok, stdout, stderr) =
            run(&["plan", "--hparams", hparams, "--free-vram", free, "--json"]);
        let doc: serde_json::Value =
            serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout} {stderr}"));
        assert_eq!(doc["mode"], mode, "{free}");
        assert_eq!(ok, mode != "insufficient");
        for key in [
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
            assert!(doc.get(key).is_some(), "missing {key}");
        }
    }
    let (ok, _, stderr) = run(&["plan", "--hparams", "hidden=0,layers=1", "--vram", "1G"]);
    assert!(!ok && !stderr.is_empty());
    let (ok, _, _) = run(&["plan", "--hparams", hparams, "--vram", "1G", "--link", "0"]);
    assert!(!ok);
}

#[test]
fn tiny_demo_is_bit_identical() {
    let (ok, stdout, stderr) = run(&["demo", "--tiny", "--passes", "2"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("bit-identical"), "{stdout}");
}

#[test]
fn quick_bench_reports_every_figure() {
    let (ok, stdout, stderr) = run(&["bench", "--quick", "--json"]);
    assert!(ok, "{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    for key in [
        "overlap_ratio",
        "naive_ratio",
        "copy_fraction_of_memcpy",
        "overhead_us_per_layer",
        "resident_overhead_fraction",
        "bit_identical",
    ] {
        assert!(doc.get(key).is_some(), "missing {key}");
    }
    assert_eq!(doc["bit_identical"], true);
}

#[test]
fn short_soak_finds_no_mismatch_and_no_leak() {
    let (ok, stdout, stderr) = run(&["soak", "--engines", "60", "--passes", "4", "--json"]);
    assert!(ok, "{stdout}{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(doc["mismatches"], 0);
    assert_eq!(doc["arena_overruns"], 0);
    assert!(doc["passes"].as_u64().unwrap() >= 100);
    // Every engine's copy thread is joined when it is dropped.
    assert_eq!(doc["threads_at_end"], doc["threads_after_first_tenth"]);
}

#[test]
fn quick_disk_bench_reports_every_figure() {
    let (ok, stdout, stderr) = run(&["bench", "--disk", "--quick", "--json"]);
    assert!(ok, "{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    for key in [
        "read_fraction_of_sequential",
        "peak_rss_bytes",
        "rss_bound_bytes",
        "bit_identical",
    ] {
        assert!(doc.get(key).is_some(), "missing {key}");
    }
    assert_eq!(doc["bit_identical"], true);
    assert!(doc["model_over_ring"].as_f64().unwrap() >= 8.0);
}

#[test]
fn pipeline_modes_give_identical_outputs_or_refuse_clearly() {
    let (ok, stdout, stderr) = run(&["pipeline", "--tiny", "--steps", "2"]);
    assert!(ok, "{stdout}\n{stderr}");
    // Two steps with guidance are four passes; the text encoder runs once.
    assert!(stdout.contains("4 passes per job"), "{stdout}");
    assert!(stdout.contains("1 pass per job"), "{stdout}");
    let line = |mode: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(&format!("{mode} ")))
            .unwrap_or_else(|| panic!("no line for {mode}:\n{stdout}"))
            .to_string()
    };
    // The default budget holds the diffusion model and the decoder, not the text encoder
    // besides: a mode that cannot move it refuses with the reason, the others all match.
    assert!(line("none").contains("refused") && line("none").contains("layer_streaming"));
    for mode in ["cond_diffusion", "aggressive", "layer_streaming"] {
        assert!(line(mode).contains("(identical)"), "{}", line(mode));
    }
    let checksums: std::collections::HashSet<&str> = stdout
        .lines()
        .filter(|l| l.ends_with("(identical)"))
        .filter_map(|l| l.split_whitespace().rev().nth(1))
        .collect();
    assert_eq!(checksums.len(), 1, "{stdout}");

    // Below the diffusion model's size only layer streaming runs it, streamed.
    let (ok, stdout, stderr) = run(&[
        "pipeline",
        "--tiny",
        "--steps",
        "2",
        "--offload-mode",
        "layer_streaming",
        "--vram-budget",
        "1500K",
        "--offload-log",
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("streaming") && stdout.contains("(identical)"),
        "{stdout}"
    );
    assert!(stderr.contains("unload 'text_encoder'"), "{stderr}");

    let (ok, _, stderr) = run(&["pipeline", "--tiny", "--offload-mode", "sometimes"]);
    assert!(!ok && stderr.contains("unknown offload mode"), "{stderr}");
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// A llama-style GGUF whose embedding dwarfs its layers (most bytes, two names).
fn gemma_like_fixture(path: &std::path::Path) {
    let mut w = Writer::new();
    w.add_kv("general.architecture", Value::Str("gemma3".into()));
    w.add_tensor_zeroed("token_embd.weight", 8, &[64, 512])
        .unwrap(); // q8_0
    w.add_tensor_zeroed("output_norm.weight", 0, &[64]).unwrap();
    for i in 0..4 {
        for part in ["attn_q", "ffn_up"] {
            w.add_tensor_zeroed(&format!("blk.{i}.{part}.weight"), 12, &[256, 64])
                .unwrap(); // q4_k
        }
    }
    w.write_path(path).unwrap();
}

const HPARAMS: &str = "hidden=1536,layers=28,heads=12,kv_heads=2,vocab=151936,ffn=8960,context=2048,type=f32,kv_type=f32";

#[test]
fn plan_has_every_budget_knob_and_one_size_syntax() {
    let json = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["plan", "--hparams", HPARAMS, "--json"];
        all.extend_from_slice(args);
        let (_, stdout, stderr) = run(&all);
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout} {stderr}"))
    };
    // --vram and --free-vram are one option; G is 10^9 and GiB 2^30.
    assert_eq!(json(&["--vram", "6GB"]), json(&["--free-vram", "6G"]));
    assert_ne!(
        json(&["--free-vram", "6GB"])["usable_bytes"],
        json(&["--free-vram", "6GiB"])["usable_bytes"]
    );
    // Margins: usable = min(free * safety, free - min_free) - reserves, as the engine computes
    // it from measured free memory.
    let usable = |args: &[&str]| json(args)["usable_bytes"].as_u64().unwrap();
    let free: u64 = 6_000_000_000;
    assert_eq!(
        usable(&["--free-vram", "6GB", "--min-free", "0", "--safety", "1"]),
        free
    );
    assert_eq!(
        usable(&["--free-vram", "6GB", "--min-free", "1GB", "--safety", "0.5"]),
        free / 2
    );
    assert_eq!(
        usable(&["--free-vram", "6GB", "--min-free", "2GB", "--safety", "0.9"]),
        free - 2_000_000_000
    );
    assert_eq!(
        usable(&[
            "--free-vram",
            "6GB",
            "--min-free",
            "0",
            "--safety",
            "1",
            "--compute-reserve",
            "1GB",
            "--kv-cache",
            "500MB"
        ]),
        free - 1_500_000_000
    );
    // --budget is the engine's budget: nothing is taken off.
    assert_eq!(usable(&["--budget", "6GB"]), free);
    // A bare number below 1 MiB is almost certainly missing its unit: a warning says so.
    let (_, _, stderr) = run(&["plan", "--hparams", HPARAMS, "--free-vram", "12"]);
    assert!(stderr.contains("12 bytes"), "{stderr}");
    // The links help mentions can be listed.
    let (ok, stdout, _) = run(&["plan", "--link", "list"]);
    assert!(
        ok && stdout.contains("pcie4-x16") && stdout.contains("usb2"),
        "{stdout}"
    );
    // Every option has a help line.
    let (ok, help, _) = run(&["plan", "--help"]);
    assert!(ok);
    for option in [
        "--min-free",
        "--safety",
        "--compute-reserve",
        "--kv-cache",
        "--budget",
        "--file-backed",
    ] {
        let line = help
            .lines()
            .find(|l| l.contains(option))
            .unwrap_or_else(|| panic!("{option}: {help}"));
        assert!(
            help.lines()
                .skip_while(|l| l != &line)
                .nth(1)
                .is_some_and(|l| !l.trim().is_empty()),
            "{option}"
        );
    }
}

#[test]
fn an_insufficient_plan_says_why_once_and_in_the_models_own_types() {
    let model = scratch("gemma-like.gguf");
    gemma_like_fixture(&model);
    let (ok, stdout, stderr) = run(&["plan", model.to_str().unwrap(), "--budget", "20KiB"]);
    assert!(!ok);
    let both = format!("{stdout}{stderr}");
    assert_eq!(
        both.matches("insufficient device memory").count(),
        1,
        "{both}"
    );
    // The advice starts from what the weights are now (4-bit), not from 16-bit weights.
    assert!(both.contains("from its 4.50 bits per weight"), "{both}");
    assert!(!both.contains("from 16-bit"), "{both}");
    // JSON carries the message; stderr only points at it.
    let (ok, stdout, stderr) = run(&[
        "plan",
        model.to_str().unwrap(),
        "--budget",
        "20KiB",
        "--json",
    ]);
    assert!(!ok);
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(doc["message"]
        .as_str()
        .unwrap()
        .contains("insufficient device memory"));
    assert!(!stderr.contains("insufficient device memory"), "{stderr}");
}

#[test]
fn inspect_names_the_files_architecture_and_lists_the_global_group() {
    let model = scratch("gemma-inspect.gguf");
    gemma_like_fixture(&model);
    let (ok, stdout, stderr) = run(&["inspect", model.to_str().unwrap(), "--global"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("architecture: gemma3 (layer pattern llama_gguf)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("token_embd.weight") && stdout.contains("q8_0"),
        "{stdout}"
    );
    assert!(stdout.contains("4 layers, 10 tensors"), "{stdout}");
    // Most bytes are in the embedding, but only 2 of 10 names are unmatched: no warning.
    assert!(!stdout.contains("warning"), "{stdout}");
    let (_, json, _) = run(&["inspect", model.to_str().unwrap(), "--global", "--json"]);
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(doc["architecture"], "gemma3");
    assert_eq!(doc["pattern"], "llama_gguf");
    assert_eq!(doc["global"].as_array().unwrap().len(), 2);
    // A pattern that matches no names: warned.
    let (_, stdout, _) = run(&[
        "inspect",
        model.to_str().unwrap(),
        "--pattern",
        "nothing\\.(\\d+)",
    ]);
    assert!(
        stdout.contains("10 of 10 tensors matched no layer"),
        "{stdout}"
    );
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    use std::io::Read;
    let model = scratch("flux-pipe.gguf");
    flux_fixture(&model);
    let mut child = Command::new(env!("CARGO_BIN_EXE_offload-engine"))
        .args(["plan", "--link", "list"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // like `| head -0`: the reader is gone before the output
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_ne!(status.code(), Some(101), "{stderr}");
}

#[test]
fn the_demo_reports_the_depth_it_runs_and_the_bytes_its_plan_predicted() {
    // The tiny model has about 600 KiB of weights: this budget streams some of its layers.
    let (ok, stdout, stderr) = run(&["demo", "--tiny", "--passes", "2", "--budget", "300KiB"]);
    assert!(ok, "{stdout}{stderr}");
    // The depth printed is the depth the plan gives (never "depth 1" then "reduced to 0").
    let plan_line = stdout
        .lines()
        .find(|l| l.contains("prefetch depth"))
        .unwrap();
    if stdout.contains("reduced from") {
        assert!(plan_line.contains("prefetch depth 0"), "{stdout}");
    }
    // Placement and per-pass traffic equal the plan's predictions, each on its own.
    for line in stdout.lines().filter(|l| l.starts_with("placed once:")) {
        let figures: Vec<&str> = line.split(['(', ')', ';']).collect();
        let placed = line
            .split("placed once: ")
            .nth(1)
            .unwrap()
            .split(" (")
            .next()
            .unwrap();
        assert!(line.contains(&format!("(planned {placed})")), "{line}");
        let streamed = line
            .split("streamed ")
            .nth(1)
            .unwrap()
            .split(" per pass")
            .next()
            .unwrap();
        assert!(
            line.contains(&format!("planned {streamed} per pass")),
            "{line} {figures:?}"
        );
    }
    for wrong in [" 1 layers", " 1 passes", " 1 slots", " 1 layer loads"] {
        assert!(!stdout.contains(wrong), "{wrong}: {stdout}");
    }
}

#[test]
fn profile_lines_are_per_pass_and_debug_logs_say_what_was_decided() {
    let out = Command::new(env!("CARGO_BIN_EXE_offload-engine"))
        .args(["demo", "--tiny", "--passes", "3", "--budget", "300KiB"])
        .env("OFFLOAD_ENGINE_PROFILE", "1")
        .env("RUST_LOG", "offload_engine=trace")
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let passes: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("offload-engine: pass "))
        .collect();
    assert!(passes.len() >= 6, "{stderr}");
    for line in &passes {
        // "pass N T ms: ... wait W us ...": the wait of one pass fits inside that pass.
        let ms: f64 = line
            .split(" ms:")
            .next()
            .unwrap()
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let wait: f64 = line
            .split("wait ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(wait / 1e3 <= ms + 0.5, "{line}");
    }
    assert!(stderr.contains("grouped "), "registry grouping is logged");
    assert!(stderr.contains("placed on CPU"), "placements are logged");
    assert!(
        stderr.contains("prefetched") || stderr.contains("loading now"),
        "layer loads are traced"
    );
}

#[test]
fn bench_shows_progress_verdicts_and_load_and_leaves_no_files() {
    // A temporary directory of its own: other tests run benches at the same time.
    let tmp = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let (ok, stdout, stderr) = run_in(
        Command::new(env!("CARGO_BIN_EXE_offload-engine"))
            .args(["bench", "--quick"])
            .env("TMPDIR", &tmp),
    );
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stderr.contains("bench: [1/5]") && stderr.contains("bench: [5/5]"),
        "{stderr}"
    );
    assert!(stdout.contains("(target <= 1.15: "), "{stdout}");
    assert!(stdout.contains("met"), "{stdout}");
    assert!(stdout.contains("load average"), "{stdout}");
    let after: Vec<_> = std::fs::read_dir(&tmp)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    assert!(after.is_empty(), "bench left {after:?}");
    // The disk bench refuses a device it would not use.
    let (ok, _, stderr) = run(&["bench", "--disk", "--quick", "--device", "NOSUCH"]);
    assert!(!ok && stderr.contains("--device"), "{stderr}");
}
