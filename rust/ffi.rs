//! The C ABI (ffi/offload_engine.h). Every export runs behind `boundary`, which turns errors
//! into a status plus a thread-local message and panics into `OFFLOAD_ENGINE_ERR_INTERNAL`.
//! Handles are checked against a table of live handles, so NULL, freed or foreign pointers
//! give `OFFLOAD_ENGINE_ERR_INVALID_HANDLE` instead of undefined behaviour.

// Exports take raw pointers by design: their validity is the caller's side of the contract
// written in the header, and every dereference below is checked for NULL first.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

use std::cell::RefCell;
use std::collections::HashSet;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Mutex;

use once_cell::sync::Lazy;

use crate::engine::{Engine, EngineParams};
use crate::error::{Error, Result, Status};
use crate::executor::{Executor, InputFill, LayeredModel};
use crate::ggml as sys;
use crate::planner::{self, Budget, Link, Plan, Workload};
use crate::registry::{Location, Registry, Source, TensorDesc, TensorId};

// ---------------------------------------------------------------------------------------
// Errors, panics, handles
// ---------------------------------------------------------------------------------------

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    let text = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = text);
}

/// The one panic boundary every export goes through.
fn boundary(body: impl FnOnce() -> Result<()>) -> c_int {
    crate::log::init();
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => Status::Ok as c_int,
        Ok(Err(err)) => {
            log::debug!("{}: {}", err.status.as_str(), err.message);
            set_last_error(&err.message);
            err.status as c_int
        }
        Err(panic) => {
            let message = format!(
                "internal error (panic): {}",
                crate::error::panic_text(&*panic)
            );
            log::error!("{message}");
            set_last_error(&message);
            Status::Internal as c_int
        }
    }
}

/// For exports that return nothing (`_free`): runs `body`, swallowing any panic.
fn boundary_void(body: impl FnOnce()) {
    let _ = boundary(|| {
        body();
        Ok(())
    });
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Registry,
    Engine,
    Plan,
    Pipeline,
}

static LIVE: Lazy<Mutex<HashSet<(usize, Kind)>>> = Lazy::new(Mutex::default);

fn live() -> std::sync::MutexGuard<'static, HashSet<(usize, Kind)>> {
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

fn publish<T>(value: T, kind: Kind) -> *mut T {
    let ptr = Box::into_raw(Box::new(value));
    live().insert((ptr as usize, kind));
    ptr
}

fn checked<'a, T>(ptr: *const T, kind: Kind) -> Result<&'a T> {
    if ptr.is_null() {
        return Err(Error::new(
            Status::NullPointer,
            format!("{kind:?} handle is NULL").to_lowercase(),
        ));
    }
    if !live().contains(&(ptr as usize, kind)) {
        return Err(Error::new(
            Status::InvalidHandle,
            format!("{kind:?} handle {ptr:p} is not live (freed, or not a {kind:?})")
                .to_lowercase(),
        ));
    }
    // SAFETY: the pointer is in the live table, so it came from `publish` for this kind and
    // has not been freed; handles hold their state behind a Mutex, so shared access is sound.
    Ok(unsafe { &*ptr })
}

fn retire<T>(ptr: *mut T, kind: Kind) {
    if ptr.is_null() {
        return;
    }
    if live().remove(&(ptr as usize, kind)) {
        // SAFETY: it was live for this kind, so it is a Box we published and nobody frees it twice.
        drop(unsafe { Box::from_raw(ptr) });
    } else {
        log::warn!("ignored free of a handle that is not live ({ptr:p})");
    }
}

fn out<'a, T>(ptr: *mut T, what: &str) -> Result<&'a mut T> {
    // SAFETY: non-null out-pointers are the caller's writable storage per the header.
    unsafe { ptr.as_mut() }
        .ok_or_else(|| Error::new(Status::NullPointer, format!("{what} is NULL")))
}

fn text<'a>(ptr: *const c_char, what: &str) -> Result<&'a str> {
    if ptr.is_null() {
        return Err(Error::new(Status::NullPointer, format!("{what} is NULL")));
    }
    // SAFETY: the header requires NUL-terminated strings.
    unsafe { CStr::from_ptr(ptr) }
        .to_str()
        .map_err(|_| Error::invalid(format!("{what} is not valid UTF-8")))
}

fn optional_text<'a>(ptr: *const c_char, what: &str) -> Result<Option<&'a str>> {
    if ptr.is_null() {
        Ok(None)
    } else {
        text(ptr, what).map(Some)
    }
}

/// Checks the caller's struct size so older callers with smaller structs stay safe.
fn check_size(size: usize, expected: usize, what: &str) -> Result<()> {
    if size < expected {
        Err(Error::invalid(format!(
            "{what}.size is {size}, expected {expected}: call the matching _init function"
        )))
    } else {
        Ok(())
    }
}

/// C structs that start with their caller's `size` (see the header's conventions).
trait Sized_ {
    fn declared_size(&self) -> usize;
}

macro_rules! sized_structs {
    ($($t:ty),* $(,)?) => {
        $(impl Sized_ for $t {
            fn declared_size(&self) -> usize {
                self.size
            }
        }

        /// All zero but `size` (for Rust callers of the C ABI, like C's `= {sizeof x}`).
        impl Default for $t {
            fn default() -> Self {
                // SAFETY: the struct holds only integers, floats, raw pointers and optional
                // function pointers, for all of which all-zero bytes are a valid value.
                let mut value: Self = unsafe { std::mem::zeroed() };
                value.size = std::mem::size_of::<Self>();
                value
            }
        })*
    };
}

sized_structs!(
    RegistryParams,
    TensorInfo,
    LayerInfo,
    PlanParams,
    PlanSummary,
    EngineParamsC,
    StatsC,
    LayerStatsC,
    StagedModelC,
    PipelineParamsC,
    ComponentInfoC,
    PipelineStatsC,
);

/// A caller's input struct: not NULL, and at least as large as ours.
fn input<'a, T: Sized_>(ptr: *const T, what: &str) -> Result<&'a T> {
    // SAFETY: a non-null pointer points to a struct the caller initialised (header rule).
    let value = unsafe { ptr.as_ref() }
        .ok_or_else(|| Error::new(Status::NullPointer, format!("{what} is NULL")))?;
    check_size(value.declared_size(), std::mem::size_of::<T>(), what)?;
    Ok(value)
}

/// A caller's result struct: not NULL, with `size` set to at least ours.
fn result_slot<'a, T: Sized_>(ptr: *mut T, what: &str) -> Result<&'a mut T> {
    let slot = out(ptr, what)?;
    check_size(slot.declared_size(), std::mem::size_of::<T>(), what)?;
    Ok(slot)
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    // One caller at a time per handle; a second thread gets an error instead of a race.
    match m.try_lock() {
        Ok(g) => Ok(g),
        Err(std::sync::TryLockError::WouldBlock) => Err(Error::state(
            "handle is in use by another thread (calls on one handle must not overlap)",
        )),
        Err(std::sync::TryLockError::Poisoned(p)) => Ok(p.into_inner()),
    }
}

// ---------------------------------------------------------------------------------------
// Library
// ---------------------------------------------------------------------------------------

#[no_mangle]
pub extern "C" fn offload_engine_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

#[no_mangle]
pub extern "C" fn offload_engine_status_str(status: c_int) -> *const c_char {
    let s = match Status::from_code(status) {
        Some(Status::Ok) => "ok\0",
        Some(Status::InvalidArgument) => "invalid argument\0",
        Some(Status::NullPointer) => "null pointer\0",
        Some(Status::InvalidHandle) => "invalid handle\0",
        Some(Status::NotFound) => "not found\0",
        Some(Status::AlreadyExists) => "already exists\0",
        Some(Status::Io) => "i/o error\0",
        Some(Status::CorruptFile) => "corrupt or unsupported file\0",
        Some(Status::InsufficientMemory) => "insufficient device memory\0",
        Some(Status::Backend) => "backend error\0",
        Some(Status::InvalidState) => "invalid state\0",
        Some(Status::Internal) => "internal error\0",
        Some(Status::Unsupported) => "unsupported\0",
        Some(Status::OutOfMemory) => "out of memory\0",
        None => "unknown status\0",
    };
    s.as_ptr().cast()
}

#[no_mangle]
pub extern "C" fn offload_engine_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

pub type LogCallback =
    Option<unsafe extern "C" fn(level: c_int, message: *const c_char, user: *mut c_void)>;

#[no_mangle]
pub extern "C" fn offload_engine_log_set_callback(
    callback: LogCallback,
    user: *mut c_void,
) -> c_int {
    boundary(|| {
        crate::log::set_callback(callback, user);
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_debug_inject_fault(fault: c_int, countdown: u32) -> c_int {
    boundary(|| {
        let fault = crate::faults::from_code(fault)
            .ok_or_else(|| Error::invalid(format!("unknown fault {fault}")))?;
        crate::faults::arm(fault, countdown);
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_debug_clear_faults() {
    boundary_void(crate::faults::disarm_all);
}

// ---------------------------------------------------------------------------------------
// Registry
// ---------------------------------------------------------------------------------------

#[repr(C)]
pub struct RegistryParams {
    pub size: usize,
    pub pattern: *const c_char,
}

#[repr(C)]
pub struct TensorInfo {
    pub size: usize,
    pub name: *const c_char,
    pub ggml_type: c_int,
    pub n_dims: c_int,
    pub ne: [i64; 4],
    pub bytes: u64,
    pub layer: i64,
    pub location: c_int,
    pub component: *const c_char,
}

#[repr(C)]
pub struct LayerInfo {
    pub size: usize,
    pub name: *const c_char,
    pub tensor_count: u64,
    pub bytes: u64,
    pub location: c_int,
    pub component: *const c_char,
}

pub struct RegistryHandle {
    inner: Mutex<RegistryState>,
}

struct RegistryState {
    registry: Registry,
    /// Strings handed out stay valid until the next call on this handle.
    scratch: Vec<CString>,
}

impl RegistryState {
    fn keep(&mut self, s: &str) -> *const c_char {
        self.scratch
            .push(CString::new(s.replace('\0', " ")).unwrap_or_default());
        self.scratch
            .last()
            .map(|c| c.as_ptr())
            .unwrap_or(std::ptr::null())
    }
}

fn location_code(location: Location) -> c_int {
    match location {
        Location::Host => 0,
        Location::Pinned => 1,
        Location::Device => 2,
        Location::File => 3,
    }
}

fn registry<'a>(handle: *const RegistryHandle) -> Result<std::sync::MutexGuard<'a, RegistryState>> {
    let h = checked(handle, Kind::Registry)?;
    let mut guard = lock(&h.inner)?;
    guard.scratch.clear();
    Ok(guard)
}

#[no_mangle]
pub extern "C" fn offload_engine_registry_params_init(params: *mut RegistryParams) {
    boundary_void(|| {
        if let Ok(p) = out(params, "params") {
            *p = RegistryParams {
                size: std::mem::size_of::<RegistryParams>(),
                pattern: std::ptr::null(),
            };
        }
    });
}

#[no_mangle]
pub extern "C" fn offload_engine_registry_new(
    params: *const RegistryParams,
    registry_out: *mut *mut RegistryHandle,
) -> c_int {
    boundary(|| {
        let params = input(params, "registry params")?;
        let slot = out(registry_out, "registry_out")?;
        let pattern = optional_text(params.pattern, "pattern")?
            .map(Registry::pattern_from_arg)
            .transpose()?;
        let handle = RegistryHandle {
            inner: Mutex::new(RegistryState {
                registry: Registry::new(pattern),
                scratch: Vec::new(),
            }),
        };
        *slot = publish(handle, Kind::Registry);
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_registry_free(registry: *mut RegistryHandle) {
    boundary_void(|| retire(registry, Kind::Registry));
}

#[no_mangle]
pub extern "C" fn offload_engine_registry_add_tensor(
    handle: *mut RegistryHandle,
    tensor: *mut sys::ggml_tensor,
    name: *const c_char,
    id_out: *mut u64,
) -> c_int {
    boundary(|| {
        let mut state = registry(handle)?;
        let name = optional_text(name, "name")?;
        if tensor.is_null() {
            return Err(Error::new(Status::NullPointer, "tensor is NULL"));
        }
        // SAFETY: the header requires a valid tensor that outlives the registry's engines.
        let id = unsafe { state.registry.add_ggml_tensor(tensor, name)? };
        if let Some(slot) = unsafe_out(id_out) {
            *slot = id.0;
        }
        Ok(())
    })
}

/// Optional out-pointers: NULL means the caller does not want the value.
fn unsafe_out<'a, T>(ptr: *mut T) -> Option<&'a mut T> {
    // SAFETY: non-null out-pointers are the caller's writable storage per the header.
    unsafe { ptr.as_mut() }
}

/// The shape of the registering calls: lock the registry, register, report how many.
fn register_and_count(
    handle: *mut RegistryHandle,
    count_out: *mut usize,
    register: impl FnOnce(&mut Registry) -> Result<usize>,
) -> c_int {
    boundary(|| {
        let mut state = registry(handle)?;
        let count = register(&mut state.registry)?;
        if let Some(slot) = unsafe_out(count_out) {
            *slot = count;
        }
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_registry_add_context(
    handle: *mut RegistryHandle,
    ctx: *mut sys::ggml_context,
    count_out: *mut usize,
) -> c_int {
    register_and_count(handle, count_out, |registry| {
        // SAFETY: the header requires a valid context (or NULL, refused there) whose tensors
        // outlive the registry's engines.
        unsafe { registry.add_ggml_context(ctx) }
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_registry_add_gguf(
    handle: *mut RegistryHandle,
    path: *const c_char,
    count_out: *mut usize,
) -> c_int {
    register_and_count(handle, count_out, |registry| {
        registry.add_gguf(&PathBuf::from(text(path, "path")?))
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_registry_load_gguf(
    handle: *mut RegistryHandle,
    path: *const c_char,
    file_backed: c_int,
    count_out: *mut usize,
) -> c_int {
    register_and_count(handle, count_out, |registry| {
        registry.load_gguf(&PathBuf::from(text(path, "path")?), file_backed != 0)
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_registry_add_file_backed(
    handle: *mut RegistryHandle,
    ctx: *mut sys::ggml_context,
    path: *const c_char,
    count_out: *mut usize,
) -> c_int {
    register_and_count(handle, count_out, |registry| {
        let path = PathBuf::from(text(path, "path")?);
        // SAFETY: the header requires a valid context whose tensors outlive the registry.
        unsafe { registry.add_file_backed_context(ctx, &path) }
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_registry_add_descriptor(
    handle: *mut RegistryHandle,
    name: *const c_char,
    ggml_type: c_int,
    n_dims: c_int,
    ne: *const i64,
    id_out: *mut u64,
) -> c_int {
    boundary(|| {
        let mut state = registry(handle)?;
        let name = text(name, "name")?;
        if !(1..=4).contains(&n_dims) {
            return Err(Error::invalid(format!("n_dims {n_dims} must be 1..4")));
        }
        if ne.is_null() {
            return Err(Error::new(Status::NullPointer, "ne is NULL"));
        }
        // SAFETY: the header requires `ne` to hold n_dims values.
        let ne = unsafe { std::slice::from_raw_parts(ne, n_dims as usize) };
        if ne.iter().any(|&d| d <= 0) {
            return Err(Error::invalid(format!(
                "tensor '{name}': dimensions {ne:?} must be positive"
            )));
        }
        let dims: Vec<u64> = ne.iter().map(|&d| d as u64).collect();
        let ty = u32::try_from(ggml_type)
            .map_err(|_| Error::invalid(format!("ggml type {ggml_type} is invalid")))?;
        let bytes = crate::gguf::tensor_bytes(ty, &dims)
            .map_err(|e| Error::invalid(format!("tensor '{name}': {}", e.message)))?;
        let id = state.registry.add(TensorDesc {
            name,
            ggml_type: ty,
            dims: &dims,
            bytes,
            source: Source::Descriptor,
            location: Location::Host,
        })?;
        if let Some(slot) = unsafe_out(id_out) {
            *slot = id.0;
        }
        Ok(())
    })
}

macro_rules! registry_getter {
    ($name:ident, $ty:ty, |$reg:ident| $body:expr) => {
        #[no_mangle]
        pub extern "C" fn $name(handle: *mut RegistryHandle, value_out: *mut $ty) -> c_int {
            boundary(|| {
                let mut state = registry(handle)?;
                let slot = out(value_out, "value_out")?;
                let $reg = &mut state.registry;
                *slot = $body;
                Ok(())
            })
        }
    };
}

registry_getter!(offload_engine_registry_tensor_count, usize, |r| r
    .tensor_count());
registry_getter!(offload_engine_registry_layer_count, usize, |r| r
    .layer_count());
registry_getter!(offload_engine_registry_global_bytes, u64, |r| r
    .global_bytes());
registry_getter!(offload_engine_registry_total_bytes, u64, |r| r
    .total_bytes());

#[no_mangle]
pub extern "C" fn offload_engine_registry_architecture(
    handle: *mut RegistryHandle,
    name_out: *mut *const c_char,
) -> c_int {
    boundary(|| {
        let mut state = registry(handle)?;
        let slot = out(name_out, "name_out")?;
        let arch = state.registry.architecture();
        *slot = state.keep(&arch);
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_registry_find(
    handle: *mut RegistryHandle,
    name: *const c_char,
    id_out: *mut u64,
) -> c_int {
    boundary(|| {
        let state = registry(handle)?;
        let name = text(name, "name")?;
        let slot = out(id_out, "id_out")?;
        *slot = state.registry.find(name)?.0;
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_registry_tensor_info(
    handle: *mut RegistryHandle,
    id: u64,
    info_out: *mut TensorInfo,
) -> c_int {
    boundary(|| {
        let mut state = registry(handle)?;
        let slot = result_slot(info_out, "tensor info")?;
        let id = TensorId(id);
        let layer = state.registry.layer_of(id)?.map(|l| l as i64).unwrap_or(-1);
        let entry = state.registry.tensor(id)?.clone();
        let mut ne = [1i64; 4];
        for (dst, src) in ne.iter_mut().zip(entry.dims.iter()) {
            *dst = *src as i64;
        }
        let name = state.keep(&entry.name);
        let component = state.keep(entry.component.as_str());
        *slot = TensorInfo {
            size: std::mem::size_of::<TensorInfo>(),
            name,
            ggml_type: entry.ggml_type as c_int,
            n_dims: c_int::from(entry.n_dims),
            ne,
            bytes: entry.bytes,
            layer,
            location: location_code(entry.location),
            component,
        };
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_registry_layer_info(
    handle: *mut RegistryHandle,
    layer: u64,
    info_out: *mut LayerInfo,
) -> c_int {
    boundary(|| {
        let mut state = registry(handle)?;
        let slot = result_slot(info_out, "layer info")?;
        let l = state
            .registry
            .layer(usize::try_from(layer).unwrap_or(usize::MAX))?
            .clone();
        let name = state.keep(&l.name);
        let component = state.keep(l.component.as_str());
        *slot = LayerInfo {
            size: std::mem::size_of::<LayerInfo>(),
            name,
            tensor_count: l.tensors.len() as u64,
            bytes: l.bytes,
            location: location_code(l.location),
            component,
        };
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_registry_layer_tensors(
    handle: *mut RegistryHandle,
    layer: u64,
    ids_out: *mut u64,
    capacity: usize,
    count_out: *mut usize,
) -> c_int {
    boundary(|| {
        let mut state = registry(handle)?;
        let count_slot = out(count_out, "count_out")?;
        let l = state
            .registry
            .layer(usize::try_from(layer).unwrap_or(usize::MAX))?;
        let n = l.tensors.len();
        if n > 0 && ids_out.is_null() {
            return Err(Error::new(Status::NullPointer, "ids_out is NULL"));
        }
        if capacity < n {
            return Err(Error::invalid(format!(
                "layer {layer} has {n} tensors but the array holds {capacity} (query with capacity 0 is not enough)"
            )));
        }
        if n > 0 {
            // SAFETY: the caller provides `capacity` >= n writable u64s at `ids_out`.
            let ids = unsafe { std::slice::from_raw_parts_mut(ids_out, n) };
            for (dst, src) in ids.iter_mut().zip(&l.tensors) {
                *dst = src.0;
            }
        }
        *count_slot = n;
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Plans
// ---------------------------------------------------------------------------------------

#[repr(C)]
pub struct PlanParams {
    pub size: usize,
    pub free_bytes: u64,
    pub total_bytes: u64,
    pub min_free_bytes: u64,
    pub safety_fraction: f64,
    pub compute_reserve_bytes: u64,
    pub persistent_bytes: u64,
    pub steps: u32,
    pub passes_per_step: u32,
    pub prefetch_depth: u32,
    pub link: *const c_char,
    pub link_gbps: f64,
}

#[repr(C)]
pub struct PlanSummary {
    pub size: usize,
    pub mode: c_int,
    pub resident_layer_count: u64,
    pub streamed_layer_count: u64,
    pub slot_count: u32,
    pub slot_bytes: u64,
    pub arena_bytes: u64,
    pub device_bytes: u64,
    pub usable_bytes: u64,
    pub full_cache_bytes: u64,
    pub streaming_bytes: u64,
    pub layer_bytes_max: u64,
    pub bytes_per_pass: u64,
    pub bytes_per_step: u64,
    pub bytes_per_run: u64,
    pub predicted_step_seconds: f64,
}

pub struct PlanHandle {
    plan: Plan,
    message: CString,
    layer_count: usize,
}

fn plan_inputs(params: *const PlanParams) -> Result<(Budget, Workload, Link)> {
    let p = input(params, "plan params")?;
    let mut budget = Budget::from_free(p.free_bytes);
    budget.total_bytes = p.total_bytes.max(p.free_bytes);
    budget.min_free_bytes = p.min_free_bytes;
    budget.safety_fraction = p.safety_fraction;
    budget.compute_reserve_bytes = p.compute_reserve_bytes;
    budget.persistent_bytes = p.persistent_bytes;
    let workload = Workload {
        steps: p.steps,
        passes_per_step: p.passes_per_step,
        prefetch_depth: p.prefetch_depth,
        ..Workload::default()
    };
    let link = if p.link_gbps != 0.0 {
        Link::from_gbps(p.link_gbps)?
    } else {
        Link::named(optional_text(p.link, "link")?.unwrap_or("pcie4-x16"))?
    };
    Ok((budget, workload, link))
}

fn publish_plan(plan: Plan, layer_count: usize, plan_out: *mut *mut PlanHandle) -> Result<()> {
    let slot = out(plan_out, "plan_out")?;
    let message = CString::new(plan.message.replace('\0', " ")).unwrap_or_default();
    *slot = publish(
        PlanHandle {
            plan,
            message,
            layer_count,
        },
        Kind::Plan,
    );
    Ok(())
}

#[no_mangle]
pub extern "C" fn offload_engine_plan_params_init(params: *mut PlanParams) {
    boundary_void(|| {
        if let Ok(p) = out(params, "params") {
            let workload = Workload::default();
            *p = PlanParams {
                size: std::mem::size_of::<PlanParams>(),
                free_bytes: 0,
                total_bytes: 0,
                min_free_bytes: 512 << 20,
                safety_fraction: 0.90,
                compute_reserve_bytes: 0,
                persistent_bytes: 0,
                steps: workload.steps,
                passes_per_step: workload.passes_per_step,
                prefetch_depth: workload.prefetch_depth,
                link: std::ptr::null(),
                link_gbps: 0.0,
            };
        }
    });
}

#[no_mangle]
pub extern "C" fn offload_engine_plan_new(
    handle: *mut RegistryHandle,
    params: *const PlanParams,
    plan_out: *mut *mut PlanHandle,
) -> c_int {
    boundary(|| {
        let mut state = registry(handle)?;
        let (budget, workload, link) = plan_inputs(params)?;
        out(plan_out, "plan_out")?;
        let model = state.registry.model_cost();
        let plan = planner::plan(&model, &budget, &workload, &link)?.into_result()?;
        publish_plan(plan, model.layers.len(), plan_out)
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_plan_free(plan: *mut PlanHandle) {
    boundary_void(|| retire(plan, Kind::Plan));
}

#[no_mangle]
pub extern "C" fn offload_engine_plan_get_summary(
    plan: *const PlanHandle,
    summary_out: *mut PlanSummary,
) -> c_int {
    boundary(|| {
        let h = checked(plan, Kind::Plan)?;
        let slot = result_slot(summary_out, "plan summary")?;
        let p = &h.plan;
        *slot = PlanSummary {
            size: std::mem::size_of::<PlanSummary>(),
            mode: p.mode as c_int,
            resident_layer_count: p.resident_layers.len() as u64,
            streamed_layer_count: p.streamed_layers.len() as u64,
            slot_count: p.slot_count,
            slot_bytes: p.slot_bytes,
            arena_bytes: p.arena_bytes,
            device_bytes: p.device_bytes,
            usable_bytes: p.usable_bytes,
            full_cache_bytes: p.full_cache_bytes,
            streaming_bytes: p.streaming_bytes,
            layer_bytes_max: p.layer_bytes_max,
            bytes_per_pass: p.bytes_per_pass,
            bytes_per_step: p.bytes_per_step,
            bytes_per_run: p.bytes_per_run,
            predicted_step_seconds: p.predicted_step_seconds,
        };
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_plan_layer_resident(
    plan: *const PlanHandle,
    layer: u64,
    resident_out: *mut c_int,
) -> c_int {
    boundary(|| {
        let h = checked(plan, Kind::Plan)?;
        let slot = out(resident_out, "resident_out")?;
        let layer = usize::try_from(layer).unwrap_or(usize::MAX);
        if layer >= h.layer_count {
            return Err(Error::not_found(format!(
                "layer {layer} out of range (plan has {} layers)",
                h.layer_count
            )));
        }
        *slot = c_int::from(h.plan.resident_layers.contains(&layer));
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_plan_message(plan: *const PlanHandle) -> *const c_char {
    let mut result: *const c_char = c"".as_ptr();
    boundary_void(|| {
        if let Ok(h) = checked(plan, Kind::Plan) {
            result = h.message.as_ptr();
        }
    });
    result
}

// ---------------------------------------------------------------------------------------
// Engine
// ---------------------------------------------------------------------------------------

#[repr(C)]
pub struct EngineParamsC {
    pub size: usize,
    pub device: *const c_char,
    pub budget_bytes: u64,
    pub min_free_bytes: u64,
    pub safety_fraction: f64,
    pub prefetch_depth: u32,
    pub compute_threads: c_int,
    pub trace: c_int,
    pub pinned_limit_bytes: u64,
}

#[repr(C)]
pub struct StatsC {
    pub size: usize,
    pub passes: u64,
    pub layer_loads: u64,
    pub bytes_copied: u64,
    pub copy_us: u64,
    pub wait_us: u64,
    pub compute_us: u64,
    pub prefetch_hits: u64,
    pub prefetch_misses: u64,
    pub arena_bytes: u64,
    pub arena_peak_bytes: u64,
}

#[repr(C)]
pub struct LayerStatsC {
    pub size: usize,
    pub resident: c_int,
    pub loads: u64,
    pub bytes: u64,
    pub wait_us: u64,
    pub compute_us: u64,
    pub evict_us: u64,
}

pub struct EngineHandle {
    /// Declared first: dropped before the engine whose backend it borrows.
    executor: Mutex<Option<(StagedShape, Executor)>>,
    /// Shared with the pipelines the engine is a component of.
    inner: crate::pipeline::SharedEngine,
}

type StagedShape = [i64; 2];

fn engine<'a>(handle: *const EngineHandle) -> Result<std::sync::MutexGuard<'a, Engine>> {
    checked(handle, Kind::Engine)?.inner.lock()
}

#[no_mangle]
pub extern "C" fn offload_engine_engine_params_init(params: *mut EngineParamsC) {
    boundary_void(|| {
        if let Ok(p) = out(params, "params") {
            let d = EngineParams::default();
            *p = EngineParamsC {
                size: std::mem::size_of::<EngineParamsC>(),
                device: std::ptr::null(),
                budget_bytes: 0,
                min_free_bytes: d.min_free_bytes,
                safety_fraction: d.safety_fraction,
                prefetch_depth: d.prefetch_depth,
                compute_threads: d.compute_threads,
                trace: 0,
                pinned_limit_bytes: u64::MAX,
            };
        }
    });
}

#[no_mangle]
pub extern "C" fn offload_engine_engine_new(
    params: *const EngineParamsC,
    registry_handle: *mut RegistryHandle,
    engine_out: *mut *mut EngineHandle,
) -> c_int {
    boundary(|| {
        let p = input(params, "engine params")?;
        let slot = out(engine_out, "engine_out")?;
        let source = registry(registry_handle)?;
        let params = EngineParams {
            device: optional_text(p.device, "device")?.map(str::to_string),
            budget_bytes: (p.budget_bytes > 0).then_some(p.budget_bytes),
            min_free_bytes: p.min_free_bytes,
            safety_fraction: p.safety_fraction,
            prefetch_depth: p.prefetch_depth,
            compute_threads: p.compute_threads,
            trace: p.trace != 0,
            pinned_limit_bytes: (p.pinned_limit_bytes != u64::MAX).then_some(p.pinned_limit_bytes),
            pattern: None,
        };
        let engine = Engine::with_registry(params, source.registry.clone())?;
        *slot = publish(
            EngineHandle {
                executor: Mutex::new(None),
                inner: crate::pipeline::EngineCell::new(engine),
            },
            Kind::Engine,
        );
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_engine_free(handle: *mut EngineHandle) {
    boundary_void(|| retire(handle, Kind::Engine));
}

#[no_mangle]
pub extern "C" fn offload_engine_engine_backend(
    handle: *mut EngineHandle,
    backend_out: *mut sys::ggml_backend_t,
) -> c_int {
    boundary(|| {
        let e = engine(handle)?;
        *out(backend_out, "backend_out")? = e.backend().raw();
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_engine_prepare(
    handle: *mut EngineHandle,
    params: *const PlanParams,
    plan_out: *mut *mut PlanHandle,
) -> c_int {
    boundary(|| {
        let mut e = engine(handle)?;
        if e.is_managed() {
            return Err(Error::state(
                "this engine is a pipeline component: the pipeline places it (stage_begin)",
            ));
        }
        let (mut budget_from_params, mut workload, link) = plan_inputs(params)?;
        // The engine's own depth; the plan params' depth is for simulations.
        workload.prefetch_depth = e.params().prefetch_depth;
        if budget_from_params.free_bytes > 0 && e.params().budget_bytes.is_none() {
            e.set_budget(budget_from_params.free_bytes);
        }
        budget_from_params.free_bytes = 0;
        e.set_reserve(
            budget_from_params
                .compute_reserve_bytes
                .saturating_add(budget_from_params.persistent_bytes),
        )?;
        let layer_count = e.layer_count();
        let plan = e.prepare(&workload, &link)?.clone();
        if !plan_out.is_null() {
            publish_plan(plan, layer_count, plan_out)?;
        }
        Ok(())
    })
}

macro_rules! engine_layer_call {
    ($name:ident, $method:ident) => {
        #[no_mangle]
        pub extern "C" fn $name(handle: *mut EngineHandle, layer: u64) -> c_int {
            boundary(|| engine(handle)?.$method(usize::try_from(layer).unwrap_or(usize::MAX)))
        }
    };
}

macro_rules! engine_call {
    ($name:ident, $method:ident) => {
        #[no_mangle]
        pub extern "C" fn $name(handle: *mut EngineHandle) -> c_int {
            boundary(|| engine(handle)?.$method())
        }
    };
}

engine_call!(offload_engine_engine_pass_begin, begin_pass);
engine_call!(offload_engine_engine_pass_end, end_pass);
engine_call!(offload_engine_engine_offload_all, offload_all);
engine_call!(offload_engine_engine_stats_reset, reset_stats);
engine_layer_call!(offload_engine_engine_layer_begin, begin_layer);
engine_layer_call!(offload_engine_engine_layer_end, end_layer);

#[no_mangle]
pub extern "C" fn offload_engine_engine_stats(
    handle: *mut EngineHandle,
    stats_out: *mut StatsC,
) -> c_int {
    boundary(|| {
        let e = engine(handle)?;
        let slot = result_slot(stats_out, "stats")?;
        let s = e.stats()?;
        *slot = StatsC {
            size: std::mem::size_of::<StatsC>(),
            passes: s.passes,
            layer_loads: s.layer_loads,
            bytes_copied: s.bytes_copied,
            copy_us: s.copy_us,
            wait_us: s.wait_us,
            compute_us: s.compute_us,
            prefetch_hits: s.prefetch_hits,
            prefetch_misses: s.prefetch_misses,
            arena_bytes: s.arena_bytes,
            arena_peak_bytes: s.arena_peak_bytes,
        };
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_engine_layer_stats(
    handle: *mut EngineHandle,
    layer: u64,
    stats_out: *mut LayerStatsC,
) -> c_int {
    boundary(|| {
        let e = engine(handle)?;
        let slot = result_slot(stats_out, "layer stats")?;
        let s = e.stats()?;
        let host_layers = s.layers.len().saturating_sub(1); // the last image is the global group
        let l = usize::try_from(layer)
            .ok()
            .filter(|&l| l < host_layers)
            .and_then(|l| s.layers.get(l))
            .ok_or_else(|| {
                Error::not_found(format!(
                    "layer {layer} out of range (model has {host_layers} layers)"
                ))
            })?;
        *slot = LayerStatsC {
            size: std::mem::size_of::<LayerStatsC>(),
            resident: c_int::from(l.resident),
            loads: l.loads,
            bytes: l.bytes,
            wait_us: l.wait_us,
            compute_us: l.compute_us,
            evict_us: l.evict_us,
        };
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_engine_trace_write(
    handle: *mut EngineHandle,
    path: *const c_char,
) -> c_int {
    boundary(|| {
        let e = engine(handle)?;
        let path = PathBuf::from(text(path, "path")?);
        e.write_trace(&path)
    })
}

// ---------------------------------------------------------------------------------------
// The three-stage executor
// ---------------------------------------------------------------------------------------

type BuildInput =
    unsafe extern "C" fn(user: *mut c_void, ctx: *mut sys::ggml_context) -> *mut sys::ggml_tensor;
type SetInputs = unsafe extern "C" fn(user: *mut c_void) -> c_int;
type BuildLayer = unsafe extern "C" fn(
    user: *mut c_void,
    ctx: *mut sys::ggml_context,
    layer: u64,
    x: *mut sys::ggml_tensor,
) -> *mut sys::ggml_tensor;
type BuildOutput = unsafe extern "C" fn(
    user: *mut c_void,
    ctx: *mut sys::ggml_context,
    x: *mut sys::ggml_tensor,
) -> *mut sys::ggml_tensor;

#[repr(C)]
pub struct StagedModelC {
    pub size: usize,
    pub user: *mut c_void,
    pub layer_count: u64,
    pub activation_ne: [i64; 2],
    pub build_input: Option<BuildInput>,
    pub set_inputs: Option<SetInputs>,
    pub build_layer: Option<BuildLayer>,
    pub build_output: Option<BuildOutput>,
}

/// A host's C callbacks seen as a `LayeredModel`.
struct CallbackModel<'a> {
    model: &'a StagedModelC,
    build_input: BuildInput,
    build_layer: BuildLayer,
    build_output: BuildOutput,
}

impl LayeredModel for CallbackModel<'_> {
    fn layer_count(&self) -> usize {
        self.model.layer_count as usize
    }

    fn activation_shape(&self) -> [i64; 2] {
        self.model.activation_ne
    }

    fn after_input_alloc(&self) -> Result<()> {
        let Some(set_inputs) = self.model.set_inputs else {
            return Ok(());
        };
        // SAFETY: the host's callback with the user pointer it gave us.
        let status = unsafe { set_inputs(self.model.user) };
        if status == 0 {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "the host's set_inputs callback failed ({status})"
            )))
        }
    }

    unsafe fn build_input(
        &self,
        ctx: *mut sys::ggml_context,
    ) -> (*mut sys::ggml_tensor, Vec<InputFill>) {
        // SAFETY: the host's callback; the executor checks what it returns.
        (
            unsafe { (self.build_input)(self.model.user, ctx) },
            Vec::new(),
        )
    }

    unsafe fn build_layer(
        &self,
        ctx: *mut sys::ggml_context,
        layer: usize,
        x: *mut sys::ggml_tensor,
    ) -> *mut sys::ggml_tensor {
        // SAFETY: as above.
        unsafe { (self.build_layer)(self.model.user, ctx, layer as u64, x) }
    }

    unsafe fn build_output(
        &self,
        ctx: *mut sys::ggml_context,
        x: *mut sys::ggml_tensor,
    ) -> *mut sys::ggml_tensor {
        // SAFETY: as above.
        unsafe { (self.build_output)(self.model.user, ctx, x) }
    }
}

#[no_mangle]
pub extern "C" fn offload_engine_engine_run_pass(
    handle: *mut EngineHandle,
    model: *const StagedModelC,
    output: *mut c_void,
    output_capacity: usize,
    output_size_out: *mut usize,
) -> c_int {
    boundary(|| {
        let h = checked(handle, Kind::Engine)?;
        let mut engine = h.inner.lock()?;
        let mut cached = lock(&h.executor)?;
        let model = input(model, "staged model")?;
        let (Some(build_input), Some(build_layer), Some(build_output)) =
            (model.build_input, model.build_layer, model.build_output)
        else {
            return Err(Error::new(
                Status::NullPointer,
                "build_input, build_layer and build_output are required",
            ));
        };
        let layers = engine.layer_count() as u64;
        if model.layer_count != layers {
            return Err(Error::invalid(format!(
                "the model declares {} layers but the engine registered {layers}",
                model.layer_count
            )));
        }
        let shape = model.activation_ne;
        if cached.as_ref().is_none_or(|(s, _)| *s != shape) {
            *cached = None; // the old executor's buffers go before new ones are made
            *cached = Some((shape, Executor::new(engine.backend(), shape)?));
        }
        let executor = &mut cached.as_mut().expect("set above").1;
        let adapter = CallbackModel {
            model,
            build_input,
            build_layer,
            build_output,
        };
        let result = executor.run_pass(&adapter, Some(&mut engine))?;
        if !output.is_null() {
            if output_capacity < result.len() {
                return Err(Error::invalid(format!(
                    "the output needs {} bytes but the buffer holds {output_capacity}",
                    result.len()
                )));
            }
            // SAFETY: the caller provides `output_capacity` writable bytes at `output`.
            unsafe {
                std::ptr::copy_nonoverlapping(result.as_ptr(), output.cast::<u8>(), result.len())
            };
        }
        if let Some(slot) = unsafe_out(output_size_out) {
            *slot = result.len();
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Measurements for the planner
// ---------------------------------------------------------------------------------------

#[no_mangle]
pub extern "C" fn offload_engine_engine_measure_link(
    handle: *mut EngineHandle,
    bytes: u64,
    pageable_gbps_out: *mut f64,
    pinned_gbps_out: *mut f64,
) -> c_int {
    boundary(|| {
        let e = engine(handle)?;
        let pageable_slot = out(pageable_gbps_out, "pageable_gbps_out")?;
        let (pageable, pinned) = crate::engine::measure_link(e.device(), bytes)?;
        *pageable_slot = pageable / 1e9;
        if let Some(slot) = unsafe_out(pinned_gbps_out) {
            *slot = pinned.unwrap_or(0.0) / 1e9;
        }
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_engine_measure_graph(
    handle: *mut EngineHandle,
    graph: *mut sys::ggml_cgraph,
    bytes_out: *mut u64,
) -> c_int {
    boundary(|| {
        let e = engine(handle)?;
        let slot = out(bytes_out, "bytes_out")?;
        // SAFETY: the header requires a valid graph built by the host.
        *slot = unsafe { e.measure_graph(graph)? };
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_engine_tensor_set(
    handle: *mut EngineHandle,
    name: *const c_char,
    data: *const c_void,
    offset: u64,
    size: u64,
) -> c_int {
    boundary(|| {
        let mut e = engine(handle)?;
        let name = text(name, "name")?;
        if data.is_null() && size > 0 {
            return Err(Error::new(Status::NullPointer, "data is NULL"));
        }
        let len = usize::try_from(size).map_err(|_| Error::invalid("size too large"))?;
        let bytes = if len == 0 {
            &[][..]
        } else {
            // SAFETY: the caller provides `size` readable bytes at `data` (checked non-NULL).
            unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) }
        };
        e.update_tensor(name, offset, bytes)
    })
}

// ---------------------------------------------------------------------------------------
// Pipelines
// ---------------------------------------------------------------------------------------

use crate::pipeline::{OffloadMode, Override, Pipeline, PipelineParams, Placement, Role};

#[repr(C)]
pub struct PipelineParamsC {
    pub size: usize,
    pub offload_mode: c_int,
    pub budget_bytes: u64,
    pub min_free_bytes: u64,
    pub margin_bytes: u64,
    pub prefetch_depth: u32,
    pub steps: u32,
    pub passes_per_step: u32,
    pub reload_diffusion: c_int,
    pub log_moves: c_int,
}

#[repr(C)]
pub struct ComponentInfoC {
    pub size: usize,
    pub name: *const c_char,
    pub role: c_int,
    pub placement: c_int,
    pub device_bytes: u64,
    pub resident_bytes: u64,
    pub stage_need_bytes: u64,
    pub loads: u64,
    pub unloads: u64,
    pub streamed_layers: u64,
}

#[repr(C)]
pub struct PipelineStatsC {
    pub size: usize,
    /// Laid out exactly as the header's fields after `size` (all u64).
    pub stats: crate::pipeline::PipelineStats,
}

pub struct PipelineHandle {
    inner: Mutex<PipelineState>,
}

struct PipelineState {
    pipeline: Pipeline,
    /// Backs the `name` of the last component_info.
    last_name: CString,
}

fn pipeline<'a>(handle: *const PipelineHandle) -> Result<std::sync::MutexGuard<'a, PipelineState>> {
    lock(&checked(handle, Kind::Pipeline)?.inner)
}

#[no_mangle]
pub extern "C" fn offload_engine_pipeline_params_init(params: *mut PipelineParamsC) {
    boundary_void(|| {
        if let Ok(p) = out(params, "params") {
            let d = PipelineParams::default();
            *p = PipelineParamsC {
                size: std::mem::size_of::<PipelineParamsC>(),
                offload_mode: 0,
                budget_bytes: 0,
                min_free_bytes: d.min_free_bytes,
                margin_bytes: d.margin_bytes,
                prefetch_depth: d.prefetch_depth,
                steps: d.steps,
                passes_per_step: d.passes_per_step,
                reload_diffusion: c_int::from(d.reload_diffusion),
                log_moves: 0,
            };
        }
    });
}

#[no_mangle]
pub extern "C" fn offload_engine_pipeline_new(
    params: *const PipelineParamsC,
    pipeline_out: *mut *mut PipelineHandle,
) -> c_int {
    boundary(|| {
        let p = input(params, "pipeline params")?;
        let slot = out(pipeline_out, "pipeline_out")?;
        let mode = OffloadMode::from_code(p.offload_mode).ok_or_else(|| {
            Error::invalid(format!(
                "offload mode {} is not one of 0..4",
                p.offload_mode
            ))
        })?;
        let pipeline = Pipeline::new(PipelineParams {
            mode,
            budget_bytes: (p.budget_bytes > 0).then_some(p.budget_bytes),
            min_free_bytes: p.min_free_bytes,
            margin_bytes: p.margin_bytes,
            prefetch_depth: p.prefetch_depth,
            steps: p.steps,
            passes_per_step: p.passes_per_step,
            reload_diffusion: p.reload_diffusion != 0,
            log_moves: p.log_moves != 0,
        })?;
        *slot = publish(
            PipelineHandle {
                inner: Mutex::new(PipelineState {
                    pipeline,
                    last_name: CString::default(),
                }),
            },
            Kind::Pipeline,
        );
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_pipeline_free(handle: *mut PipelineHandle) {
    boundary_void(|| retire(handle, Kind::Pipeline));
}

#[no_mangle]
pub extern "C" fn offload_engine_pipeline_add(
    handle: *mut PipelineHandle,
    name: *const c_char,
    role: c_int,
    engine_handle: *mut EngineHandle,
) -> c_int {
    boundary(|| {
        let mut state = pipeline(handle)?;
        let name = text(name, "name")?;
        let role = Role::from_code(role)
            .ok_or_else(|| Error::invalid(format!("component role {role} is not one of 0..5")))?;
        let engine = checked(engine_handle, Kind::Engine)?.inner.clone();
        state.pipeline.add(name, role, engine)
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_pipeline_set_override(
    handle: *mut PipelineHandle,
    name: *const c_char,
    override_: c_int,
) -> c_int {
    boundary(|| {
        let mut state = pipeline(handle)?;
        let value = Override::from_code(override_).ok_or_else(|| {
            Error::invalid(format!("placement override {override_} is not one of 0..2"))
        })?;
        state.pipeline.set_override(text(name, "name")?, value)
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_pipeline_set_stage_need(
    handle: *mut PipelineHandle,
    name: *const c_char,
    bytes: u64,
) -> c_int {
    boundary(|| {
        let mut state = pipeline(handle)?;
        state.pipeline.set_stage_need(text(name, "name")?, bytes)
    })
}

macro_rules! pipeline_call {
    ($name:ident, $method:ident) => {
        #[no_mangle]
        pub extern "C" fn $name(handle: *mut PipelineHandle) -> c_int {
            boundary(|| pipeline(handle)?.pipeline.$method())
        }
    };
}

macro_rules! pipeline_stage_call {
    ($name:ident, $method:ident) => {
        #[no_mangle]
        pub extern "C" fn $name(handle: *mut PipelineHandle, name: *const c_char) -> c_int {
            boundary(|| {
                let mut state = pipeline(handle)?;
                state.pipeline.$method(text(name, "name")?)
            })
        }
    };
}

pipeline_call!(offload_engine_pipeline_run_begin, run_begin);
pipeline_call!(offload_engine_pipeline_run_end, run_end);
pipeline_stage_call!(offload_engine_pipeline_stage_begin, stage_begin);
pipeline_stage_call!(offload_engine_pipeline_stage_end, stage_end);

#[no_mangle]
pub extern "C" fn offload_engine_pipeline_component_info(
    handle: *mut PipelineHandle,
    name: *const c_char,
    info_out: *mut ComponentInfoC,
) -> c_int {
    boundary(|| {
        let mut state = pipeline(handle)?;
        let slot = result_slot(info_out, "component info")?;
        let info = state.pipeline.component(text(name, "name")?)?;
        state.last_name = CString::new(info.name.replace('\0', " ")).unwrap_or_default();
        *slot = ComponentInfoC {
            size: slot.size,
            name: state.last_name.as_ptr(),
            role: info.role as c_int,
            placement: match info.placement {
                Placement::Off => 0,
                Placement::Resident => 1,
                Placement::Streaming => 2,
            },
            device_bytes: info.device_bytes,
            resident_bytes: info.resident_bytes,
            stage_need_bytes: info.stage_need_bytes,
            loads: info.loads,
            unloads: info.unloads,
            streamed_layers: info.streamed_layers,
        };
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_pipeline_get_stats(
    handle: *mut PipelineHandle,
    stats_out: *mut PipelineStatsC,
) -> c_int {
    boundary(|| {
        let state = pipeline(handle)?;
        let slot = result_slot(stats_out, "pipeline stats")?;
        slot.stats = state.pipeline.stats();
        Ok(())
    })
}
