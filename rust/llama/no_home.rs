//! Stands in for `home.rs` in builds without ggml's internal buffer interface (host-ggml mode
//! without `OFFLOAD_ENGINE_GGML_SRC`): `Hook::new` refuses before any of this is reached.

use std::collections::HashMap;
use std::sync::Arc;

use crate::backend::Device;
use crate::ggml as sys;

use super::Shared;

#[derive(Debug, Clone)]
pub(crate) struct Recorded {
    pub tensor: *mut sys::ggml_tensor,
    pub name: String,
    pub home: *mut std::ffi::c_void,
}

pub(crate) type FileHome = (u64, u64);

pub(crate) struct HomeType;

impl HomeType {
    pub(crate) fn new(
        _pinned_on: Option<Device>,
        _file_homes: HashMap<String, FileHome>,
        _file: Option<std::fs::File>,
    ) -> HomeType {
        HomeType
    }

    pub(crate) fn bind(_shared: &Arc<Shared>) {}

    pub(crate) fn raw(&self) -> sys::ggml_backend_buffer_type_t {
        std::ptr::null_mut()
    }

    pub(crate) fn recorded(&self) -> Vec<Recorded> {
        Vec::new()
    }

    pub(crate) fn file_home(&self, _name: &str, _bytes: u64) -> Option<FileHome> {
        None
    }

    pub(crate) fn release_file_backed_pages(&self) {}
}
