//! Runs llama.cpp on a GGUF model, unmodified or through the engine's drop-in, the way a
//! llama.cpp program does: load, make a context, decode the prompt, then greedy tokens one
//! at a time. Every step's logits are kept, so two runs can be compared bit for bit.

use std::ffi::{c_char, c_void, CString};
use std::path::Path;
use std::time::Instant;

use llama_cpp_sys_2 as ll;
use offload_engine::error::{Error, Result, Status};
use offload_engine::llama::{EvalContext, Hook, LlamaParams};
use offload_engine::planner::Plan;
use offload_engine::stream::StreamStats;

/// How to run llama.cpp.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub prompt: String,
    pub n_predict: u32,
    pub n_ctx: u32,
    /// Tokens per graph (llama.cpp's n_ubatch): the prompt is decoded in pieces this long.
    pub n_ubatch: u32,
    pub threads: i32,
    /// llama.cpp's mmap loading (its default) or plain reads.
    pub mmap: bool,
    /// A threadpool kept for the context's life (what llama.cpp's own tools attach); without
    /// one the CPU backend starts its threads anew for every graph it computes.
    pub threadpool: bool,
    /// A progress line on stderr while generating.
    pub progress: bool,
    /// Where a streamed run writes the engine's timeline (Chrome trace JSON).
    pub trace: Option<std::path::PathBuf>,
}

/// What one run produced.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub prompt_tokens: usize,
    /// The generated tokens.
    pub tokens: Vec<i32>,
    /// The logits after the prompt, then after each generated token was decoded, as digests
    /// of their bits (`logits_digest`): a run keeps 16 bytes per step, not a vocabulary's
    /// worth of floats (1 MiB per step for Gemma 3).
    pub logits: Vec<[u64; 2]>,
    pub text: String,
    pub prefill_seconds: f64,
    /// Decode calls after the prompt, and their time.
    pub decode_steps: usize,
    pub decode_seconds: f64,
}

impl RunResult {
    pub fn prefill_tokens_per_second(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_seconds.max(1e-9)
    }

    pub fn decode_tokens_per_second(&self) -> f64 {
        self.decode_steps as f64 / self.decode_seconds.max(1e-9)
    }
}

/// What the engine did in a streamed run.
#[derive(Debug, Clone)]
pub struct StreamReport {
    pub plan: Plan,
    pub stats: StreamStats,
}

/// llama.cpp's log lines go to ours, errors as warnings and the rest (its load report, its
/// notes about the model file) at info and debug level, so a run prints what the command
/// says; RUST_LOG=info shows llama.cpp's warnings.
unsafe extern "C" fn forward_log(level: ll::ggml_log_level, text: *const c_char, _: *mut c_void) {
    if text.is_null() {
        return;
    }
    // SAFETY: llama.cpp passes a NUL-terminated message.
    let message = unsafe { std::ffi::CStr::from_ptr(text) }.to_string_lossy();
    let message = message.trim_end();
    if message.is_empty() {
        return;
    }
    if level == ll::GGML_LOG_LEVEL_ERROR {
        log::warn!("llama.cpp: {message}");
    } else if level == ll::GGML_LOG_LEVEL_WARN {
        log::info!("llama.cpp: {message}");
    } else {
        log::debug!("llama.cpp: {message}");
    }
}

/// Sets llama.cpp up once per process.
fn init_llama() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        // SAFETY: process-wide initialisation with a callback that lives forever.
        unsafe {
            ll::llama_log_set(Some(forward_log), std::ptr::null_mut());
            ll::llama_backend_init();
        }
    });
}

unsafe extern "C" fn eval_trampoline(
    t: *mut ll::ggml_tensor,
    ask: bool,
    user: *mut c_void,
) -> bool {
    // SAFETY: the two bindings describe the same ggml_tensor; `user` is the run's live
    // EvalContext (see `run`).
    unsafe { offload_engine::llama::eval_callback(t.cast(), ask, user) }
}

/// An eval callback the host had before the engine (chained by the engine, or set alone in
/// an unmodified run).
#[derive(Debug, Clone, Copy)]
pub struct HostEval {
    pub callback: offload_engine::llama::EvalFn,
    pub data: *mut c_void,
}

/// A model llama.cpp loaded, with the hook it was loaded through. Dropping it detaches the
/// hook (when adopted) before llama.cpp frees the model, then frees the hook.
pub struct LoadedModel {
    raw: *mut ll::llama_model,
    hook: Option<Hook>,
}

impl LoadedModel {
    /// Loads `path` as llama.cpp does, into `hook`'s buffer type when there is a hook (which
    /// it does not adopt: see `adopt`).
    pub fn load(path: &Path, options: &RunOptions, hook: Option<Hook>) -> Result<LoadedModel> {
        init_llama();
        let c_path = CString::new(path.to_string_lossy().as_bytes())
            .map_err(|_| Error::invalid("model path contains a NUL byte"))?;
        // SAFETY: a plain default parameter struct.
        let mut params = unsafe { ll::llama_model_default_params() };
        // Weights in ggml's plain layout in both runs: the engine's arena holds them that
        // way, and CPU repacking would change the kernels (and the bits) of the reference.
        params.use_extra_bufts = false;
        params.lazy_mode = ll::LLAMA_LAZY_MODE_OFF;
        params.load_mode = if options.mmap {
            ll::LLAMA_LOAD_MODE_MMAP
        } else {
            ll::LLAMA_LOAD_MODE_NONE
        };
        params.n_gpu_layers = 999;
        let overrides = hook.as_ref().map(|hook| {
            [
                ll::llama_model_tensor_buft_override {
                    pattern: c".*".as_ptr(),
                    buft: hook.buffer_type().cast(),
                },
                ll::llama_model_tensor_buft_override {
                    pattern: std::ptr::null(),
                    buft: std::ptr::null_mut(),
                },
            ]
        });
        if let Some(overrides) = &overrides {
            params.tensor_buft_overrides = overrides.as_ptr();
        }
        // SAFETY: a NUL-terminated path; the overrides outlive the call.
        let raw = unsafe { ll::llama_model_load_from_file(c_path.as_ptr(), params) };
        if raw.is_null() {
            return Err(backend_error(format!(
                "llama.cpp could not load {} (run with RUST_LOG=debug for its log)",
                path.display()
            )));
        }
        Ok(LoadedModel { raw, hook })
    }

    pub fn hook(&self) -> Option<&Hook> {
        self.hook.as_ref()
    }

    /// Frees the model while its hook is still adopted, as a host that forgets detach does
    /// (the hook must then detach on its own); returns the hook.
    #[allow(dead_code)] // the command always detaches; tests/llama.rs checks the forgetful host
    pub fn free_before_detach(self) -> Option<Hook> {
        let mut this = std::mem::ManuallyDrop::new(self);
        // SAFETY: the model this object loaded, freed once (Drop does not run).
        unsafe { ll::llama_model_free(this.raw) };
        this.hook.take()
    }
}

impl Drop for LoadedModel {
    fn drop(&mut self) {
        if let Some(hook) = &self.hook {
            if hook.is_adopted().unwrap_or(false) {
                if let Err(err) = hook.detach() {
                    log::warn!("detach: {}", err.message);
                }
            }
        }
        // SAFETY: the model this object loaded; its sessions borrowed it and are gone.
        unsafe { ll::llama_model_free(self.raw) };
        self.hook = None;
    }
}

/// A llama.cpp context on a loaded model, with the engine's eval callback when the model
/// has a hook.
pub struct Session<'m> {
    model: &'m LoadedModel,
    raw: *mut ll::llama_context,
    threadpool: *mut ll::ggml_threadpool,
    /// Boxed: its address is the callback's user data for the context's life.
    eval: Option<Box<EvalContext>>,
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        // SAFETY: the context and pool this session made; the context goes first.
        unsafe {
            ll::llama_free(self.raw);
            if !self.threadpool.is_null() {
                ll::ggml_threadpool_free(self.threadpool);
            }
        }
        self.eval = None;
    }
}

impl<'m> Session<'m> {
    pub fn new(
        model: &'m LoadedModel,
        options: &RunOptions,
        host: Option<HostEval>,
    ) -> Result<Session<'m>> {
        // SAFETY: a plain default parameter struct.
        let mut params = unsafe { ll::llama_context_default_params() };
        params.n_ctx = options.n_ctx;
        params.n_batch = options.n_ctx;
        params.n_ubatch = options.n_ubatch.clamp(1, options.n_ctx);
        params.n_threads = options.threads;
        params.n_threads_batch = options.threads;
        params.no_perf = true;
        // Only the last token's logits are sampled: llama.cpp's output buffer (outputs x
        // vocabulary floats, 128 MiB for 128 outputs of Gemma 3's 262,144 tokens) stays small.
        params.n_outputs_max = 1;
        let mut eval = None;
        match (model.hook(), host) {
            (Some(hook), host) => {
                let context = Box::new(EvalContext::new(
                    hook,
                    host.map(|h| h.callback),
                    host.map_or(std::ptr::null_mut(), |h| h.data),
                )?);
                params.cb_eval = Some(eval_trampoline);
                params.cb_eval_user_data = (&*context as *const EvalContext).cast_mut().cast();
                eval = Some(context);
            }
            (None, Some(host)) => {
                // SAFETY: the same signature in the two bindings of ggml.
                params.cb_eval = Some(unsafe {
                    std::mem::transmute::<
                        offload_engine::llama::EvalFn,
                        unsafe extern "C" fn(*mut ll::ggml_tensor, bool, *mut c_void) -> bool,
                    >(host.callback)
                });
                params.cb_eval_user_data = host.data;
            }
            (None, None) => {}
        }
        // SAFETY: a loaded model; the callback's user data outlives the context (dropped
        // after it in `Drop`).
        let raw = unsafe { ll::llama_init_from_model(model.raw, params) };
        if raw.is_null() {
            return Err(backend_error("llama.cpp could not make a context"));
        }
        let mut session = Session {
            model,
            raw,
            threadpool: std::ptr::null_mut(),
            eval,
        };
        if options.threadpool {
            // SAFETY: plain parameter construction and a pool the context uses until it is
            // freed (the session frees the context first).
            unsafe {
                let mut tp_params = ll::ggml_threadpool_params_default(options.threads);
                session.threadpool = ll::ggml_threadpool_new(&mut tp_params);
                if session.threadpool.is_null() {
                    return Err(backend_error("cannot start a ggml threadpool"));
                }
                ll::llama_attach_threadpool(session.raw, session.threadpool, session.threadpool);
            }
        }
        Ok(session)
    }

    /// The engine's sticky error for this context, if any.
    pub fn engine_status(&self) -> Result<()> {
        self.eval.as_ref().map_or(Ok(()), |e| e.status())
    }

    fn decode(&self, batch: &mut [i32]) -> Result<()> {
        // SAFETY: a batch over tokens that outlive the call.
        let status = unsafe {
            ll::llama_decode(
                self.raw,
                ll::llama_batch_get_one(batch.as_mut_ptr(), batch.len() as i32),
            )
        };
        if status != 0 {
            return Err(backend_error(format!("llama_decode failed ({status})")));
        }
        self.engine_status()
    }

    /// The prompt, then up to `n_predict` greedy tokens.
    pub fn generate(&mut self, options: &RunOptions) -> Result<RunResult> {
        // SAFETY: a loaded model.
        let vocab = unsafe { ll::llama_model_get_vocab(self.model.raw) };
        // SAFETY: as above.
        let n_vocab = unsafe { ll::llama_vocab_n_tokens(vocab) }.max(0) as usize;
        let logits_now = || -> &[f32] {
            // SAFETY: the last decode asked for its last token's output (batch_get_one);
            // llama.cpp keeps n_vocab floats for it until the next decode.
            unsafe {
                let ptr = ll::llama_get_logits_ith(self.raw, -1);
                std::slice::from_raw_parts(ptr, n_vocab)
            }
        };
        let mut tokens = vec![0i32; options.prompt.len() + 8];
        // SAFETY: the prompt's bytes and a token buffer of the given capacity.
        let n = unsafe {
            ll::llama_tokenize(
                vocab,
                options.prompt.as_ptr().cast(),
                options.prompt.len() as i32,
                tokens.as_mut_ptr(),
                tokens.len() as i32,
                true,
                true,
            )
        };
        if n <= 0 {
            return Err(Error::invalid("the prompt tokenizes to nothing"));
        }
        tokens.truncate(n as usize);
        let prompt_tokens = tokens.len();
        if prompt_tokens + options.n_predict as usize > options.n_ctx as usize {
            return Err(Error::invalid(format!(
                "prompt ({prompt_tokens} tokens) plus {} to generate exceed the context of {}",
                options.n_predict, options.n_ctx
            )));
        }
        // A context may be used again: start from an empty cache.
        // SAFETY: the context's memory.
        unsafe { ll::llama_memory_clear(ll::llama_get_memory(self.raw), true) };

        let start = Instant::now();
        self.decode(&mut tokens)?;
        let prefill_seconds = start.elapsed().as_secs_f64();
        let mut logits = vec![logits_digest(logits_now())];
        let mut next = argmax(logits_now());
        let mut generated = Vec::new();
        let mut decode_seconds = 0.0f64;
        let mut decode_steps = 0;
        let mut text = String::new();
        for i in 0..options.n_predict {
            let token = next;
            // SAFETY: a token of this vocabulary.
            if unsafe { ll::llama_vocab_is_eog(vocab, token) } {
                break;
            }
            generated.push(token);
            let mut piece = [0u8; 128];
            // SAFETY: a buffer of the given length.
            let len = unsafe {
                ll::llama_token_to_piece(vocab, token, piece.as_mut_ptr().cast(), 128, 0, false)
            };
            if len > 0 {
                text.push_str(&String::from_utf8_lossy(&piece[..len as usize]));
            }
            if options.progress {
                eprint!(
                    "\rgenerating: [{}/{}] {:.1} tokens/s ",
                    i + 1,
                    options.n_predict,
                    decode_steps as f64 / decode_seconds.max(1e-9)
                );
            }
            // The last token is kept; decoding it would only give logits nobody samples.
            if i + 1 == options.n_predict {
                break;
            }
            let step = Instant::now();
            self.decode(&mut [token])?;
            decode_seconds += step.elapsed().as_secs_f64();
            decode_steps += 1;
            logits.push(logits_digest(logits_now()));
            next = argmax(logits_now());
        }
        if options.progress {
            eprintln!();
        }
        Ok(RunResult {
            prompt_tokens,
            tokens: generated,
            logits,
            text,
            prefill_seconds,
            decode_steps,
            decode_seconds,
        })
    }
}

fn backend_error(what: impl Into<String>) -> Error {
    Error::new(Status::Backend, what)
}

/// A 128-bit digest of the logits' bits, two independent multiply-xorshift lanes over the
/// words: two runs' logits are bit-identical exactly when their digests are (a collision
/// between different logits has probability about 2^-128).
pub fn logits_digest(logits: &[f32]) -> [u64; 2] {
    let mut lanes = [0x9e37_79b9_7f4a_7c15u64, 0xc2b2_ae3d_27d4_eb4fu64];
    for (i, &v) in logits.iter().enumerate() {
        let word = u64::from(v.to_bits()) ^ ((i as u64) << 32);
        lanes[0] = (lanes[0] ^ word)
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(29);
        lanes[1] = (lanes[1].rotate_left(17) ^ word).wrapping_mul(0xff51_afd7_ed55_8ccd);
    }
    lanes
}

/// The index of the largest logit (the first one on ties): greedy sampling.
fn argmax(logits: &[f32]) -> i32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as i32
}

/// One generation, through the engine when `engine` is given: the hook is made (and plans)
/// before llama.cpp loads anything, and adopts the model between load and context.
pub fn run(
    model: &Path,
    options: &RunOptions,
    engine: Option<LlamaParams>,
) -> Result<(RunResult, Option<StreamReport>)> {
    let hook = engine.map(|params| Hook::new(params, model)).transpose()?;
    let loaded = LoadedModel::load(model, options, hook)?;
    if let Some(hook) = loaded.hook() {
        hook.adopt()?;
    }
    let result = Session::new(&loaded, options, None)?.generate(options)?;
    let report = match loaded.hook() {
        Some(hook) => {
            if let Some(path) = &options.trace {
                hook.write_trace(path)?;
            }
            Some(StreamReport {
                plan: hook.plan()?,
                stats: hook.stats()?,
            })
        }
        None => None,
    };
    Ok((result, report))
}
