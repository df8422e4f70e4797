//! The `offload-engine` command as a person runs it.

use std::process::Command;

use offload_engine::gguf::{Value, Writer};

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
