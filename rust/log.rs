//! Logging: through the host's callback when it installed one, else through env_logger
//! (`RUST_LOG=offload_engine=debug`).

use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::RwLock;

use once_cell::sync::{Lazy, OnceCell};

type Callback = unsafe extern "C" fn(level: c_int, message: *const c_char, user: *mut c_void);

#[derive(Clone, Copy)]
struct HostSink {
    callback: Callback,
    user: *mut c_void,
}

// SAFETY: the header requires the callback and its user pointer to be usable from any thread.
unsafe impl Send for HostSink {}
// SAFETY: see Send.
unsafe impl Sync for HostSink {}

static SINK: Lazy<RwLock<Option<HostSink>>> = Lazy::new(|| RwLock::new(None));

struct Logger {
    fallback: env_logger::Logger,
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.sink().is_some() || self.fallback.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if !record.target().starts_with("offload_engine") {
            return;
        }
        match self.sink() {
            Some(sink) => {
                let level = match record.level() {
                    log::Level::Error => 4,
                    log::Level::Warn => 3,
                    log::Level::Info => 2,
                    log::Level::Debug => 1,
                    log::Level::Trace => 0,
                };
                let text =
                    CString::new(record.args().to_string().replace('\0', " ")).unwrap_or_default();
                // SAFETY: the host registered this callback for exactly this call shape.
                unsafe { (sink.callback)(level, text.as_ptr(), sink.user) };
            }
            None => self.fallback.log(record),
        }
    }

    fn flush(&self) {}
}

impl Logger {
    fn sink(&self) -> Option<HostSink> {
        *SINK.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// Installs our logger once; harmless when the host process already has a Rust logger.
pub fn init() {
    static INIT: OnceCell<()> = OnceCell::new();
    INIT.get_or_init(|| {
        let fallback = env_logger::Builder::from_env(
            env_logger::Env::default().default_filter_or("warn,offload_engine::moves=info"),
        )
        .build();
        let max = fallback.filter().max(log::LevelFilter::Info);
        if log::set_boxed_logger(Box::new(Logger { fallback })).is_ok() {
            log::set_max_level(max);
        }
    });
}

pub fn set_callback(callback: Option<Callback>, user: *mut c_void) {
    init();
    *SINK.write().unwrap_or_else(|p| p.into_inner()) =
        callback.map(|callback| HostSink { callback, user });
    if SINK.read().map(|s| s.is_some()).unwrap_or(false) {
        log::set_max_level(log::LevelFilter::Debug);
    }
}

thread_local! {
    static LIBRARY_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Marks the calling thread as one of the library's own (a copy thread, a placement helper).
/// The host's log callback may run there, and whatever the callback frees must not be torn
/// down there: tearing an engine down joins its copy thread.
pub fn mark_library_thread() {
    LIBRARY_THREAD.with(|t| t.set(true));
}

pub fn on_library_thread() -> bool {
    LIBRARY_THREAD.with(Cell::get)
}
