//! Finds ggml (the pinned vendored build, or the host's own via OFFLOAD_ENGINE_GGML_DIR)
//! and generates the Rust bindings from that same set of headers.

use std::env;
use std::path::{Path, PathBuf};

const HOST_GGML_VAR: &str = "OFFLOAD_ENGINE_GGML_DIR";
/// `static`: link the host ggml's static libraries into this crate (for Rust programs, such
/// as the fuzz targets, that have no C++ host to supply ggml at their final link).
const HOST_GGML_LINK_VAR: &str = "OFFLOAD_ENGINE_GGML_LINK";
/// The host ggml's source tree (the directory holding `src/ggml-backend-impl.h`), for the
/// buffer type the llama.cpp drop-in implements. Without it that drop-in is left out.
const HOST_GGML_SRC_VAR: &str = "OFFLOAD_ENGINE_GGML_SRC";
/// Compile definitions the host builds its ggml with, e.g. `GGML_MAX_NAME=128`
/// (stable-diffusion.cpp's): they change ggml's struct layouts, so the bindings must see them.
const HOST_GGML_DEFINES_VAR: &str = "OFFLOAD_ENGINE_GGML_DEFINES";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=vendor/ggml_api.h");
    println!("cargo:rerun-if-env-changed={HOST_GGML_VAR}");
    println!("cargo:rerun-if-env-changed={HOST_GGML_LINK_VAR}");
    println!("cargo:rerun-if-env-changed={HOST_GGML_SRC_VAR}");
    println!("cargo:rerun-if-env-changed={HOST_GGML_DEFINES_VAR}");
    println!("cargo:rerun-if-changed=vendor/ggml_backend_impl.h");
    println!("cargo::rustc-check-cfg=cfg(offload_engine_backend_impl)");

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
    generate_backend_impl_bindings(
        &include_dir,
        ggml_source_dir(&include_dir, host_dir.as_deref()),
    );
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

/// `-DNAME=VALUE` for each definition in OFFLOAD_ENGINE_GGML_DEFINES (separated by spaces,
/// commas or semicolons).
fn ggml_defines() -> Vec<String> {
    env::var(HOST_GGML_DEFINES_VAR)
        .unwrap_or_default()
        .split(|c: char| c.is_whitespace() || c == ',' || c == ';')
        .filter(|d| !d.is_empty())
        .map(|d| format!("-D{}", d.trim_start_matches("-D")))
        .collect()
}

fn generate_bindings(include_dir: &Path) {
    let bindings = bindgen::Builder::default()
        .header("vendor/ggml_api.h")
        .clang_args(ggml_defines())
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

/// ggml's source tree: named by the host, or recorded in the CMake cache beside the install
/// prefix (the pinned package's build, and host-ggml builds that point at it).
fn ggml_source_dir(include_dir: &Path, host_dir: Option<&Path>) -> Option<PathBuf> {
    if let (Some(_), Some(source)) = (host_dir, env::var_os(HOST_GGML_SRC_VAR)) {
        return Some(PathBuf::from(source));
    }
    // <prefix>/include -> <prefix>/build/CMakeCache.txt (the cmake crate's layout).
    let cache = include_dir.parent()?.join("build").join("CMakeCache.txt");
    let text = std::fs::read_to_string(cache).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("ggml_SOURCE_DIR:STATIC="))
        .map(PathBuf::from)
}

/// The version ggml's CMakeLists.txt declares, "MAJOR.MINOR.PATCH".
fn ggml_source_version(source: &Path) -> Option<String> {
    let text = std::fs::read_to_string(source.join("CMakeLists.txt")).ok()?;
    let part = |name: &str| {
        text.lines().find_map(|line| {
            line.trim()
                .strip_prefix(&format!("set({name} "))
                .and_then(|rest| rest.strip_suffix(')'))
                .map(|v| v.trim().to_string())
        })
    };
    Some(format!(
        "{}.{}.{}",
        part("GGML_VERSION_MAJOR")?,
        part("GGML_VERSION_MINOR")?,
        part("GGML_VERSION_PATCH")?
    ))
}

/// Bindings to ggml's backend implementation interface (buffer types and buffers), which is
/// internal to ggml and changes between versions: the drop-in checks at run time that the
/// ggml it runs with has the version these bindings were made from.
fn generate_backend_impl_bindings(include_dir: &Path, source: Option<PathBuf>) {
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR")).join("ggml_impl_bindings.rs");
    let Some(source) = source.filter(|s| s.join("src/ggml-backend-impl.h").is_file()) else {
        println!(
            "cargo:warning=ggml-backend-impl.h not found (set {HOST_GGML_SRC_VAR} to the host \
             ggml's source tree): the llama.cpp drop-in is left out of this build"
        );
        let _ = std::fs::remove_file(&out);
        return;
    };
    let version = ggml_source_version(&source).unwrap_or_else(|| {
        fail(&format!(
            "no GGML_VERSION_* in {}",
            source.join("CMakeLists.txt").display()
        ))
    });
    let bindings = bindgen::Builder::default()
        .header("vendor/ggml_backend_impl.h")
        .clang_args(ggml_defines())
        .clang_arg(format!("-I{}", include_dir.display()))
        .clang_arg(format!("-I{}", source.join("src").display()))
        .allowlist_type("ggml_backend_buffer_i")
        .allowlist_type("ggml_backend_buffer_type_i")
        .allowlist_type("ggml_backend_buffer_type")
        .allowlist_type("ggml_backend_buffer")
        .allowlist_function("ggml_backend_buffer_init")
        // Everything these name (tensors, enums) comes from the main bindings.
        .allowlist_recursively(false)
        .prepend_enum_name(false)
        .layout_tests(false)
        .generate_comments(false)
        .generate()
        .unwrap_or_else(|e| fail(&format!("bindgen failed on ggml-backend-impl.h: {e}")));
    bindings
        .write_to_file(&out)
        .unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", out.display())));
    println!("cargo:rustc-cfg=offload_engine_backend_impl");
    println!("cargo:rustc-env=OFFLOAD_ENGINE_GGML_BUILD_VERSION={version}");
}
