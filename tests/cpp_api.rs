//! Builds tests/cpp/api_test.cpp against cpp/offload_engine.hpp and the static library, and
//! runs it.

#[path = "common/gemma.rs"]
mod gemma;

use std::path::{Path, PathBuf};
use std::process::Command;

fn profile_dir() -> PathBuf {
    // target/<profile>/deps/cpp_api-<hash> -> target/<profile>
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

#[test]
fn cpp_api_end_to_end() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = profile_dir().join("liboffload_engine.a");
    if !lib.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--lib"])
            .current_dir(root)
            .status()
            .unwrap();
        assert!(status.success());
    }
    assert!(lib.exists(), "{} missing", lib.display());
    let out_dir = std::env::temp_dir().join(format!("oe-cpp-api-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let exe = out_dir.join("api_test");
    let output = Command::new("c++")
        .args(["-std=c++17", "-Wall", "-Wextra", "-Werror", "-O1"])
        .arg(format!("-I{}", root.join("ffi").display()))
        .arg(format!("-I{}", root.join("cpp").display()))
        .arg(format!("-I{}", env!("OFFLOAD_ENGINE_GGML_INCLUDE")))
        .arg(root.join("tests/cpp/api_test.cpp"))
        .arg(&lib)
        .args(["-lpthread", "-ldl", "-lm"])
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("a C++ compiler (c++) is installed");
    assert!(
        output.status.success(),
        "compile failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let run = Command::new(&exe).arg(gemma::gemma()).output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("all checks passed"));
    std::fs::remove_dir_all(&out_dir).ok();
}
