//! Builds tests/cpp/api_test.cpp against cpp/offload_engine.hpp and the static library, and
//! runs it.

#[allow(dead_code)] // shared by the example tests; this one takes the library from it
mod common;
#[allow(dead_code)]
#[path = "common/example.rs"]
mod example;
#[path = "common/gemma.rs"]
mod gemma;

use std::path::Path;
use std::process::Command;

#[test]
fn cpp_api_end_to_end() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // This run's archive (target/<profile>/liboffload_engine.a is refreshed by cargo build only).
    let lib = example::static_library();
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
