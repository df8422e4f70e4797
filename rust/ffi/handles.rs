//! The table of live handles: every pointer the library hands out is recorded with its kind,
//! so NULL, freed or foreign pointers are refused instead of dereferenced.

use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard, TryLockError};

use once_cell::sync::Lazy;

use crate::error::{Error, Result, Status};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    Registry,
    Engine,
    Plan,
    Pipeline,
}

static LIVE: Lazy<Mutex<HashSet<(usize, Kind)>>> = Lazy::new(Mutex::default);

fn live() -> MutexGuard<'static, HashSet<(usize, Kind)>> {
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Boxes `value` and records the pointer as a live handle of `kind`.
pub(crate) fn publish<T>(value: T, kind: Kind) -> *mut T {
    let ptr = Box::into_raw(Box::new(value));
    live().insert((ptr as usize, kind));
    ptr
}

/// The handle behind `ptr`, if it is a live handle of `kind`.
pub(crate) fn checked<'a, T>(ptr: *const T, kind: Kind) -> Result<&'a T> {
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

/// Frees a live handle of `kind`; NULL and handles that are not live are ignored.
pub(crate) fn retire<T>(ptr: *mut T, kind: Kind) {
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

/// One caller at a time per handle; a second thread gets an error instead of a race.
pub(crate) fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Ok(g),
        Err(TryLockError::WouldBlock) => Err(Error::state(
            "handle is in use by another thread (calls on one handle must not overlap)",
        )),
        Err(TryLockError::Poisoned(p)) => Ok(p.into_inner()),
    }
}
