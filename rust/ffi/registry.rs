//! Registry objects: the host's weight tensors, grouped into layers in execution order.

use std::ffi::{c_char, c_int, CString};
use std::path::PathBuf;
use std::sync::Mutex;

use crate::error::{Error, Result, Status};
use crate::ffi::boundary::{
    boundary, boundary_void, c_string, input, optional_out, optional_text, out, result_slot,
    sized_structs, text,
};
use crate::ffi::handles::{checked, lock, publish, retire, Kind};
use crate::ggml as sys;
use crate::registry::{Location, Registry, Source, TensorDesc, TensorId};

sized_structs!(RegistryParams, TensorInfo, LayerInfo);

#[repr(C)]
pub struct RegistryParams {
    pub size: usize,
    pub pattern: *const c_char,
}

#[repr(C)]
pub struct TensorInfo {
    pub size: usize,
    pub name: *const c_char,
    pub ggml_type: c_int,
    pub n_dims: c_int,
    pub ne: [i64; 4],
    pub bytes: u64,
    pub layer: i64,
    pub location: c_int,
    pub component: *const c_char,
}

#[repr(C)]
pub struct LayerInfo {
    pub size: usize,
    pub name: *const c_char,
    pub tensor_count: u64,
    pub bytes: u64,
    pub location: c_int,
    pub component: *const c_char,
}

pub struct RegistryHandle {
    pub(crate) inner: Mutex<RegistryState>,
}

pub(crate) struct RegistryState {
    pub(crate) registry: Registry,
    /// Strings handed out stay valid until the next call on this handle.
    scratch: Vec<CString>,
}

impl RegistryState {
    fn keep(&mut self, s: &str) -> *const c_char {
        self.scratch.push(c_string(s));
        self.scratch
            .last()
            .map(|c| c.as_ptr())
            .unwrap_or(std::ptr::null())
    }
}

fn location_code(location: Location) -> c_int {
    match location {
        Location::Host => 0,
        Location::Pinned => 1,
        Location::Device => 2,
        Location::File => 3,
    }
}

/// Runs `f` on a live registry, held and locked for the call. Strings handed out by the
/// previous call on this registry expire here.
pub(crate) fn with_registry<R>(
    handle: *const RegistryHandle,
    f: impl FnOnce(&mut RegistryState) -> Result<R>,
) -> Result<R> {
    let held = checked(handle, Kind::Registry)?;
    let mut state = lock(&held.inner)?;
    state.scratch.clear();
    f(&mut state)
}

#[no_mangle]
pub extern "C" fn offload_engine_registry_params_init(params: *mut RegistryParams) {
    boundary_void(|| {
        if let Ok(p) = out(params, "params") {
            *p = RegistryParams {
                size: std::mem::size_of::<RegistryParams>(),
                pattern: std::ptr::null(),
            };
        }
    });
}

#[no_mangle]
pub extern "C" fn offload_engine_registry_new(
    params: *const RegistryParams,
    registry_out: *mut *mut RegistryHandle,
) -> c_int {
    boundary(|| {
        let params = input(params, "registry params")?;
        let slot = out(registry_out, "registry_out")?;
        let pattern = optional_text(params.pattern, "pattern")?
            .map(Registry::pattern_from_arg)
            .transpose()?;
        let handle = RegistryHandle {
            inner: Mutex::new(RegistryState {
                registry: Registry::new(pattern),
                scratch: Vec::new(),
            }),
        };
        *slot = publish(handle, Kind::Registry);
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_registry_free(registry: *mut RegistryHandle) {
    boundary_void(|| retire(registry, Kind::Registry));
}

#[no_mangle]
pub extern "C" fn offload_engine_registry_add_tensor(
    handle: *mut RegistryHandle,
    tensor: *mut sys::ggml_tensor,
    name: *const c_char,
    id_out: *mut u64,
) -> c_int {
    boundary(|| {
        with_registry(handle, |state| {
            let name = optional_text(name, "name")?;
            if tensor.is_null() {
                return Err(Error::new(Status::NullPointer, "tensor is NULL"));
            }
            // SAFETY: the header requires a valid tensor that outlives the registry's engines.
            let id = unsafe { state.registry.add_ggml_tensor(tensor, name)? };
            if let Some(slot) = optional_out(id_out) {
                *slot = id.0;
            }
            Ok(())
        })
    })
}

/// The shape of the registering calls: lock the registry, register, report how many.
fn register_and_count(
    handle: *mut RegistryHandle,
    count_out: *mut usize,
    register: impl FnOnce(&mut Registry) -> Result<usize>,
) -> c_int {
    boundary(|| {
        with_registry(handle, |state| {
            let count = register(&mut state.registry)?;
            if let Some(slot) = optional_out(count_out) {
                *slot = count;
            }
            Ok(())
        })
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_registry_add_context(
    handle: *mut RegistryHandle,
    ctx: *mut sys::ggml_context,
    count_out: *mut usize,
) -> c_int {
    register_and_count(handle, count_out, |registry| {
        // SAFETY: the header requires a valid context (or NULL, refused there) whose tensors
        // outlive the registry's engines.
        unsafe { registry.add_ggml_context(ctx) }
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_registry_add_gguf(
    handle: *mut RegistryHandle,
    path: *const c_char,
    count_out: *mut usize,
) -> c_int {
    register_and_count(handle, count_out, |registry| {
        registry.add_gguf(&PathBuf::from(text(path, "path")?))
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_registry_load_gguf(
    handle: *mut RegistryHandle,
    path: *const c_char,
    file_backed: c_int,
    count_out: *mut usize,
) -> c_int {
    register_and_count(handle, count_out, |registry| {
        registry.load_gguf(&PathBuf::from(text(path, "path")?), file_backed != 0)
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_registry_add_file_backed(
    handle: *mut RegistryHandle,
    ctx: *mut sys::ggml_context,
    path: *const c_char,
    count_out: *mut usize,
) -> c_int {
    register_and_count(handle, count_out, |registry| {
        let path = PathBuf::from(text(path, "path")?);
        // SAFETY: the header requires a valid context whose tensors outlive the registry.
        unsafe { registry.add_file_backed_context(ctx, &path) }
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_registry_add_tensor_from_file(
    handle: *mut RegistryHandle,
    tensor: *mut sys::ggml_tensor,
    name: *const c_char,
    path: *const c_char,
    offset: u64,
    id_out: *mut u64,
) -> c_int {
    boundary(|| {
        with_registry(handle, |state| {
            let name = optional_text(name, "name")?;
            let path = PathBuf::from(text(path, "path")?);
            // SAFETY: the header requires a valid tensor that outlives the registry's engines.
            let id = unsafe {
                state
                    .registry
                    .add_ggml_tensor_from_file(tensor, name, &path, offset)?
            };
            if let Some(slot) = optional_out(id_out) {
                *slot = id.0;
            }
            Ok(())
        })
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_registry_add_descriptor(
    handle: *mut RegistryHandle,
    name: *const c_char,
    ggml_type: c_int,
    n_dims: c_int,
    ne: *const i64,
    id_out: *mut u64,
) -> c_int {
    boundary(|| {
        with_registry(handle, |state| {
            let name = text(name, "name")?;
            if !(1..=4).contains(&n_dims) {
                return Err(Error::invalid(format!("n_dims {n_dims} must be 1..4")));
            }
            if ne.is_null() {
                return Err(Error::new(Status::NullPointer, "ne is NULL"));
            }
            // SAFETY: the header requires `ne` to hold n_dims values.
            let ne = unsafe { std::slice::from_raw_parts(ne, n_dims as usize) };
            if ne.iter().any(|&d| d <= 0) {
                return Err(Error::invalid(format!(
                    "tensor '{name}': dimensions {ne:?} must be positive"
                )));
            }
            let dims: Vec<u64> = ne.iter().map(|&d| d as u64).collect();
            let ty = u32::try_from(ggml_type)
                .map_err(|_| Error::invalid(format!("ggml type {ggml_type} is invalid")))?;
            let bytes = crate::gguf::tensor_bytes(ty, &dims)
                .map_err(|e| Error::invalid(format!("tensor '{name}': {}", e.message)))?;
            let id = state.registry.add(TensorDesc {
                name,
                ggml_type: ty,
                dims: &dims,
                bytes,
                source: Source::Descriptor,
                location: Location::Host,
            })?;
            if let Some(slot) = optional_out(id_out) {
                *slot = id.0;
            }
            Ok(())
        })
    })
}

macro_rules! registry_getter {
    ($name:ident, $ty:ty, |$reg:ident| $body:expr) => {
        #[no_mangle]
        pub extern "C" fn $name(handle: *mut RegistryHandle, value_out: *mut $ty) -> c_int {
            boundary(|| {
                with_registry(handle, |state| {
                    let slot = out(value_out, "value_out")?;
                    let $reg = &mut state.registry;
                    *slot = $body;
                    Ok(())
                })
            })
        }
    };
}

registry_getter!(offload_engine_registry_tensor_count, usize, |r| r
    .tensor_count());
registry_getter!(offload_engine_registry_layer_count, usize, |r| r
    .layer_count());
registry_getter!(offload_engine_registry_global_bytes, u64, |r| r
    .global_bytes());
registry_getter!(offload_engine_registry_total_bytes, u64, |r| r
    .total_bytes());

#[no_mangle]
pub extern "C" fn offload_engine_registry_architecture(
    handle: *mut RegistryHandle,
    name_out: *mut *const c_char,
) -> c_int {
    boundary(|| {
        with_registry(handle, |state| {
            let slot = out(name_out, "name_out")?;
            let arch = state.registry.architecture();
            *slot = state.keep(&arch);
            Ok(())
        })
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_registry_find(
    handle: *mut RegistryHandle,
    name: *const c_char,
    id_out: *mut u64,
) -> c_int {
    boundary(|| {
        with_registry(handle, |state| {
            let name = text(name, "name")?;
            let slot = out(id_out, "id_out")?;
            *slot = state.registry.find(name)?.0;
            Ok(())
        })
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_registry_assign(
    handle: *mut RegistryHandle,
    id: u64,
    layer: u32,
) -> c_int {
    boundary(|| with_registry(handle, |state| state.registry.assign(TensorId(id), layer)))
}

#[no_mangle]
pub extern "C" fn offload_engine_registry_tensor_info(
    handle: *mut RegistryHandle,
    id: u64,
    info_out: *mut TensorInfo,
) -> c_int {
    boundary(|| {
        with_registry(handle, |state| {
            let slot = result_slot(info_out, "tensor info")?;
            let id = TensorId(id);
            let layer = state.registry.layer_of(id)?.map(|l| l as i64).unwrap_or(-1);
            let entry = state.registry.tensor(id)?.clone();
            let mut ne = [1i64; 4];
            for (dst, src) in ne.iter_mut().zip(entry.dims.iter()) {
                *dst = *src as i64;
            }
            let name = state.keep(&entry.name);
            let component = state.keep(entry.component.as_str());
            *slot = TensorInfo {
                size: std::mem::size_of::<TensorInfo>(),
                name,
                ggml_type: entry.ggml_type as c_int,
                n_dims: c_int::from(entry.n_dims),
                ne,
                bytes: entry.bytes,
                layer,
                location: location_code(entry.location),
                component,
            };
            Ok(())
        })
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_registry_layer_info(
    handle: *mut RegistryHandle,
    layer: u64,
    info_out: *mut LayerInfo,
) -> c_int {
    boundary(|| {
        with_registry(handle, |state| {
            let slot = result_slot(info_out, "layer info")?;
            let l = state
                .registry
                .layer(usize::try_from(layer).unwrap_or(usize::MAX))?
                .clone();
            let name = state.keep(&l.name);
            let component = state.keep(l.component.as_str());
            *slot = LayerInfo {
                size: std::mem::size_of::<LayerInfo>(),
                name,
                tensor_count: l.tensors.len() as u64,
                bytes: l.bytes,
                location: location_code(l.location),
                component,
            };
            Ok(())
        })
    })
}

#[no_mangle]
pub extern "C" fn offload_engine_registry_layer_tensors(
    handle: *mut RegistryHandle,
    layer: u64,
    ids_out: *mut u64,
    capacity: usize,
    count_out: *mut usize,
) -> c_int {
    boundary(|| {
        with_registry(handle, |state| {
            let count_slot = out(count_out, "count_out")?;
            let l = state
                .registry
                .layer(usize::try_from(layer).unwrap_or(usize::MAX))?;
            let n = l.tensors.len();
            if n > 0 && ids_out.is_null() {
                return Err(Error::new(Status::NullPointer, "ids_out is NULL"));
            }
            if capacity < n {
                return Err(Error::invalid(format!(
                "layer {layer} has {n} tensors but the array holds {capacity} (query with capacity 0 is not enough)"
            )));
            }
            if n > 0 {
                // SAFETY: the caller provides `capacity` >= n writable u64s at `ids_out`.
                let ids = unsafe { std::slice::from_raw_parts_mut(ids_out, n) };
                for (dst, src) in ids.iter_mut().zip(&l.tensors) {
                    *dst = src.0;
                }
            }
            *count_slot = n;
            Ok(())
        })
    })
}
