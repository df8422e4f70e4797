//! The llama.cpp drop-in: streams an unmodified llama.cpp's layers through three public hooks.
//!
//! 1. **Home** (`home.rs`): the host loads the weights into the hook's buffer type through
//!    `llama_model_params.tensor_buft_overrides`; the buffer type records every tensor.
//! 2. **Adopt** (`Hook::adopt`): after `llama_model_load_from_file`, before
//!    `llama_init_from_model` (whose scheduler assigns ops to devices by their weights'
//!    buffers), the engine takes the recorded tensors over in the parked placement: every
//!    tensor points into the device arena from now on, resident layers at fixed places,
//!    streamed layers at their fixed slot.
//! 3. **Layer boundaries** (`boundaries.rs`): the host sets `offload_engine_llama_eval` as
//!    `llama_context_params.cb_eval`. ggml's scheduler asks it about every node; the engine
//!    asks for each layer output (`l_out-N`) to be computed alone and, once it has been,
//!    ends layer N and begins layer N+1, whose weights are then in their slot.
//!
//! A pass is one ubatch (prefill) or one token (decode): each graph llama.cpp computes.
//! The plan is made from the model file's descriptors when the hook is made, before
//! llama.cpp allocates anything, and the same budget places the model at adopt.

pub(crate) mod boundaries;
#[cfg(offload_engine_backend_impl)]
pub(crate) mod home;
#[cfg(not(offload_engine_backend_impl))]
#[path = "no_home.rs"]
pub(crate) mod home;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::backend::Device;
use crate::engine::{budget_for, Engine, EngineParams};
use crate::error::{Error, Result, Status};
use crate::ggml as sys;
use crate::gguf::{self, GgufFile};
use crate::planner::{self, Budget, Link, Plan, Workload};
use crate::registry::Registry;
use crate::stream::StreamStats;

pub use boundaries::{eval_callback, BoundaryPattern, EvalContext, EvalFn, DEFAULT_LAYER_OUTPUT};
use home::HomeType;

/// Architectures whose llama.cpp graph names no node `l_out-N` (their graph builders in
/// llama.cpp's `src/models/` never call `cb(cur, "l_out", il)`): they need a
/// `layer_output_pattern` naming the node that ends a layer.
const ARCHS_WITHOUT_L_OUT: &[&str] = &[
    "bert",
    "clip",
    "eagle3",
    "eurobert",
    "gemma4-assistant",
    "jina-bert-v2",
    "jina-bert-v3",
    "modern-bert",
    "neo-bert",
    "nomic-bert",
    "nomic-bert-moe",
    "plamo2",
    "qwen3tts",
    "qwen4exp",
    "wavtokenizer-dec",
];

/// Everything a hook needs besides the model file.
#[derive(Debug, Clone)]
pub struct LlamaParams {
    /// Device, budget, margins, prefetch depth, trace.
    pub engine: EngineParams,
    /// llama.cpp's compute buffers on the device; `None` estimates them from the model's
    /// hyperparameters and `n_ubatch`.
    pub compute_reserve_bytes: Option<u64>,
    /// llama.cpp's KV cache on the device; `None` estimates it from `n_ctx`.
    pub kv_cache_bytes: Option<u64>,
    /// Context length and physical batch the host will use (for the estimates).
    pub n_ctx: u32,
    pub n_ubatch: u32,
    /// Stream every layer from the model file instead of holding the weights in host memory.
    pub file_backed: bool,
    /// Regex with one capture group, the layer index, matching the name of the graph node
    /// that ends a layer; `None`: `^l_out-(\d+)$`.
    pub layer_output_pattern: Option<String>,
    /// Link for the plan's time predictions.
    pub link: Link,
}

impl Default for LlamaParams {
    fn default() -> Self {
        LlamaParams {
            engine: EngineParams::default(),
            compute_reserve_bytes: None,
            kv_cache_bytes: None,
            n_ctx: 4096,
            n_ubatch: 512,
            file_backed: false,
            layer_output_pattern: None,
            link: Link::named("pcie4-x16").expect("a built-in link"),
        }
    }
}

/// Device memory llama.cpp itself will use next to the weights, estimated from the model's
/// hyperparameters: `(kv_cache, compute)`.
///
/// * KV cache: `2 * n_layer * n_ctx * n_head_kv * head_dim` f16 values (an upper bound for
///   models with sliding-window layers, whose cache is smaller).
/// * Compute: the logits of a full ubatch (`n_ubatch * n_vocab` f32, what llama.cpp reserves
///   for a prompt whose every token is an output) plus 16 hidden-state-sized f32 activations
///   per token and one attention score matrix (`n_ubatch * n_ctx * n_head` f32).
pub fn estimate_reserves(file: &GgufFile, n_ctx: u32, n_ubatch: u32) -> (u64, u64) {
    let arch = file.architecture().unwrap_or("llama");
    let key = |k: &str| {
        file.get(&format!("{arch}.{k}")).and_then(|v| {
            v.as_u64().or_else(|| {
                v.as_array()
                    .and_then(|a| a.iter().filter_map(|x| x.as_u64()).max())
            })
        })
    };
    let n_layer = key("block_count").unwrap_or(0);
    let n_embd = key("embedding_length").unwrap_or(0);
    let n_head = key("attention.head_count").unwrap_or(1).max(1);
    let n_head_kv = key("attention.head_count_kv").unwrap_or(n_head);
    let head_dim_k = key("attention.key_length").unwrap_or(n_embd / n_head);
    let head_dim_v = key("attention.value_length").unwrap_or(head_dim_k);
    let n_vocab = key("vocab_size")
        .or_else(|| {
            file.get("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map(|a| a.len() as u64)
        })
        .unwrap_or(0);
    let (n_ctx, n_ubatch) = (u64::from(n_ctx), u64::from(n_ubatch));
    let kv = n_layer
        .saturating_mul(n_ctx)
        .saturating_mul(n_head_kv.saturating_mul(head_dim_k + head_dim_v))
        .saturating_mul(2);
    let compute = n_ubatch
        .saturating_mul(n_vocab)
        .saturating_add(n_ubatch.saturating_mul(n_embd).saturating_mul(16))
        .saturating_add(n_ubatch.saturating_mul(n_ctx).saturating_mul(n_head))
        .saturating_mul(4);
    (kv, compute)
}

/// What the hook knows about the model from its file.
struct ModelFile {
    path: PathBuf,
    stamp: gguf::FileStamp,
    architecture: String,
}

/// The engine over the adopted model, and where the graph is in its layers.
pub(crate) struct Adopted {
    pub engine: Engine,
    pub layers: boundaries::LayerMap,
    pub pass: boundaries::PassState,
}

/// State shared by the hook handle, the buffers llama.cpp made from its buffer type (the
/// model's memory must outlive a hook freed first) and the per-context objects.
pub(crate) struct Shared {
    pub(crate) home: HomeType,
    model: ModelFile,
    params: LlamaParams,
    budget: Budget,
    workload: Workload,
    preview: Plan,
    pub(crate) pattern: BoundaryPattern,
    pub(crate) adopted: Mutex<Option<Adopted>>,
    /// Set when llama.cpp freed the model (its buffers); adopt and new contexts are refused.
    model_gone: std::sync::atomic::AtomicBool,
    contexts: std::sync::atomic::AtomicUsize,
}

// SAFETY: the raw pointers inside (the ggml buffer type struct, recorded tensors, the
// engine's tensors) are only dereferenced under the `adopted` or `recorded` mutexes, or by
// ggml's loader on the one thread that loads the model; the objects they point to are
// llama.cpp's and live until it frees the model, which detaches the engine first.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

impl Shared {
    pub(crate) fn lock_adopted(&self) -> std::sync::MutexGuard<'_, Option<Adopted>> {
        self.adopted.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// For the host's calls: a call made while a graph step holds the engine (from a log
    /// callback, or another thread) is refused instead of waiting on itself.
    fn try_adopted(&self) -> Result<std::sync::MutexGuard<'_, Option<Adopted>>> {
        match self.adopted.try_lock() {
            Ok(guard) => Ok(guard),
            Err(std::sync::TryLockError::Poisoned(p)) => Ok(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => Err(Error::state(
                "the hook is in use (a graph of its model is being computed, or another call \
                 runs): calls on one hook must not overlap",
            )),
        }
    }

    /// llama.cpp is freeing the model's buffers: whatever the host forgot, the tensors go home
    /// while they still exist, and the engine leaves the device.
    pub(crate) fn model_freed(&self) {
        self.model_gone
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(adopted) = self.lock_adopted().take() {
            log::warn!(
                "llama.cpp freed the model before offload_engine_llama_detach: detached now"
            );
            drop(adopted);
        }
    }

    pub(crate) fn context_added(&self) {
        self.contexts
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    pub(crate) fn context_removed(&self) {
        self.contexts
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A hook for one llama.cpp model.
pub struct Hook {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hook")
            .field("model", &self.shared.model.path)
            .field("architecture", &self.shared.model.architecture)
            .finish()
    }
}

/// Without ggml's internal buffer interface there is no home buffer type.
#[cfg(not(offload_engine_backend_impl))]
pub fn check_ggml_version() -> Result<()> {
    Err(Error::new(
        Status::Unsupported,
        "this build of offload-engine has no llama.cpp drop-in: it was built against a host \
         ggml without OFFLOAD_ENGINE_GGML_SRC, so ggml's internal buffer interface was not \
         available",
    ))
}

/// The ggml this library runs with must be the one whose internal buffer interface it was
/// built against: a different layout would be silent memory corruption.
#[cfg(offload_engine_backend_impl)]
pub fn check_ggml_version() -> Result<()> {
    // SAFETY: returns a static NUL-terminated string.
    let running = unsafe { std::ffi::CStr::from_ptr(sys::ggml_version()) }
        .to_string_lossy()
        .into_owned();
    let built = sys::backend_impl::GGML_BUILD_VERSION;
    if running != built {
        return Err(Error::new(
            Status::Unsupported,
            format!(
                "the llama.cpp drop-in was built against ggml {built}'s internal buffer \
                 interface, but this process runs ggml {running}: rebuild offload-engine \
                 against this ggml (host-ggml mode with OFFLOAD_ENGINE_GGML_SRC)"
            ),
        ));
    }
    Ok(())
}

impl Hook {
    /// Reads the model file's descriptors, checks that its graph can be followed, and plans
    /// it. An impossible budget is `InsufficientMemory` here, before llama.cpp loads anything.
    pub fn new(params: LlamaParams, model_path: &Path) -> Result<Hook> {
        check_ggml_version()?;
        let (file, stamp) = gguf::read_path_stamped(model_path)?;
        let architecture = file
            .architecture()
            .ok_or_else(|| {
                Error::corrupt(format!(
                    "{}: no general.architecture: not a llama.cpp model file",
                    model_path.display()
                ))
            })?
            .to_string();
        let pattern = match &params.layer_output_pattern {
            Some(regex) => BoundaryPattern::user(regex)?,
            None if ARCHS_WITHOUT_L_OUT.contains(&architecture.as_str()) => {
                return Err(Error::new(
                    Status::Unsupported,
                    format!(
                        "{}: llama.cpp's '{architecture}' graph names no layer output \
                         '{DEFAULT_LAYER_OUTPUT}' (l_out-0, l_out-1, ...), which is how the \
                         engine finds where a layer ends: give a layer output pattern (a regex \
                         with one group for the layer index, e.g. '^ffn_out-(\\d+)$') naming \
                         the last node of each layer",
                        model_path.display()
                    ),
                ))
            }
            None => BoundaryPattern::default(),
        };
        if params.n_ctx == 0 || params.n_ubatch == 0 {
            return Err(Error::invalid("n_ctx and n_ubatch must be at least 1"));
        }
        let (kv_estimate, compute_estimate) =
            estimate_reserves(&file, params.n_ctx, params.n_ubatch);
        let device = Device::select(params.engine.device.as_deref())?;
        let mut budget = budget_for(
            &params.engine,
            &device,
            params.compute_reserve_bytes.unwrap_or(compute_estimate),
        );
        budget.persistent_bytes = params.kv_cache_bytes.unwrap_or(kv_estimate);
        let workload = Workload {
            prefetch_depth: params.engine.prefetch_depth,
            ..Workload::default()
        };
        let mut descriptors = Registry::new(Some(Registry::pattern_from_arg(
            params.engine.pattern.as_deref().unwrap_or("llama_gguf"),
        )?));
        descriptors.add_gguf(model_path)?;
        if descriptors.layer_count() == 0 {
            return Err(Error::invalid(format!(
                "{}: no tensor matches the layer pattern, so there is nothing to stream",
                model_path.display()
            )));
        }
        let model = descriptors.model_cost(params.file_backed);
        let preview = planner::plan(&model, &budget, &workload, &params.link)?.into_result()?;
        let file_homes: HashMap<String, home::FileHome> = if params.file_backed {
            file.tensors
                .iter()
                .map(|t| (t.name.clone(), (t.offset, t.bytes)))
                .collect()
        } else {
            HashMap::new()
        };
        let reader =
            if params.file_backed {
                Some(std::fs::File::open(model_path).map_err(|e| {
                    Error::new(Status::Io, format!("{}: {e}", model_path.display()))
                })?)
            } else {
                None
            };
        // Copies to a device with pinned memory run asynchronously from a pinned home.
        let pinned_on = (!params.file_backed && device.pinned_host).then_some(device);
        let shared = Arc::new(Shared {
            home: HomeType::new(pinned_on, file_homes, reader),
            model: ModelFile {
                path: model_path.to_path_buf(),
                stamp,
                architecture,
            },
            params,
            budget,
            workload,
            preview,
            pattern,
            adopted: Mutex::new(None),
            model_gone: Default::default(),
            contexts: Default::default(),
        });
        HomeType::bind(&shared);
        Ok(Hook { shared })
    }

    /// The buffer type to give llama.cpp for every tensor (`{".*", buft}` as its only
    /// tensor_buft_overrides entry).
    pub fn buffer_type(&self) -> sys::ggml_backend_buffer_type_t {
        self.shared.home.raw()
    }

    pub fn architecture(&self) -> &str {
        &self.shared.model.architecture
    }

    /// The plan: the one carried out once adopted, else the one made from the file.
    pub fn plan(&self) -> Result<Plan> {
        Ok(match &*self.shared.try_adopted()? {
            Some(adopted) => adopted
                .engine
                .plan()
                .cloned()
                .unwrap_or_else(|| self.shared.preview.clone()),
            None => self.shared.preview.clone(),
        })
    }

    /// The budget the hook plans with (measured once, when it was made).
    pub fn budget(&self) -> &Budget {
        &self.shared.budget
    }

    pub fn is_adopted(&self) -> Result<bool> {
        Ok(self.shared.try_adopted()?.is_some())
    }

    /// Takes the loaded model over: registers what llama.cpp created in the home buffers,
    /// places it on the device (parked) and returns the plan carried out.
    pub fn adopt(&self) -> Result<Plan> {
        let shared = &self.shared;
        let mut slot = shared.try_adopted()?;
        if slot.is_some() {
            return Err(Error::state("the model is already adopted"));
        }
        if shared.model_gone.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::state("llama.cpp has freed the model"));
        }
        let recorded = shared.home.recorded();
        if recorded.is_empty() {
            return Err(Error::state(
                "llama.cpp created no tensor in this hook's buffer type: pass it as the \
                 tensor_buft_overrides of llama_model_load_from_file ({\".*\", buft}), and \
                 adopt after the load returns",
            ));
        }
        let params = &shared.params;
        let mut registry = Registry::new(Some(Registry::pattern_from_arg(
            params.engine.pattern.as_deref().unwrap_or("llama_gguf"),
        )?));
        let file = registry.add_stamped_file(&shared.model.path, Some(shared.model.stamp))?;
        for r in &recorded {
            // SAFETY: llama.cpp keeps its model's tensors alive until it frees the model,
            // which detaches the engine first (`Shared::model_freed`).
            let bytes = unsafe { sys::ggml_nbytes(r.tensor) } as u64;
            // SAFETY: as above.
            unsafe {
                match shared.home.file_home(&r.name, bytes) {
                    Some((offset, _)) => {
                        registry.add_ggml_tensor_in_file(r.tensor, &r.name, file, offset)?
                    }
                    None => registry.add_ggml_tensor(r.tensor, Some(&r.name))?,
                }
            };
        }
        let layers = boundaries::LayerMap::new(&mut registry)?;
        let engine_params = EngineParams {
            park_streamed: true,
            // The home is already pinned where the device has pinned memory.
            pinned_limit_bytes: Some(0),
            ..params.engine.clone()
        };
        let mut engine = Engine::with_registry(engine_params, registry)?;
        engine.prepare_within(&shared.workload, &params.link, Some(shared.budget.clone()))?;
        let layers = layers.with_arena(&engine)?;
        if params.file_backed {
            shared.home.release_file_backed_pages();
        }
        let plan = engine.plan().cloned().expect("prepared");
        *slot = Some(Adopted {
            engine,
            layers,
            pass: boundaries::PassState::default(),
        });
        Ok(plan)
    }

    /// Points every tensor home again and takes the engine off the device. After the last
    /// context is freed and before llama_model_free.
    pub fn detach(&self) -> Result<()> {
        let contexts = self
            .shared
            .contexts
            .load(std::sync::atomic::Ordering::SeqCst);
        if contexts > 0 {
            return Err(Error::state(format!(
                "{contexts} context{} of this model still live: free them first (llama_free, \
                 then offload_engine_llama_context_free)",
                if contexts == 1 { "" } else { "s" }
            )));
        }
        match self.shared.try_adopted()?.take() {
            Some(adopted) => {
                drop(adopted);
                Ok(())
            }
            None => Err(Error::state("the model is not adopted")),
        }
    }

    pub fn stats(&self) -> Result<StreamStats> {
        match &*self.shared.try_adopted()? {
            Some(adopted) => adopted.engine.stats(),
            None => Err(Error::state("the model is not adopted")),
        }
    }

    pub fn write_trace(&self, path: &Path) -> Result<()> {
        match &*self.shared.try_adopted()? {
            Some(adopted) => adopted.engine.write_trace(path),
            None => Err(Error::state("the model is not adopted")),
        }
    }

    /// Passes started again because a graph stopped before its last layer.
    pub fn resyncs(&self) -> Result<u64> {
        Ok(self
            .shared
            .try_adopted()?
            .as_ref()
            .map_or(0, |a| a.pass.resyncs))
    }
}

impl Drop for Hook {
    /// The host is done with the hook: the tensors go home (the model stays usable from its
    /// host memory); the buffer type lives on while llama.cpp's buffers do.
    fn drop(&mut self) {
        if let Some(adopted) = self.shared.lock_adopted().take() {
            drop(adopted);
        }
    }
}
