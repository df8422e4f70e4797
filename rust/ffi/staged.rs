//! The three-stage executor's C face: a host's graph-building callbacks run as passes.

use std::ffi::{c_int, c_void};

use crate::error::{Error, Result, Status};
use crate::executor::{Executor, InputFill, LayeredModel};
use crate::ffi::boundary::{boundary, input, optional_out, sized_structs};
use crate::ffi::engine::EngineHandle;
use crate::ffi::handles::{checked, lock, Kind};
use crate::ggml as sys;

sized_structs!(StagedModelC);

type BuildInput =
    unsafe extern "C" fn(user: *mut c_void, ctx: *mut sys::ggml_context) -> *mut sys::ggml_tensor;
type SetInputs = unsafe extern "C" fn(user: *mut c_void) -> c_int;
type BuildLayer = unsafe extern "C" fn(
    user: *mut c_void,
    ctx: *mut sys::ggml_context,
    layer: u64,
    x: *mut sys::ggml_tensor,
) -> *mut sys::ggml_tensor;
type BuildOutput = unsafe extern "C" fn(
    user: *mut c_void,
    ctx: *mut sys::ggml_context,
    x: *mut sys::ggml_tensor,
) -> *mut sys::ggml_tensor;

#[repr(C)]
pub struct StagedModelC {
    pub size: usize,
    pub user: *mut c_void,
    pub layer_count: u64,
    pub activation_ne: [i64; 2],
    pub build_input: Option<BuildInput>,
    pub set_inputs: Option<SetInputs>,
    pub build_layer: Option<BuildLayer>,
    pub build_output: Option<BuildOutput>,
}

/// A host's C callbacks seen as a `LayeredModel`.
struct CallbackModel<'a> {
    model: &'a StagedModelC,
    build_input: BuildInput,
    build_layer: BuildLayer,
    build_output: BuildOutput,
}

impl LayeredModel for CallbackModel<'_> {
    fn layer_count(&self) -> usize {
        self.model.layer_count as usize
    }

    fn activation_shape(&self) -> [i64; 2] {
        self.model.activation_ne
    }

    fn after_input_alloc(&self) -> Result<()> {
        let Some(set_inputs) = self.model.set_inputs else {
            return Ok(());
        };
        // SAFETY: the host's callback with the user pointer it gave us.
        let status = unsafe { set_inputs(self.model.user) };
        if status == 0 {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "the host's set_inputs callback failed ({status})"
            )))
        }
    }

    unsafe fn build_input(
        &self,
        ctx: *mut sys::ggml_context,
    ) -> (*mut sys::ggml_tensor, Vec<InputFill>) {
        // SAFETY: the host's callback; the executor checks what it returns.
        (
            unsafe { (self.build_input)(self.model.user, ctx) },
            Vec::new(),
        )
    }

    unsafe fn build_layer(
        &self,
        ctx: *mut sys::ggml_context,
        layer: usize,
        x: *mut sys::ggml_tensor,
    ) -> *mut sys::ggml_tensor {
        // SAFETY: as above.
        unsafe { (self.build_layer)(self.model.user, ctx, layer as u64, x) }
    }

    unsafe fn build_output(
        &self,
        ctx: *mut sys::ggml_context,
        x: *mut sys::ggml_tensor,
    ) -> *mut sys::ggml_tensor {
        // SAFETY: as above.
        unsafe { (self.build_output)(self.model.user, ctx, x) }
    }
}

#[no_mangle]
pub extern "C" fn offload_engine_engine_run_pass(
    handle: *mut EngineHandle,
    model: *const StagedModelC,
    output: *mut c_void,
    output_capacity: usize,
    output_size_out: *mut usize,
) -> c_int {
    boundary(|| {
        let h = checked(handle, Kind::Engine)?;
        let mut engine = h.inner.lock()?;
        let mut cached = lock(&h.executor)?;
        let model = input(model, "staged model")?;
        let (Some(build_input), Some(build_layer), Some(build_output)) =
            (model.build_input, model.build_layer, model.build_output)
        else {
            return Err(Error::new(
                Status::NullPointer,
                "build_input, build_layer and build_output are required",
            ));
        };
        let layers = engine.layer_count() as u64;
        if model.layer_count != layers {
            return Err(Error::invalid(format!(
                "the model declares {} layers but the engine registered {layers}",
                model.layer_count
            )));
        }
        let shape = model.activation_ne;
        if cached.as_ref().is_none_or(|(s, _)| *s != shape) {
            *cached = None; // the old executor's buffers go before new ones are made
            *cached = Some((shape, Executor::new(engine.backend(), shape)?));
        }
        let executor = &mut cached.as_mut().expect("set above").1;
        let adapter = CallbackModel {
            model,
            build_input,
            build_layer,
            build_output,
        };
        let result = executor.run_pass(&adapter, Some(&mut engine))?;
        if !output.is_null() {
            if output_capacity < result.len() {
                return Err(Error::invalid(format!(
                    "the output needs {} bytes but the buffer holds {output_capacity}",
                    result.len()
                )));
            }
            // SAFETY: the caller provides `output_capacity` writable bytes at `output`.
            unsafe {
                std::ptr::copy_nonoverlapping(result.as_ptr(), output.cast::<u8>(), result.len())
            };
        }
        if let Some(slot) = optional_out(output_size_out) {
            *slot = result.len();
        }
        Ok(())
    })
}
