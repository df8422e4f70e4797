//! Status codes shared by the Rust API and the C ABI, and the error type that carries them.
//!
//! The numbers are part of the C ABI (`offload_engine_status` in ffi/offload_engine.h):
//! never renumber or reuse one.

use std::fmt;

#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Ok = 0,
    InvalidArgument = 1,
    NullPointer = 2,
    InvalidHandle = 3,
    NotFound = 4,
    AlreadyExists = 5,
    Io = 6,
    CorruptFile = 7,
    InsufficientMemory = 8,
    Backend = 9,
    InvalidState = 10,
    Internal = 11,
    Unsupported = 12,
    OutOfMemory = 13,
}

impl Status {
    pub const ALL: [Status; 14] = [
        Status::Ok,
        Status::InvalidArgument,
        Status::NullPointer,
        Status::InvalidHandle,
        Status::NotFound,
        Status::AlreadyExists,
        Status::Io,
        Status::CorruptFile,
        Status::InsufficientMemory,
        Status::Backend,
        Status::InvalidState,
        Status::Internal,
        Status::Unsupported,
        Status::OutOfMemory,
    ];

    /// Short, stable description; also returned by `offload_engine_status_str`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::InvalidArgument => "invalid argument",
            Status::NullPointer => "null pointer",
            Status::InvalidHandle => "invalid handle",
            Status::NotFound => "not found",
            Status::AlreadyExists => "already exists",
            Status::Io => "i/o error",
            Status::CorruptFile => "corrupt or unsupported file",
            Status::InsufficientMemory => "insufficient device memory",
            Status::Backend => "backend error",
            Status::InvalidState => "invalid state",
            Status::Internal => "internal error",
            Status::Unsupported => "unsupported",
            Status::OutOfMemory => "out of memory",
        }
    }

    pub fn from_code(code: i32) -> Option<Status> {
        Status::ALL.into_iter().find(|s| *s as i32 == code)
    }
}

/// An error: a status for programs and a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub status: Status,
    pub message: String,
}

impl Error {
    pub fn new(status: Status, message: impl Into<String>) -> Error {
        Error {
            status,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Error {
        Error::new(Status::InvalidArgument, message)
    }
    pub fn corrupt(message: impl Into<String>) -> Error {
        Error::new(Status::CorruptFile, message)
    }
    pub fn not_found(message: impl Into<String>) -> Error {
        Error::new(Status::NotFound, message)
    }
    pub fn state(message: impl Into<String>) -> Error {
        Error::new(Status::InvalidState, message)
    }
    pub fn io(context: impl fmt::Display, err: std::io::Error) -> Error {
        Error::new(Status::Io, format!("{context}: {err}"))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// The text of a caught panic's payload.
pub fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
