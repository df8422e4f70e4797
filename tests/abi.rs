//! The C ABI from the outside, with the system's C and C++ compilers and Python:
//!
//! - ffi/offload_engine.h compiles alone as C99 and as C++17 without a warning;
//! - tests/c/abi_test.c (C99) and tests/c/abi_test.cpp (C++17) build and pass against the
//!   static and the shared library;
//! - every function the header declares is exported by the shared library, and nothing else
//!   named `offload_engine_*` is;
//! - tests/python/test_ctypes.py passes against the shared library.
//!
//! The static library bundles ggml, so the programs built against it also call ggml (build a
//! model, run graphs). The shared library keeps its ggml private, and linking a second ggml
//! next to it would put two copies in one process, so those builds use no ggml function
//! (ABI_TEST_WITH_GGML unset; the test asserts the executable defines no ggml symbol).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Headers of the ggml this crate was built against (set by build.rs).
const GGML_INCLUDE: &str = env!("OFFLOAD_ENGINE_GGML_INCLUDE");

/// Every compile here, the header-only ones included, uses these.
const WARNING_FLAGS: &[&str] = &["-Wall", "-Wextra", "-Werror", "-pedantic"];

/// System libraries a Rust staticlib needs at link time (`rustc --print native-static-libs`).
const STATIC_LIB_DEPENDENCIES: &[&str] = &[
    "-lstdc++",
    "-lgcc_s",
    "-lutil",
    "-lrt",
    "-lpthread",
    "-lm",
    "-ldl",
    "-lc",
];

/// Generous: a hang (a deadlock in the engine, say) must fail the test, not stall CI.
const PROGRAM_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Clone, Copy, Debug)]
enum Language {
    C99,
    Cpp17,
}

impl Language {
    fn compiler(self) -> &'static str {
        match self {
            Language::C99 => "cc",
            Language::Cpp17 => "c++",
        }
    }

    fn standard(self) -> &'static str {
        match self {
            Language::C99 => "-std=c99",
            Language::Cpp17 => "-std=c++17",
        }
    }

    fn extension(self) -> &'static str {
        match self {
            Language::C99 => "c",
            Language::Cpp17 => "cpp",
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Linkage {
    Static,
    Shared,
}

impl Linkage {
    fn file_name(self) -> &'static str {
        match self {
            Linkage::Static => "liboffload_engine.a",
            Linkage::Shared => "liboffload_engine.so",
        }
    }
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh directory for one test's files.
fn scratch_dir(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("abi")
        .join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

/// The library as built for this test run. Cargo builds every crate type of the lib (rlib,
/// staticlib, cdylib) as this test's dependency, into target/<profile>/deps beside this
/// binary; it copies them up to target/<profile>/ only on `cargo build`, so the copies there
/// may be stale. If neither holds the library, build it with this test's profile.
fn library(linkage: Linkage) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("the test binary lies in a directory");
    let candidates = [
        deps.to_path_buf(),
        deps.parent().unwrap_or(deps).to_path_buf(),
    ];
    if let Some(found) = candidates
        .iter()
        .map(|dir| dir.join(linkage.file_name()))
        .find(|path| path.is_file())
    {
        return found;
    }
    build_library(deps);
    candidates
        .iter()
        .map(|dir| dir.join(linkage.file_name()))
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("{} not found in {candidates:?}", linkage.file_name()))
}

fn build_library(deps: &Path) {
    let profile_dir = deps.parent().expect("target/<profile>/deps");
    run(
        "cargo build --lib",
        &mut common::cargo_build_lib(profile_dir),
        None,
    );
}

/// Runs `command`, failing the test with its output if it fails or outlives `timeout`.
fn run(what: &str, command: &mut Command, timeout: Option<Duration>) -> String {
    let log_dir = scratch_dir(&format!("logs/{}", what.replace([' ', '/'], "_")));
    common::execute_ok(what, command, &log_dir, timeout).stdout
}

fn compiler(language: Language) -> Command {
    let mut command = Command::new(language.compiler());
    command
        .current_dir(manifest_dir())
        .arg(language.standard())
        .args(WARNING_FLAGS)
        .arg("-I")
        .arg(manifest_dir().join("ffi"));
    command
}

#[test]
fn header_compiles_alone_as_c99_and_cpp17() {
    let dir = scratch_dir("header_only");
    for language in [Language::C99, Language::Cpp17] {
        let source = dir.join(format!("header_only.{}", language.extension()));
        std::fs::write(&source, "#include \"offload_engine.h\"\n").expect("write the source");
        let object = dir.join(format!("header_only_{}.o", language.extension()));
        run(
            &format!("header alone as {language:?}"),
            compiler(language)
                .arg("-c")
                .arg(&source)
                .arg("-o")
                .arg(&object),
            None,
        );
    }
}

/// Builds tests/c/abi_test.<ext> against the library and runs it.
fn build_and_run_program(language: Language, linkage: Linkage) {
    let name = format!("{language:?}_{linkage:?}").to_lowercase();
    let dir = scratch_dir(&name);
    let library = library(linkage);
    let program = dir.join("abi_test");
    let mut build = compiler(language);
    build
        .arg("-pthread")
        .arg("-isystem")
        .arg(GGML_INCLUDE)
        .arg(format!("tests/c/abi_test.{}", language.extension()));
    match linkage {
        Linkage::Static => {
            build
                .arg("-DABI_TEST_WITH_GGML=1")
                .arg(&library)
                .args(STATIC_LIB_DEPENDENCIES);
        }
        Linkage::Shared => {
            let library_dir = library.parent().expect("library directory");
            // RPATH, not RUNPATH: cargo's LD_LIBRARY_PATH also names target/<profile>/, where
            // an older `cargo build` may have left another copy of the library.
            build
                .arg(&library)
                .arg("-Wl,--disable-new-dtags")
                .arg(format!("-Wl,-rpath,{}", library_dir.display()));
        }
    }
    build.arg("-o").arg(&program);
    run(&format!("build {name}"), &mut build, Some(PROGRAM_TIMEOUT));

    if let Linkage::Shared = linkage {
        let defined = run(
            &format!("nm {name}"),
            Command::new("nm").arg("--defined-only").arg(&program),
            None,
        );
        let ggml: Vec<&str> = defined
            .lines()
            .filter_map(|line| line.split_whitespace().last())
            .filter(|symbol| symbol.starts_with("ggml_") || symbol.starts_with("gguf_"))
            .collect();
        assert!(
            ggml.is_empty(),
            "{name} defines ggml symbols of its own (a second ggml next to the library's): {ggml:?}"
        );
    }

    let scratch = dir.join("scratch");
    std::fs::create_dir_all(&scratch).expect("scratch directory");
    run(
        &format!("run {name}"),
        Command::new(&program)
            .arg(&scratch)
            .current_dir(&dir)
            // The library's own warnings go to the test's callbacks; keep its default logger
            // from being turned up by the developer's environment.
            .env_remove("RUST_LOG"),
        Some(PROGRAM_TIMEOUT),
    );
}

#[test]
fn c99_program_against_the_static_library() {
    if !vendored_ggml("c99_program_against_the_static_library") {
        return;
    }
    build_and_run_program(Language::C99, Linkage::Static);
}

#[test]
fn c99_program_against_the_shared_library() {
    build_and_run_program(Language::C99, Linkage::Shared);
}

#[test]
fn cpp17_program_against_the_static_library() {
    if !vendored_ggml("cpp17_program_against_the_static_library") {
        return;
    }
    build_and_run_program(Language::Cpp17, Linkage::Static);
}

#[test]
fn cpp17_program_against_the_shared_library() {
    build_and_run_program(Language::Cpp17, Linkage::Shared);
}

/// Built against a host's ggml, the static library leaves ggml to the host's final link
/// (tests/host_ggml.rs covers that case); these programs rely on the bundled one.
fn vendored_ggml(test: &str) -> bool {
    let vendored = cfg!(feature = "vendored-ggml");
    if !vendored {
        eprintln!("{test}: skipped: the static library bundles ggml only with `vendored-ggml`");
    }
    vendored
}

/// `offload_engine_*` functions the header declares (comments stripped first, so prose that
/// names a function does not count).
fn declared_functions(header: &str) -> BTreeSet<String> {
    let block_comments = regex::Regex::new(r"(?s)/\*.*?\*/").expect("regex");
    let line_comments = regex::Regex::new(r"//[^\n]*").expect("regex");
    let code = block_comments.replace_all(header, " ");
    let code = line_comments.replace_all(&code, " ");
    // A name directly followed by '(' is a function declaration; the log callback typedef
    // `(*offload_engine_log_fn)(` has ')' after the name and is not one.
    let declaration = regex::Regex::new(r"\b(offload_engine_\w+)\s*\(").expect("regex");
    declaration
        .captures_iter(&code)
        .map(|c| c[1].to_string())
        .collect()
}

#[test]
fn header_declares_exactly_the_exported_functions() {
    let header_path = manifest_dir().join("ffi/offload_engine.h");
    let header = std::fs::read_to_string(&header_path)
        .unwrap_or_else(|e| panic!("{}: {e}", header_path.display()));
    let declared = declared_functions(&header);
    assert!(
        declared.len() > 40,
        "only {} functions parsed from the header: {declared:?}",
        declared.len()
    );

    let library = library(Linkage::Shared);
    let symbols = run(
        "nm -D liboffload_engine.so",
        Command::new("nm")
            .args(["-D", "--defined-only"])
            .arg(&library),
        None,
    );
    let exported: BTreeSet<String> = symbols
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                [_, "T", name] if name.starts_with("offload_engine_") => Some(name.to_string()),
                _ => None,
            }
        })
        .collect();

    let not_exported: Vec<&String> = declared.difference(&exported).collect();
    let not_declared: Vec<&String> = exported.difference(&declared).collect();
    assert!(
        not_exported.is_empty() && not_declared.is_empty(),
        "header and {} disagree\n  declared but not exported: {not_exported:?}\n  exported but not declared: {not_declared:?}",
        library.display()
    );
}

#[test]
fn python_ctypes_suite() {
    let python = "python3";
    if Command::new(python).arg("--version").output().is_err() {
        eprintln!("python_ctypes_suite: skipped: {python} is not installed");
        return;
    }
    let library = library(Linkage::Shared);
    run(
        "python ctypes suite",
        Command::new(python)
            .current_dir(manifest_dir())
            .arg("tests/python/test_ctypes.py")
            .env("OFFLOAD_ENGINE_LIB", &library)
            // The command line, to check Python and it give the same plan.
            .env("OFFLOAD_ENGINE_CLI", env!("CARGO_BIN_EXE_offload-engine"))
            // No __pycache__ in the source tree from a test run.
            .env("PYTHONDONTWRITEBYTECODE", "1"),
        Some(PROGRAM_TIMEOUT),
    );
}
