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

/// Tensors one builder call (one stage, one layer) may create. Graphs are sized from what
/// the builders made, so this is the only limit: a builder that creates more runs ggml out of
/// context memory, which aborts.
pub const MAX_BUILDER_TENSORS: usize = 32768;

/// Consecutive resident layers share one graph (and builder context) while it holds fewer
/// than this many tensors, so the next layer still has MAX_BUILDER_TENSORS of room.
const MERGE_BELOW_TENSORS: usize = MAX_BUILDER_TENSORS;

/// Types ggml can copy into the f32 activation on every backend.
fn activation_type_ok(ty: sys::ggml_type) -> bool {
    matches!(
        ty,
        sys::GGML_TYPE_F32 | sys::GGML_TYPE_F16 | sys::GGML_TYPE_BF16
    )
}

/// Runs passes of a `LayeredModel` on one backend, with or without an engine.
pub struct Executor {
    /// Borrowed: the engine's (or host's) compute backend.
    backend: Backend,
    activation_elements: i64,
    activation_shape: [i64; 2],
    allocator: NonNull<sys::ggml_gallocr>,
    _act_ctx: Context,
    act_buffer: NonNull<sys::ggml_backend_buffer>,
    activations: [*mut sys::ggml_tensor; 2],
    /// The context builders create nodes in, reused from graph to graph (reset each time).
    builder: Context,
}

// SAFETY: the allocator, activation buffer and tensors are ggml objects this executor owns
// alone; ggml does not tie them to the thread that made them, and the C handle that holds an
// executor uses it behind a mutex, one call at a time.
unsafe impl Send for Executor {}

/// The distinct tensors a graph computing `out` visits (nodes and leafs), not counting those
/// in `seen` already; adds them to `seen`. ggml's graph must be at least this large.
fn count_new_tensors(
    out: *mut sys::ggml_tensor,
    seen: &mut std::collections::HashSet<usize>,
) -> usize {
    let mut stack = vec![out];
    let mut added = 0;
    while let Some(t) = stack.pop() {
        if t.is_null() || !seen.insert(t as usize) {
            continue;
        }
        added += 1;
        // SAFETY: tensors reachable from a builder's result are valid ggml tensors (of our
        // contexts, the host's weights, or the activations).
        for &src in unsafe { &(*t).src } {
            if !src.is_null() {
                stack.push(src);
            }
        }
    }
    added
}

impl Executor {
    pub fn new(backend: &Backend, shape: [i64; 2]) -> Result<Executor> {
        if shape.iter().any(|&d| d <= 0) {
            return Err(Error::invalid(format!(
                "activation shape {shape:?} must be positive"
            )));
        }
        // ggml sizes are int64: the element count and its f32 bytes must fit.
        let elements = shape[0]
            .checked_mul(shape[1])
            .filter(|&n| n <= i64::MAX / 4)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "activation shape {shape:?} has more elements than ggml can size"
                ))
            })?;
        // SAFETY: valid backend.
        let buft = unsafe { sys::ggml_backend_get_default_buffer_type(backend.raw()) };
        // SAFETY: valid buffer type.
        let allocator = NonNull::new(unsafe { sys::ggml_gallocr_new(buft) })
            .ok_or_else(|| Error::new(Status::OutOfMemory, "cannot create a graph allocator"))?;
        // SAFETY: ggml_tensor_overhead has no preconditions.
        let act_ctx = Context::new(4 * unsafe { sys::ggml_tensor_overhead() }, true)?;
        let mut activations = [std::ptr::null_mut(); 2];
        for a in &mut activations {
            // SAFETY: valid context with room for the two tensors; the shape fits int64.
            *a = unsafe {
                sys::ggml_new_tensor_2d(act_ctx.raw(), sys::GGML_TYPE_F32, shape[0], shape[1])
            };
        }
        // SAFETY: allocates the context's tensors in one backend buffer.
        let act_buffer = NonNull::new(unsafe {
            sys::ggml_backend_alloc_ctx_tensors(act_ctx.raw(), backend.raw())
        });
        let Some(act_buffer) = act_buffer else {
            // SAFETY: the allocator was created above and is not used again.
            unsafe { sys::ggml_gallocr_free(allocator.as_ptr()) };
            return Err(Error::new(
                Status::OutOfMemory,
                format!("cannot allocate the activation buffers ({elements} f32 elements, twice)"),
            ));
        };
        Ok(Executor {
            backend: Backend::borrowed(backend.raw())?,
            activation_elements: elements,
            activation_shape: shape,
            allocator,
            _act_ctx: act_ctx,
            act_buffer,
            activations,
            builder: Context::new(
                // SAFETY: overhead query without preconditions.
                unsafe { sys::ggml_tensor_overhead() }
                    * (MERGE_BELOW_TENSORS + MAX_BUILDER_TENSORS + 1),
                true,
            )?,
        })
    }

    /// The builder context, emptied for a new graph.
    fn fresh_context(&mut self) -> *mut sys::ggml_context {
        let ctx = self.builder.raw();
        // SAFETY: a context we own; nothing built in it earlier is used any more (its graph
        // was computed and its results copied out).
        unsafe { sys::ggml_reset(ctx) };
        ctx
    }

    /// Tensors created in the builder context since it was emptied.
    fn built_tensors(&self) -> usize {
        // SAFETY: a valid context; the overhead query has no preconditions. In a no-alloc
        // context every object is one tensor header of exactly this overhead.
        unsafe { sys::ggml_used_mem(self.builder.raw()) / sys::ggml_tensor_overhead() }
    }

    /// Computes `out` in a graph sized for its `tensors` distinct tensors.
    fn compute(
        &self,
        out: *mut sys::ggml_tensor,
        tensors: usize,
        fills: &[InputFill],
        after_alloc: Option<&dyn Fn() -> Result<()>>,
    ) -> Result<()> {
        let size = tensors.max(sys::GGML_DEFAULT_GRAPH_SIZE as usize);
        // SAFETY: overhead queries without preconditions.
        let bytes =
            unsafe { sys::ggml_graph_overhead_custom(size, false) + sys::ggml_tensor_overhead() };
        let graph_ctx = Context::new(bytes, true)?;
        // SAFETY: the context has room for one graph of `size`, which holds every node and
        // leaf reachable from `out` (counted by the caller).
        let graph = unsafe { sys::ggml_new_graph_custom(graph_ctx.raw(), size, false) };
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

    /// One forward pass. With an engine, each layer is bracketed by begin/end so streamed
    /// layers are on the device exactly while their graph runs. On error the engine's pass
    /// is abandoned (`offload_all`), so the engine stays usable. A pass the host opened
    /// itself is not ours to run inside or to abandon: that is refused untouched.
    pub fn run_pass(
        &mut self,
        model: &dyn LayeredModel,
        mut engine: Option<&mut Engine>,
    ) -> Result<Vec<u8>> {
        if engine
            .as_deref()
            .and_then(Engine::streamer_ref)
            .is_some_and(|s| s.in_pass())
        {
            return Err(Error::state(
                "run_pass while a pass is open (call pass_end first)",
            ));
        }
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
        let (elements, ty) = unsafe { (sys::ggml_nelements(tensor), (*tensor).type_) };
        if elements != self.activation_elements {
            return Err(Error::invalid(format!(
                "{what} returned a tensor of {elements} elements; the activation has {}",
                self.activation_elements
            )));
        }
        if !activation_type_ok(ty) {
            return Err(Error::invalid(format!(
                "{what} returned a tensor of ggml type {ty}; the activation takes f32, f16 or bf16"
            )));
        }
        Ok(tensor)
    }

    /// What a layer in a merged run gets from the one before it: exactly what it would get
    /// in a graph of its own, a contiguous f32 tensor of the activation's shape.
    ///
    /// # Safety
    /// `ctx` is the builder context and `y` a checked builder result (activation elements,
    /// f32, f16 or bf16).
    unsafe fn as_activation(
        &self,
        ctx: *mut sys::ggml_context,
        y: *mut sys::ggml_tensor,
    ) -> *mut sys::ggml_tensor {
        let [ne0, ne1] = self.activation_shape;
        // SAFETY: the caller's guarantee; cast, cont and reshape accept these tensors.
        unsafe {
            let mut x = y;
            if (*x).type_ != sys::GGML_TYPE_F32 {
                x = sys::ggml_cast(ctx, x, sys::GGML_TYPE_F32);
            } else if !sys::ggml_is_contiguous(x) {
                x = sys::ggml_cont(ctx, x);
            }
            if (*x).ne[0] != ne0 || (*x).ne[1] != ne1 || sys::ggml_n_dims(x) > 2 {
                x = sys::ggml_reshape_2d(ctx, x, ne0, ne1);
            }
            x
        }
    }

    fn run_pass_inner(
        &mut self,
        model: &dyn LayeredModel,
        mut engine: Option<&mut Engine>,
    ) -> Result<Vec<u8>> {
        let mut current = 0usize;
        {
            let ctx = self.fresh_context();
            // SAFETY: builders get a valid no-alloc context.
            let (x0, fills) = unsafe { model.build_input(ctx) };
            let x0 = self.check_built(x0, "the input stage")?;
            // SAFETY: copy into the persistent activation (element count and type checked).
            let out = unsafe { sys::ggml_cpy(ctx, x0, self.activations[0]) };
            let tensors = count_new_tensors(out, &mut Default::default());
            self.compute(out, tensors, &fills, Some(&|| model.after_input_alloc()))?;
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
            // Consecutive resident layers form one graph while it has room for another layer;
            // a streamed layer runs alone.
            let ctx = self.fresh_context();
            let mut seen = std::collections::HashSet::new();
            let mut tensors = 0usize;
            let mut x = self.activations[current];
            let mut end = layer;
            loop {
                if let Some(engine) = engine.as_deref_mut() {
                    if end > layer {
                        engine.end_layer(end - 1)?; // resident: nothing moves; counters stay honest
                    }
                    engine.begin_layer(end)?;
                }
                // SAFETY: builders get a valid context and an activation-shaped tensor.
                x = unsafe { model.build_layer(ctx, end, x) };
                x = self.check_built(x, "the layer stage")?;
                tensors += count_new_tensors(x, &mut seen);
                end += 1;
                let merge = resident(end - 1, &engine)
                    && end < layers
                    && resident(end, &engine)
                    && self.built_tensors() < MERGE_BELOW_TENSORS;
                if !merge {
                    break;
                }
                // SAFETY: `x` was checked just above; `ctx` is the builder context.
                x = unsafe { self.as_activation(ctx, x) };
            }
            // SAFETY: copy into the other persistent activation (element count and type
            // checked); the context keeps one tensor of room for it past the builders' share.
            let out = unsafe { sys::ggml_cpy(ctx, x, self.activations[1 - current]) };
            tensors += count_new_tensors(out, &mut seen);
            self.compute(out, tensors, &[], None)?;
            if let Some(engine) = engine.as_deref_mut() {
                engine.end_layer(end - 1)?;
            }
            current = 1 - current;
            layer = end;
        }
        if let Some(engine) = engine {
            engine.end_pass()?;
        }
        let ctx = self.fresh_context();
        // SAFETY: builder gets a valid context and the final activation.
        let out = unsafe { model.build_output(ctx, self.activations[current]) };
        if out.is_null() {
            return Err(Error::invalid("the output stage returned NULL"));
        }
        // SAFETY: marks the result so the allocator keeps it until we read it.
        unsafe { sys::ggml_set_output(out) };
        let tensors = count_new_tensors(out, &mut Default::default());
        self.compute(out, tensors, &[], None)?;
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
