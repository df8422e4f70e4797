//! A state-machine fuzzer of the C ABI (ffi/offload_engine.h) against real engines on the CPU
//! device. Each input is a sequence of at most MAX_OPS calls on registries, plans, engines and
//! pipelines, with fuzzed arguments: NULL, freed, foreign and wrong-kind handles, out-of-range
//! ids and layers, odd struct sizes, invalid UTF-8, passes and layers in any order, frees at
//! any point. It also does what no host should: two engines over one model, one engine in two
//! pipelines, run_pass whose graph builders return tensors of every ggml type or build graphs
//! of tens of thousands of nodes, and which free the engine, free a pipeline or call the
//! pipeline from inside the pass; frees from the log callback (on whatever thread it runs) and
//! from a second thread while the first is in a call. The llama.cpp drop-in is driven as a
//! ggml host would drive it: hooks over a small llama-like file, its weights loaded through
//! the hook's buffer type, adopted, and a graph with l_out-N layer outputs run by ggml's
//! scheduler with offload_engine_llama_eval and a host callback that asks for nodes and stops
//! graphs at random; models freed before or after detach, contexts of any hook or none.
//!
//! Checks, per call: it returns a status in 0..=13; a failure leaves a non-empty
//! last_error(); an out-parameter is left alone on failure; no panic happens (libFuzzer's
//! panic hook aborts even on panics the library would catch, so ERR_INTERNAL cannot hide one);
//! a plan handle's summary agrees with its mode and message; a second engine over a model
//! with a live engine is refused; a completed run_pass whose builders were honest returns its
//! input bit for bit (the layers add zero times their weights' sum); a streamed llama graph
//! whose context reports no error and whose host callback stopped nothing gives the plainly
//! computed result bit for bit; detach is refused while a context object lives.
//! Per input, after freeing whatever is still alive: no handle the input saw is live any more,
//! and every model tensor points at its host memory again with its weights unchanged.
//!
//! The two tiny ggml models are built once per process.

#![no_main]

#[allow(dead_code)]
#[path = "input.rs"]
mod input;

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr::{null, null_mut};
use std::sync::{Mutex, OnceLock};

use input::Input;
use libfuzzer_sys::fuzz_target;
use offload_engine::ffi::*;
use offload_engine::ggml as sys;

/// Keeps an input's run short: engine creation and planning dominate the cost.
const MAX_OPS: usize = 64;
const MAX_STATUS: c_int = 13;
const ERR_INVALID_HANDLE: c_int = 3;
const ERR_INTERNAL: c_int = 11;

// ---------------------------------------------------------------------------------------
// Models
// ---------------------------------------------------------------------------------------

struct Model {
    ctx: *mut sys::ggml_context,
    tensors: Vec<*mut sys::ggml_tensor>,
    /// Where each tensor's data lives and what it holds, to check engines restore both.
    homes: Vec<*mut c_void>,
    checksum: u64,
}

// SAFETY: the models are created once, never freed, and only touched from the fuzzing thread
// (engine copy threads read their data under the engine's own synchronisation).
unsafe impl Send for Model {}
// SAFETY: as for Send; shared references only read the pointers.
unsafe impl Sync for Model {}

static MODELS: OnceLock<[Model; 2]> = OnceLock::new();

/// `layers` f32 tensors `blk.N.w` of growing size (so plans have a largest layer to pick)
/// plus one global tensor, allocated in one CPU buffer and filled with a pattern.
fn build_model(layers: i64, width: i64, global: &str) -> Model {
    let count = layers as usize + 1;
    let params = sys::ggml_init_params {
        // SAFETY: no preconditions.
        mem_size: count * unsafe { sys::ggml_tensor_overhead() } + 1024,
        mem_buffer: null_mut(),
        no_alloc: true,
    };
    // SAFETY: a metadata-only context with room for `count` tensors.
    let ctx = unsafe { sys::ggml_init(params) };
    assert!(!ctx.is_null());
    let mut tensors = Vec::new();
    for i in 0..layers {
        let name = CString::new(format!("blk.{i}.w")).unwrap();
        // SAFETY: valid context with room left.
        unsafe {
            let t = sys::ggml_new_tensor_2d(ctx, sys::GGML_TYPE_F32, width, i + 1);
            sys::ggml_set_name(t, name.as_ptr());
            tensors.push(t);
        }
    }
    let name = CString::new(global).unwrap();
    // SAFETY: as above.
    unsafe {
        let t = sys::ggml_new_tensor_1d(ctx, sys::GGML_TYPE_F32, width);
        sys::ggml_set_name(t, name.as_ptr());
        tensors.push(t);
    }
    // SAFETY: allocates every tensor of the context in one host buffer (kept for the process).
    let buffer = unsafe {
        sys::ggml_backend_alloc_ctx_tensors_from_buft(ctx, sys::ggml_backend_cpu_buffer_type())
    };
    assert!(!buffer.is_null());
    let mut value = 1u32;
    for &t in &tensors {
        // SAFETY: f32 tensors with host data of ggml_nbytes bytes.
        let data = unsafe {
            std::slice::from_raw_parts_mut((*t).data as *mut f32, sys::ggml_nbytes(t) / 4)
        };
        for x in data {
            value = value.wrapping_mul(1_103_515_245).wrapping_add(12345);
            *x = (value >> 8) as f32;
        }
    }
    // SAFETY: tensors of the context allocated above.
    let homes = tensors.iter().map(|&t| unsafe { (*t).data }).collect();
    let mut model = Model {
        ctx,
        tensors,
        homes,
        checksum: 0,
    };
    model.checksum = checksum(&model);
    model
}

fn checksum(model: &Model) -> u64 {
    let mut sum = 0xcbf2_9ce4_8422_2325u64;
    for (&t, &home) in model.tensors.iter().zip(&model.homes) {
        // SAFETY: the home buffer outlives the process's fuzzing.
        let bytes = unsafe { std::slice::from_raw_parts(home as *const u8, sys::ggml_nbytes(t)) };
        for &b in bytes {
            sum = (sum ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    sum
}

unsafe extern "C" fn log_sink(level: c_int, message: *const c_char, _user: *mut c_void) {
    // Messages must be valid C strings. They are dropped to keep the fuzzer's output readable,
    // unless FUZZ_ABI_LOG=1 (for replaying one input).
    assert!(!message.is_null());
    // SAFETY: the library passes a NUL-terminated string valid during the callback.
    let message = unsafe { CStr::from_ptr(message) };
    if show() {
        eprintln!("  log [{level}]: {}", message.to_string_lossy());
    }
    // A free armed by the input happens at the next message, on whatever thread logs it (the
    // caller's, inside a call, or the copy thread). Recorded first: the state learns of it
    // before the handle can be gone.
    let armed = lock(&ARMED).take();
    if let Some((ptr, kind)) = armed {
        lock(&FREED_BY_CALLBACK).push((ptr, kind));
        free_handle(ptr, kind);
    }
}

/// A handle the log callback frees at its next message.
static ARMED: Mutex<Option<(usize, Kind)>> = Mutex::new(None);
/// Handles the log callback freed, for the state to learn at the next step.
static FREED_BY_CALLBACK: Mutex<Vec<(usize, Kind)>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn free_handle(ptr: usize, kind: Kind) {
    match kind {
        Kind::Registry => offload_engine_registry_free(ptr as *mut RegistryHandle),
        Kind::Plan => offload_engine_plan_free(ptr as *mut PlanHandle),
        Kind::Engine => offload_engine_engine_free(ptr as *mut EngineHandle),
        Kind::Pipeline => offload_engine_pipeline_free(ptr as *mut PipelineHandle),
        Kind::Llama => offload_engine_llama_free(ptr as *mut LlamaHandle),
        Kind::LlamaContext => offload_engine_llama_context_free(ptr as *mut LlamaContextHandle),
    }
}

/// FUZZ_ABI_LOG=1 traces every call, its status and the library's log (to replay one input).
fn show() -> bool {
    static SHOW: OnceLock<bool> = OnceLock::new();
    *SHOW.get_or_init(|| std::env::var_os("FUZZ_ABI_LOG").is_some_and(|v| v == "1"))
}

fn models() -> &'static [Model; 2] {
    MODELS.get_or_init(|| {
        check(
            offload_engine_log_set_callback(Some(log_sink), null_mut()),
            "log_set_callback",
        );
        [
            build_model(4, 16, "output_norm.weight"),
            build_model(2, 64, "token_embd.weight"),
        ]
    })
}

// ---------------------------------------------------------------------------------------
// Status checks
// ---------------------------------------------------------------------------------------

fn check(rc: c_int, what: &str) -> c_int {
    if show() {
        eprintln!("{what} -> {rc}");
    }
    assert!((0..=MAX_STATUS).contains(&rc), "{what} returned {rc}");
    // SAFETY: the library returns a valid NUL-terminated string.
    let description = unsafe { CStr::from_ptr(offload_engine_status_str(rc)) };
    assert_ne!(description.to_bytes(), b"unknown status", "{what}: {rc}");
    if rc != 0 {
        // SAFETY: as above; valid until the next failed call on this thread.
        let message = unsafe { CStr::from_ptr(offload_engine_last_error()) };
        assert!(
            !message.to_bytes().is_empty(),
            "{what} failed ({rc}) without a message"
        );
        assert_ne!(rc, ERR_INTERNAL, "{what}: {message:?}");
    }
    rc
}

/// For out-parameters: on failure the value must be what the caller left there.
fn unchanged<T: PartialEq + std::fmt::Debug>(rc: c_int, before: T, after: T, what: &str) {
    if rc != 0 {
        assert_eq!(
            before, after,
            "{what} wrote its out-parameter on failure ({rc})"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Handles the input has seen
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Registry,
    Plan,
    Engine,
    Pipeline,
    Llama,
    LlamaContext,
}

struct Handle {
    ptr: usize,
    kind: Kind,
    live: bool,
    /// Bit i: model i's tensors are (or may be) registered here.
    models: u8,
    /// Model tensors surely registered here (registries) or held (engines): bit 8 * model +
    /// the tensor's index.
    tensors: u16,
    /// Engines: the registry's layer count when the engine was made.
    layers: u64,
    /// Engines: the live pipeline they are a component of (0: none).
    pipeline: usize,
}

/// Something non-NULL that was never a handle; the library must not dereference it.
static FOREIGN: [u64; 8] = [0; 8];

#[derive(Default)]
struct State {
    handles: Vec<Handle>,
    /// Model tensors a live engine holds (bits as `Handle::tensors`).
    busy: u16,
    /// Tensor ids seen in outputs, to query with later.
    ids: Vec<u64>,
    /// Models loaded through a hook's buffer type (as llama.cpp would), by hook address;
    /// they outlive their hook, as llama.cpp's buffers may.
    hook_models: Vec<(usize, HookModel)>,
}

impl State {
    fn born(&mut self, ptr: usize, kind: Kind, models: u8, tensors: u16) {
        assert_ne!(ptr, 0, "a successful _new returned NULL");
        let handle = Handle {
            ptr,
            kind,
            live: true,
            models,
            tensors,
            layers: 0,
            pipeline: 0,
        };
        // A freed address may come back for a new handle: it is live again.
        if let Some(h) = self.handles.iter_mut().find(|h| h.ptr == ptr) {
            assert!(!h.live, "a new handle at the address of a live one");
            *h = handle;
        } else {
            self.handles.push(handle);
        }
        if kind == Kind::Engine {
            self.busy |= tensors;
        }
    }

    /// Mirrors the library: a free only retires a live handle of the matching kind.
    fn freed(&mut self, ptr: usize, kind: Kind) {
        if let Some(h) = self
            .handles
            .iter_mut()
            .find(|h| h.ptr == ptr && h.kind == kind && h.live)
        {
            h.live = false;
            if kind == Kind::Engine {
                self.busy &= !h.tensors;
            }
        }
        // A freed pipeline hands its engines back.
        if kind == Kind::Pipeline {
            for e in self.handles.iter_mut().filter(|e| e.pipeline == ptr) {
                e.pipeline = 0;
            }
        }
    }

    /// What the log callback freed since the last step.
    fn reconcile(&mut self) {
        let freed: Vec<(usize, Kind)> = lock(&FREED_BY_CALLBACK).drain(..).collect();
        for (ptr, kind) in freed {
            self.freed(ptr, kind);
        }
    }

    fn live_mut(&mut self, ptr: usize, kind: Kind) -> Option<&mut Handle> {
        self.handles
            .iter_mut()
            .find(|h| h.ptr == ptr && h.kind == kind && h.live)
    }

    fn live(&self, ptr: usize, kind: Kind) -> Option<&Handle> {
        self.handles
            .iter()
            .find(|h| h.ptr == ptr && h.kind == kind && h.live)
    }

    /// A handle argument: NULL, foreign, of another kind, or one of this kind (live or not).
    fn pick<T>(&self, input: &mut Input, kind: Kind) -> *mut T {
        let sel = input.u8();
        let pool: Vec<usize> = match sel % 8 {
            0 => return null_mut(),
            1 => return FOREIGN.as_ptr() as *mut T,
            2 => self
                .handles
                .iter()
                .filter(|h| h.kind != kind)
                .map(|h| h.ptr)
                .collect(),
            3 => self
                .handles
                .iter()
                .filter(|h| h.kind == kind)
                .map(|h| h.ptr)
                .collect(),
            // Mostly live ones, so that deep sequences happen.
            _ => self
                .handles
                .iter()
                .filter(|h| h.kind == kind && h.live)
                .map(|h| h.ptr)
                .collect(),
        };
        if pool.is_empty() {
            return null_mut();
        }
        pool[usize::from(sel >> 3) % pool.len()] as *mut T
    }
}

// ---------------------------------------------------------------------------------------
// Argument decoding
// ---------------------------------------------------------------------------------------

const NAMES: [&[u8]; 10] = [
    b"blk.0.w",
    b"blk.1.w",
    b"blk.3.attn_q.weight",
    b"output_norm.weight",
    b"double_blocks.0.img_mod.lin.weight",
    b"model.diffusion_model.input_blocks.1.0.weight",
    b"",
    b"blk.99999999999999999999.w",
    b"\xff\xfe.0.w",
    b"blk.-1.w",
];

/// A string argument: NULL (None), one of NAMES, or raw bytes up to the first NUL.
fn text(input: &mut Input, table: &[&[u8]]) -> Option<CString> {
    let sel = input.u8();
    let bytes: Vec<u8> = match sel % 4 {
        0 => return None,
        1 => {
            let len = usize::from(input.u8() % 24);
            input.bytes(len).to_vec()
        }
        _ => table[usize::from(sel >> 2) % table.len()].to_vec(),
    };
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    Some(CString::new(&bytes[..end]).expect("cut at the first NUL"))
}

fn ptr_of(s: &Option<CString>) -> *const c_char {
    s.as_ref().map_or(null(), |s| s.as_ptr())
}

const PATTERNS: [&[u8]; 7] = [
    b"flux",
    b"llama_gguf",
    b"blk\\.(\\d+)\\.",
    b"(?P<kind>blk)\\.(\\d+)",
    b"(",
    b"no_group",
    b"(\\d+)",
];

const LINKS: [&[u8]; 5] = [b"pcie4-x16", b"PCIE3_X16", b"usb2", b"nvme", b"bogus"];

/// A layer index or tensor id: small, at a boundary, or anything.
fn index(input: &mut Input, known: &[u64]) -> u64 {
    match input.u8() % 6 {
        0..=2 => u64::from(input.u8() % 6),
        3 if !known.is_empty() => known[usize::from(input.u8()) % known.len()],
        4 => [u64::MAX, 1 << 32, u64::from(u32::MAX), 1 << 63][usize::from(input.u8() % 4)],
        _ => input.u64(),
    }
}

/// A `size` field: right, zero, one short, or larger than the struct.
fn struct_size(input: &mut Input, real: usize) -> usize {
    match input.u8() % 8 {
        0 => 0,
        1 => real - 1,
        2 => real + 8,
        _ => real,
    }
}

fn plan_params(input: &mut Input) -> (PlanParams, Option<CString>) {
    let mut p = PlanParams::default();
    offload_engine_plan_params_init(&mut p);
    p.size = struct_size(input, std::mem::size_of::<PlanParams>());
    let link = if input.bool() {
        None
    } else {
        text(input, &LINKS)
    };
    // Keep init defaults unless the input says otherwise, so valid plans are common.
    if input.bool() {
        p.free_bytes = input.size();
        p.total_bytes = input.size();
        p.min_free_bytes = input.size();
        p.safety_fraction = input.float();
        p.compute_reserve_bytes = input.size();
        p.persistent_bytes = input.size();
    } else {
        p.free_bytes = u64::from(input.u16()) << input.u8() % 24;
        p.min_free_bytes = 0;
    }
    if input.bool() {
        p.steps = input.count();
        p.passes_per_step = input.count();
        p.prefetch_depth = input.count();
    }
    if input.bool() {
        p.link_gbps = input.float();
    }
    p.link = ptr_of(&link);
    (p, link)
}

// ---------------------------------------------------------------------------------------
// The state machine
// ---------------------------------------------------------------------------------------

fuzz_target!(|data: &[u8]| {
    let models = models();
    let mut input = Input::new(data);
    let mut state = State::default();
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        step(&mut input, &mut state, models);
    }
    cleanup(&mut state, models);
});

fn step(input: &mut Input, state: &mut State, models: &[Model; 2]) {
    state.reconcile();
    match input.u8() % 37 {
        0 => registry_new(input, state),
        1 => {
            let r = state.pick::<RegistryHandle>(input, Kind::Registry);
            offload_engine_registry_free(r);
            state.freed(r as usize, Kind::Registry);
        }
        2 => {
            let r = state.pick::<RegistryHandle>(input, Kind::Registry);
            let which = usize::from(input.u8() % 3);
            let ctx = models.get(which).map_or(null_mut(), |m| m.ctx);
            let mut count = usize::MAX;
            let rc = check(
                offload_engine_registry_add_context(
                    r,
                    ctx,
                    if input.bool() { &mut count } else { null_mut() },
                ),
                "registry_add_context",
            );
            unchanged(rc, usize::MAX, count, "registry_add_context");
            if which < 2 {
                let all = model_bits(models, which);
                if state.busy & all != 0 {
                    assert_ne!(
                        rc, 0,
                        "registered model {which}'s tensors while an engine holds them"
                    );
                }
                // A failed add may still have registered a prefix of the context.
                mark_models(state, r, which, if rc == 0 { all } else { 0 });
            }
        }
        3 => {
            let r = state.pick::<RegistryHandle>(input, Kind::Registry);
            let which = usize::from(input.u8() % 3);
            let index = usize::from(input.u8());
            let tensor = models
                .get(which)
                .map_or(null_mut(), |m| m.tensors[index % m.tensors.len()]);
            let bit = models
                .get(which)
                .map_or(0u16, |m| 1 << (8 * which + index % m.tensors.len()));
            let name = text(input, &NAMES);
            let mut id = u64::MAX;
            let rc = check(
                offload_engine_registry_add_tensor(r, tensor, ptr_of(&name), &mut id),
                "registry_add_tensor",
            );
            unchanged(rc, u64::MAX, id, "registry_add_tensor");
            if state.busy & bit != 0 {
                assert_ne!(
                    rc, 0,
                    "registered a tensor of model {which} while an engine holds it"
                );
            }
            if rc == 0 {
                state.ids.push(id);
            }
            if which < 2 {
                mark_models(state, r, which, if rc == 0 { bit } else { 0 });
            }
        }
        4 => {
            let r = state.pick::<RegistryHandle>(input, Kind::Registry);
            let name = text(input, &NAMES);
            let ggml_type = match input.u8() % 4 {
                0 => sys::GGML_TYPE_F32 as c_int,
                1 => sys::GGML_TYPE_Q4_K as c_int,
                2 => c_int::from(input.u8() % 48),
                _ => input.u32() as c_int,
            };
            let n_dims = c_int::from(input.u8() % 7) - 1;
            let mut ne = [0i64; 4];
            for d in &mut ne {
                *d = match input.u8() % 6 {
                    0 => 0,
                    1 => -1,
                    2 => i64::MAX,
                    3 => 1 << 40,
                    _ => i64::from(input.u16()),
                };
            }
            let ne_ptr = if input.u8() % 8 == 0 {
                null()
            } else {
                ne.as_ptr()
            };
            let mut id = u64::MAX;
            let rc = check(
                offload_engine_registry_add_descriptor(
                    r,
                    ptr_of(&name),
                    ggml_type,
                    n_dims,
                    ne_ptr,
                    &mut id,
                ),
                "registry_add_descriptor",
            );
            unchanged(rc, u64::MAX, id, "registry_add_descriptor");
            if rc == 0 {
                state.ids.push(id);
            }
        }
        5 => registry_getters(input, state),
        6 => {
            let r = state.pick::<RegistryHandle>(input, Kind::Registry);
            let name = text(input, &NAMES);
            let mut id = u64::MAX;
            let out = if input.u8() % 8 == 0 {
                null_mut()
            } else {
                &mut id as *mut u64
            };
            let rc = check(
                offload_engine_registry_find(r, ptr_of(&name), out),
                "registry_find",
            );
            unchanged(rc, u64::MAX, id, "registry_find");
            if rc == 0 {
                state.ids.push(id);
            }
        }
        7 => {
            let r = state.pick::<RegistryHandle>(input, Kind::Registry);
            let id = index(input, &state.ids);
            let mut info = TensorInfo::default();
            info.size = struct_size(input, std::mem::size_of::<TensorInfo>());
            let out = if input.u8() % 8 == 0 {
                null_mut()
            } else {
                &mut info as *mut TensorInfo
            };
            let rc = check(
                offload_engine_registry_tensor_info(r, id, out),
                "registry_tensor_info",
            );
            if rc == 0 {
                assert!(!info.name.is_null() && !info.component.is_null());
                assert!((1..=4).contains(&info.n_dims), "n_dims {}", info.n_dims);
                assert!((0..=3).contains(&info.location));
            }
        }
        8 => {
            let r = state.pick::<RegistryHandle>(input, Kind::Registry);
            let layer = index(input, &[]);
            let mut info = LayerInfo::default();
            info.size = struct_size(input, std::mem::size_of::<LayerInfo>());
            let out = if input.u8() % 8 == 0 {
                null_mut()
            } else {
                &mut info as *mut LayerInfo
            };
            let rc = check(
                offload_engine_registry_layer_info(r, layer, out),
                "registry_layer_info",
            );
            if rc == 0 {
                assert!(!info.name.is_null() && !info.component.is_null());
                assert!((0..=3).contains(&info.location));
            }
        }
        9 => {
            let r = state.pick::<RegistryHandle>(input, Kind::Registry);
            let layer = index(input, &[]);
            let mut ids = [u64::MAX; 16];
            // The capacity never exceeds the array: that part is the caller's contract.
            let capacity = usize::from(input.u8() % 17);
            let ids_ptr = if input.u8() % 6 == 0 {
                null_mut()
            } else {
                ids.as_mut_ptr()
            };
            let mut count = usize::MAX;
            let out = if input.u8() % 8 == 0 {
                null_mut()
            } else {
                &mut count as *mut usize
            };
            let rc = check(
                offload_engine_registry_layer_tensors(r, layer, ids_ptr, capacity, out),
                "registry_layer_tensors",
            );
            unchanged(rc, usize::MAX, count, "registry_layer_tensors");
            if rc == 0 {
                assert!(count <= capacity, "{count} ids in a capacity of {capacity}");
                state.ids.extend_from_slice(&ids[..count.min(16)]);
            }
        }
        10 => {
            let r = state.pick::<RegistryHandle>(input, Kind::Registry);
            let (params, _link) = plan_params(input);
            let params_ptr = if input.u8() % 8 == 0 {
                null()
            } else {
                &params as *const PlanParams
            };
            let mut plan: *mut PlanHandle = FOREIGN.as_ptr() as *mut PlanHandle;
            let out = if input.u8() % 8 == 0 {
                null_mut()
            } else {
                &mut plan as *mut *mut PlanHandle
            };
            let rc = check(offload_engine_plan_new(r, params_ptr, out), "plan_new");
            unchanged(rc, FOREIGN.as_ptr() as usize, plan as usize, "plan_new");
            if rc == 0 {
                state.born(plan as usize, Kind::Plan, 0, 0);
                check_new_plan(plan);
            }
        }
        11 => plan_queries(input, state),
        12 => {
            let p = state.pick::<PlanHandle>(input, Kind::Plan);
            offload_engine_plan_free(p);
            state.freed(p as usize, Kind::Plan);
        }
        13 => engine_new(input, state),
        14 => {
            let e = state.pick::<EngineHandle>(input, Kind::Engine);
            offload_engine_engine_free(e);
            state.freed(e as usize, Kind::Engine);
        }
        15 => {
            let e = state.pick::<EngineHandle>(input, Kind::Engine);
            let (params, _link) = plan_params(input);
            let params_ptr = if input.u8() % 8 == 0 {
                null()
            } else {
                &params as *const PlanParams
            };
            let mut plan: *mut PlanHandle = FOREIGN.as_ptr() as *mut PlanHandle;
            let out = if input.bool() {
                null_mut()
            } else {
                &mut plan as *mut *mut PlanHandle
            };
            let rc = check(
                offload_engine_engine_prepare(e, params_ptr, out),
                "engine_prepare",
            );
            if !out.is_null() {
                unchanged(
                    rc,
                    FOREIGN.as_ptr() as usize,
                    plan as usize,
                    "engine_prepare",
                );
                if rc == 0 {
                    state.born(plan as usize, Kind::Plan, 0, 0);
                    if show() {
                        eprintln!("  plan: {}", plan_message(plan));
                    }
                    check_new_plan(plan);
                }
            }
        }
        16 => {
            let e = state.pick(input, Kind::Engine);
            check(offload_engine_engine_pass_begin(e), "engine_pass_begin");
        }
        17 => {
            let e = state.pick(input, Kind::Engine);
            check(offload_engine_engine_pass_end(e), "engine_pass_end");
        }
        18 => {
            let e = state.pick(input, Kind::Engine);
            let layer = index(input, &[]);
            check(
                offload_engine_engine_layer_begin(e, layer),
                "engine_layer_begin",
            );
        }
        19 => {
            let e = state.pick(input, Kind::Engine);
            let layer = index(input, &[]);
            check(
                offload_engine_engine_layer_end(e, layer),
                "engine_layer_end",
            );
        }
        20 => {
            let e = state.pick(input, Kind::Engine);
            check(offload_engine_engine_offload_all(e), "engine_offload_all");
        }
        21 => engine_stats(input, state),
        22 => engine_misc(input, state),
        23 => {
            // Only the failure paths: no file to read, or a context whose tensors have data.
            let r = state.pick::<RegistryHandle>(input, Kind::Registry);
            let path = if input.bool() {
                None
            } else {
                Some(CString::new("/nonexistent/offload-fuzz.gguf").unwrap())
            };
            let mut count = usize::MAX;
            let rc = if input.bool() {
                let tensor = if input.bool() {
                    models[0].tensors[0]
                } else {
                    null_mut()
                };
                let name = text(input, &NAMES);
                let offset = u64::from(input.u8()) << (input.u8() % 64);
                let mut id = u64::MAX;
                let rc = check(
                    offload_engine_registry_add_tensor_from_file(
                        r,
                        tensor,
                        ptr_of(&name),
                        ptr_of(&path),
                        offset,
                        &mut id,
                    ),
                    "registry_add_tensor_from_file",
                );
                assert_ne!(rc, 0, "registered a tensor from a file that is not there");
                unchanged(rc, u64::MAX, id, "registry_add_tensor_from_file");
                rc
            } else if input.bool() {
                check(
                    offload_engine_registry_add_gguf(r, ptr_of(&path), &mut count),
                    "registry_add_gguf",
                )
            } else {
                let ctx = if input.bool() {
                    models[0].ctx
                } else {
                    null_mut()
                };
                check(
                    offload_engine_registry_add_file_backed(r, ctx, ptr_of(&path), &mut count),
                    "registry_add_file_backed",
                )
            };
            unchanged(rc, usize::MAX, count, "registry_add_gguf/file_backed");
        }
        24 => {
            // Fault 2 (a panic in the copy thread) is left out: the library catches it by
            // design, but libFuzzer's panic hook would abort first.
            let fault = [0, 1, 3, -1, 2 + 7][usize::from(input.u8() % 5)];
            let countdown = u32::from(input.u8() % 8);
            check(
                offload_engine_debug_inject_fault(fault, countdown),
                "debug_inject_fault",
            );
        }
        26 => pipeline_new(input, state),
        27 => {
            let p = state.pick::<PipelineHandle>(input, Kind::Pipeline);
            offload_engine_pipeline_free(p);
            state.freed(p as usize, Kind::Pipeline);
        }
        28 => pipeline_add(input, state),
        29 => pipeline_control(input, state),
        30 => staged_pass(input, state, models),
        31 => {
            // The log callback frees this handle at its next message.
            let kind = [Kind::Engine, Kind::Pipeline, Kind::Registry, Kind::Plan]
                [usize::from(input.u8() % 4)];
            let ptr = state.pick::<c_void>(input, kind) as usize;
            *lock(&ARMED) = Some((ptr, kind));
        }
        32 => free_during_a_call(input, state, models),
        33 => llama_hook(input, state),
        34 => llama_forward(input, state),
        35 => llama_context(input, state),
        36 => llama_load(input, state),
        _ => whole_pass(input, state),
    }
}

/// All of model `which`'s tensors, as `Handle::tensors` bits.
fn model_bits(models: &[Model; 2], which: usize) -> u16 {
    ((1u16 << models[which].tensors.len()) - 1) << (8 * which)
}

fn mark_models(state: &mut State, r: *mut RegistryHandle, which: usize, sure: u16) {
    if let Some(h) = state.live_mut(r as usize, Kind::Registry) {
        h.models |= 1 << which;
        h.tensors |= sure;
    }
}

fn registry_new(input: &mut Input, state: &mut State) {
    let mut params = RegistryParams::default();
    offload_engine_registry_params_init(&mut params);
    params.size = struct_size(input, std::mem::size_of::<RegistryParams>());
    let pattern = if input.bool() {
        None
    } else {
        text(input, &PATTERNS)
    };
    params.pattern = ptr_of(&pattern);
    let params_ptr = if input.u8() % 8 == 0 {
        null()
    } else {
        &params as *const RegistryParams
    };
    let mut registry: *mut RegistryHandle = FOREIGN.as_ptr() as *mut RegistryHandle;
    let out = if input.u8() % 8 == 0 {
        null_mut()
    } else {
        &mut registry as *mut *mut RegistryHandle
    };
    let rc = check(offload_engine_registry_new(params_ptr, out), "registry_new");
    unchanged(
        rc,
        FOREIGN.as_ptr() as usize,
        registry as usize,
        "registry_new",
    );
    if rc == 0 {
        state.born(registry as usize, Kind::Registry, 0, 0);
    }
}

fn registry_getters(input: &mut Input, state: &mut State) {
    let r = state.pick::<RegistryHandle>(input, Kind::Registry);
    let null_out = input.u8() % 8 == 0;
    match input.u8() % 6 {
        5 => {
            let id = index(input, &state.ids);
            let layer = input.u32();
            check(
                offload_engine_registry_assign(r, id, layer),
                "registry_assign",
            );
        }
        0 => {
            let mut v = usize::MAX;
            let out = if null_out {
                null_mut()
            } else {
                &mut v as *mut usize
            };
            let rc = check(
                offload_engine_registry_tensor_count(r, out),
                "registry_tensor_count",
            );
            unchanged(rc, usize::MAX, v, "registry_tensor_count");
        }
        1 => {
            let mut v = usize::MAX;
            let out = if null_out {
                null_mut()
            } else {
                &mut v as *mut usize
            };
            let rc = check(
                offload_engine_registry_layer_count(r, out),
                "registry_layer_count",
            );
            unchanged(rc, usize::MAX, v, "registry_layer_count");
        }
        2 => {
            let mut v = u64::MAX;
            let out = if null_out {
                null_mut()
            } else {
                &mut v as *mut u64
            };
            let rc = check(
                offload_engine_registry_global_bytes(r, out),
                "registry_global_bytes",
            );
            unchanged(rc, u64::MAX, v, "registry_global_bytes");
        }
        3 => {
            let mut v = u64::MAX;
            let out = if null_out {
                null_mut()
            } else {
                &mut v as *mut u64
            };
            let rc = check(
                offload_engine_registry_total_bytes(r, out),
                "registry_total_bytes",
            );
            unchanged(rc, u64::MAX, v, "registry_total_bytes");
        }
        _ => {
            let mut name: *const c_char = null();
            let out = if null_out {
                null_mut()
            } else {
                &mut name as *mut *const c_char
            };
            let rc = check(
                offload_engine_registry_architecture(r, out),
                "registry_architecture",
            );
            if rc == 0 {
                assert!(!name.is_null());
                // SAFETY: valid until the next call on the registry.
                let _ = unsafe { CStr::from_ptr(name) }.to_str().expect("UTF-8");
            }
        }
    }
}

fn plan_message(plan: *const PlanHandle) -> String {
    let message = offload_engine_plan_message(plan);
    assert!(!message.is_null());
    // SAFETY: a NUL-terminated string valid until the plan is freed.
    unsafe { CStr::from_ptr(message) }
        .to_string_lossy()
        .into_owned()
}

/// What a plan handle promises: it is never insufficient (that is an error), its figures agree
/// with its mode, and the message describes the same mode.
fn check_summary(s: &PlanSummary, message: String) {
    let context = || {
        format!(
            "{message:?} summary mode {} resident {} streamed {} slots {} x {} arena {} usable {}",
            s.mode,
            s.resident_layer_count,
            s.streamed_layer_count,
            s.slot_count,
            s.slot_bytes,
            s.arena_bytes,
            s.usable_bytes
        )
    };
    let t = s.predicted_step_seconds;
    assert!(t.is_finite() && t >= 0.0, "predicted step seconds {t}");
    assert!(s.arena_bytes <= s.usable_bytes, "{}", context());
    assert!(
        u128::from(s.arena_bytes) >= u128::from(s.slot_count) * u128::from(s.slot_bytes),
        "{}",
        context()
    );
    match s.mode {
        0 => {
            assert!(
                s.streamed_layer_count == 0 && s.slot_count == 0,
                "{}",
                context()
            );
            assert!(message.starts_with("full"), "{}", context());
        }
        1 => {
            assert!(
                s.streamed_layer_count >= 1 && s.slot_count >= 1,
                "{}",
                context()
            );
            // A streaming plan streams at least one non-empty layer, and never needs more
            // slots than there are layers.
            assert!(s.slot_bytes > 0, "{}", context());
            assert!(
                u64::from(s.slot_count) <= s.resident_layer_count + s.streamed_layer_count,
                "{}",
                context()
            );
            assert!(message.starts_with("streaming"), "{}", context());
        }
        mode => panic!("plan handle with mode {mode}: {}", context()),
    }
}

/// Every plan handle the library hands out is checked once, whatever the input does next.
fn check_new_plan(plan: *mut PlanHandle) {
    let mut s = PlanSummary::default();
    s.size = std::mem::size_of::<PlanSummary>();
    check(
        offload_engine_plan_get_summary(plan, &mut s),
        "plan_get_summary",
    );
    check_summary(&s, plan_message(plan));
}

fn plan_queries(input: &mut Input, state: &mut State) {
    let p = state.pick::<PlanHandle>(input, Kind::Plan);
    match input.u8() % 3 {
        0 => {
            let mut s = PlanSummary::default();
            s.size = struct_size(input, std::mem::size_of::<PlanSummary>());
            let out = if input.u8() % 8 == 0 {
                null_mut()
            } else {
                &mut s as *mut PlanSummary
            };
            let rc = check(offload_engine_plan_get_summary(p, out), "plan_get_summary");
            if rc == 0 {
                check_summary(&s, plan_message(p));
            }
        }
        1 => {
            let layer = index(input, &[]);
            let mut resident: c_int = -7;
            let out = if input.u8() % 8 == 0 {
                null_mut()
            } else {
                &mut resident as *mut c_int
            };
            let rc = check(
                offload_engine_plan_layer_resident(p, layer, out),
                "plan_layer_resident",
            );
            unchanged(rc, -7, resident, "plan_layer_resident");
            if rc == 0 {
                assert!(resident == 0 || resident == 1);
            }
        }
        _ => {
            let message = offload_engine_plan_message(p);
            assert!(!message.is_null());
            // SAFETY: valid until the plan is freed.
            let message = unsafe { CStr::from_ptr(message) };
            let live = state.live(p as usize, Kind::Plan).is_some();
            assert_eq!(
                !message.to_bytes().is_empty(),
                live,
                "plan message {message:?}"
            );
        }
    }
}

fn engine_new(input: &mut Input, state: &mut State) {
    let r = state.pick::<RegistryHandle>(input, Kind::Registry);
    let (models, tensors) = state
        .live(r as usize, Kind::Registry)
        .map_or((0, 0), |h| (h.models, h.tensors));
    let mut layers = 0usize;
    offload_engine_registry_layer_count(r, &mut layers);
    let mut params = EngineParamsC::default();
    offload_engine_engine_params_init(&mut params);
    params.size = struct_size(input, std::mem::size_of::<EngineParamsC>());
    let device = match input.u8() % 8 {
        0 => None, // the first GPU, else the CPU
        1 => Some(CString::new("NoSuchDevice0").unwrap()),
        _ => Some(CString::new("CPU").unwrap()),
    };
    params.device = ptr_of(&device);
    params.compute_threads = [1, 1, 1, 0, -1, 2, 257, i32::MAX][usize::from(input.u8() % 8)];
    if input.bool() {
        params.budget_bytes = input.size();
        params.min_free_bytes = input.size();
        params.safety_fraction = input.float();
    }
    if input.bool() {
        params.prefetch_depth = input.count();
    }
    params.trace = c_int::from(input.u8() % 4 == 0);
    if input.u8() % 4 == 0 {
        params.pinned_limit_bytes = input.size();
    }
    let params_ptr = if input.u8() % 8 == 0 {
        null()
    } else {
        &params as *const EngineParamsC
    };
    let mut engine: *mut EngineHandle = FOREIGN.as_ptr() as *mut EngineHandle;
    let out = if input.u8() % 8 == 0 {
        null_mut()
    } else {
        &mut engine as *mut *mut EngineHandle
    };
    let rc = check(offload_engine_engine_new(params_ptr, r, out), "engine_new");
    unchanged(rc, FOREIGN.as_ptr() as usize, engine as usize, "engine_new");
    if tensors & state.busy != 0 {
        assert_ne!(
            rc, 0,
            "a second live engine over model tensors (these {tensors:#b}, held {:#b})",
            state.busy
        );
    }
    if rc == 0 {
        state.born(engine as usize, Kind::Engine, models, tensors);
        if let Some(h) = state.live_mut(engine as usize, Kind::Engine) {
            h.layers = layers as u64;
        }
    }
}

fn engine_stats(input: &mut Input, state: &mut State) {
    let e = state.pick::<EngineHandle>(input, Kind::Engine);
    match input.u8() % 3 {
        0 => {
            let mut s = StatsC::default();
            s.size = struct_size(input, std::mem::size_of::<StatsC>());
            let out = if input.u8() % 8 == 0 {
                null_mut()
            } else {
                &mut s as *mut StatsC
            };
            let rc = check(offload_engine_engine_stats(e, out), "engine_stats");
            if rc == 0 {
                // The peak is the placed bytes; the arena adds alignment slack on top.
                assert!(
                    s.arena_peak_bytes <= s.arena_bytes,
                    "peak {} > arena {}",
                    s.arena_peak_bytes,
                    s.arena_bytes
                );
            }
        }
        1 => {
            let layer = index(input, &[]);
            let mut s = LayerStatsC::default();
            s.size = struct_size(input, std::mem::size_of::<LayerStatsC>());
            let out = if input.u8() % 8 == 0 {
                null_mut()
            } else {
                &mut s as *mut LayerStatsC
            };
            let rc = check(
                offload_engine_engine_layer_stats(e, layer, out),
                "engine_layer_stats",
            );
            if rc == 0 {
                assert!(s.resident == 0 || s.resident == 1);
            }
        }
        _ => {
            check(offload_engine_engine_stats_reset(e), "engine_stats_reset");
        }
    }
}

fn engine_misc(input: &mut Input, state: &mut State) {
    let e = state.pick::<EngineHandle>(input, Kind::Engine);
    match input.u8() % 7 {
        5 => {
            // A range of layers at once: any first and count, begun and ended, or not.
            let first = index(input, &[]);
            let count = index(input, &[]);
            check(
                offload_engine_engine_layers_begin(e, first, count),
                "engine_layers_begin",
            );
            if input.bool() {
                let (first, count) = if input.bool() {
                    (first, count)
                } else {
                    (index(input, &[]), index(input, &[]))
                };
                check(
                    offload_engine_engine_layers_end(e, first, count),
                    "engine_layers_end",
                );
            }
        }
        6 => {
            // The engine's own backend (as a host's would be), none, or something else.
            let mut own: sys::ggml_backend_t = null_mut();
            let have = offload_engine_engine_backend(e, &mut own) == 0;
            let backend = match input.u8() % 3 {
                0 if have => own,
                1 => FOREIGN.as_ptr() as sys::ggml_backend_t,
                _ => null_mut(),
            };
            // A foreign pointer is the caller's breach (it is dereferenced to find its
            // device): only NULL and real backends are passed.
            if backend != FOREIGN.as_ptr() as sys::ggml_backend_t {
                check(
                    offload_engine_engine_set_compute_backend(e, backend),
                    "engine_set_compute_backend",
                );
            }
        }
        0 => {
            let mut backend: sys::ggml_backend_t = FOREIGN.as_ptr() as sys::ggml_backend_t;
            let out = if input.bool() {
                null_mut()
            } else {
                &mut backend as *mut sys::ggml_backend_t
            };
            let rc = check(offload_engine_engine_backend(e, out), "engine_backend");
            unchanged(
                rc,
                FOREIGN.as_ptr() as usize,
                backend as usize,
                "engine_backend",
            );
            if rc == 0 {
                assert!(!backend.is_null());
            }
        }
        1 => {
            // A path that cannot be created, or NULL: the error paths without touching disk.
            let path = if input.bool() {
                None
            } else {
                Some(CString::new("/nonexistent/dir/trace.json").unwrap())
            };
            check(
                offload_engine_engine_trace_write(e, ptr_of(&path)),
                "engine_trace_write",
            );
        }
        2 => {
            let mut bytes = u64::MAX;
            let rc = check(
                offload_engine_engine_measure_graph(e, null_mut(), &mut bytes),
                "engine_measure_graph",
            );
            assert_ne!(rc, 0, "a NULL graph was measured");
        }
        3 => {
            let mut size = usize::MAX;
            let rc = check(
                offload_engine_engine_run_pass(e, null(), null_mut(), 0, &mut size),
                "engine_run_pass",
            );
            assert_ne!(rc, 0, "a NULL model ran");
        }
        _ => {
            // measure_link allocates at least 1 MiB and copies it three times: only the
            // argument checks here (a NULL out-pointer fails before anything is allocated).
            let rc = check(
                offload_engine_engine_measure_link(e, input.u64(), null_mut(), null_mut()),
                "engine_measure_link",
            );
            assert_ne!(rc, 0);
        }
    }
}

/// A well-formed pass over the first `n` layers, in order or reversed: deep states are rare
/// when every call has to be drawn separately.
fn whole_pass(input: &mut Input, state: &mut State) {
    let e = state.pick::<EngineHandle>(input, Kind::Engine);
    let n = u64::from(input.u8() % 6);
    let reversed = input.bool();
    check(offload_engine_engine_pass_begin(e), "engine_pass_begin");
    for i in 0..n {
        let layer = if reversed { n - 1 - i } else { i };
        check(
            offload_engine_engine_layer_begin(e, layer),
            "engine_layer_begin",
        );
        check(
            offload_engine_engine_layer_end(e, layer),
            "engine_layer_end",
        );
    }
    check(offload_engine_engine_pass_end(e), "engine_pass_end");
}

// ---------------------------------------------------------------------------------------
// Pipelines
// ---------------------------------------------------------------------------------------

const COMPONENTS: [&[u8]; 4] = [b"cond", b"denoise", b"vae", b""];

fn pipeline_new(input: &mut Input, state: &mut State) {
    let mut params = PipelineParamsC::default();
    offload_engine_pipeline_params_init(&mut params);
    params.size = struct_size(input, std::mem::size_of::<PipelineParamsC>());
    params.offload_mode = c_int::from(input.u8() % 7) - 1;
    if input.bool() {
        params.budget_bytes = input.size();
        params.min_free_bytes = if input.bool() { 0 } else { input.size() };
        params.margin_bytes = if input.bool() { 0 } else { input.size() };
    } else {
        params.budget_bytes = u64::from(input.u16()) << (input.u8() % 16);
        params.min_free_bytes = 0;
        params.margin_bytes = 0;
    }
    params.prefetch_depth = u32::from(input.u8() % 4);
    params.steps = input.count();
    params.passes_per_step = input.count();
    params.reload_diffusion = c_int::from(input.bool());
    params.log_moves = c_int::from(input.bool());
    params.max_resident_layers = if input.bool() {
        u32::MAX
    } else {
        u32::from(input.u8() % 8)
    };
    let params_ptr = if input.u8() % 8 == 0 {
        null()
    } else {
        &params as *const PipelineParamsC
    };
    let mut pipeline: *mut PipelineHandle = FOREIGN.as_ptr() as *mut PipelineHandle;
    let rc = check(
        offload_engine_pipeline_new(params_ptr, &mut pipeline),
        "pipeline_new",
    );
    unchanged(
        rc,
        FOREIGN.as_ptr() as usize,
        pipeline as usize,
        "pipeline_new",
    );
    if rc == 0 {
        state.born(pipeline as usize, Kind::Pipeline, 0, 0);
    }
}

fn pipeline_add(input: &mut Input, state: &mut State) {
    let p = state.pick::<PipelineHandle>(input, Kind::Pipeline);
    let e = state.pick::<EngineHandle>(input, Kind::Engine);
    let name = text(input, &COMPONENTS);
    let role = c_int::from(input.u8() % 8) - 1;
    let rc = check(
        offload_engine_pipeline_add(p, ptr_of(&name), role, e),
        "pipeline_add",
    );
    let pipeline_live = state.live(p as usize, Kind::Pipeline).is_some();
    let owner = state.live(e as usize, Kind::Engine).map(|h| h.pipeline);
    if let Some(owner) = owner {
        if owner != 0 && owner != p as usize && pipeline_live {
            assert_ne!(rc, 0, "an engine joined a second live pipeline");
        }
    }
    if rc == 0 {
        if let Some(h) = state.live_mut(e as usize, Kind::Engine) {
            h.pipeline = p as usize;
        }
    }
}

fn pipeline_control(input: &mut Input, state: &mut State) {
    let p = state.pick::<PipelineHandle>(input, Kind::Pipeline);
    let name = text(input, &COMPONENTS);
    match input.u8() % 8 {
        0 => {
            check(offload_engine_pipeline_run_begin(p), "pipeline_run_begin");
        }
        1 => {
            check(offload_engine_pipeline_run_end(p), "pipeline_run_end");
        }
        2 => {
            check(
                offload_engine_pipeline_stage_begin(p, ptr_of(&name)),
                "pipeline_stage_begin",
            );
        }
        3 => {
            check(
                offload_engine_pipeline_stage_end(p, ptr_of(&name)),
                "pipeline_stage_end",
            );
        }
        4 => {
            let value = c_int::from(input.u8() % 5) - 1;
            check(
                offload_engine_pipeline_set_override(p, ptr_of(&name), value),
                "pipeline_set_override",
            );
        }
        5 => {
            let bytes = input.size();
            check(
                offload_engine_pipeline_set_stage_need(p, ptr_of(&name), bytes),
                "pipeline_set_stage_need",
            );
        }
        6 => {
            let mut info = ComponentInfoC::default();
            info.size = struct_size(input, std::mem::size_of::<ComponentInfoC>());
            let rc = check(
                offload_engine_pipeline_component_info(p, ptr_of(&name), &mut info),
                "pipeline_component_info",
            );
            if rc == 0 {
                assert!(!info.name.is_null());
                assert!((0..=2).contains(&info.placement));
            }
        }
        _ => {
            let mut stats = PipelineStatsC::default();
            stats.size = struct_size(input, std::mem::size_of::<PipelineStatsC>());
            check(
                offload_engine_pipeline_get_stats(p, &mut stats),
                "pipeline_get_stats",
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// run_pass with graph builders that misbehave
// ---------------------------------------------------------------------------------------

/// What a builder does to the library from inside the pass.
#[derive(Debug, Clone, Copy)]
enum Hostile {
    Nothing,
    FreeEngine(usize),
    FreePipeline(usize),
    PipelineRunBegin(usize),
    EngineCall(usize),
}

/// The builders' state (the staged model's `user`).
struct Staged {
    width: i64,
    /// Model tensors the layers read (the engine's own model), empty when it has none.
    weights: Vec<*mut sys::ggml_tensor>,
    input: *mut sys::ggml_tensor,
    values: Vec<f32>,
    /// The layer (or u64::MAX for the input stage) that returns a fresh tensor of `odd_type`.
    odd_at: u64,
    odd_type: u32,
    scale_ops: usize,
    hostile: Hostile,
    hostile_at: u64,
    /// Handles freed from inside the pass, for the state.
    freed: Vec<(usize, Kind)>,
}

/// A fresh tensor of `ty` with `n` elements, when ggml can make one (else f32).
///
/// # Safety
/// `ctx` is a valid context.
unsafe fn fresh_tensor(ctx: *mut sys::ggml_context, ty: u32, n: i64) -> *mut sys::ggml_tensor {
    // SAFETY: type queries accept any value below GGML_TYPE_COUNT.
    let usable = ty < sys::GGML_TYPE_COUNT
        && unsafe { sys::ggml_blck_size(ty) } > 0
        && unsafe { sys::ggml_type_size(ty) } > 0
        && n % unsafe { sys::ggml_blck_size(ty) } == 0;
    let ty = if usable { ty } else { sys::GGML_TYPE_F32 };
    // SAFETY: a valid context with room; the shape fits the type's blocks (checked above).
    unsafe { sys::ggml_new_tensor_1d(ctx, ty, n) }
}

unsafe extern "C" fn staged_input(
    user: *mut c_void,
    ctx: *mut sys::ggml_context,
) -> *mut sys::ggml_tensor {
    // SAFETY: `user` is the Staged the fuzzer passed for this pass.
    let s = unsafe { &mut *(user as *mut Staged) };
    if s.odd_at == u64::MAX {
        // SAFETY: a valid builder context.
        return unsafe { fresh_tensor(ctx, s.odd_type, s.width) };
    }
    // SAFETY: as above.
    s.input = unsafe { sys::ggml_new_tensor_2d(ctx, sys::GGML_TYPE_F32, s.width, 1) };
    s.input
}

unsafe extern "C" fn staged_set_inputs(user: *mut c_void) -> c_int {
    // SAFETY: as in staged_input.
    let s = unsafe { &mut *(user as *mut Staged) };
    if !s.input.is_null() {
        // SAFETY: the input tensor is allocated now and holds `width` f32 values.
        unsafe {
            sys::ggml_backend_tensor_set(s.input, s.values.as_ptr().cast(), 0, s.values.len() * 4)
        };
    }
    0
}

fn act_hostile(s: &mut Staged) {
    match s.hostile {
        Hostile::Nothing => {}
        Hostile::FreeEngine(e) => {
            s.freed.push((e, Kind::Engine));
            offload_engine_engine_free(e as *mut EngineHandle);
        }
        Hostile::FreePipeline(p) => {
            s.freed.push((p, Kind::Pipeline));
            offload_engine_pipeline_free(p as *mut PipelineHandle);
        }
        Hostile::PipelineRunBegin(p) => {
            check(
                offload_engine_pipeline_run_begin(p as *mut PipelineHandle),
                "pipeline_run_begin (in a pass)",
            );
        }
        Hostile::EngineCall(e) => {
            check(
                offload_engine_engine_pass_begin(e as *mut EngineHandle),
                "engine_pass_begin (in a pass)",
            );
        }
    }
    s.hostile = Hostile::Nothing;
}

unsafe extern "C" fn staged_layer(
    user: *mut c_void,
    ctx: *mut sys::ggml_context,
    layer: u64,
    x: *mut sys::ggml_tensor,
) -> *mut sys::ggml_tensor {
    // SAFETY: as in staged_input.
    let s = unsafe { &mut *(user as *mut Staged) };
    if layer == s.hostile_at {
        act_hostile(s);
    }
    if layer == s.odd_at {
        // SAFETY: a valid builder context.
        return unsafe { fresh_tensor(ctx, s.odd_type, s.width) };
    }
    let mut y = x;
    if !s.weights.is_empty() {
        let w = s.weights[layer as usize % s.weights.len()];
        // SAFETY: valid context; `w` is a live model tensor; x + 0 * sum(w) has x's shape.
        y = unsafe {
            let zero = sys::ggml_scale(ctx, sys::ggml_sum(ctx, w), 0.0);
            sys::ggml_add(ctx, x, zero)
        };
    }
    for _ in 0..s.scale_ops {
        // SAFETY: as above; scaling by one is exact.
        y = unsafe { sys::ggml_scale(ctx, y, 1.0) };
    }
    y
}

unsafe extern "C" fn staged_output(
    _user: *mut c_void,
    _ctx: *mut sys::ggml_context,
    x: *mut sys::ggml_tensor,
) -> *mut sys::ggml_tensor {
    x
}

fn staged_pass(input: &mut Input, state: &mut State, models: &[Model; 2]) {
    let e = state.pick::<EngineHandle>(input, Kind::Engine);
    let (held, layers) = state
        .live(e as usize, Kind::Engine)
        .map_or((0, 0), |h| (h.tensors, h.layers));
    // The layers read weights this engine surely holds, of one model (one width).
    let model = (0..2).find(|&i| held & model_bits(models, i) != 0);
    let width = model.map_or(16, |i| if i == 0 { 16 } else { 64 });
    let weights = model.map_or_else(Vec::new, |i| {
        let m = &models[i];
        (0..m.tensors.len())
            .filter(|t| held & (1 << (8 * i + t)) != 0)
            .map(|t| m.tensors[t])
            .collect()
    });
    let layer_count = match input.u8() % 8 {
        0 => u64::from(input.u8() % 6),
        _ => layers,
    };
    let odd = input.u8() % 4 == 0;
    let odd_at = if !odd {
        u64::MAX - 1
    } else if input.bool() {
        u64::MAX
    } else {
        u64::from(input.u8()) % layer_count.max(1)
    };
    let odd_type = u32::from(input.u8()) % (sys::GGML_TYPE_COUNT + 2);
    // Mostly small graphs; sometimes big ones, up to the per-builder limit.
    let scale_ops = match input.u8() % 16 {
        0 => 12000,
        1 => 30000,
        2..=4 => usize::from(input.u8()) * 8,
        _ => 0,
    };
    let hostile = match input.u8() % 8 {
        0 => Hostile::FreeEngine(state.pick::<EngineHandle>(input, Kind::Engine) as usize),
        1 => Hostile::FreePipeline(state.pick::<PipelineHandle>(input, Kind::Pipeline) as usize),
        2 => {
            Hostile::PipelineRunBegin(state.pick::<PipelineHandle>(input, Kind::Pipeline) as usize)
        }
        3 => Hostile::EngineCall(e as usize),
        _ => Hostile::Nothing,
    };
    let hostile_at = u64::from(input.u8()) % layer_count.max(1);
    let mut staged = Staged {
        width,
        weights,
        input: null_mut(),
        values: (0..width).map(|i| (i as f32 - 7.5) * 0.25).collect(),
        odd_at,
        odd_type,
        scale_ops,
        hostile,
        hostile_at,
        freed: Vec::new(),
    };
    let mut model_c = StagedModelC::default();
    model_c.size = struct_size(input, std::mem::size_of::<StagedModelC>());
    model_c.user = (&mut staged as *mut Staged).cast();
    model_c.layer_count = layer_count;
    model_c.activation_ne = match input.u8() % 16 {
        0 => [i64::MAX, 2],
        1 => [0, 1],
        2 => [width, 2],
        _ => [width, 1],
    };
    model_c.build_input = Some(staged_input);
    model_c.set_inputs = Some(staged_set_inputs);
    model_c.build_layer = Some(staged_layer);
    model_c.build_output = Some(staged_output);
    let mut output = vec![0f32; width as usize];
    let mut size = usize::MAX;
    let rc = check(
        offload_engine_engine_run_pass(
            e,
            &model_c,
            output.as_mut_ptr().cast(),
            output.len() * 4,
            &mut size,
        ),
        "engine_run_pass",
    );
    unchanged(rc, usize::MAX, size, "engine_run_pass");
    let honest = !odd && model_c.activation_ne == [width, 1];
    if rc == 0 && honest {
        assert_eq!(size, output.len() * 4, "run_pass output size");
        assert!(
            output
                .iter()
                .zip(&staged.values)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "run_pass output differs from its input: {output:?} vs {:?}",
            staged.values
        );
    }
    for (ptr, kind) in staged.freed {
        state.freed(ptr, kind);
    }
}

// ---------------------------------------------------------------------------------------
// A free from another thread while this one is in a call
// ---------------------------------------------------------------------------------------

fn free_during_a_call(input: &mut Input, state: &mut State, models: &[Model; 2]) {
    let kind = [Kind::Engine, Kind::Pipeline, Kind::Registry][usize::from(input.u8() % 3)];
    let target = state.pick::<c_void>(input, kind) as usize;
    let delay_us = u64::from(input.u8()) * 4;
    let freer = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_micros(delay_us));
        free_handle(target, kind);
    });
    // Whatever this thread does meanwhile: a pass, a prepare, a pipeline call.
    match input.u8() % 3 {
        0 => whole_pass(input, state),
        1 => staged_pass(input, state, models),
        _ => pipeline_control(input, state),
    }
    freer.join().expect("the freeing thread");
    state.freed(target, kind);
}

/// Frees what is still alive, then checks nothing the input saw is live and the models are
/// back in host memory, untouched.
fn cleanup(state: &mut State, models: &[Model; 2]) {
    offload_engine_debug_clear_faults();
    *lock(&ARMED) = None;
    state.reconcile();
    for kind in [
        Kind::LlamaContext,
        Kind::Pipeline,
        Kind::Engine,
        Kind::Plan,
        Kind::Registry,
        Kind::Llama,
    ] {
        for h in state.handles.iter().filter(|h| h.kind == kind && h.live) {
            free_handle(h.ptr, kind);
        }
    }
    // llama.cpp's buffers go last: they keep the buffer type alive after the hook.
    state.hook_models.clear();
    state.reconcile();
    for h in &state.handles {
        let rc = match h.kind {
            Kind::Engine => offload_engine_engine_pass_begin(h.ptr as *mut EngineHandle),
            Kind::Plan => {
                let mut r = 0;
                offload_engine_plan_layer_resident(h.ptr as *const PlanHandle, 0, &mut r)
            }
            Kind::Registry => {
                let mut n = 0;
                offload_engine_registry_tensor_count(h.ptr as *mut RegistryHandle, &mut n)
            }
            Kind::Pipeline => offload_engine_pipeline_run_end(h.ptr as *mut PipelineHandle),
            Kind::Llama => offload_engine_llama_detach(h.ptr as *mut LlamaHandle),
            Kind::LlamaContext => {
                offload_engine_llama_context_status(h.ptr as *mut LlamaContextHandle)
            }
        };
        assert_eq!(
            rc, ERR_INVALID_HANDLE,
            "{:?} {:#x} still live",
            h.kind, h.ptr
        );
    }
    // An engine freed from the copy thread's log callback is torn down on a thread of its
    // own: give it a moment.
    let home = |m: &Model| {
        m.tensors
            .iter()
            .zip(&m.homes)
            // SAFETY: model tensors live for the process.
            .all(|(&t, &home)| unsafe { (*t).data } == home)
    };
    for _ in 0..2000 {
        if models.iter().all(home) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    for (i, m) in models.iter().enumerate() {
        for (&t, &home) in m.tensors.iter().zip(&m.homes) {
            // SAFETY: model tensors live for the process.
            let data = unsafe { (*t).data };
            assert_eq!(
                data, home,
                "model {i}: a tensor was not restored to host memory"
            );
        }
        assert_eq!(
            checksum(m),
            m.checksum,
            "model {i}: host weights were modified"
        );
    }
}

// ---------------------------------------------------------------------------------------
// The llama.cpp drop-in, driven as a ggml host would (no llama.cpp): weights allocated from
// the hook's buffer type, adopted, and a graph whose layer outputs are named l_out-N run by
// ggml's scheduler with offload_engine_llama_eval as its eval callback
// ---------------------------------------------------------------------------------------

const HOOK_LAYERS: usize = 4;
const HOOK_WIDTH: i64 = 16;

/// The GGUF files the hooks read: a llama-like model (blk.N.w, output_norm.weight) and the
/// same tensors under an architecture whose llama.cpp graph names no l_out node.
fn hook_files() -> &'static [std::path::PathBuf; 2] {
    static FILES: OnceLock<[std::path::PathBuf; 2]> = OnceLock::new();
    FILES.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("fuzz_abi_hook_{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        let names: Vec<String> = (0..HOOK_LAYERS)
            .map(|i| format!("blk.{i}.w"))
            .chain(["output_norm.weight".to_string()])
            .collect();
        ["llama", "bert"].map(|arch| {
            use offload_engine::gguf::{Value, Writer};
            let path = dir.join(format!("{arch}.gguf"));
            let mut file = Writer::new();
            file.add_kv("general.architecture", Value::Str(arch.into()));
            for (t, name) in names.iter().enumerate() {
                let dims = if t < HOOK_LAYERS {
                    vec![HOOK_WIDTH as u64, HOOK_WIDTH as u64]
                } else {
                    vec![HOOK_WIDTH as u64]
                };
                let elements: u64 = dims.iter().product();
                let data = (0..elements)
                    .flat_map(|i| hook_weight(t, i).to_le_bytes())
                    .collect();
                file.add_tensor(name, sys::GGML_TYPE_F32, &dims, data)
                    .expect("a valid tensor");
            }
            file.write_path(&path).expect("the hook model writes");
            path
        })
    })
}

fn hook_weight(tensor: usize, i: u64) -> f32 {
    (tensor as f32 + 1.0) * 0.05 + (i % 5) as f32 * 0.01 - (i % 3) as f32 * 0.02
}

/// Weights in a ggml context, allocated from a buffer type and filled with the file's values.
struct HookModel {
    ctx: *mut sys::ggml_context,
    buffer: sys::ggml_backend_buffer_t,
    weights: Vec<*mut sys::ggml_tensor>,
}

impl HookModel {
    fn load(buft: sys::ggml_backend_buffer_type_t) -> Option<HookModel> {
        let params = sys::ggml_init_params {
            // SAFETY: no preconditions.
            mem_size: (HOOK_LAYERS + 1) * unsafe { sys::ggml_tensor_overhead() } + 1024,
            mem_buffer: null_mut(),
            no_alloc: true,
        };
        // SAFETY: a metadata-only context.
        let ctx = unsafe { sys::ggml_init(params) };
        assert!(!ctx.is_null());
        let mut weights = Vec::new();
        for t in 0..=HOOK_LAYERS {
            let name = if t < HOOK_LAYERS {
                CString::new(format!("blk.{t}.w")).unwrap()
            } else {
                CString::new("output_norm.weight").unwrap()
            };
            // SAFETY: a valid context with room for these tensors.
            unsafe {
                let w = if t < HOOK_LAYERS {
                    sys::ggml_new_tensor_2d(ctx, sys::GGML_TYPE_F32, HOOK_WIDTH, HOOK_WIDTH)
                } else {
                    sys::ggml_new_tensor_1d(ctx, sys::GGML_TYPE_F32, HOOK_WIDTH)
                };
                sys::ggml_set_name(w, name.as_ptr());
                weights.push(w);
            }
        }
        // SAFETY: the context's tensors, allocated in one buffer of `buft` (NULL on failure).
        let buffer = unsafe { sys::ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft) };
        if buffer.is_null() {
            // SAFETY: the context made above, used by nothing else.
            unsafe { sys::ggml_free(ctx) };
            return None;
        }
        for (t, &w) in weights.iter().enumerate() {
            // SAFETY: an f32 tensor of this context.
            let n = unsafe { sys::ggml_nelements(w) } as u64;
            let values: Vec<f32> = (0..n).map(|i| hook_weight(t, i)).collect();
            // SAFETY: `values` holds the tensor's bytes.
            unsafe { sys::ggml_backend_tensor_set(w, values.as_ptr().cast(), 0, values.len() * 4) };
        }
        Some(HookModel {
            ctx,
            buffer,
            weights,
        })
    }

    /// y = norm * tanh(W3 tanh(W2 tanh(W1 tanh(W0 x)))), layer outputs named l_out-N, on the
    /// CPU backend through a scheduler with `callback` (and `user`) as its eval callback.
    fn forward(
        &self,
        callback: sys::ggml_backend_sched_eval_callback,
        user: *mut c_void,
    ) -> Vec<f32> {
        let params = sys::ggml_init_params {
            // SAFETY: no preconditions.
            mem_size: 64 * unsafe { sys::ggml_tensor_overhead() }
                // SAFETY: no preconditions.
                + unsafe { sys::ggml_graph_overhead() }
                + 1024,
            mem_buffer: null_mut(),
            no_alloc: true,
        };
        // SAFETY: each call below gets valid objects made just before it; the scheduler and
        // contexts are freed at the end, in order.
        unsafe {
            let ctx = sys::ggml_init(params);
            let mut cpu = sys::ggml_backend_cpu_init();
            let x = sys::ggml_new_tensor_1d(ctx, sys::GGML_TYPE_F32, HOOK_WIDTH);
            sys::ggml_set_input(x);
            let mut y = x;
            for (l, &w) in self.weights[..HOOK_LAYERS].iter().enumerate() {
                y = sys::ggml_tanh(ctx, sys::ggml_mul_mat(ctx, w, y));
                let name = CString::new(format!("l_out-{l}")).unwrap();
                sys::ggml_set_name(y, name.as_ptr());
            }
            y = sys::ggml_mul(ctx, y, self.weights[HOOK_LAYERS]);
            sys::ggml_set_output(y);
            let graph = sys::ggml_new_graph(ctx);
            sys::ggml_build_forward_expand(graph, y);
            let sched = sys::ggml_backend_sched_new(&mut cpu, null_mut(), 1, 64, false, false);
            sys::ggml_backend_sched_set_eval_callback(sched, callback, user);
            assert!(sys::ggml_backend_sched_alloc_graph(sched, graph));
            let input: Vec<f32> = (0..HOOK_WIDTH)
                .map(|i| (i % 4) as f32 * 0.3 - 0.4)
                .collect();
            sys::ggml_backend_tensor_set(x, input.as_ptr().cast(), 0, input.len() * 4);
            assert_eq!(
                sys::ggml_backend_sched_graph_compute(sched, graph),
                sys::GGML_STATUS_SUCCESS
            );
            let mut out = vec![0f32; HOOK_WIDTH as usize];
            sys::ggml_backend_tensor_get(y, out.as_mut_ptr().cast(), 0, out.len() * 4);
            sys::ggml_backend_sched_free(sched);
            sys::ggml_backend_free(cpu);
            sys::ggml_free(ctx);
            out
        }
    }
}

impl Drop for HookModel {
    fn drop(&mut self) {
        // SAFETY: the buffer and context this model made, freed once, buffer first (as
        // llama.cpp does: the hook detaches when its buffer goes).
        unsafe {
            sys::ggml_backend_buffer_free(self.buffer);
            sys::ggml_free(self.ctx);
        }
    }
}

/// The output of the graph over plainly allocated weights: what every streamed run must give.
fn hook_reference() -> &'static [f32] {
    static REFERENCE: OnceLock<Vec<f32>> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        // SAFETY: no preconditions.
        let model = HookModel::load(unsafe { sys::ggml_backend_cpu_buffer_type() }).unwrap();
        model.forward(None, null_mut())
    })
}

const OUTPUT_PATTERNS: [&[u8]; 5] = [
    b"^l_out-(\\d+)$",
    b"^layer_out-(\\d+)$",
    b"l_out",
    b"(",
    b"(\\d+)",
];

fn llama_new(input: &mut Input, state: &mut State) {
    let mut p = LlamaParamsC::default();
    offload_engine_llama_params_init(&mut p);
    p.size = struct_size(input, std::mem::size_of::<LlamaParamsC>());
    let device = match input.u8() % 8 {
        0 => None,
        1 => Some(CString::new("nope").unwrap()),
        _ => Some(CString::new("CPU").unwrap()),
    };
    p.device = ptr_of(&device);
    // Around what the model needs (global 64 B, layers 1 KiB each; from the file, 4 KiB
    // aligned: 4.25 and 8 KiB), or anything.
    p.budget_bytes = match input.u8() % 4 {
        0 => input.size(),
        1 => 0,
        _ => u64::from(input.u16() % 32768),
    };
    p.prefetch_depth = input.count().min(80);
    if input.bool() {
        p.compute_reserve_bytes = input.size();
        p.kv_cache_bytes = input.size();
    } else {
        p.compute_reserve_bytes = 0;
        p.kv_cache_bytes = 0;
    }
    if input.u8() % 4 == 0 {
        p.n_ctx = input.u32();
        p.n_ubatch = input.u32();
    }
    p.file_backed = c_int::from(input.u8() % 3 == 0);
    let pattern = if input.bool() {
        None
    } else {
        text(input, &OUTPUT_PATTERNS)
    };
    p.layer_output_pattern = ptr_of(&pattern);
    let files = hook_files();
    let path = match input.u8() % 8 {
        0 => None,
        1 => Some(CString::new("/nonexistent.gguf").unwrap()),
        2 => Some(CString::new(files[1].to_str().unwrap()).unwrap()),
        _ => Some(CString::new(files[0].to_str().unwrap()).unwrap()),
    };
    let mut hook: *mut LlamaHandle = FOREIGN.as_ptr() as *mut LlamaHandle;
    let rc = check(
        offload_engine_llama_new(&p, ptr_of(&path), &mut hook),
        "llama_new",
    );
    unchanged(rc, FOREIGN.as_ptr() as usize, hook as usize, "llama_new");
    if rc == 0 {
        state.born(hook as usize, Kind::Llama, 0, 0);
    }
}

/// Hook calls: new, free, buffer type, plan, adopt, detach, stats, trace.
fn llama_hook(input: &mut Input, state: &mut State) {
    let op = input.u8() % 8;
    if op == 0 {
        return llama_new(input, state);
    }
    let h = state.pick::<LlamaHandle>(input, Kind::Llama);
    match op {
        1 => {
            offload_engine_llama_free(h);
            state.freed(h as usize, Kind::Llama);
        }
        2 => {
            let mut buft: sys::ggml_backend_buffer_type_t = FOREIGN.as_ptr() as *mut _;
            let rc = check(
                offload_engine_llama_buffer_type(h, &mut buft),
                "llama_buffer_type",
            );
            unchanged(
                rc,
                FOREIGN.as_ptr() as usize,
                buft as usize,
                "llama_buffer_type",
            );
        }
        3 | 4 => {
            let mut plan: *mut PlanHandle = FOREIGN.as_ptr() as *mut PlanHandle;
            let out = if input.u8() % 8 == 0 {
                null_mut()
            } else {
                &mut plan as *mut *mut PlanHandle
            };
            let rc = if op == 3 {
                check(offload_engine_llama_plan(h, out), "llama_plan")
            } else {
                check(offload_engine_llama_adopt(h, out), "llama_adopt")
            };
            if rc == 0 && !out.is_null() {
                state.born(plan as usize, Kind::Plan, 0, 0);
            } else {
                unchanged(rc, FOREIGN.as_ptr() as usize, plan as usize, "llama_plan");
            }
        }
        5 => {
            let contexts = state
                .handles
                .iter()
                .any(|c| c.kind == Kind::LlamaContext && c.live && c.pipeline == h as usize);
            let rc = check(offload_engine_llama_detach(h), "llama_detach");
            if contexts {
                assert_ne!(rc, 0, "detached while a context object lives");
            }
        }
        6 => {
            let mut stats = StatsC::default();
            stats.size = struct_size(input, std::mem::size_of::<StatsC>());
            let before = stats.passes;
            let rc = check(offload_engine_llama_stats(h, &mut stats), "llama_stats");
            unchanged(rc, before, stats.passes, "llama_stats");
        }
        _ => {
            let path = if input.bool() {
                None
            } else {
                let p = std::env::temp_dir().join(format!("fuzz_abi_hook_{}", std::process::id()));
                Some(CString::new(p.join("trace.json").to_str().unwrap()).unwrap())
            };
            check(
                offload_engine_llama_trace_write(h, ptr_of(&path)),
                "llama_trace_write",
            );
        }
    }
}

/// Loads the hook model through a hook's buffer type (llama.cpp's load), or frees one such
/// model (llama_model_free, with or without detach first).
fn llama_load(input: &mut Input, state: &mut State) {
    if input.u8() % 4 == 0 {
        if !state.hook_models.is_empty() {
            let i = usize::from(input.u8()) % state.hook_models.len();
            drop(state.hook_models.swap_remove(i));
        }
        return;
    }
    let h = state.pick::<LlamaHandle>(input, Kind::Llama);
    let mut buft: sys::ggml_backend_buffer_type_t = null_mut();
    if offload_engine_llama_buffer_type(h, &mut buft) != 0 {
        return;
    }
    if let Some(model) = HookModel::load(buft) {
        state.hook_models.push((h as usize, model));
    }
}

/// Context objects: new (with or without a host callback), free, status, eval with odd
/// arguments.
fn llama_context(input: &mut Input, state: &mut State) {
    match input.u8() % 4 {
        0 => {
            let h = state.pick::<LlamaHandle>(input, Kind::Llama);
            let host: Option<offload_engine::llama::EvalFn> =
                if input.bool() { Some(host_eval) } else { None };
            let mut context: *mut LlamaContextHandle = FOREIGN.as_ptr() as *mut _;
            let rc = check(
                offload_engine_llama_context_new(h, host, null_mut(), &mut context),
                "llama_context_new",
            );
            unchanged(
                rc,
                FOREIGN.as_ptr() as usize,
                context as usize,
                "llama_context_new",
            );
            if rc == 0 {
                state.born(context as usize, Kind::LlamaContext, 0, 0);
                if let Some(c) = state.live_mut(context as usize, Kind::LlamaContext) {
                    c.pipeline = h as usize; // the hook it belongs to
                }
            }
        }
        1 => {
            let c = state.pick::<LlamaContextHandle>(input, Kind::LlamaContext);
            offload_engine_llama_context_free(c);
            state.freed(c as usize, Kind::LlamaContext);
        }
        2 => {
            let c = state.pick::<LlamaContextHandle>(input, Kind::LlamaContext);
            check(
                offload_engine_llama_context_status(c),
                "llama_context_status",
            );
        }
        _ => {
            let c = state.pick::<c_void>(input, Kind::LlamaContext);
            let ask = input.bool();
            // No node: the neutral answer, whatever the user data.
            assert_eq!(offload_engine_llama_eval(null_mut(), ask, c), !ask);
        }
    }
}

/// The host callback's answers, drawn from the input (the last first): asking for nodes, and
/// now and then stopping the graph (a "false" after a node was computed), as an imatrix or a
/// debugger may.
static HOST_ANSWERS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

unsafe extern "C" fn host_eval(_t: *mut sys::ggml_tensor, ask: bool, _user: *mut c_void) -> bool {
    // Out of answers: not interested, go on.
    let byte = lock(&HOST_ANSWERS).pop().unwrap_or(1);
    if ask {
        byte % 4 == 0
    } else {
        byte % 8 != 0
    }
}

/// Runs the graph over a hook-loaded model with a picked context object as user data; when
/// the engine reports no error and the host callback stopped nothing, the output must be
/// the reference's, bit for bit.
fn llama_forward(input: &mut Input, state: &mut State) {
    if state.hook_models.is_empty() {
        return;
    }
    let i = usize::from(input.u8()) % state.hook_models.len();
    let c = state.pick::<LlamaContextHandle>(input, Kind::LlamaContext);
    let len = usize::from(input.u8() % 32);
    let answers: Vec<u8> = input.bytes(len).to_vec();
    let may_stop = answers.iter().any(|b| b % 8 == 0);
    *lock(&HOST_ANSWERS) = answers;
    let model = &state.hook_models[i].1;
    // SAFETY: the exported eval callback has ggml's callback signature.
    let callback: sys::ggml_backend_sched_eval_callback = Some(offload_engine_llama_eval);
    let before = offload_engine_llama_context_status(c);
    let out = model.forward(callback, c.cast());
    lock(&HOST_ANSWERS).clear();
    let status = offload_engine_llama_context_status(c);
    if before == 0 && status == 0 && !may_stop {
        assert!(
            out.iter()
                .zip(hook_reference())
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "a streamed graph differs from the reference: {out:?} vs {:?}",
            hook_reference()
        );
    }
}
