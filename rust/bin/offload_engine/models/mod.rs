//! The command's built-in models with deterministic weights and realistic tensor names, for
//! the demo, the benchmarks and the streaming tests (which include this module by path). Two architectures with different naming schemes and
//! layer sizes: a llama-style decoder (`blk.N.*`) and a Flux-style stack
//! (`double_blocks.N.*` then `single_blocks.N.*`).

use std::ffi::CString;
use std::ptr::NonNull;

use offload_engine::backend::Backend;
use offload_engine::error::{Error, Result, Status};
use offload_engine::executor::{InputFill, LayeredModel};
use offload_engine::ggml as sys;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Flux,
}

#[derive(Debug, Clone)]
pub struct DemoConfig {
    pub architecture: Architecture,
    pub hidden: i64,
    pub heads: i64,
    pub ffn: i64,
    /// Llama: decoder layers. Flux: double blocks (single blocks are twice as many).
    pub layers: usize,
    pub vocab: i64,
    pub tokens: i64,
    pub seed: u64,
    /// ggml type of the weight matrices (F16 by default; Q8_0 or Q4_0 make compute heavier
    /// per byte moved, which is what diffusion- and prefill-like workloads look like).
    pub matrix_type: sys::ggml_type,
}

impl DemoConfig {
    /// The demo's default: about 325 MB of f16 weights in 12 layers.
    pub fn default_llama() -> DemoConfig {
        DemoConfig {
            architecture: Architecture::Llama,
            hidden: 1024,
            heads: 8,
            ffn: 2816,
            layers: 12,
            vocab: 4096,
            tokens: 16,
            seed: 42,
            matrix_type: sys::GGML_TYPE_F16,
        }
    }

    /// Small models for tests (a few MB).
    pub fn tiny(architecture: Architecture) -> DemoConfig {
        DemoConfig {
            architecture,
            hidden: 64,
            heads: 4,
            ffn: 160,
            layers: 6,
            vocab: 128,
            tokens: 4,
            seed: 7,
            matrix_type: sys::GGML_TYPE_F16,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.hidden <= 0 || self.heads <= 0 || self.hidden % self.heads != 0 || self.ffn <= 0 {
            return Err(Error::invalid(
                "demo model: hidden must be a positive multiple of heads",
            ));
        }
        let supported = [
            sys::GGML_TYPE_F16,
            sys::GGML_TYPE_F32,
            sys::GGML_TYPE_Q8_0,
            sys::GGML_TYPE_Q4_0,
        ];
        if !supported.contains(&self.matrix_type) {
            return Err(Error::invalid(
                "demo model: matrices are f16, f32, q8_0 or q4_0",
            ));
        }
        // SAFETY: a supported type id.
        let block = unsafe { sys::ggml_blck_size(self.matrix_type) };
        if self.hidden % block != 0 || self.ffn % block != 0 {
            return Err(Error::invalid(format!(
                "demo model: hidden and ffn must be multiples of {block}"
            )));
        }
        if self.layers == 0 || self.vocab <= 0 || self.tokens <= 0 {
            return Err(Error::invalid(
                "demo model: layers, vocab and tokens must be positive",
            ));
        }
        Ok(())
    }
}

struct LayerWeights {
    mats: Vec<*mut sys::ggml_tensor>,
    norms: Vec<*mut sys::ggml_tensor>,
    kind: BlockKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockKind {
    /// attn_norm, q, k, v, o, ffn_norm, gate, up, down
    Decoder,
    /// a two-matrix residual MLP per named sub-block
    Mlp,
}

/// A demo model whose weights live in one host (CPU) buffer, like a host that loaded them.
pub struct DemoModel {
    pub config: DemoConfig,
    ctx: NonNull<sys::ggml_context>,
    /// `None` for a model whose weights stay in its file (disk tier).
    buffer: Option<NonNull<sys::ggml_backend_buffer>>,
    layers: Vec<LayerWeights>,
    token_embd: *mut sys::ggml_tensor,
    output_norm: *mut sys::ggml_tensor,
    output: *mut sys::ggml_tensor,
    weight_bytes: u64,
}

impl DemoModel {
    /// Weights in host memory, like a host that loaded them.
    pub fn new(config: DemoConfig) -> Result<DemoModel> {
        DemoModel::on_device(
            config,
            &offload_engine::backend::Device::select(Some("CPU"))?,
        )
    }

    /// Weights in `device`'s own memory: the run without any engine on that device.
    pub fn on_device(
        config: DemoConfig,
        device: &offload_engine::backend::Device,
    ) -> Result<DemoModel> {
        let mut model = DemoModel::unallocated(config)?;
        let buft = device.buffer_type();
        // SAFETY: allocates every tensor of the context in one host buffer.
        let buffer =
            unsafe { sys::ggml_backend_alloc_ctx_tensors_from_buft(model.ctx.as_ptr(), buft) };
        model.buffer =
            Some(NonNull::new(buffer).ok_or_else(|| {
                Error::new(Status::OutOfMemory, "cannot allocate the demo weights")
            })?);
        model.fill_weights();
        Ok(model)
    }

    /// The model's tensors without memory: for a host that lets the engine load weights
    /// from the model file (disk tier).
    pub fn unallocated(config: DemoConfig) -> Result<DemoModel> {
        config.validate()?;
        let max_tensors = config.layers * 16 + 16;
        let params = sys::ggml_init_params {
            // SAFETY: no preconditions.
            mem_size: max_tensors * unsafe { sys::ggml_tensor_overhead() },
            mem_buffer: std::ptr::null_mut(),
            no_alloc: true,
        };
        // SAFETY: metadata-only context.
        let ctx = NonNull::new(unsafe { sys::ggml_init(params) })
            .ok_or_else(|| Error::new(Status::OutOfMemory, "cannot create the demo context"))?;
        let c = ctx.as_ptr();
        let (h, f) = (config.hidden, config.ffn);
        let new = |name: &str, ty: sys::ggml_type, ne0: i64, ne1: i64| -> *mut sys::ggml_tensor {
            let cname = CString::new(name).expect("names have no NUL");
            // SAFETY: valid context with room for `max_tensors` tensors.
            unsafe {
                let t = if ne1 == 1 {
                    sys::ggml_new_tensor_1d(c, ty, ne0)
                } else {
                    sys::ggml_new_tensor_2d(c, ty, ne0, ne1)
                };
                sys::ggml_set_name(t, cname.as_ptr());
                t
            }
        };
        let f16 = config.matrix_type;
        let f32 = sys::GGML_TYPE_F32;
        let mut layers = Vec::new();
        match config.architecture {
            Architecture::Llama => {
                for i in 0..config.layers {
                    let p = format!("blk.{i}.");
                    let norms = vec![
                        new(&format!("{p}attn_norm.weight"), f32, h, 1),
                        new(&format!("{p}ffn_norm.weight"), f32, h, 1),
                    ];
                    let mats = vec![
                        new(&format!("{p}attn_q.weight"), f16, h, h),
                        new(&format!("{p}attn_k.weight"), f16, h, h),
                        new(&format!("{p}attn_v.weight"), f16, h, h),
                        new(&format!("{p}attn_output.weight"), f16, h, h),
                        new(&format!("{p}ffn_gate.weight"), f16, h, f),
                        new(&format!("{p}ffn_up.weight"), f16, h, f),
                        new(&format!("{p}ffn_down.weight"), f16, f, h),
                    ];
                    layers.push(LayerWeights {
                        mats,
                        norms,
                        kind: BlockKind::Decoder,
                    });
                }
            }
            Architecture::Flux => {
                let prefix = "model.diffusion_model.";
                for i in 0..config.layers {
                    let p = format!("{prefix}double_blocks.{i}.");
                    let norms = vec![
                        new(&format!("{p}img_norm1.scale"), f32, h, 1),
                        new(&format!("{p}img_norm2.scale"), f32, h, 1),
                    ];
                    let mats = vec![
                        new(&format!("{p}img_attn.qkv.weight"), f16, h, 3 * h),
                        new(&format!("{p}img_attn.proj.weight"), f16, 3 * h, h),
                        new(&format!("{p}img_mlp.0.weight"), f16, h, f),
                        new(&format!("{p}img_mlp.2.weight"), f16, f, h),
                    ];
                    layers.push(LayerWeights {
                        mats,
                        norms,
                        kind: BlockKind::Mlp,
                    });
                }
                for i in 0..config.layers * 2 {
                    let p = format!("{prefix}single_blocks.{i}.");
                    let norms = vec![new(&format!("{p}norm.scale"), f32, h, 1)];
                    let mats = vec![
                        new(&format!("{p}linear1.weight"), f16, h, f),
                        new(&format!("{p}linear2.weight"), f16, f, h),
                    ];
                    layers.push(LayerWeights {
                        mats,
                        norms,
                        kind: BlockKind::Mlp,
                    });
                }
            }
        }
        let embd_name = match config.architecture {
            Architecture::Llama => "token_embd.weight",
            Architecture::Flux => "model.diffusion_model.img_in.weight",
        };
        let token_embd = new(embd_name, f32, h, config.vocab);
        let output_norm = new(
            match config.architecture {
                Architecture::Llama => "output_norm.weight",
                Architecture::Flux => "model.diffusion_model.final_layer.norm.scale",
            },
            f32,
            h,
            1,
        );
        let output = new(
            match config.architecture {
                Architecture::Llama => "output.weight",
                Architecture::Flux => "model.diffusion_model.final_layer.linear.weight",
            },
            f16,
            h,
            config.vocab,
        );
        let mut weight_bytes = 0u64;
        // SAFETY: iterating our own context's tensor metadata.
        unsafe {
            let mut t = sys::ggml_get_first_tensor(c);
            while !t.is_null() {
                weight_bytes += sys::ggml_nbytes(t) as u64;
                t = sys::ggml_get_next_tensor(c, t);
            }
        }
        Ok(DemoModel {
            config,
            ctx,
            buffer: None,
            layers,
            token_embd,
            output_norm,
            output,
            weight_bytes,
        })
    }

    /// Writes the weights as a GGUF file (tensors in execution order, as converters do).
    pub fn write_gguf(&self, path: &std::path::Path) -> Result<()> {
        use std::os::unix::fs::FileExt;
        if self.buffer.is_none() {
            return Err(Error::state("the model has no weights in memory to write"));
        }
        let mut writer = offload_engine::gguf::Writer::new();
        writer.add_kv(
            "general.architecture",
            offload_engine::gguf::Value::Str("offload-engine-demo".into()),
        );
        let mut tensors = Vec::new();
        // SAFETY: iterating our own context's allocated tensors.
        unsafe {
            let mut t = sys::ggml_get_first_tensor(self.ctx.as_ptr());
            while !t.is_null() {
                let name = std::ffi::CStr::from_ptr((*t).name.as_ptr())
                    .to_string_lossy()
                    .into_owned();
                let dims: Vec<u64> = (0..sys::ggml_n_dims(t))
                    .map(|d| (*t).ne[d as usize] as u64)
                    .collect();
                writer.add_tensor_zeroed(&name, (*t).type_, &dims)?;
                tensors.push((name, t));
                t = sys::ggml_get_next_tensor(self.ctx.as_ptr(), t);
            }
        }
        writer.write_path(path)?;
        let layout = offload_engine::gguf::read_path(path)?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| Error::io(path.display(), e))?;
        for (name, t) in tensors {
            let info = layout.tensor(&name).ok_or_else(|| {
                Error::new(
                    Status::Internal,
                    format!("'{name}' missing from the written file"),
                )
            })?;
            // SAFETY: the tensor's data holds `ggml_nbytes` bytes in our host buffer.
            let data =
                unsafe { std::slice::from_raw_parts((*t).data as *const u8, sys::ggml_nbytes(t)) };
            file.write_all_at(data, info.offset)
                .map_err(|e| Error::io(path.display(), e))?;
        }
        Ok(())
    }

    /// Deterministic pseudo-random weights scaled by 1/sqrt(fan-in); norms near 1.
    fn fill_weights(&mut self) {
        let mut index = 0u64;
        let mut total = 0u64;
        // SAFETY: iterating the tensors of our own context.
        let mut t = unsafe { sys::ggml_get_first_tensor(self.ctx.as_ptr()) };
        while !t.is_null() {
            // SAFETY: every tensor was allocated in our host buffer.
            let (ty, ne0, n) = unsafe { ((*t).type_, (*t).ne[0], sys::ggml_nelements(t)) };
            let mut state = self.config.seed ^ (index.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
            let is_norm = unsafe { sys::ggml_n_dims(t) } == 1;
            let scale = 1.0 / (ne0 as f32).sqrt();
            let values: Vec<f32> = (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let unit = (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                    if is_norm {
                        1.0 + 0.1 * unit
                    } else {
                        unit * scale
                    }
                })
                .collect();
            // Encoded on the host, then set through the backend: the buffer may be a device's.
            // SAFETY: a valid allocated tensor.
            let nbytes = unsafe { sys::ggml_nbytes(t) };
            let mut encoded = vec![0u8; nbytes];
            // SAFETY: `encoded` holds the tensor's bytes: n elements of type `ty`; quantized
            // rows are ne0 elements (a multiple of the block size, checked in validate).
            unsafe {
                if ty == sys::GGML_TYPE_F16 {
                    sys::ggml_fp32_to_fp16_row(values.as_ptr(), encoded.as_mut_ptr().cast(), n);
                } else if ty != sys::GGML_TYPE_F32 {
                    sys::ggml_quantize_chunk(
                        ty,
                        values.as_ptr(),
                        encoded.as_mut_ptr().cast(),
                        0,
                        n / ne0,
                        ne0,
                        std::ptr::null(),
                    );
                } else {
                    std::ptr::copy_nonoverlapping(
                        values.as_ptr().cast::<u8>(),
                        encoded.as_mut_ptr(),
                        nbytes,
                    );
                }
                sys::ggml_backend_tensor_set(t, encoded.as_ptr().cast(), 0, nbytes);
                total += nbytes as u64;
                t = sys::ggml_get_next_tensor(self.ctx.as_ptr(), t);
            }
            index += 1;
        }
        self.weight_bytes = total;
    }

    pub fn context(&self) -> *mut sys::ggml_context {
        self.ctx.as_ptr()
    }

    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    fn token_ids(&self) -> Vec<u8> {
        let ids: Vec<i32> = (0..self.config.tokens)
            .map(|i| ((i * 7919 + 13) % self.config.vocab) as i32)
            .collect();
        ids.iter().flat_map(|v| v.to_ne_bytes()).collect()
    }

    /// # Safety
    /// `ctx` is a valid no-alloc context.
    unsafe fn norm(
        &self,
        ctx: *mut sys::ggml_context,
        x: *mut sys::ggml_tensor,
        w: *mut sys::ggml_tensor,
    ) -> *mut sys::ggml_tensor {
        // SAFETY: graph construction on a valid context.
        unsafe { sys::ggml_mul(ctx, sys::ggml_rms_norm(ctx, x, 1e-5), w) }
    }

    /// # Safety
    /// `ctx` is a valid no-alloc context; `x` is the [hidden, tokens] activation.
    unsafe fn attention(
        &self,
        ctx: *mut sys::ggml_context,
        x: *mut sys::ggml_tensor,
        w: &LayerWeights,
    ) -> *mut sys::ggml_tensor {
        let (h, nh, t) = (self.config.hidden, self.config.heads, self.config.tokens);
        let hd = h / nh;
        // SAFETY: graph construction with shapes that match by construction.
        unsafe {
            let q = sys::ggml_mul_mat(ctx, w.mats[0], x);
            let k = sys::ggml_mul_mat(ctx, w.mats[1], x);
            let v = sys::ggml_mul_mat(ctx, w.mats[2], x);
            let q = sys::ggml_permute(ctx, sys::ggml_reshape_3d(ctx, q, hd, nh, t), 0, 2, 1, 3);
            let k = sys::ggml_permute(ctx, sys::ggml_reshape_3d(ctx, k, hd, nh, t), 0, 2, 1, 3);
            let v = sys::ggml_cont(
                ctx,
                sys::ggml_permute(ctx, sys::ggml_reshape_3d(ctx, v, hd, nh, t), 1, 2, 0, 3),
            );
            let kq = sys::ggml_mul_mat(ctx, k, q);
            let kq = sys::ggml_soft_max_ext(
                ctx,
                kq,
                std::ptr::null_mut(),
                1.0 / (hd as f32).sqrt(),
                0.0,
            );
            let kqv = sys::ggml_mul_mat(ctx, v, kq);
            let merged = sys::ggml_cont(ctx, sys::ggml_permute(ctx, kqv, 0, 2, 1, 3));
            sys::ggml_mul_mat(ctx, w.mats[3], sys::ggml_reshape_2d(ctx, merged, h, t))
        }
    }
}

impl LayeredModel for DemoModel {
    fn layer_count(&self) -> usize {
        self.layers.len()
    }

    fn activation_shape(&self) -> [i64; 2] {
        [self.config.hidden, self.config.tokens]
    }

    unsafe fn build_input(
        &self,
        ctx: *mut sys::ggml_context,
    ) -> (*mut sys::ggml_tensor, Vec<InputFill>) {
        // SAFETY: graph construction on a valid context.
        unsafe {
            let ids = sys::ggml_new_tensor_1d(ctx, sys::GGML_TYPE_I32, self.config.tokens);
            sys::ggml_set_input(ids);
            let x = sys::ggml_get_rows(ctx, self.token_embd, ids);
            (
                x,
                vec![InputFill {
                    tensor: ids,
                    bytes: self.token_ids(),
                }],
            )
        }
    }

    unsafe fn build_layer(
        &self,
        ctx: *mut sys::ggml_context,
        layer: usize,
        x: *mut sys::ggml_tensor,
    ) -> *mut sys::ggml_tensor {
        let w = &self.layers[layer];
        // SAFETY: graph construction on a valid context with matching shapes.
        unsafe {
            match w.kind {
                BlockKind::Decoder => {
                    let h = self.norm(ctx, x, w.norms[0]);
                    let x = sys::ggml_add(ctx, x, self.attention(ctx, h, w));
                    let h = self.norm(ctx, x, w.norms[1]);
                    let gate = sys::ggml_silu(ctx, sys::ggml_mul_mat(ctx, w.mats[4], h));
                    let up = sys::ggml_mul_mat(ctx, w.mats[5], h);
                    sys::ggml_add(
                        ctx,
                        x,
                        sys::ggml_mul_mat(ctx, w.mats[6], sys::ggml_mul(ctx, gate, up)),
                    )
                }
                BlockKind::Mlp => {
                    let mut x = x;
                    for (pair, norm) in w.mats.chunks(2).zip(w.norms.iter()) {
                        let h = self.norm(ctx, x, *norm);
                        let inner = sys::ggml_gelu(ctx, sys::ggml_mul_mat(ctx, pair[0], h));
                        x = sys::ggml_add(ctx, x, sys::ggml_mul_mat(ctx, pair[1], inner));
                    }
                    x
                }
            }
        }
    }

    unsafe fn build_output(
        &self,
        ctx: *mut sys::ggml_context,
        x: *mut sys::ggml_tensor,
    ) -> *mut sys::ggml_tensor {
        // SAFETY: graph construction on a valid context.
        unsafe { sys::ggml_mul_mat(ctx, self.output, self.norm(ctx, x, self.output_norm)) }
    }
}

impl Drop for DemoModel {
    fn drop(&mut self) {
        // SAFETY: we own the buffer and the context; engines using these tensors are gone
        // (they borrow the model and are dropped first).
        unsafe {
            if let Some(buffer) = self.buffer {
                sys::ggml_backend_buffer_free(buffer.as_ptr());
            }
            sys::ggml_free(self.ctx.as_ptr());
        }
    }
}

/// FNV-1a over the output bytes: a short fingerprint to print; equality is checked on bytes.
pub fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Runs `passes` forward passes fully resident without any engine: the reference.
pub fn run_reference(model: &DemoModel, backend: &Backend, passes: usize) -> Result<Vec<u8>> {
    let mut executor = offload_engine::executor::Executor::new(backend, model.activation_shape())?;
    let mut out = Vec::new();
    for _ in 0..passes.max(1) {
        out = executor.run_pass(model, None)?;
    }
    Ok(out)
}

/// What one engine-driven run produced.
pub struct RunResult {
    pub output: Vec<u8>,
    pub pass_seconds: Vec<f64>,
    pub stats: offload_engine::stream::StreamStats,
    pub plan: offload_engine::planner::Plan,
    pub overlap_us: u64,
}

/// Runs `passes` forward passes of `model` through an engine with the given budget.
pub fn run_with_engine(
    model: &DemoModel,
    params: offload_engine::engine::EngineParams,
    workload: &offload_engine::planner::Workload,
    passes: usize,
    trace_path: Option<&std::path::Path>,
) -> Result<RunResult> {
    run_streamed(model, None, params, workload, passes, trace_path)
}

/// As `run_with_engine`; with `file`, the (unallocated) model's weights stream from that
/// GGUF file instead of host memory (the disk tier).
pub fn run_streamed(
    model: &DemoModel,
    file: Option<&std::path::Path>,
    mut params: offload_engine::engine::EngineParams,
    workload: &offload_engine::planner::Workload,
    passes: usize,
    trace_path: Option<&std::path::Path>,
) -> Result<RunResult> {
    params.trace = params.trace || trace_path.is_some();
    let mut engine = offload_engine::engine::Engine::new(params)?;
    // SAFETY: the model's context and tensors outlive the engine (dropped at the end here).
    unsafe {
        match file {
            Some(path) => engine.register_file_backed(model.context(), path)?,
            None => engine.register_context(model.context())?,
        }
    };
    let link = offload_engine::planner::Link::named("ddr4")?;
    let plan = engine.prepare(workload, &link)?.clone();
    let mut executor =
        offload_engine::executor::Executor::new(engine.backend(), model.activation_shape())?;
    let mut output = Vec::new();
    let mut pass_seconds = Vec::with_capacity(passes);
    for _ in 0..passes.max(1) {
        let start = std::time::Instant::now();
        output = executor.run_pass(model, Some(&mut engine))?;
        pass_seconds.push(start.elapsed().as_secs_f64());
    }
    let stats = engine.stats()?;
    let overlap_us = engine
        .streamer_ref()
        .map(|s| s.trace.overlap_us())
        .unwrap_or(0);
    if let Some(path) = trace_path {
        engine.write_trace(path)?;
    }
    drop(executor);
    drop(engine);
    Ok(RunResult {
        output,
        pass_seconds,
        stats,
        plan,
        overlap_us,
    })
}

pub mod pipeline;
