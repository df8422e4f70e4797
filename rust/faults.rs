//! Fault injection for tests: inert (one relaxed atomic load per check) unless a test arms it.
//!
//! A fault is armed with a countdown: the check that brings it to zero fails, once.

use std::sync::atomic::{AtomicI64, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Device (arena) or pinned allocation fails.
    DeviceAlloc = 0,
    /// A host-to-device layer copy fails.
    Copy = 1,
    /// The copy thread panics while copying.
    CopyThreadPanic = 2,
    /// A read from the model file fails.
    FileRead = 3,
}

const COUNT: usize = 4;
const DISARMED: i64 = -1;

static COUNTDOWNS: [AtomicI64; COUNT] = [const { AtomicI64::new(DISARMED) }; COUNT];

/// Arms `fault` so that the `countdown`-th check from now (1 = the next) fails.
pub fn arm(fault: Fault, countdown: u32) {
    COUNTDOWNS[fault as usize].store(i64::from(countdown.max(1)), Ordering::SeqCst);
}

pub fn disarm_all() {
    for c in &COUNTDOWNS {
        c.store(DISARMED, Ordering::SeqCst);
    }
}

/// True exactly once per arming, at the chosen check.
pub fn should_fail(fault: Fault) -> bool {
    let counter = &COUNTDOWNS[fault as usize];
    if counter.load(Ordering::Relaxed) <= 0 {
        return false;
    }
    counter.fetch_sub(1, Ordering::SeqCst) == 1
}

pub fn from_code(code: i32) -> Option<Fault> {
    [
        Fault::DeviceAlloc,
        Fault::Copy,
        Fault::CopyThreadPanic,
        Fault::FileRead,
    ]
    .into_iter()
    .find(|f| *f as i32 == code)
}
