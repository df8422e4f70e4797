//! Layer boundaries in llama.cpp's graphs, found through ggml's scheduler eval callback.
//!
//! The scheduler asks the callback about every node, in graph order (`ask = true`); a "yes"
//! makes it compute the nodes up to that one, synchronize the backend and call again
//! (`ask = false`). The engine answers yes for the output (`l_out-N`) of each streamed layer
//! and, at the second call, ends layer N (its slot may be refilled: its ops have run) and
//! begins layer N+1: the next range, layer N+1's ops, is launched only once that layer's
//! weights are in place. After a resident layer's output it moves on at once, without
//! splitting the graph: an all-resident model is computed in one piece, as without the engine.
//!
//! A pass begins when a node reads layer 0's weights. Between layer outputs, a node that
//! reads the weights of a layer other than the open one means the graph does not run layer
//! by layer where the boundaries say: that is an error (sticky: the callback cannot return
//! one), never a silent read of another layer's slot. A graph interrupted mid-pass (the host's
//! own callback stopped it, or an error) is noticed when the next graph reads layer 0 again:
//! the engine then drains and starts that pass afresh.

use std::collections::HashMap;
use std::ffi::{c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, TryLockError};

use crate::engine::Engine;
use crate::error::{Error, Result, Status};
use crate::ggml as sys;
use crate::registry::{Registry, Source};

use super::{Adopted, Hook, Shared};

/// The node name llama.cpp gives each layer's output (`cb(cur, "l_out", il)`).
pub const DEFAULT_LAYER_OUTPUT: &str = "^l_out-(\\d+)$";

/// How layer outputs are named in the graph.
#[derive(Debug, Clone, Default)]
pub enum BoundaryPattern {
    /// `l_out-N`, matched without a regex (it runs for every node of every graph).
    #[default]
    LOut,
    /// A user regex whose first capture group is the layer index.
    User(regex::Regex),
}

impl BoundaryPattern {
    pub fn user(pattern: &str) -> Result<BoundaryPattern> {
        let regex = regex::Regex::new(pattern).map_err(|e| {
            Error::invalid(format!(
                "layer output pattern '{pattern}' is not a regex: {e}"
            ))
        })?;
        if regex.captures_len() < 2 {
            return Err(Error::invalid(format!(
                "layer output pattern '{pattern}' needs a capture group for the layer index, \
                 e.g. '^l_out-(\\d+)$'"
            )));
        }
        Ok(BoundaryPattern::User(regex))
    }

    /// The layer index a node of this name ends, if it ends one.
    pub fn layer_of(&self, name: &[u8]) -> Option<usize> {
        let digits = match self {
            BoundaryPattern::LOut => name.strip_prefix(b"l_out-")?,
            BoundaryPattern::User(regex) => {
                let text = std::str::from_utf8(name).ok()?;
                let group = regex.captures(text)?.get(1)?;
                return group.as_str().parse().ok();
            }
        };
        if digits.is_empty() || digits.len() > 9 || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(
            digits
                .iter()
                .fold(0usize, |n, d| n * 10 + usize::from(d - b'0')),
        )
    }

    pub fn describe(&self) -> String {
        match self {
            BoundaryPattern::LOut => DEFAULT_LAYER_OUTPUT.to_string(),
            BoundaryPattern::User(regex) => regex.as_str().to_string(),
        }
    }
}

/// Which layer each weight belongs to, and which engine layer each graph layer index is.
pub(crate) struct LayerMap {
    /// Weight tensor address -> engine layer (resident and streamed layers alike).
    weights: HashMap<usize, usize>,
    /// Graph layer index (the N of `l_out-N`, llama.cpp's `il`) -> engine layer.
    by_index: Vec<Option<usize>>,
    layer_count: usize,
    /// Per engine layer: streamed through a slot (else resident).
    streamed: Vec<bool>,
    /// The engine's device arena: only tensors in it can be weights we place.
    arena: sys::ggml_backend_buffer_t,
}

impl LayerMap {
    /// From a registry grouped into layers named `<prefix>.N` (llama.cpp's `blk.N`).
    pub(crate) fn new(registry: &mut Registry) -> Result<LayerMap> {
        let layers = registry.layers().to_vec();
        let mut weights = HashMap::new();
        let mut by_index = Vec::new();
        for (layer, info) in layers.iter().enumerate() {
            let index = info
                .name
                .rsplit('.')
                .next()
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "layer '{}' has no index: the layer pattern must group tensors into \
                         numbered layers (blk.N) for the graph's layer outputs to name them",
                        info.name
                    ))
                })?;
            if index >= by_index.len() {
                by_index.resize(index + 1, None);
            }
            if by_index[index].replace(layer).is_some() {
                return Err(Error::invalid(format!(
                    "two layers have the index {index} (layer pattern groups tensors of other \
                     models or towers together)"
                )));
            }
            for &id in &info.tensors {
                let tensor = match registry.tensor(id)?.source {
                    Source::Ggml(tensor) | Source::GgmlFile { tensor, .. } => tensor,
                    Source::Descriptor | Source::File { .. } => continue,
                };
                weights.insert(tensor as usize, layer);
            }
        }
        Ok(LayerMap {
            weights,
            by_index,
            layer_count: layers.len(),
            streamed: Vec::new(),
            arena: std::ptr::null_mut(),
        })
    }

    pub(crate) fn with_arena(mut self, engine: &Engine) -> Result<LayerMap> {
        let streamer = engine
            .streamer_ref()
            .ok_or_else(|| Error::new(Status::Internal, "adopted engine has no placement"))?;
        self.arena = streamer.arena_buffer();
        self.streamed = (0..self.layer_count)
            .map(|l| !streamer.is_resident(l))
            .collect();
        Ok(self)
    }
}

/// Where the graph being computed is in the layers.
#[derive(Debug, Default)]
pub(crate) struct PassState {
    /// The engine layer whose ops run now; `None` before layer 0 and after the last layer.
    open: Option<usize>,
    /// Passes restarted because a graph stopped mid-pass.
    pub resyncs: u64,
}

fn name_of(t: &sys::ggml_tensor) -> &[u8] {
    // SAFETY: ggml names are NUL-terminated inside their fixed array.
    unsafe { CStr::from_ptr(t.name.as_ptr()) }.to_bytes()
}

impl Adopted {
    /// A node is about to be computed: reads of a layer's weights open that layer's pass or
    /// must be of the open layer. Returns whether the node ends the open layer.
    fn ask(&mut self, pattern: &BoundaryPattern, node: &sys::ggml_tensor) -> Result<bool> {
        for &src in node.src.iter().filter(|s| !s.is_null()) {
            // SAFETY: ggml hands the callback a valid node of the graph it computes; its
            // sources are valid tensors, views point at their (root) view source.
            let weight = unsafe {
                if (*src).view_src.is_null() {
                    src
                } else {
                    (*src).view_src
                }
            };
            // SAFETY: as above.
            if unsafe { (*weight).buffer } != self.layers.arena {
                continue;
            }
            if let Some(&layer) = self.layers.weights.get(&(weight as usize)) {
                // SAFETY: as above.
                self.reads(layer, node, unsafe { &*weight })?;
            }
        }
        let Some(index) = pattern.layer_of(name_of(node)) else {
            return Ok(false);
        };
        let layer = self.layers.by_index.get(index).copied().flatten();
        match layer {
            Some(layer) if Some(layer) == self.pass.open => {
                if self.layers.streamed[layer] {
                    // Its slot may be refilled only once its ops have run: compute up to
                    // here, then move on (`done`).
                    return Ok(true);
                }
                // A resident layer's weights stay put: move on now, without splitting the
                // graph (an all-resident model is computed in one piece, as without the
                // engine); the next layer's weights are in place before its ops launch.
                self.advance(layer)?;
                return Ok(false);
            }
            _ => {}
        }
        Err(Error::state(format!(
            "graph node '{}' ends layer {index}, but {}: the graph's layer outputs are not \
             where the engine follows them",
            String::from_utf8_lossy(name_of(node)),
            self.open_text()
        )))
    }

    fn open_text(&self) -> String {
        match self.pass.open {
            Some(layer) => format!("layer {layer} is open"),
            None => "no layer is open".into(),
        }
    }

    fn reads(
        &mut self,
        layer: usize,
        node: &sys::ggml_tensor,
        weight: &sys::ggml_tensor,
    ) -> Result<()> {
        match self.pass.open {
            Some(open) if open == layer => Ok(()),
            None if layer == 0 => self.start_pass(),
            Some(_) if layer == 0 => {
                // The previous graph stopped mid-pass; this one starts from the top.
                if self.pass.resyncs == 0 {
                    log::warn!(
                        "a graph began while layer {} of the previous one was open (it was \
                         stopped early): starting the pass again",
                        self.pass.open.unwrap_or(0)
                    );
                }
                self.pass.resyncs += 1;
                self.engine.offload_all()?;
                self.pass.open = None;
                self.start_pass()
            }
            _ => Err(Error::state(format!(
                "graph node '{}' reads '{}' of layer {layer} while {}: llama.cpp's graph does \
                 not run layer by layer between its layer outputs here",
                String::from_utf8_lossy(name_of(node)),
                String::from_utf8_lossy(name_of(weight)),
                self.open_text()
            ))),
        }
    }

    fn start_pass(&mut self) -> Result<()> {
        self.engine.begin_pass()?;
        self.engine.begin_layer(0)?;
        self.pass.open = Some(0);
        Ok(())
    }

    /// A range ending in `node` was computed: if it ended the open layer, move to the next.
    fn done(&mut self, pattern: &BoundaryPattern, node: &sys::ggml_tensor) -> Result<()> {
        let Some(index) = pattern.layer_of(name_of(node)) else {
            return Ok(());
        };
        let layer = self.layers.by_index.get(index).copied().flatten();
        match layer.filter(|&l| Some(l) == self.pass.open && self.layers.streamed[l]) {
            Some(layer) => self.advance(layer),
            None => Ok(()),
        }
    }

    /// Ends `layer` and begins the next, or ends the pass after the last layer.
    fn advance(&mut self, layer: usize) -> Result<()> {
        self.engine.end_layer(layer)?;
        if layer + 1 < self.layers.layer_count {
            self.engine.begin_layer(layer + 1)?;
            self.pass.open = Some(layer + 1);
        } else {
            self.engine.end_pass()?;
            self.pass.open = None;
        }
        Ok(())
    }

    /// After an error: nothing half-open is left for the next graph.
    fn reset(&mut self) {
        let _ = self.engine.offload_all();
        self.pass.open = None;
    }
}

/// The signature of ggml's `ggml_backend_sched_eval_callback`.
pub type EvalFn = unsafe extern "C" fn(*mut sys::ggml_tensor, bool, *mut c_void) -> bool;

/// The per-`llama_context` object the eval callback gets as its user data.
pub struct EvalContext {
    shared: Arc<Shared>,
    host: Option<EvalFn>,
    host_data: *mut c_void,
    /// Whether the host's own callback wanted the node last asked about.
    host_wanted: AtomicBool,
    /// The first error; the callback cannot return one.
    sticky: Mutex<Option<Error>>,
}

// SAFETY: `host_data` is the host's pointer, only passed back to the host's own callback on
// the thread that computes the graph; everything else is `Sync`.
unsafe impl Send for EvalContext {}
// SAFETY: as above.
unsafe impl Sync for EvalContext {}

impl EvalContext {
    /// A context object for `hook`, chaining `host` (an eval callback the host had, such as
    /// imatrix's) with its `host_data`.
    pub fn new(hook: &Hook, host: Option<EvalFn>, host_data: *mut c_void) -> Result<EvalContext> {
        if hook.shared.model_gone.load(Ordering::SeqCst) {
            return Err(Error::state("llama.cpp has freed the model"));
        }
        hook.shared.context_added();
        Ok(EvalContext {
            shared: hook.shared.clone(),
            host,
            host_data,
            host_wanted: AtomicBool::new(false),
            sticky: Mutex::new(None),
        })
    }

    /// The first error the callback met, if any.
    pub fn status(&self) -> Result<()> {
        match &*self.sticky.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(err) => Err(err.clone()),
            None => Ok(()),
        }
    }

    fn stick(&self, err: Error) {
        let mut sticky = self.sticky.lock().unwrap_or_else(|p| p.into_inner());
        if sticky.is_none() {
            log::error!("llama.cpp eval callback: {}", err.message);
            *sticky = Some(err);
        }
    }

    /// The engine's part of one callback.
    fn step(&self, node: &sys::ggml_tensor, ask: bool) -> Result<bool> {
        let mut guard = match self.shared.adopted.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                return Err(Error::state(
                    "another context of this model is computing a graph at the same time: \
                     contexts of one streamed model must decode one at a time",
                ))
            }
        };
        let Some(adopted) = guard.as_mut() else {
            return Err(Error::state(
                "the model is not adopted (call offload_engine_llama_adopt after loading it, \
                 before creating contexts), or it was detached",
            ));
        };
        let pattern = &self.shared.pattern;
        let result = if ask {
            adopted.ask(pattern, node)
        } else {
            adopted.done(pattern, node).map(|()| true)
        };
        if result.is_err() {
            adopted.reset();
        }
        result
    }

    /// ggml's eval callback: `ask` about `node`, or tell that it was computed. Never
    /// unwinds (ggml calls it from C++): a panic becomes the sticky error.
    ///
    /// # Safety
    /// `node` must be a valid tensor (ggml's scheduler passes nodes of the graph it computes).
    pub unsafe fn eval(&self, node: *mut sys::ggml_tensor, ask: bool) -> bool {
        // SAFETY: per the contract.
        let ours = match unsafe { node.as_ref() } {
            Some(t) => {
                let step =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step(t, ask)));
                let result = step.unwrap_or_else(|panic| {
                    Err(Error::new(
                        Status::Internal,
                        format!(
                            "internal error (panic): {}",
                            crate::error::panic_text(&*panic)
                        ),
                    ))
                });
                result.unwrap_or_else(|err| {
                    self.stick(err);
                    false
                })
            }
            None => false,
        };
        let host = |ask| match self.host {
            // SAFETY: the host's callback with its own data and ggml's node, as ggml would
            // have called it.
            Some(f) => unsafe { f(node, ask, self.host_data) },
            None => false,
        };
        if ask {
            let wanted = host(true);
            self.host_wanted.store(wanted, Ordering::Relaxed);
            ours || wanted
        } else if self.host_wanted.load(Ordering::Relaxed) {
            // The host's answer decides whether the graph goes on (false stops it).
            host(false)
        } else {
            true
        }
    }
}

impl Drop for EvalContext {
    fn drop(&mut self) {
        self.shared.context_removed();
    }
}

/// ggml's eval callback for Rust hosts, whose `user_data` is a `&EvalContext` they keep alive
/// for the context's life (C hosts use `offload_engine_llama_eval`, which checks handles).
///
/// # Safety
/// `user_data` must point to a live `EvalContext`, `node` to a valid tensor.
pub unsafe extern "C" fn eval_callback(
    node: *mut sys::ggml_tensor,
    ask: bool,
    user_data: *mut c_void,
) -> bool {
    // SAFETY: per the contract.
    unsafe { (*(user_data as *const EvalContext)).eval(node, ask) }
}
