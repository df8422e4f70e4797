//! Building the CMake examples in examples/ against this test run's static library, the way
//! a C++ host would (cpp/offload_engine.cmake).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::common::{self, Finished};

/// Headers of the ggml this crate was built against (set by build.rs).
const GGML_INCLUDE: &str = env!("OFFLOAD_ENGINE_GGML_INCLUDE");

/// Generous: a hang in a build or a run must fail the test, not stall CI.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(300);

pub fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// `<target>/<profile>/deps/<test exe>`: the directory holding the test binary.
fn deps_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .expect("the test binary lies in a directory")
        .to_path_buf()
}

/// The static library as built for this test run. Cargo builds every crate type of the lib
/// as this test's dependency into target/<profile>/deps; it copies them to target/<profile>/
/// only on `cargo build`, so the copy there may be stale. If neither holds the archive,
/// build it with this test's profile into this target dir.
pub fn static_library() -> PathBuf {
    let deps = deps_dir();
    let profile_dir = deps.parent().unwrap_or(&deps).to_path_buf();
    let candidates = [
        deps.join("liboffload_engine.a"),
        profile_dir.join("liboffload_engine.a"),
    ];
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return found.clone();
    }
    checked(
        "cargo build --lib",
        "library",
        &mut common::cargo_build_lib(&profile_dir),
    );
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| panic!("liboffload_engine.a not found in {candidates:?}"))
}

/// Where example `name` builds and runs: beside the test binary's profile dir.
pub fn work_dir(name: &str) -> PathBuf {
    let deps = deps_dir();
    deps.parent().unwrap_or(&deps).join(name)
}

/// Runs a build step; a failure fails the test with the step's output.
pub fn checked(what: &str, example: &str, command: &mut Command) -> Finished {
    let log_dir = work_dir(example)
        .join("logs")
        .join(what.replace([' ', '/'], "_"));
    common::execute_ok(what, command, &log_dir, Some(RUN_TIMEOUT))
}

/// Configures and builds examples/<name> against `library`; returns the executable.
pub fn build_example(name: &str, library: &Path) -> PathBuf {
    let build = work_dir(name).join("build");
    let mut configure = Command::new("cmake");
    configure
        .arg("-S")
        .arg(manifest_dir().join("examples").join(name))
        .arg("-B")
        .arg(&build)
        .arg("-DCMAKE_BUILD_TYPE=Release")
        .arg(format!("-DOFFLOAD_ENGINE_LIB={}", library.display()))
        .arg(format!("-DOFFLOAD_ENGINE_GGML_INCLUDE={GGML_INCLUDE}"));
    if cfg!(feature = "cuda") {
        configure.arg("-DOFFLOAD_ENGINE_WITH_CUDA=ON");
    }
    if cfg!(feature = "vulkan") {
        configure.arg("-DOFFLOAD_ENGINE_EXTRA_LIBS=vulkan");
    }
    checked("cmake configure", name, &mut configure);
    checked(
        "cmake build",
        name,
        Command::new("cmake")
            .arg("--build")
            .arg(&build)
            .arg("--config")
            .arg("Release"),
    );
    let exe = build.join(name);
    assert!(exe.is_file(), "{} was not built", exe.display());
    exe
}
