//! Host-ggml mode end to end: the library built against a host's static ggml leaves every ggml
//! symbol for the host's final link, and a CMake host linking that ggml plus the library
//! streams layers correctly with one ggml in the process.
//!
//! The "host's ggml" is the vendored install this crate was built with (headers, static
//! libraries and CMake package), so the test needs no second ggml build.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

/// Where the vendored ggml was installed, announced by build.rs to every compile unit of the
/// package. Absent when this test itself was built in host-ggml mode.
const GGML_PREFIX: Option<&str> = option_env!("OFFLOAD_ENGINE_GGML_PREFIX");
const GGML_CMAKE_DIR: Option<&str> = option_env!("OFFLOAD_ENGINE_GGML_CMAKE_DIR");

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The target directory this test binary was built into (`<target>/<profile>/deps/<exe>`),
/// so the host-ggml build lands beside it even under CARGO_TARGET_DIR or --target.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| manifest_dir().join("target"))
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn run(what: &str, cmd: &mut Command) -> Output {
    let started = Instant::now();
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    eprintln!("{what}: {:.1?}", started.elapsed());
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\n{cmd:?}\n--- stdout\n{}\n--- stderr\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Checks an archive's symbol table: every ggml/gguf symbol it mentions must be undefined
/// (`U`, or weak-undefined `w`), and the engine must actually refer to ggml.
fn assert_ggml_only_undefined(archive: &Path) {
    let out = run(
        "nm",
        Command::new("nm").arg("-A").arg("--no-sort").arg(archive),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut undefined_init = false;
    let mut defined = Vec::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace().rev();
        let (Some(symbol), Some(kind)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !(symbol.starts_with("ggml_") || symbol.starts_with("gguf_")) {
            continue;
        }
        match kind {
            "U" | "w" => undefined_init |= symbol == "ggml_init",
            _ => defined.push(line.to_string()),
        }
    }
    assert!(
        defined.is_empty(),
        "{} defines ggml symbols (a second ggml would be linked):\n{}",
        archive.display(),
        defined
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        undefined_init,
        "{} has no undefined reference to ggml_init: is it the engine library?",
        archive.display()
    );
}

#[test]
fn host_ggml_mode_links_one_ggml() {
    let started = Instant::now();
    if !have("cmake") {
        println!("note: cmake not found; skipping the host-ggml mode test");
        return;
    }
    let (Some(prefix), Some(cmake_dir)) = (GGML_PREFIX, GGML_CMAKE_DIR) else {
        // Built in host-ggml mode ourselves: there is no vendored install to play the host.
        println!("note: no vendored ggml install (built without `vendored-ggml`); skipping");
        return;
    };
    let prefix = Path::new(prefix);
    assert!(
        prefix.join("include/ggml-backend.h").is_file(),
        "no ggml headers under {}",
        prefix.display()
    );

    // 1. The library in host-ggml mode, in its own target dir: different features must not
    // overwrite target/<profile>/liboffload_engine.a, and the outer cargo holds the lock on
    // our own target dir while tests run.
    let host_target = target_dir().join("host-ggml");
    let out = run(
        "cargo build (host-ggml mode)",
        Command::new(env!("CARGO"))
            .current_dir(manifest_dir())
            .args(["build", "--lib", "--no-default-features", "--locked"])
            .arg("--manifest-path")
            .arg(manifest_dir().join("Cargo.toml"))
            .env("CARGO_TARGET_DIR", &host_target)
            // No debug info: it roughly halves the cold build of all dependencies, and the
            // link check does not need it.
            .env("CARGO_PROFILE_DEV_DEBUG", "0")
            .env("OFFLOAD_ENGINE_GGML_DIR", prefix),
    );
    let log = String::from_utf8_lossy(&out.stderr);
    // The whole point: no second ggml is compiled (or linked).
    assert!(
        !log.contains("llama-cpp-sys-2"),
        "the host-ggml build compiled the vendored ggml:\n{log}"
    );
    let lib = host_target.join("debug").join("liboffload_engine.a");
    assert!(lib.is_file(), "{} was not built", lib.display());
    assert_ggml_only_undefined(&lib);

    // 2. A CMake host against the vendored ggml package, linking that library. A fresh build
    // dir: CMake caches ggml_DIR, which would outlive a change of the ggml install.
    let build = host_target.join("host-build");
    if build.exists() {
        std::fs::remove_dir_all(&build).expect("remove the old host build dir");
    }
    run(
        "cmake configure",
        Command::new("cmake")
            .arg("-S")
            .arg(manifest_dir().join("tests/host_ggml"))
            .arg("-B")
            .arg(&build)
            .arg(format!("-DCMAKE_PREFIX_PATH={cmake_dir}"))
            .arg(format!("-DOFFLOAD_ENGINE_LIB={}", lib.display()))
            .arg(format!(
                "-DOFFLOAD_ENGINE_INCLUDE_DIR={}",
                manifest_dir().join("ffi").display()
            )),
    );
    run(
        "cmake build",
        Command::new("cmake").arg("--build").arg(&build),
    );

    // 3. Run it: it checks the outputs bit for bit and that ggml objects are shared.
    let out = run("host", &mut Command::new(build.join("host")));
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{}", stdout.trim_end());
    assert!(
        stdout.lines().any(|l| l.starts_with("OK")),
        "the host did not print OK:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("host-ggml mode test: {:.1?} in all", started.elapsed());
}
