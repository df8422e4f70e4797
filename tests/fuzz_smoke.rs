//! Runs every libFuzzer target for a few seconds on its seed corpus (tests/fuzz.sh builds
//! them on stable Rust). Longer runs: `FUZZ_SECONDS=600 bash tests/fuzz.sh`.

use std::process::Command;

#[test]
fn fuzz_targets_survive_a_short_run() {
    if std::env::var_os("OFFLOAD_ENGINE_SKIP_FUZZ").is_some_and(|v| !v.is_empty()) {
        eprintln!("skipped: OFFLOAD_ENGINE_SKIP_FUZZ is set");
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let status = Command::new("bash")
        .arg(format!("{root}/tests/fuzz.sh"))
        .env(
            "FUZZ_SECONDS",
            std::env::var("FUZZ_SECONDS").unwrap_or_else(|_| "5".into()),
        )
        .current_dir(root)
        .status()
        .expect("bash runs");
    assert!(
        status.success(),
        "a fuzz target failed (see its output above)"
    );
}
