//! The C ABI (ffi/offload_engine.h), one file per C object. Every export runs behind
//! `boundary::boundary`, which turns errors into a status plus a thread-local message and
//! panics into `OFFLOAD_ENGINE_ERR_INTERNAL`. Handles are checked against the live-handle
//! table (`handles`), so NULL, freed or foreign pointers give
//! `OFFLOAD_ENGINE_ERR_INVALID_HANDLE` instead of undefined behaviour.

// Exports take raw pointers by design: their validity is the caller's side of the contract
// written in the header, and every dereference is checked for NULL first.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

use std::ffi::{c_char, c_int, c_void};

use crate::error::{Error, Status};

pub(crate) mod boundary;
mod engine;
pub(crate) mod handles;
mod llama;
mod pipeline;
mod plan;
mod registry;
mod staged;

pub use engine::*;
pub use llama::*;
pub use pipeline::*;
pub use plan::*;
pub use registry::*;
pub use staged::*;

use boundary::{boundary, boundary_void};

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
    boundary::last_error_ptr()
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
pub extern "C" fn offload_engine_size_parse(text: *const c_char, bytes_out: *mut u64) -> c_int {
    boundary(|| {
        let text = boundary::text(text, "text")?;
        let slot = boundary::out(bytes_out, "bytes_out")?;
        let bytes = crate::units::parse_size(text)?;
        if let Some(warning) = crate::units::bare_size_warning(text, bytes) {
            log::warn!("{warning}");
        }
        *slot = bytes;
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
