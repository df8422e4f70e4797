//! Finds ggml (the pinned vendored build, or the host's own via OFFLOAD_ENGINE_GGML_DIR)
//! and generates the Rust bindings from that same set of headers.

use std::env;
use std::path::{Path, PathBuf};

const HOST_GGML_VAR: &str = "OFFLOAD_ENGINE_GGML_DIR";
/// `static`: link the host ggml's static libraries into this crate (for Rust programs, such
/// as the fuzz targets, that have no C++ host to supply ggml at their final link).
const HOST_GGML_LINK_VAR: &str = "OFFLOAD_ENGINE_GGML_LINK";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=vendor/ggml_api.h");
    println!("cargo:rerun-if-env-changed={HOST_GGML_VAR}");
    println!("cargo:rerun-if-env-changed={HOST_GGML_LINK_VAR}");

    let vendored = env::var_os("CARGO_FEATURE_VENDORED_GGML").is_some();
    let host_dir = env::var_os(HOST_GGML_VAR).map(PathBuf::from);

    let include_dir = match (&host_dir, vendored) {
        (Some(_), true) => fail(&format!(
            "{HOST_GGML_VAR} is set but the `vendored-ggml` feature is on, which would link a \
             second ggml. Build with `--no-default-features` to use the host's ggml."
        )),
        (Some(dir), false) => host_ggml(dir),
        (None, true) => vendored_include_dir(),
        (None, false) => fail(&format!(
            "no ggml: enable the `vendored-ggml` feature (the default) or set {HOST_GGML_VAR} \
             to a directory holding the host's ggml `include/` and `lib/`."
        )),
    };
    println!(
        "cargo:rustc-env=OFFLOAD_ENGINE_GGML_INCLUDE={}",
        include_dir.display()
    );
    generate_bindings(&include_dir);
    // A SONAME, so that hosts linking the shared library record its name, not the path it
    // was linked from, and find it through their rpath or the loader's search path.
    if env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,liboffload_engine.so");
    }
}

fn fail(message: &str) -> ! {
    eprintln!("offload-engine build: {message}");
    std::process::exit(1);
}

/// The pinned package installs ggml's headers next to the CMake package it announces.
fn vendored_include_dir() -> PathBuf {
    let cmake_dir = env::var("DEP_LLAMA_GGML_CMAKE_DIR")
        .unwrap_or_else(|_| fail("llama-cpp-sys-2 did not announce DEP_LLAMA_GGML_CMAKE_DIR"));
    let prefix = Path::new(&cmake_dir)
        .parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| fail("unexpected ggml CMake directory layout"));
    let include = prefix.join("include");
    if !include.join("ggml-backend.h").is_file() {
        fail(&format!("ggml headers not found in {}", include.display()));
    }
    // Expose the same ggml to the test harness and to C++ hosts built beside us.
    println!("cargo:rustc-env=OFFLOAD_ENGINE_GGML_CMAKE_DIR={cmake_dir}");
    println!(
        "cargo:rustc-env=OFFLOAD_ENGINE_GGML_PREFIX={}",
        prefix.display()
    );
    include
}

/// Host-ggml mode: bindings from the host's headers; link its shared ggml when it has one,
/// otherwise leave the symbols for the host's final link (static ggml in the host binary).
fn host_ggml(dir: &Path) -> PathBuf {
    let include = dir.join("include");
    if !include.join("ggml-backend.h").is_file() {
        fail(&format!(
            "{HOST_GGML_VAR}: no ggml-backend.h in {}",
            include.display()
        ));
    }
    let link_static = env::var(HOST_GGML_LINK_VAR).is_ok_and(|v| v == "static");
    for lib_dir in [dir.join("lib"), dir.join("lib64")] {
        if lib_dir.join("libggml.so").exists() {
            println!("cargo:rustc-link-search=native={}", lib_dir.display());
            for lib in ["ggml", "ggml-base"] {
                println!("cargo:rustc-link-lib=dylib={lib}");
            }
        } else if link_static && lib_dir.join("libggml.a").exists() {
            println!("cargo:rustc-link-search=native={}", lib_dir.display());
            for lib in ["ggml-base", "ggml-cpu", "ggml"] {
                if lib_dir.join(format!("lib{lib}.a")).exists() {
                    println!("cargo:rustc-link-lib=static={lib}");
                }
            }
            println!("cargo:rustc-link-lib=dylib=stdc++");
        }
    }
    include
}

fn generate_bindings(include_dir: &Path) {
    let bindings = bindgen::Builder::default()
        .header("vendor/ggml_api.h")
        .clang_arg(format!("-I{}", include_dir.display()))
        .allowlist_function("ggml_.*")
        .allowlist_function("gguf_.*")
        .allowlist_type("ggml_.*")
        .allowlist_type("gguf_.*")
        .allowlist_var("GGML_.*")
        .allowlist_var("GGUF_.*")
        // stdio's FILE appears in a few ggml signatures; its layout (bitfields in newer
        // glibc) is none of our business.
        .opaque_type("_IO_FILE")
        .opaque_type("FILE")
        .prepend_enum_name(false)
        .layout_tests(false)
        .generate_comments(false)
        .generate()
        .unwrap_or_else(|e| fail(&format!("bindgen failed on the ggml headers: {e}")));
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR")).join("ggml_bindings.rs");
    bindings
        .write_to_file(&out)
        .unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", out.display())));
}
