//! The three-stage executor for hosts that split a forward into an input stage, one stage per
//! layer and an output stage (the stable-diffusion.cpp pattern). Activations persist in two
//! device tensors between layer graphs; consecutive resident layers run as one graph.

use std::ptr::NonNull;

use crate::backend::{Backend, Context};
use crate::engine::Engine;
use crate::error::{Error, Result, Status};
use crate::ggml as sys;

/// Host data for an input tensor, set after the input graph is allocated.
pub struct InputFill {
    pub tensor: *mut sys::ggml_tensor,
    pub bytes: Vec<u8>,
}

/// A model the executor can run. Builders create graph nodes in `ctx` (a no-alloc context).
pub trait LayeredModel {
    fn layer_count(&self) -> usize;
    /// Called after the input graph is allocated and before it runs: the place to copy
    /// input data into input tensors (for models that do not return `InputFill`s).
    fn after_input_alloc(&self) -> Result<()> {
        Ok(())
    }
    /// Shape of the persistent activation (f32): [ne0, ne1].
    fn activation_shape(&self) -> [i64; 2];
    /// # Safety
    /// `ctx` is a valid no-alloc ggml context.
    unsafe fn build_input(
        &self,
        ctx: *mut sys::ggml_context,
    ) -> (*mut sys::ggml_tensor, Vec<InputFill>);
    /// # Safety
    /// `ctx` is a valid no-alloc ggml context and `x` a tensor of the activation shape.
    unsafe fn build_layer(
        &self,
        ctx: *mut sys::ggml_context,
        layer: usize,
        x: *mut sys::ggml_tensor,
    ) -> *mut sys::ggml_tensor;
    /// # Safety
    /// As for `build_layer`.
    unsafe fn build_output(
        &self,
        ctx: *mut sys::ggml_context,
        x: *mut sys::ggml_tensor,
    ) -> *mut sys::ggml_tensor;
}

const GRAPH_NODES: usize = 16384;

/// Runs passes of a `LayeredModel` on one backend, with or without an engine.
pub struct Executor {
    /// Borrowed: the engine's (or host's) compute backend.
    backend: Backend,
    activation_elements: i64,
    allocator: NonNull<sys::ggml_gallocr>,
    _act_ctx: Context,
    act_buffer: NonNull<sys::ggml_backend_buffer>,
    activations: [*mut sys::ggml_tensor; 2],
}

impl Executor {
    pub fn new(backend: &Backend, shape: [i64; 2]) -> Result<Executor> {
        if shape.iter().any(|&d| d <= 0) {
            return Err(Error::invalid(format!(
                "activation shape {shape:?} must be positive"
            )));
        }
        // SAFETY: valid backend.
        let buft = unsafe { sys::ggml_backend_get_default_buffer_type(backend.raw()) };
        // SAFETY: valid buffer type.
        let allocator = NonNull::new(unsafe { sys::ggml_gallocr_new(buft) })
            .ok_or_else(|| Error::new(Status::OutOfMemory, "cannot create a graph allocator"))?;
        // SAFETY: ggml_tensor_overhead has no preconditions.
        let act_ctx = Context::new(4 * unsafe { sys::ggml_tensor_overhead() }, true)?;
        let mut activations = [std::ptr::null_mut(); 2];
        for a in &mut activations {
            // SAFETY: valid context with room for the two tensors.
            *a = unsafe {
                sys::ggml_new_tensor_2d(act_ctx.raw(), sys::GGML_TYPE_F32, shape[0], shape[1])
            };
        }
        // SAFETY: allocates the context's tensors in one backend buffer.
        let act_buffer = NonNull::new(unsafe {
            sys::ggml_backend_alloc_ctx_tensors(act_ctx.raw(), backend.raw())
        })
        .ok_or_else(|| {
            Error::new(
                Status::OutOfMemory,
                "cannot allocate the activation buffers",
            )
        })?;
        Ok(Executor {
            backend: Backend::borrowed(backend.raw())?,
            activation_elements: shape[0] * shape[1],
            allocator,
            _act_ctx: act_ctx,
            act_buffer,
            activations,
        })
    }

    fn compute(
        &self,
        ctx: &Context,
        out: *mut sys::ggml_tensor,
        fills: &[InputFill],
        after_alloc: Option<&dyn Fn() -> Result<()>>,
    ) -> Result<()> {
        // SAFETY: building a graph in a valid context from tensors of that context.
        let graph = unsafe { sys::ggml_new_graph_custom(ctx.raw(), GRAPH_NODES, false) };
        // SAFETY: as above.
        unsafe { sys::ggml_build_forward_expand(graph, out) };
        // SAFETY: the allocator places every tensor without data; weights already have data.
        if !unsafe { sys::ggml_gallocr_alloc_graph(self.allocator.as_ptr(), graph) } {
            return Err(Error::new(
                Status::OutOfMemory,
                "cannot allocate the compute buffer",
            ));
        }
        for fill in fills {
            // SAFETY: input tensors were allocated just above; sizes match by construction.
            let size = unsafe { sys::ggml_nbytes(fill.tensor) };
            if size != fill.bytes.len() {
                return Err(Error::new(Status::Internal, "input size mismatch"));
            }
            // SAFETY: as above.
            unsafe {
                sys::ggml_backend_tensor_set(fill.tensor, fill.bytes.as_ptr().cast(), 0, size)
            };
        }
        if let Some(hook) = after_alloc {
            hook()?;
        }
        // SAFETY: the graph is fully allocated on buffers of this backend's device.
        unsafe { self.backend.compute(graph) }
    }

    fn graph_context() -> Result<Context> {
        // SAFETY: overhead queries without preconditions.
        let bytes = unsafe {
            sys::ggml_tensor_overhead() * GRAPH_NODES
                + sys::ggml_graph_overhead_custom(GRAPH_NODES, false)
        };
        Context::new(bytes, true)
    }

    /// One forward pass. With an engine, each layer is bracketed by begin/end so streamed
    /// layers are on the device exactly while their graph runs. On error the engine's pass
    /// is abandoned (`offload_all`), so the engine stays usable.
    pub fn run_pass(
        &mut self,
        model: &dyn LayeredModel,
        mut engine: Option<&mut Engine>,
    ) -> Result<Vec<u8>> {
        let result = self.run_pass_inner(model, engine.as_deref_mut());
        if result.is_err() {
            if let Some(engine) = engine {
                let _ = engine.offload_all();
            }
        }
        result
    }

    /// Checks what a builder returned before ggml sees it: ggml asserts abort the process.
    fn check_built(
        &self,
        tensor: *mut sys::ggml_tensor,
        what: &str,
    ) -> Result<*mut sys::ggml_tensor> {
        if tensor.is_null() {
            return Err(Error::invalid(format!("{what} returned NULL")));
        }
        // SAFETY: a non-null tensor from the builder, created in our context.
        let elements = unsafe { sys::ggml_nelements(tensor) };
        if elements != self.activation_elements {
            return Err(Error::invalid(format!(
                "{what} returned a tensor of {elements} elements; the activation has {}",
                self.activation_elements
            )));
        }
        Ok(tensor)
    }

    fn run_pass_inner(
        &mut self,
        model: &dyn LayeredModel,
        mut engine: Option<&mut Engine>,
    ) -> Result<Vec<u8>> {
        let mut current = 0usize;
        {
            let ctx = Self::graph_context()?;
            // SAFETY: builders get a valid no-alloc context.
            let (x0, fills) = unsafe { model.build_input(ctx.raw()) };
            let x0 = self.check_built(x0, "the input stage")?;
            // SAFETY: copy into the persistent activation (same element count, checked).
            let out = unsafe { sys::ggml_cpy(ctx.raw(), x0, self.activations[0]) };
            self.compute(&ctx, out, &fills, Some(&|| model.after_input_alloc()))?;
        }
        if let Some(engine) = engine.as_deref_mut() {
            engine.begin_pass()?;
        }
        let layers = model.layer_count();
        let resident = |l: usize, e: &Option<&mut Engine>| {
            e.as_ref()
                .and_then(|e| e.streamer_ref())
                .is_none_or(|s| s.is_resident(l))
        };
        let mut layer = 0;
        while layer < layers {
            // Consecutive resident layers form one graph; a streamed layer runs alone.
            let mut end = layer + 1;
            if resident(layer, &engine) {
                while end < layers && resident(end, &engine) {
                    end += 1;
                }
            }
            if let Some(engine) = engine.as_deref_mut() {
                for l in layer..end {
                    engine.begin_layer(l)?;
                    if l + 1 < end {
                        engine.end_layer(l)?; // resident: nothing moves; keeps the counters honest
                    }
                }
            }
            let ctx = Self::graph_context()?;
            let mut x = self.activations[current];
            for l in layer..end {
                // SAFETY: builders get a valid context and an activation-shaped tensor.
                x = unsafe { model.build_layer(ctx.raw(), l, x) };
                x = self.check_built(x, "the layer stage")?;
            }
            // SAFETY: copy into the other persistent activation (element count checked).
            let out = unsafe { sys::ggml_cpy(ctx.raw(), x, self.activations[1 - current]) };
            self.compute(&ctx, out, &[], None)?;
            if let Some(engine) = engine.as_deref_mut() {
                engine.end_layer(end - 1)?;
            }
            current = 1 - current;
            layer = end;
        }
        if let Some(engine) = engine {
            engine.end_pass()?;
        }
        let ctx = Self::graph_context()?;
        // SAFETY: builder gets a valid context and the final activation.
        let out = unsafe { model.build_output(ctx.raw(), self.activations[current]) };
        if out.is_null() {
            return Err(Error::invalid("the output stage returned NULL"));
        }
        // SAFETY: marks the result so the allocator keeps it until we read it.
        unsafe { sys::ggml_set_output(out) };
        self.compute(&ctx, out, &[], None)?;
        // SAFETY: the output tensor is allocated and computed.
        let size = unsafe { sys::ggml_nbytes(out) };
        let mut bytes = vec![0u8; size];
        // SAFETY: reading `size` bytes from a computed tensor into a buffer of that size.
        unsafe { sys::ggml_backend_tensor_get(out, bytes.as_mut_ptr().cast(), 0, size) };
        Ok(bytes)
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        // SAFETY: we own the allocator and the activation buffer.
        unsafe {
            sys::ggml_gallocr_free(self.allocator.as_ptr());
            sys::ggml_backend_buffer_free(self.act_buffer.as_ptr());
        }
    }
}
