//! The home buffer type: a ggml buffer type the host gives llama.cpp for the weights the
//! engine places (`llama_model_params.tensor_buft_overrides`). llama.cpp allocates its
//! buffers from it, creates every tensor in them (`init_tensor`, which records the tensor and
//! its name) and loads the weights into them (`set_tensor`). The engine then takes the
//! recorded tensors over at adopt.
//!
//! It is a host type (`is_host`): the memory is pinned where the device offers pinned host
//! memory, so copies to the device run asynchronously straight from the home, else
//! anonymous memory. When the layers stream from the model file (`file_backed`), writes of
//! tensors the file holds are dropped and reads come from the file, so the home memory is
//! never touched (it is reserved lazily, `MAP_NORESERVE`).

use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use crate::backend::{Buffer, Device};
use crate::error::{Error, Result, Status};
use crate::ggml as sys;
use crate::ggml::backend_impl as bi;

use super::Shared;

const NAME: &CStr = c"offload_engine_home";
/// Tensor data alignment inside home buffers (ggml's CPU buffers use 32; a cache line here).
const ALIGNMENT: usize = 64;

/// One tensor llama.cpp created in a home buffer.
#[derive(Debug, Clone)]
pub(crate) struct Recorded {
    pub tensor: *mut sys::ggml_tensor,
    pub name: String,
    /// Where its data lives in the home buffer (the tensor points elsewhere once adopted).
    pub home: *mut c_void,
}

/// Where a tensor's data lies in the model file: `(offset, bytes)`.
pub(crate) type FileHome = (u64, u64);

/// The buffer type's own state, shared by the hook and every buffer made from it.
pub(crate) struct HomeType {
    /// What ggml sees; `context` points at the `Shared` that holds this.
    raw: std::cell::UnsafeCell<bi::ggml_backend_buffer_type>,
    /// The engine's device, when it offers pinned host memory and the home should use it.
    pinned_on: Option<Device>,
    /// File-backed homes: tensors whose data the model file holds, by name.
    file_homes: HashMap<String, FileHome>,
    /// The model file, for reads of file-backed tensors.
    file: Option<std::fs::File>,
    recorded: Mutex<Vec<Recorded>>,
}

impl HomeType {
    pub(crate) fn new(
        pinned_on: Option<Device>,
        file_homes: HashMap<String, FileHome>,
        file: Option<std::fs::File>,
    ) -> HomeType {
        HomeType {
            raw: std::cell::UnsafeCell::new(bi::ggml_backend_buffer_type {
                iface: bi::ggml_backend_buffer_type_i {
                    get_name: Some(buft_get_name),
                    alloc_buffer: Some(buft_alloc_buffer),
                    alloc_buffer_n: None,
                    get_alignment: Some(buft_get_alignment),
                    get_max_size: None,
                    get_alloc_size: None,
                    get_alloc_size_n: None,
                    is_host: Some(buft_is_host),
                },
                device: std::ptr::null_mut(),
                context: std::ptr::null_mut(),
            }),
            pinned_on,
            file_homes,
            file,
            recorded: Mutex::new(Vec::new()),
        }
    }

    /// Points the ggml struct's context at its owner; called once, before it is handed out.
    pub(crate) fn bind(shared: &Arc<Shared>) {
        // SAFETY: nothing has seen the struct yet (the hook is being built), so this write
        // races with no reader; afterwards the struct is only read.
        unsafe { (*shared.home.raw.get()).context = Arc::as_ptr(shared) as *mut c_void };
    }

    /// The buffer type handed to llama.cpp; valid while the hook or any buffer made from it
    /// lives (each buffer keeps the hook's shared state alive).
    pub(crate) fn raw(&self) -> sys::ggml_backend_buffer_type_t {
        self.raw.get().cast()
    }

    /// The tensors llama.cpp created so far, in creation order.
    pub(crate) fn recorded(&self) -> Vec<Recorded> {
        self.recorded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Where the file holds this tensor's data, if it streams from there.
    pub(crate) fn file_home(&self, name: &str, bytes: u64) -> Option<FileHome> {
        self.file_homes
            .get(name)
            .copied()
            .filter(|&(_, file_bytes)| file_bytes == bytes)
    }

    /// Gives the pages of file-backed tensors back to the system: llama.cpp may have written
    /// them (reads without mmap land in a host buffer directly), and the file is their home.
    pub(crate) fn release_file_backed_pages(&self) {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        for r in self.recorded() {
            // SAFETY: recorded tensors are alive until llama.cpp frees its model, which
            // detaches the engine first (`free_buffer`), and adopt runs before that.
            let (data, bytes) = (r.home as usize, unsafe { sys::ggml_nbytes(r.tensor) });
            if data == 0 || self.file_home(&r.name, bytes as u64).is_none() {
                continue;
            }
            let start = data.next_multiple_of(page);
            let end = (data + bytes) / page * page;
            if end > start {
                // SAFETY: [start, end) lies inside this tensor's part of an anonymous mapping
                // we made; MADV_DONTNEED on private anonymous pages only drops their contents,
                // which nothing reads again (reads of these tensors come from the file).
                unsafe { libc::madvise(start as *mut c_void, end - start, libc::MADV_DONTNEED) };
            }
        }
    }
}

/// The memory behind one home buffer.
enum Memory {
    /// Pinned host memory from the device's host buffer type.
    Pinned(Buffer),
    /// Private anonymous pages, reserved as touched.
    Anonymous { ptr: *mut c_void, len: usize },
}

impl Drop for Memory {
    fn drop(&mut self) {
        if let Memory::Anonymous { ptr, len } = *self {
            // SAFETY: the mapping made in `Memory::anonymous`, unmapped once.
            unsafe { libc::munmap(ptr, len) };
        }
    }
}

impl Memory {
    fn anonymous(size: usize) -> Result<Memory> {
        let len = size.max(1);
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::new(
                Status::OutOfMemory,
                format!(
                    "cannot map {} of host memory for the weights: {}",
                    crate::units::format_bytes(size as u64),
                    std::io::Error::last_os_error()
                ),
            ));
        }
        Ok(Memory::Anonymous { ptr, len })
    }

    fn base(&self) -> *mut u8 {
        match self {
            Memory::Pinned(buffer) => buffer.base(),
            Memory::Anonymous { ptr, .. } => ptr.cast(),
        }
    }
}

/// A home buffer's context (the `context` of its ggml buffer).
struct HomeBuffer {
    memory: Memory,
    size: usize,
    shared: Arc<Shared>,
}

/// The shared state behind a home buffer type.
///
/// # Safety
/// `buft` must be a home buffer type, whose context is set by `HomeType::bind` and is alive
/// while the hook or any of its buffers lives.
unsafe fn shared_of_type<'a>(buft: sys::ggml_backend_buffer_type_t) -> &'a Shared {
    // SAFETY: per the function's contract.
    unsafe { &*((*buft.cast::<bi::ggml_backend_buffer_type>()).context as *const Shared) }
}

/// # Safety
/// `buffer` must be a live buffer made by `buft_alloc_buffer`.
unsafe fn home_buffer<'a>(buffer: sys::ggml_backend_buffer_t) -> &'a HomeBuffer {
    // SAFETY: per the function's contract, its context is our boxed `HomeBuffer`.
    unsafe { &*((*buffer.cast::<bi::ggml_backend_buffer>()).context as *const HomeBuffer) }
}

/// Runs a callback body, turning a panic into a logged error: these are called by ggml from
/// C++, which a panic must not unwind into.
fn guarded<R>(what: &str, fallback: R, body: impl FnOnce() -> R) -> R {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(value) => value,
        Err(panic) => {
            log::error!(
                "home buffer {what}: internal error (panic): {}",
                crate::error::panic_text(&*panic)
            );
            fallback
        }
    }
}

unsafe extern "C" fn buft_get_name(_buft: sys::ggml_backend_buffer_type_t) -> *const c_char {
    NAME.as_ptr()
}

unsafe extern "C" fn buft_get_alignment(_buft: sys::ggml_backend_buffer_type_t) -> usize {
    ALIGNMENT
}

unsafe extern "C" fn buft_is_host(_buft: sys::ggml_backend_buffer_type_t) -> bool {
    true
}

unsafe extern "C" fn buft_alloc_buffer(
    buft: sys::ggml_backend_buffer_type_t,
    size: usize,
) -> sys::ggml_backend_buffer_t {
    guarded("alloc_buffer", std::ptr::null_mut(), || {
        // SAFETY: ggml calls this with our buffer type.
        let shared = unsafe { shared_of_type(buft) };
        let pinned = shared.home.pinned_on.as_ref().and_then(|device| {
            match device.alloc_pinned(size as u64)? {
                Ok(buffer) => Some(Memory::Pinned(buffer)),
                Err(err) => {
                    log::warn!(
                        "cannot pin {} for the weights' home ({}); using pageable memory",
                        crate::units::format_bytes(size as u64),
                        err.message
                    );
                    None
                }
            }
        });
        let memory = match pinned.map_or_else(|| Memory::anonymous(size), Ok) {
            Ok(memory) => memory,
            Err(err) => {
                log::error!("{}", err.message);
                return std::ptr::null_mut();
            }
        };
        // SAFETY: the Arc behind the type's context is alive (the caller holds the type,
        // which lives inside it); this adds the buffer's own reference.
        let shared = unsafe {
            let ptr = shared as *const Shared;
            Arc::increment_strong_count(ptr);
            Arc::from_raw(ptr)
        };
        let context = Box::into_raw(Box::new(HomeBuffer {
            memory,
            size,
            shared,
        }));
        let iface = bi::ggml_backend_buffer_i {
            free_buffer: Some(buffer_free),
            get_base: Some(buffer_get_base),
            init_tensor: Some(buffer_init_tensor),
            memset_tensor: Some(buffer_memset_tensor),
            set_tensor: Some(buffer_set_tensor),
            get_tensor: Some(buffer_get_tensor),
            set_tensor_2d: None,
            get_tensor_2d: None,
            cpy_tensor: None,
            clear: Some(buffer_clear),
            reset: None,
        };
        // SAFETY: a valid interface, our type and a context that `buffer_free` releases.
        unsafe { bi::ggml_backend_buffer_init(buft, iface, context.cast(), size) }
    })
}

unsafe extern "C" fn buffer_free(buffer: sys::ggml_backend_buffer_t) {
    guarded("free_buffer", (), || {
        // SAFETY: ggml frees each buffer once; its context is the box `buft_alloc_buffer` made.
        let home = unsafe {
            Box::from_raw((*buffer.cast::<bi::ggml_backend_buffer>()).context as *mut HomeBuffer)
        };
        // llama.cpp frees its buffers (the tensors' homes) before the tensors themselves: the
        // last moment to point them home and take the engine off the device.
        home.shared.model_freed();
        drop(home);
    });
}

unsafe extern "C" fn buffer_get_base(buffer: sys::ggml_backend_buffer_t) -> *mut c_void {
    // SAFETY: ggml calls this with one of our live buffers.
    unsafe { home_buffer(buffer) }.memory.base().cast()
}

unsafe extern "C" fn buffer_init_tensor(
    _buffer: sys::ggml_backend_buffer_t,
    tensor: *mut sys::ggml_tensor,
) -> sys::ggml_status {
    guarded("init_tensor", sys::GGML_STATUS_FAILED, || {
        // SAFETY: ggml calls this with one of our live buffers and a tensor it just placed.
        let (home, t) = unsafe { (home_buffer(_buffer), &*tensor) };
        if t.view_src.is_null() {
            // SAFETY: ggml names are NUL-terminated inside their array.
            let name = unsafe { CStr::from_ptr(t.name.as_ptr()) }
                .to_string_lossy()
                .into_owned();
            home.shared
                .home
                .recorded
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Recorded {
                    tensor,
                    name,
                    home: t.data,
                });
        }
        sys::GGML_STATUS_SUCCESS
    })
}

/// The tensor's name and size, and whether its bytes live in the model file instead.
///
/// # Safety
/// `tensor` must be a valid tensor.
unsafe fn file_backed(home: &HomeBuffer, tensor: *const sys::ggml_tensor) -> Option<FileHome> {
    if home.shared.home.file_homes.is_empty() {
        return None;
    }
    // SAFETY: per the contract; names are NUL-terminated.
    let (name, bytes) = unsafe {
        (
            CStr::from_ptr((*tensor).name.as_ptr()),
            sys::ggml_nbytes(tensor),
        )
    };
    home.shared
        .home
        .file_home(name.to_str().ok()?, bytes as u64)
}

/// The `size` bytes at `offset` of `tensor`'s data, checked to lie inside this buffer.
///
/// # Safety
/// `tensor` must be a valid tensor of `home`'s buffer.
unsafe fn span(
    home: &HomeBuffer,
    tensor: *const sys::ggml_tensor,
    offset: usize,
    size: usize,
) -> Option<*mut u8> {
    let base = home.memory.base() as usize;
    // SAFETY: per the contract.
    let start = unsafe { (*tensor).data } as usize;
    let begin = start.checked_add(offset)?;
    let end = begin.checked_add(size)?;
    (begin >= base && end <= base + home.size).then_some(begin as *mut u8)
}

unsafe extern "C" fn buffer_memset_tensor(
    buffer: sys::ggml_backend_buffer_t,
    tensor: *mut sys::ggml_tensor,
    value: u8,
    offset: usize,
    size: usize,
) {
    guarded("memset_tensor", (), || {
        // SAFETY: ggml calls this with one of our live buffers and one of its tensors.
        let home = unsafe { home_buffer(buffer) };
        // SAFETY: as above.
        if let Some(dst) = unsafe { span(home, tensor, offset, size) } {
            // SAFETY: `span` checked that the range lies inside the buffer.
            unsafe { std::ptr::write_bytes(dst, value, size) };
        }
    })
}

unsafe extern "C" fn buffer_set_tensor(
    buffer: sys::ggml_backend_buffer_t,
    tensor: *mut sys::ggml_tensor,
    data: *const c_void,
    offset: usize,
    size: usize,
) {
    guarded("set_tensor", (), || {
        // SAFETY: ggml calls this with one of our live buffers and one of its tensors.
        let home = unsafe { home_buffer(buffer) };
        // SAFETY: as above.
        if unsafe { file_backed(home, tensor) }.is_some() {
            return; // the file is its home; copies read it from there
        }
        // SAFETY: as above.
        match unsafe { span(home, tensor, offset, size) } {
            // SAFETY: `span` checked the destination; ggml passes `size` readable bytes.
            Some(dst) => unsafe { std::ptr::copy_nonoverlapping(data.cast::<u8>(), dst, size) },
            None => log::error!("home buffer: a write outside its tensor was dropped"),
        }
    })
}

unsafe extern "C" fn buffer_get_tensor(
    buffer: sys::ggml_backend_buffer_t,
    tensor: *const sys::ggml_tensor,
    data: *mut c_void,
    offset: usize,
    size: usize,
) {
    guarded("get_tensor", (), || {
        // SAFETY: ggml calls this with one of our live buffers and one of its tensors; `data`
        // has room for `size` bytes.
        let (home, out) = unsafe {
            (
                home_buffer(buffer),
                std::slice::from_raw_parts_mut(data.cast::<u8>(), size),
            )
        };
        // SAFETY: as above.
        if let Some((file_offset, _)) = unsafe { file_backed(home, tensor) } {
            let read = home
                .shared
                .home
                .file
                .as_ref()
                .map(|file| file.read_exact_at(out, file_offset + offset as u64));
            if !matches!(read, Some(Ok(()))) {
                log::error!("home buffer: cannot read a file-backed tensor back; zeros returned");
                out.fill(0);
            }
            return;
        }
        // SAFETY: as above.
        match unsafe { span(home, tensor, offset, size) } {
            // SAFETY: `span` checked the source range.
            Some(src) => unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), size) },
            None => {
                log::error!("home buffer: a read outside its tensor returned zeros");
                out.fill(0);
            }
        }
    })
}

unsafe extern "C" fn buffer_clear(buffer: sys::ggml_backend_buffer_t, value: u8) {
    guarded("clear", (), || {
        // SAFETY: ggml calls this with one of our live buffers.
        let home = unsafe { home_buffer(buffer) };
        // SAFETY: the whole buffer is ours to write.
        unsafe { std::ptr::write_bytes(home.memory.base(), value, home.size) };
    })
}
