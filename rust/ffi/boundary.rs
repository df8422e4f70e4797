//! The one panic boundary every export runs behind, the thread-local last error, and the
//! checked views of what a caller passes in (strings, in/out structs, out-pointers).

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::{Error, Result, Status};

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    LAST_ERROR.with(|e| *e.borrow_mut() = c_string(message));
}

/// The message of the last failed call on this thread; valid until the next one fails.
pub(crate) fn last_error_ptr() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The one panic boundary every export goes through.
pub(crate) fn boundary(body: impl FnOnce() -> Result<()>) -> c_int {
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
pub(crate) fn boundary_void(body: impl FnOnce()) {
    let _ = boundary(|| {
        body();
        Ok(())
    });
}

/// A required out-pointer.
pub(crate) fn out<'a, T>(ptr: *mut T, what: &str) -> Result<&'a mut T> {
    // SAFETY: non-null out-pointers are the caller's writable storage per the header.
    unsafe { ptr.as_mut() }
        .ok_or_else(|| Error::new(Status::NullPointer, format!("{what} is NULL")))
}

/// Optional out-pointers: NULL means the caller does not want the value.
pub(crate) fn optional_out<'a, T>(ptr: *mut T) -> Option<&'a mut T> {
    // SAFETY: non-null out-pointers are the caller's writable storage per the header.
    unsafe { ptr.as_mut() }
}

pub(crate) fn text<'a>(ptr: *const c_char, what: &str) -> Result<&'a str> {
    if ptr.is_null() {
        return Err(Error::new(Status::NullPointer, format!("{what} is NULL")));
    }
    // SAFETY: the header requires NUL-terminated strings.
    unsafe { CStr::from_ptr(ptr) }
        .to_str()
        .map_err(|_| Error::invalid(format!("{what} is not valid UTF-8")))
}

pub(crate) fn optional_text<'a>(ptr: *const c_char, what: &str) -> Result<Option<&'a str>> {
    if ptr.is_null() {
        Ok(None)
    } else {
        text(ptr, what).map(Some)
    }
}

/// A library-owned C string (NULs inside become spaces).
pub(crate) fn c_string(text: &str) -> CString {
    CString::new(text.replace('\0', " ")).unwrap_or_default()
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
pub(crate) trait SizedStruct {
    fn declared_size(&self) -> usize;
}

/// Implements `SizedStruct` and an all-zero-but-`size` `Default` (for Rust callers of the
/// C ABI, like C's `= {sizeof x}`) for structs made only of integers, floats, raw pointers
/// and optional function pointers.
macro_rules! sized_structs {
    ($($t:ty),* $(,)?) => {
        $(impl $crate::ffi::boundary::SizedStruct for $t {
            fn declared_size(&self) -> usize {
                self.size
            }
        }

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
pub(crate) use sized_structs;

/// A caller's input struct: not NULL, and at least as large as ours.
pub(crate) fn input<'a, T: SizedStruct>(ptr: *const T, what: &str) -> Result<&'a T> {
    // SAFETY: a non-null pointer points to a struct the caller initialised (header rule).
    let value = unsafe { ptr.as_ref() }
        .ok_or_else(|| Error::new(Status::NullPointer, format!("{what} is NULL")))?;
    check_size(value.declared_size(), std::mem::size_of::<T>(), what)?;
    Ok(value)
}

/// A caller's result struct: not NULL, with `size` set to at least ours.
pub(crate) fn result_slot<'a, T: SizedStruct>(ptr: *mut T, what: &str) -> Result<&'a mut T> {
    let slot = out(ptr, what)?;
    check_size(slot.declared_size(), std::mem::size_of::<T>(), what)?;
    Ok(slot)
}
