//! The disk tier: weights stream straight from the GGUF file; outputs equal the resident run;
//! read faults and truncated files are errors that name the tensor and offset.

mod builtin_models;

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Mutex;

use builtin_models::{run_reference, run_streamed, Architecture, DemoConfig, DemoModel};
use offload_engine::engine::{Engine, EngineParams};
use offload_engine::error::Status;
use offload_engine::faults::{self, Fault};
use offload_engine::planner::{Link, Mode, Workload};

static SERIAL: Mutex<()> = Mutex::new(());

fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("oe-disk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn params(budget: u64, depth: u32) -> EngineParams {
    builtin_models::engine_params("CPU", budget, depth)
}

fn workload(depth: u32) -> Workload {
    builtin_models::workload(2, 1, depth)
}

/// (reference output, the model's file, an unallocated twin of the model)
fn fixture(architecture: Architecture, name: &str) -> (Vec<u8>, PathBuf, DemoModel) {
    let config = DemoConfig::tiny(architecture);
    let model = DemoModel::new(config.clone()).unwrap();
    let backend = offload_engine::backend::Device::select(Some("CPU"))
        .unwrap()
        .init_backend()
        .unwrap();
    backend.set_threads(1); // the engines below compute on one thread too
    let reference = run_reference(&model, &backend, 2).unwrap();
    let path = temp_path(name);
    model.write_gguf(&path).unwrap();
    (reference, path, DemoModel::unallocated(config).unwrap())
}

#[test]
fn streaming_from_the_file_is_bit_identical() {
    let _guard = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    for architecture in [Architecture::Llama, Architecture::Flux] {
        let (reference, path, twin) = fixture(architecture, &format!("{architecture:?}.gguf"));
        let w = twin.weight_bytes();
        for budget in [w * 2, w * 2 / 3, w / 3] {
            for depth in [0, 1, 3] {
                let run = run_streamed(
                    &twin,
                    Some(&path),
                    params(budget, depth),
                    &workload(depth),
                    2,
                    None,
                )
                .unwrap_or_else(|e| panic!("{architecture:?} budget {budget} depth {depth}: {e}"));
                assert!(
                    run.output == reference,
                    "{architecture:?}: differs at budget {budget}, depth {depth}"
                );
                if run.plan.mode == Mode::Streaming {
                    assert!(run.stats.layer_loads > 0);
                    assert_eq!(
                        run.stats.staged_bytes, 0,
                        "nothing of the file is held in host memory"
                    );
                    // On the CPU device the arena is the only host memory the weights take.
                    assert_eq!(
                        run.plan.host_bytes, run.stats.arena_bytes,
                        "{}",
                        run.plan.message
                    );
                    assert!(run.plan.message.contains("host memory for weights"));
                }
            }
        }
    }
}

#[test]
fn a_failed_read_names_the_tensor_and_leaves_the_engine_usable() {
    let _guard = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (reference, path, twin) = fixture(Architecture::Llama, "fault.gguf");
    let mut engine = Engine::new(params(twin.weight_bytes() / 3, 1)).unwrap();
    // SAFETY: the model outlives the engine.
    unsafe { engine.register_file_backed(twin.context(), &path).unwrap() };
    engine
        .prepare(&workload(1), &Link::named("nvme").unwrap())
        .unwrap();
    let mut executor = offload_engine::executor::Executor::new(engine.backend(), [64, 4]).unwrap();
    faults::arm(Fault::FileRead, 2);
    let err = executor.run_pass(&twin, Some(&mut engine)).unwrap_err();
    faults::disarm_all();
    assert_eq!(err.status, Status::Io, "{err}");
    assert!(
        err.message.contains("tensor '") && err.message.contains("offset"),
        "{err}"
    );
    engine.offload_all().unwrap();
    assert_eq!(
        executor.run_pass(&twin, Some(&mut engine)).unwrap(),
        reference
    );
}

#[test]
fn a_file_truncated_while_streaming_is_an_error_and_the_next_pass_works_once_it_is_back() {
    let _guard = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (reference, path, twin) = fixture(Architecture::Llama, "truncated.gguf");
    let original = std::fs::read(&path).unwrap();
    let mut engine = Engine::new(params(twin.weight_bytes() / 3, 1)).unwrap();
    // SAFETY: the model outlives the engine.
    unsafe { engine.register_file_backed(twin.context(), &path).unwrap() };
    engine
        .prepare(&workload(1), &Link::named("nvme").unwrap())
        .unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let mut executor = offload_engine::executor::Executor::new(engine.backend(), [64, 4]).unwrap();
    let err = executor.run_pass(&twin, Some(&mut engine)).unwrap_err();
    assert_eq!(err.status, Status::Io, "{err}");
    assert!(
        err.message.contains("short read") || err.message.contains("truncated"),
        "{err}"
    );
    assert!(err.message.contains("tensor '"), "{err}");
    engine.offload_all().unwrap();
    // The same file back in place (a network share reconnected, a copy finished).
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .write_all_at(&original, 0)
        .unwrap();
    assert_eq!(
        executor.run_pass(&twin, Some(&mut engine)).unwrap(),
        reference
    );
}

#[test]
fn registration_checks_the_file_against_the_host_tensors() {
    let _guard = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (_, path, twin) = fixture(Architecture::Llama, "mismatch.gguf");
    // A model of another shape does not match the file.
    let other = DemoModel::unallocated(DemoConfig {
        hidden: 32,
        ..DemoConfig::tiny(Architecture::Llama)
    })
    .unwrap();
    let mut engine = Engine::new(params(1 << 30, 1)).unwrap();
    // SAFETY: the models outlive the engine.
    let err = unsafe { engine.register_file_backed(other.context(), &path) }.unwrap_err();
    assert_eq!(err.status, Status::CorruptFile, "{err}");
    assert_eq!(engine.registry().tensor_count(), 0, "all or nothing");
    // Data ranges outside the file are refused at registration.
    let bytes = std::fs::read(&path).unwrap();
    let cut = temp_path("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 4096]).unwrap();
    // SAFETY: the models outlive the engine (both dropped at the end of the test).
    let err = unsafe { engine.register_file_backed(twin.context(), &cut) }.unwrap_err();
    assert_eq!(err.status, Status::CorruptFile, "{err}");
    // An allocated model's tensors are not file-backed.
    let allocated = DemoModel::new(DemoConfig::tiny(Architecture::Llama)).unwrap();
    // SAFETY: as above.
    let err = unsafe { engine.register_file_backed(allocated.context(), &path) }.unwrap_err();
    assert_eq!(err.status, Status::InvalidArgument, "{err}");
}

#[test]
fn a_host_mmap_of_the_file_serves_as_the_home_without_copies() {
    use offload_engine::ggml as sys;
    let _guard = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (reference, path, twin) = fixture(Architecture::Flux, "mmap.gguf");
    let layout = offload_engine::gguf::read_path(&path).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let len = file.metadata().unwrap().len() as usize;
    use std::os::fd::AsRawFd;
    // SAFETY: a private read-only mapping of the whole file, unmapped at the end.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(base, libc::MAP_FAILED);
    // The host points its tensors into the mapping, as llama.cpp does with mmap'd models.
    // SAFETY: offsets come from the file's own (validated) layout.
    unsafe {
        let mut t = sys::ggml_get_first_tensor(twin.context());
        while !t.is_null() {
            let name = std::ffi::CStr::from_ptr((*t).name.as_ptr())
                .to_string_lossy()
                .into_owned();
            (*t).data = (base as *mut u8)
                .add(layout.tensor(&name).unwrap().offset as usize)
                .cast();
            t = sys::ggml_get_next_tensor(twin.context(), t);
        }
    }
    let run = builtin_models::run_with_engine(
        &twin,
        params(twin.weight_bytes() / 3, 1),
        &workload(1),
        2,
        None,
    )
    .unwrap();
    assert_eq!(run.output, reference);
    assert_eq!(
        run.stats.staged_bytes, 0,
        "nothing pinned or copied that the engine does not own"
    );
    // SAFETY: restore the unallocated state before unmapping.
    unsafe {
        let mut t = sys::ggml_get_first_tensor(twin.context());
        while !t.is_null() {
            (*t).data = std::ptr::null_mut();
            t = sys::ggml_get_next_tensor(twin.context(), t);
        }
        libc::munmap(base, len);
    }
}

/// A read whose first pages the page cache holds and whose rest it does not: the cached part
/// is copied from the cache, the rest read from the disk (directly where it can be), and the
/// bytes are the file's, at any alignment.
#[test]
fn reads_across_cached_and_uncached_pages_are_exact() {
    use offload_engine::diskio::{drop_page_cache, FileSet, ModelFile};
    let dir = std::env::temp_dir().join(format!("oe-partial-cache-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("data.bin");
    let bytes: Vec<u8> = (0..(8u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&path, &bytes).unwrap();
    let files = FileSet::open(&[ModelFile {
        path: path.clone(),
        stamp: None,
    }])
    .unwrap();
    for (start, len, warm) in [
        (0usize, 4usize << 20, 1usize << 20),
        (4096, 2 << 20, 12288),
        (1000, 3 << 20, 5000),
        (6 << 20, 2 << 20, 0),
    ] {
        drop_page_cache(&path).unwrap();
        // Warm the first `warm` bytes of the range only.
        if warm > 0 {
            let mut sink = vec![0u8; warm];
            use std::os::unix::fs::FileExt;
            std::fs::File::open(&path)
                .unwrap()
                .read_exact_at(&mut sink, start as u64)
                .unwrap();
        }
        // An aligned destination, as the engine's slots are.
        let mut buffer = vec![0u8; len + 8192];
        let pad = buffer.as_ptr().align_offset(4096);
        let dst = &mut buffer[pad..pad + len];
        files.read(0, start as u64, dst, len as u64).unwrap();
        assert!(
            dst == &bytes[start..start + len],
            "range {start}+{len}, {warm} warm"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
