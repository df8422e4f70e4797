//! The table of live handles. Every handle is an `Arc` whose pointer the library hands out;
//! the table records it with its kind, so NULL, freed or foreign pointers are refused
//! instead of dereferenced. A call takes its own reference (`Held`) while the table is
//! locked, so a `_free` that comes during the call (from another thread, a callback of the
//! call, or the log callback) only retires the handle: new calls are refused at once, and
//! the object is destroyed when the last call holding it returns.

use std::collections::HashSet;
use std::ops::Deref;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use once_cell::sync::Lazy;

use crate::error::{Error, Result, Status};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    Registry,
    Engine,
    Plan,
    Pipeline,
    Llama,
    LlamaContext,
}

static LIVE: Lazy<Mutex<HashSet<(usize, Kind)>>> = Lazy::new(Mutex::default);

fn live() -> MutexGuard<'static, HashSet<(usize, Kind)>> {
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

/// A reference to a live handle, held for the length of one call.
pub(crate) struct Held<T: Send + Sync + 'static>(Option<Arc<T>>);

impl<T: Send + Sync + 'static> Deref for Held<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.0
            .as_deref()
            .expect("a Held always holds its handle until dropped")
    }
}

impl<T: Send + Sync + 'static> Drop for Held<T> {
    fn drop(&mut self) {
        if let Some(last) = self.0.take().and_then(Arc::into_inner) {
            dispose(last);
        }
    }
}

/// Destroys a handle's object. On one of the library's own threads (the log callback runs
/// there) it is destroyed on a short-lived thread of its own instead: an engine's teardown
/// joins its copy thread, which must not be the thread doing it.
/// Every disposal ends a destruction `retire` began (`registry::deferred_release`).
fn dispose<T: Send + 'static>(value: T) {
    let destroy = move || {
        drop(value);
        crate::registry::deferred_release(false);
    };
    if !crate::log::on_library_thread() {
        destroy();
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("offload-free".into())
        .spawn(destroy);
    if let Err(err) = spawned {
        // The value went with the failed closure; nothing can be done but say so.
        log::error!("cannot start a thread to free a handle ({err}); it is leaked");
        crate::registry::deferred_release(false);
    }
}

/// Records `value` as a live handle of `kind` and returns the pointer the host gets.
pub(crate) fn publish<T: Send + Sync + 'static>(value: T, kind: Kind) -> *mut T {
    let ptr = Arc::into_raw(Arc::new(value)) as *mut T;
    live().insert((ptr as usize, kind));
    ptr
}

/// The handle behind `ptr` if it is a live handle of `kind`, held for the caller's call.
pub(crate) fn checked<T: Send + Sync + 'static>(ptr: *const T, kind: Kind) -> Result<Held<T>> {
    if ptr.is_null() {
        return Err(Error::new(
            Status::NullPointer,
            format!("{kind:?} handle is NULL").to_lowercase(),
        ));
    }
    let table = live();
    if !table.contains(&(ptr as usize, kind)) {
        return Err(Error::new(
            Status::InvalidHandle,
            format!("{kind:?} handle {ptr:p} is not live (freed, or not a {kind:?})")
                .to_lowercase(),
        ));
    }
    // SAFETY: the pointer is in the table, so it came from `Arc::into_raw` in `publish` for
    // this kind and the table still owns that reference; taking ours while the table is
    // locked means `retire` cannot release the table's reference in between.
    let held = unsafe {
        Arc::increment_strong_count(ptr);
        Arc::from_raw(ptr)
    };
    drop(table);
    Ok(Held(Some(held)))
}

/// Retires a live handle of `kind`: later calls with it are refused; the object is destroyed
/// now, or when the last call still holding it returns. NULL and handles that are not live
/// are ignored.
pub(crate) fn retire<T: Send + Sync + 'static>(ptr: *mut T, kind: Kind) {
    if ptr.is_null() {
        return;
    }
    if live().remove(&(ptr as usize, kind)) {
        // Counted before the table's reference goes, so the disposal (here, or when the last
        // call holding it returns) always follows the count it ends.
        crate::registry::deferred_release(true);
        // SAFETY: it was live for this kind, so the table owned the reference `publish` made;
        // removing it from the table gives that reference to us, once.
        drop(Held(Some(unsafe { Arc::from_raw(ptr) })));
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
