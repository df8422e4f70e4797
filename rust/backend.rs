//! Owned wrappers over the ggml backend objects the engine uses: devices, backend streams,
//! buffers and events. All raw ggml calls of the streaming path go through here, and each
//! checks its inputs first, because a failed `GGML_ASSERT` aborts the host's whole process.

use std::ffi::{CStr, CString};
use std::ptr::NonNull;

use crate::error::{Error, Result, Status};
use crate::ggml as sys;

/// Makes the backends that ggml can offer available (loads modules when built with them).
fn ensure_backends_loaded() {
    static LOADED: once_cell::sync::OnceCell<()> = once_cell::sync::OnceCell::new();
    LOADED.get_or_init(|| {
        // A directory of backend modules built apart from this library (a GPU machine that
        // builds only its backend) comes first.
        if let Some(dir) = std::env::var_os("OFFLOAD_ENGINE_BACKEND_DIR") {
            use std::os::unix::ffi::OsStrExt;
            if let Ok(dir) = CString::new(dir.as_bytes()) {
                // SAFETY: a NUL-terminated path; ggml skips files that are not its modules.
                unsafe { sys::ggml_backend_load_all_from_path(dir.as_ptr()) };
            }
        } else if cfg!(feature = "dynamic-backends")
            || std::env::var_os("GGML_BACKEND_PATH").is_some()
        {
            // SAFETY: takes no arguments; loads backend modules found next to the program.
            unsafe { sys::ggml_backend_load_all() };
        }
    });
}

fn c_str(ptr: *const std::os::raw::c_char) -> String {
    if ptr.is_null() {
        return String::new();
    }
    // SAFETY: ggml returns NUL-terminated strings that live as long as the device registry.
    unsafe { CStr::from_ptr(ptr) }
        .to_string_lossy()
        .into_owned()
}

/// An owned ggml context (tensor metadata, and their data unless `no_alloc`). Its memory is
/// ours: a failed allocation is an error here, where ggml's own would abort the process.
pub struct Context {
    raw: NonNull<sys::ggml_context>,
    /// Backs the context; u128 for ggml's 16-byte alignment. Dropped after the context.
    _memory: Vec<u128>,
}

impl Context {
    pub fn new(bytes: usize, no_alloc: bool) -> Result<Context> {
        let words = bytes.div_ceil(16).max(1);
        let mut memory: Vec<u128> = Vec::new();
        memory.try_reserve_exact(words).map_err(|_| {
            Error::new(
                Status::OutOfMemory,
                format!("cannot allocate {bytes} bytes for a ggml context"),
            )
        })?;
        // The capacity is ggml's to write (the length stays 0: Rust never reads it).
        let params = sys::ggml_init_params {
            mem_size: words * 16,
            mem_buffer: memory.as_mut_ptr().cast(),
            no_alloc,
        };
        // SAFETY: the reserved capacity holds mem_size bytes, 16-byte aligned, and outlives the
        // context (dropped after it).
        NonNull::new(unsafe { sys::ggml_init(params) })
            .map(|raw| Context {
                raw,
                _memory: memory,
            })
            .ok_or_else(|| Error::new(Status::OutOfMemory, "cannot create a ggml context"))
    }

    pub fn raw(&self) -> *mut sys::ggml_context {
        self.raw.as_ptr()
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: we own the context; whoever used its tensors is gone before the owner drops.
        unsafe { sys::ggml_free(self.raw()) };
    }
}

// SAFETY: a ggml context is plain memory owned by this value; ggml keeps no thread affinity.
unsafe impl Send for Context {}
// SAFETY: shared references only hand out the raw pointer; mutation goes through ggml calls
// that the owner serialises.
unsafe impl Sync for Context {}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    Cpu,
    Gpu,
    IntegratedGpu,
    Accelerator,
}

/// A ggml device (registered devices live for the whole process).
#[derive(Debug, Clone)]
pub struct Device {
    raw: sys::ggml_backend_dev_t,
    pub name: String,
    pub description: String,
    pub kind: DeviceKind,
    /// The device can run copies asynchronously from pinned memory and has events.
    pub async_copies: bool,
    /// The device offers a pinned host buffer type.
    pub pinned_host: bool,
}

// SAFETY: ggml device handles are process-wide registry entries, safe to use from any thread.
unsafe impl Send for Device {}
// SAFETY: see Send; the handle is never mutated through this type.
unsafe impl Sync for Device {}

impl Device {
    fn from_raw(raw: sys::ggml_backend_dev_t) -> Device {
        let mut props: sys::ggml_backend_dev_props = unsafe {
            // SAFETY: a plain C struct of pointers, sizes, an enum and bools; all-zero is valid.
            std::mem::zeroed()
        };
        // SAFETY: `raw` came from ggml's device registry and `props` is a valid out-pointer.
        unsafe { sys::ggml_backend_dev_get_props(raw, &mut props) };
        let kind = match props.type_ {
            sys::GGML_BACKEND_DEVICE_TYPE_CPU => DeviceKind::Cpu,
            sys::GGML_BACKEND_DEVICE_TYPE_GPU => DeviceKind::Gpu,
            sys::GGML_BACKEND_DEVICE_TYPE_IGPU => DeviceKind::IntegratedGpu,
            _ => DeviceKind::Accelerator,
        };
        Device {
            raw,
            name: c_str(props.name),
            description: c_str(props.description),
            kind,
            async_copies: props.caps.async_ && props.caps.events,
            pinned_host: props.caps.host_buffer,
        }
    }

    /// All devices ggml offers, in registry order.
    pub fn all() -> Vec<Device> {
        ensure_backends_loaded();
        // SAFETY: registry queries with in-range indices.
        let count = unsafe { sys::ggml_backend_dev_count() };
        (0..count)
            .map(|i| Device::from_raw(unsafe { sys::ggml_backend_dev_get(i) }))
            .collect()
    }

    /// `name` picks a device by its ggml name (case-insensitive, e.g. "CPU", "CUDA0",
    /// "Vulkan0"); `None` picks the first GPU, else the CPU.
    pub fn select(name: Option<&str>) -> Result<Device> {
        let devices = Device::all();
        let found = match name {
            Some(wanted) => devices
                .iter()
                .find(|d| d.name.eq_ignore_ascii_case(wanted))
                .cloned(),
            None => devices
                .iter()
                .find(|d| matches!(d.kind, DeviceKind::Gpu | DeviceKind::IntegratedGpu))
                .or_else(|| devices.iter().find(|d| d.kind == DeviceKind::Cpu))
                .cloned(),
        };
        found.ok_or_else(|| {
            let names: Vec<_> = devices.iter().map(|d| d.name.as_str()).collect();
            Error::not_found(format!(
                "no ggml device {:?}; available: {}",
                name.unwrap_or("(any)"),
                names.join(", ")
            ))
        })
    }

    pub fn raw(&self) -> sys::ggml_backend_dev_t {
        self.raw
    }

    /// (free, total) bytes as the device reports them now. The CPU device's memory is the
    /// process's: inside a memory cgroup, the limit and what the group uses bound it.
    pub fn memory(&self) -> (u64, u64) {
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: valid device handle and out-pointers.
        unsafe { sys::ggml_backend_dev_memory(self.raw, &mut free, &mut total) };
        let (mut free, mut total) = (free as u64, total as u64);
        if self.kind == DeviceKind::Cpu {
            if let Some((limit, usage)) = cgroup_memory() {
                total = total.min(limit);
                free = free.min(limit.saturating_sub(usage));
            }
        }
        (free, total)
    }

    /// A new backend instance (its own stream on GPUs).
    pub fn init_backend(&self) -> Result<Backend> {
        // SAFETY: valid device; NULL params asks for the defaults.
        let raw = unsafe { sys::ggml_backend_dev_init(self.raw, std::ptr::null()) };
        NonNull::new(raw)
            .map(|raw| Backend { raw, owned: true })
            .ok_or_else(|| {
                Error::new(
                    Status::Backend,
                    format!("cannot start a ggml backend on {}", self.name),
                )
            })
    }

    /// Allocates device memory (the arena). Fails cleanly when the device is out of memory.
    pub fn alloc(&self, bytes: u64) -> Result<Buffer> {
        Buffer::alloc(self.buffer_type(), bytes, &self.name)
    }

    /// The device's own buffer type (host memory for the CPU device).
    pub fn buffer_type(&self) -> sys::ggml_backend_buffer_type_t {
        // SAFETY: valid device handle.
        unsafe { sys::ggml_backend_dev_buffer_type(self.raw) }
    }

    /// The device's pinned host buffer type, if it has one.
    pub fn pinned_buffer_type(&self) -> Option<sys::ggml_backend_buffer_type_t> {
        if !self.pinned_host {
            return None;
        }
        // SAFETY: valid device handle.
        let buft = unsafe { sys::ggml_backend_dev_host_buffer_type(self.raw) };
        (!buft.is_null()).then_some(buft)
    }

    /// Allocates pinned host memory, or `None` when the device has no pinned buffer type.
    pub fn alloc_pinned(&self, bytes: u64) -> Option<Result<Buffer>> {
        if !self.pinned_host {
            return None;
        }
        // SAFETY: valid device handle.
        let buft = unsafe { sys::ggml_backend_dev_host_buffer_type(self.raw) };
        if buft.is_null() {
            return None;
        }
        Some(Buffer::alloc(buft, bytes, "pinned host"))
    }
}

/// A backend instance (a compute or copy stream). Borrowed ones are not freed.
#[derive(Debug)]
pub struct Backend {
    raw: NonNull<sys::ggml_backend>,
    owned: bool,
}

// SAFETY: a ggml backend may be used from another thread as long as one thread at a time
// uses it; the engine gives each backend to exactly one thread at a time.
unsafe impl Send for Backend {}

impl Backend {
    /// Wraps a backend the host owns; it is never freed here.
    pub fn borrowed(raw: sys::ggml_backend_t) -> Result<Backend> {
        NonNull::new(raw)
            .map(|raw| Backend { raw, owned: false })
            .ok_or_else(|| Error::new(Status::NullPointer, "backend is NULL"))
    }

    pub fn raw(&self) -> sys::ggml_backend_t {
        self.raw.as_ptr()
    }

    /// Compute threads, for backends that have them (the CPU). Found through the backend's
    /// registry, so it works whether the CPU backend is linked in or loaded as a module.
    pub fn set_threads(&self, threads: i32) {
        // SAFETY: valid backend; its device and registry live as long as the process.
        let proc_address = unsafe {
            let device = sys::ggml_backend_get_device(self.raw());
            let registry = if device.is_null() {
                std::ptr::null_mut()
            } else {
                sys::ggml_backend_dev_backend_reg(device)
            };
            if registry.is_null() {
                return;
            }
            sys::ggml_backend_reg_get_proc_address(registry, c"ggml_backend_set_n_threads".as_ptr())
        };
        if proc_address.is_null() {
            return;
        }
        // SAFETY: ggml documents this name's address as a `ggml_backend_set_n_threads_t`.
        let set: sys::ggml_backend_set_n_threads_t = unsafe {
            std::mem::transmute::<*mut std::ffi::c_void, sys::ggml_backend_set_n_threads_t>(
                proc_address,
            )
        };
        if let Some(set) = set {
            // SAFETY: the function belongs to this backend's registry; the backend is valid.
            unsafe { set(self.raw(), threads.max(1)) };
        }
    }

    pub fn synchronize(&self) {
        // SAFETY: valid backend.
        unsafe { sys::ggml_backend_synchronize(self.raw()) };
    }

    /// Computes a graph whose tensors all have memory; returns ggml's failure as an error.
    ///
    /// # Safety
    /// `graph` must be a valid graph whose tensors are allocated in buffers this backend can use.
    pub unsafe fn compute(&self, graph: *mut sys::ggml_cgraph) -> Result<()> {
        // SAFETY: the caller guarantees the graph is valid and allocated.
        let status = unsafe { sys::ggml_backend_graph_compute(self.raw(), graph) };
        if status == sys::GGML_STATUS_SUCCESS {
            Ok(())
        } else {
            Err(Error::new(
                Status::Backend,
                format!("ggml graph compute failed (status {status})"),
            ))
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: we created this backend and nobody else frees it.
            unsafe { sys::ggml_backend_free(self.raw()) };
        }
    }
}

/// An owned ggml buffer.
#[derive(Debug)]
pub struct Buffer {
    raw: NonNull<sys::ggml_backend_buffer>,
    base: *mut u8,
    size: u64,
}

// SAFETY: buffers are plain memory handles; the engine synchronises who writes where.
unsafe impl Send for Buffer {}
// SAFETY: see Send; shared use only reads the handle.
unsafe impl Sync for Buffer {}

impl Buffer {
    fn alloc(buft: sys::ggml_backend_buffer_type_t, bytes: u64, what: &str) -> Result<Buffer> {
        if buft.is_null() {
            return Err(Error::new(
                Status::Backend,
                format!("{what}: no buffer type"),
            ));
        }
        let size = usize::try_from(bytes.max(1)).map_err(|_| {
            Error::invalid(format!("{what}: {bytes} bytes does not fit this platform"))
        })?;
        // SAFETY: valid buffer type; ggml reports allocation failure by returning NULL.
        let max = unsafe { sys::ggml_backend_buft_get_max_size(buft) };
        if size > max {
            return Err(Error::new(
                Status::OutOfMemory,
                format!(
                    "{what}: {bytes} bytes exceeds the largest buffer the device allows ({max})"
                ),
            ));
        }
        if crate::faults::should_fail(crate::faults::Fault::DeviceAlloc) {
            return Err(Error::new(
                Status::OutOfMemory,
                format!("{what}: injected allocation failure"),
            ));
        }
        // SAFETY: as above.
        let raw = unsafe { sys::ggml_backend_buft_alloc_buffer(buft, size) };
        let raw = NonNull::new(raw).ok_or_else(|| {
            Error::new(
                Status::OutOfMemory,
                format!(
                    "{what}: could not allocate {} on the device",
                    crate::units::format_bytes(bytes)
                ),
            )
        })?;
        // SAFETY: a freshly allocated, valid buffer.
        let base = unsafe { sys::ggml_backend_buffer_get_base(raw.as_ptr()) } as *mut u8;
        Ok(Buffer {
            raw,
            base,
            size: bytes,
        })
    }

    pub fn raw(&self) -> sys::ggml_backend_buffer_t {
        self.raw.as_ptr()
    }

    pub fn base(&self) -> *mut u8 {
        self.base
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Marks the buffer as holding weights (ggml's scheduler then runs their ops here).
    pub fn mark_as_weights(&self) {
        // SAFETY: a live buffer we own.
        unsafe {
            sys::ggml_backend_buffer_set_usage(self.raw(), sys::GGML_BACKEND_BUFFER_USAGE_WEIGHTS)
        };
    }

    pub fn is_host(&self) -> bool {
        // SAFETY: valid buffer.
        unsafe { sys::ggml_backend_buffer_is_host(self.raw()) }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: we own this buffer; the engine drains copies that use it before dropping.
        unsafe { sys::ggml_backend_buffer_free(self.raw()) };
    }
}

/// A ggml event on one device.
#[derive(Debug)]
pub struct Event(NonNull<sys::ggml_backend_event>);

// SAFETY: events are recorded and waited on from the threads the engine assigns; ggml's event
// implementations (CUDA events) are thread-safe handles.
unsafe impl Send for Event {}
// SAFETY: see Send.
unsafe impl Sync for Event {}

impl Event {
    /// `None` when the device has no events.
    pub fn new(device: &Device) -> Option<Event> {
        if !device.async_copies {
            return None;
        }
        // SAFETY: valid device that reports event support.
        NonNull::new(unsafe { sys::ggml_backend_event_new(device.raw()) }).map(Event)
    }

    pub fn record(&self, backend: &Backend) {
        // SAFETY: valid event and backend of the same device.
        unsafe { sys::ggml_backend_event_record(self.0.as_ptr(), backend.raw()) };
    }

    /// Makes `backend` wait (on the device, not the CPU) for this event.
    pub fn wait_on(&self, backend: &Backend) {
        // SAFETY: valid event and backend of the same device.
        unsafe { sys::ggml_backend_event_wait(backend.raw(), self.0.as_ptr()) };
    }

    pub fn synchronize(&self) {
        // SAFETY: valid event.
        unsafe { sys::ggml_backend_event_synchronize(self.0.as_ptr()) };
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: we own the event; nothing waits on it once its owner is dropped.
        unsafe { sys::ggml_backend_event_free(self.0.as_ptr()) };
    }
}

/// Names the devices for messages and the CLI.
pub fn describe_devices() -> Vec<String> {
    Device::all()
        .iter()
        .map(|d| {
            let (free, total) = d.memory();
            format!(
                "{} ({}): {} free of {}",
                d.name,
                d.description,
                crate::units::format_bytes(free),
                crate::units::format_bytes(total)
            )
        })
        .collect()
}

pub fn cstring(text: &str) -> CString {
    CString::new(text.replace('\0', " ")).expect("interior NULs were replaced")
}

/// The tightest memory limit of this process's cgroup and its ancestors, with that group's
/// usage: (limit, usage) bytes. cgroup v2 (`memory.max`, `memory.current`) or v1
/// (`memory.limit_in_bytes`, `memory.usage_in_bytes`); `None` without a limit.
pub fn cgroup_memory() -> Option<(u64, u64)> {
    let groups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mut best: Option<(u64, u64)> = None;
    for line in groups.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let (roots, limit_file, usage_file): (&[&str], _, _) = if controllers.is_empty() {
            (
                &["/sys/fs/cgroup", "/sys/fs/cgroup/unified"],
                "memory.max",
                "memory.current",
            )
        } else if controllers.split(',').any(|c| c == "memory") {
            (
                &["/sys/fs/cgroup/memory"],
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
            )
        } else {
            continue;
        };
        for root in roots {
            let mut dir = std::path::PathBuf::from(format!("{root}{path}"));
            loop {
                let read = |file: &str| {
                    std::fs::read_to_string(dir.join(file))
                        .ok()
                        .and_then(|t| t.trim().parse::<u64>().ok())
                };
                // "max" (v2) does not parse: no limit here. v1 reports a huge number.
                if let (Some(limit), Some(usage)) = (read(limit_file), read(usage_file)) {
                    if limit < (1 << 60) && best.is_none_or(|(l, _)| limit < l) {
                        best = Some((limit, usage));
                    }
                }
                if dir.as_os_str().len() <= root.len() || !dir.pop() {
                    break;
                }
            }
        }
    }
    best
}
