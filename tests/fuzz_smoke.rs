//! Runs every libFuzzer target for a few seconds on its seed corpus (tests/fuzz.sh builds
//! them on stable Rust, under this build's target directory, with fuzz_abi linked against the
//! ggml this build compiled). Longer runs: `FUZZ_SECONDS=600 bash tests/fuzz.sh`.

use std::process::Command;

#[test]
fn fuzz_targets_survive_a_short_run() {
    if std::env::var_os("OFFLOAD_ENGINE_SKIP_FUZZ").is_some_and(|v| !v.is_empty()) {
        eprintln!("skipped: OFFLOAD_ENGINE_SKIP_FUZZ is set");
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    // target/tmp -> target: the fuzz build goes beside this one's.
    let target_dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR lies in the target directory");
    let mut command = Command::new("bash");
    command
        .arg(format!("{root}/tests/fuzz.sh"))
        .env(
            "FUZZ_SECONDS",
            std::env::var("FUZZ_SECONDS").unwrap_or_else(|_| "5".into()),
        )
        .env("CARGO_TARGET_DIR", target_dir)
        .current_dir(root);
    if let Some(prefix) = option_env!("OFFLOAD_ENGINE_GGML_PREFIX") {
        command.env("OFFLOAD_ENGINE_GGML_DIR", prefix);
    }
    let status = command.status().expect("bash runs");
    assert!(
        status.success(),
        "a fuzz target failed (see its output above)"
    );
}
