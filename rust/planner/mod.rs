//! Memory and time planning: will the model fit on the device, and if not, which layers stay
//! resident, which stream through how many slots, how many bytes cross the link, and how long a
//! step takes.
//!
//! Pure arithmetic: no ggml calls, no allocation on any device. The host measures (free memory,
//! layer sizes, optionally link bandwidth and per-layer compute time) and the planner decides.
//!
//! Sub-modules: `estimate` (sizes from transformer hyperparameters), `link` (host-link table and
//! stream-or-CPU advice), `schedule` (resident-set choice, cache simulations, pipeline timing).

pub mod estimate;
pub mod link;
pub mod schedule;

pub use estimate::{Hparams, WeightType};
pub use link::{advise, advise_llm, Advice, Link, LinkSpec, Machine, Regime};
pub use schedule::{
    simulate_belady, simulate_belady_with_slot, simulate_lru, static_traffic, Traffic,
};

use serde::Serialize;

use crate::error::{Error, Result, Status};
use crate::units::format_bytes;

/// One streamable unit (a transformer block, usually), in execution order.
#[derive(Debug, Clone, Serialize)]
pub struct LayerCost {
    pub name: String,
    /// Device bytes the layer takes (its image, alignment included).
    pub bytes: u64,
    /// Bytes one load of the layer moves over the link (its tensors' data, or the file
    /// stretch it is read as); at most `bytes`.
    pub copy_bytes: u64,
    /// Part of `copy_bytes` moved only on the first pass of a run (e.g. cross-attention K/V
    /// projections of a fixed context, read once across a run's diffusion steps).
    pub once_bytes: u64,
    /// Compute time of one pass through this layer, measured or given.
    pub compute_seconds: Option<f64>,
}

/// A model as the planner sees it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ModelCost {
    /// In execution order.
    pub layers: Vec<LayerCost>,
    /// Always resident (embeddings, output head, norms; for `Hparams` models also the KV cache).
    pub global_bytes: u64,
    /// Bytes the global group's one upload moves (at most `global_bytes`).
    pub global_copy_bytes: u64,
    /// Average bits per weight of the layers' tensors, when known (advice on quantizing
    /// starts from it).
    pub bits_per_weight: Option<f64>,
}

impl LayerCost {
    /// A layer whose loads move exactly its bytes (no alignment, nothing read once).
    pub fn new(name: impl Into<String>, bytes: u64) -> LayerCost {
        LayerCost {
            name: name.into(),
            bytes,
            copy_bytes: bytes,
            once_bytes: 0,
            compute_seconds: None,
        }
    }
}

impl ModelCost {
    /// Sum of all layer bytes; `InvalidArgument` if it overflows.
    pub fn layer_bytes_total(&self) -> Result<u64> {
        self.layers.iter().try_fold(0u64, |acc, l| {
            acc.checked_add(l.bytes)
                .ok_or_else(|| Error::invalid("layer sizes overflow 64 bits"))
        })
    }

    fn validate(&self) -> Result<()> {
        if self.layers.is_empty() {
            return Err(Error::invalid("model has no layers"));
        }
        if let Some(bits) = self.bits_per_weight {
            if !(bits.is_finite() && bits > 0.0) {
                return Err(Error::invalid(format!(
                    "bits per weight must be positive and finite, got {bits}"
                )));
            }
        }
        if self.global_copy_bytes > self.global_bytes {
            return Err(Error::invalid(format!(
                "the global group moves {} bytes but takes only {}",
                self.global_copy_bytes, self.global_bytes
            )));
        }
        for l in &self.layers {
            if l.copy_bytes > l.bytes {
                return Err(Error::invalid(format!(
                    "layer {:?}: copy_bytes ({}) exceed its bytes ({})",
                    l.name, l.copy_bytes, l.bytes
                )));
            }
            if l.once_bytes > l.copy_bytes {
                return Err(Error::invalid(format!(
                    "layer {:?}: once_bytes ({}) exceed its copy_bytes ({})",
                    l.name, l.once_bytes, l.copy_bytes
                )));
            }
            if let Some(c) = l.compute_seconds {
                if !(c.is_finite() && c >= 0.0) {
                    return Err(Error::invalid(format!(
                        "layer {:?}: compute time must be finite and non-negative, got {c}",
                        l.name
                    )));
                }
            }
        }
        let total = self.layer_bytes_total()?;
        if total == 0 {
            return Err(Error::invalid(
                "every layer has 0 bytes: nothing to place (is the model empty?)",
            ));
        }
        total
            .checked_add(self.global_bytes)
            .ok_or_else(|| Error::invalid("model size overflows 64 bits"))?;
        Ok(())
    }
}

/// Streams the resident layers that save the least traffic (then the smallest) until at most
/// `max` stay, and gives the streamed ones a ring: `wanted` slots of the largest streamed
/// layer, fewer if `room` (the bytes beside the global group) cannot hold them.
fn cap_resident(
    resident: &mut [bool],
    slot_count: &mut u32,
    slot_bytes: &mut u64,
    (bytes, values): (&[u64], &[u64]),
    max: usize,
    (wanted, room): (u32, u128),
) {
    // Empty layers cost nothing resident and do not count.
    let mut kept: Vec<usize> = (0..resident.len())
        .filter(|&i| resident[i] && bytes[i] > 0)
        .collect();
    if kept.len() <= max {
        return;
    }
    kept.sort_by_key(|&i| (values[i], bytes[i], std::cmp::Reverse(i)));
    for &i in &kept[..kept.len() - max] {
        resident[i] = false;
    }
    let streamed: Vec<usize> = (0..resident.len())
        .filter(|&i| !resident[i] && bytes[i] > 0)
        .collect();
    let largest = streamed.iter().map(|&i| bytes[i]).max().unwrap_or(0);
    let resident_bytes: u128 = (0..resident.len())
        .filter(|&i| resident[i])
        .map(|i| bytes[i] as u128)
        .sum();
    let mut slots = wanted.min(streamed.len() as u32).max(1);
    // The dropped layers freed at least one largest layer's worth: one slot always fits.
    while slots > 1 && resident_bytes + slots as u128 * largest as u128 > room {
        slots -= 1;
    }
    *slot_count = slots;
    *slot_bytes = largest.max(*slot_bytes);
}

/// Device memory the plan may use.
#[derive(Debug, Clone, Serialize)]
pub struct Budget {
    /// Free device memory as reported by the backend now.
    pub free_bytes: u64,
    /// Device total (0 = unknown).
    pub total_bytes: u64,
    /// Always left free for the driver and other allocations (default 512 MiB, the
    /// `--streaming-min-vram` figure).
    pub min_free_bytes: u64,
    /// Fraction of free memory the plan may use (default 0.90, a common VRAM-estimation margin).
    pub safety_fraction: f64,
    /// The host graph's compute buffer.
    pub compute_reserve_bytes: u64,
    /// KV cache / persistent activations declared by the host.
    pub persistent_bytes: u64,
}

const MIB: u64 = 1 << 20;

impl Budget {
    /// Default margins for `free` bytes free; the device total is left unknown (0).
    pub fn from_free(free: u64) -> Budget {
        Budget {
            free_bytes: free,
            total_bytes: 0,
            min_free_bytes: 512 * MIB,
            safety_fraction: 0.90,
            compute_reserve_bytes: 0,
            persistent_bytes: 0,
        }
    }

    /// `min(free * safety, free - min_free) - compute reserve - persistent`, never below 0.
    pub fn usable_bytes(&self) -> u64 {
        let by_fraction = (self.free_bytes as f64 * self.safety_fraction).floor();
        let by_fraction = if by_fraction.is_finite() && by_fraction > 0.0 {
            (by_fraction as u64).min(self.free_bytes)
        } else {
            0
        };
        by_fraction
            .min(self.free_bytes.saturating_sub(self.min_free_bytes))
            .saturating_sub(self.compute_reserve_bytes)
            .saturating_sub(self.persistent_bytes)
    }

    fn validate(&self) -> Result<()> {
        if self.free_bytes == 0 {
            return Err(Error::invalid("budget: free device memory is 0"));
        }
        if self.total_bytes != 0 && self.total_bytes < self.free_bytes {
            return Err(Error::invalid(format!(
                "budget: free memory ({}) exceeds the device total ({})",
                self.free_bytes, self.total_bytes
            )));
        }
        let s = self.safety_fraction;
        if !(s.is_finite() && s > 0.0 && s <= 1.0) {
            return Err(Error::invalid(format!(
                "budget: safety fraction must be in (0, 1], got {s}"
            )));
        }
        Ok(())
    }
}

/// How the model is run.
#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    /// Default 1 (an LLM forward; the number of sampling steps for diffusion).
    pub steps: u32,
    /// Passes over the layers per step: 2 with classifier-free guidance.
    pub passes_per_step: u32,
    /// Layers in flight ahead of the computing one (default 1); 0 loads synchronously.
    pub prefetch_depth: u32,
    /// Peak activations of one layer; stands in for the compute reserve when the host declared
    /// none (layers run one at a time, so it is reserved once).
    pub activation_bytes_per_layer: u64,
    /// At most this many resident layers (`--resident-layers N`; empty layers do not count);
    /// `None`: as many as the budget allows. The layers that save the least traffic stream
    /// instead.
    pub max_resident_layers: Option<u32>,
}

impl Default for Workload {
    fn default() -> Workload {
        Workload {
            steps: 1,
            passes_per_step: 1,
            prefetch_depth: 1,
            activation_bytes_per_layer: 0,
            max_resident_layers: None,
        }
    }
}

impl Workload {
    fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(Error::invalid("workload: steps must be at least 1"));
        }
        if self.passes_per_step == 0 {
            return Err(Error::invalid(
                "workload: passes per step must be at least 1",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every layer resident.
    Full,
    /// Some layers stream through slots.
    Streaming,
    /// Not even the global tensors plus one slot fit.
    Insufficient,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Full => "full",
            Mode::Streaming => "streaming",
            Mode::Insufficient => "insufficient",
        }
    }
}

/// The planner's answer. Byte counts are per device; "run" = steps x passes.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub mode: Mode,
    /// Layer indices kept on the device for the whole run.
    pub resident_layers: Vec<usize>,
    /// Layer indices uploaded on every pass (all layers when insufficient).
    pub streamed_layers: Vec<usize>,
    /// Streaming buffers: prefetch depth + 1, at most one per non-empty layer, fewer when that
    /// many do not fit (the message says so); 0 in full mode. Hosts should run with an
    /// effective prefetch depth of `slot_count - 1`.
    pub slot_count: u32,
    /// Size of each slot: the largest streamed layer.
    pub slot_bytes: u64,
    /// Resident layers + slots.
    pub arena_bytes: u64,
    /// Global + arena + reserves (0 when insufficient).
    pub device_bytes: u64,
    /// What the budget allows for global tensors and the arena.
    pub usable_bytes: u64,
    /// Global + all layers + reserves.
    pub full_cache_bytes: u64,
    /// Minimum streaming footprint: global + (prefetch depth + 1) slots of the largest layer +
    /// reserves.
    pub streaming_bytes: u64,
    pub layer_bytes_max: u64,
    /// Copied once, when the engine is placed: the global group and the resident layers.
    pub placement_bytes: u64,
    /// Streamed layers copied per pass once warm (read-once parts excluded).
    pub bytes_per_pass: u64,
    /// `passes_per_step * bytes_per_pass`.
    pub bytes_per_step: u64,
    /// Every copy of the run: the placement, then every streamed load of every pass.
    pub bytes_per_run: u64,
    pub layer_loads_per_run: u64,
    /// One step from an empty pipeline (so including the first copy), from the two-engine model.
    pub predicted_step_seconds: f64,
    /// Per step, summed over layers.
    pub predicted_compute_seconds: f64,
    /// Per step, summed over streamed layers (latency included).
    pub predicted_transfer_seconds: f64,
    pub link: Link,
    /// True when every layer had a compute time; missing ones count as 0.
    pub compute_measured: bool,
    /// Always-resident bytes of the model (embeddings, head, norms, KV for `Hparams` models).
    pub global_bytes: u64,
    /// Compute reserve (or activations) + persistent bytes.
    pub reserve_bytes: u64,
    /// Host memory the run holds for weights (homes, staging, bounce buffers); 0 until an
    /// engine that knows where the weights live fills it in.
    pub host_bytes: u64,
    /// Human-readable summary: what was decided and why, which figures were measured.
    pub message: String,
}

impl Plan {
    /// The prefetch depth a run of this plan gets when `asked` for: a ring of `slot_count`
    /// slots holds the layer computing and at most `slot_count - 1` copied ahead.
    pub fn prefetch_depth(&self, asked: u32) -> u32 {
        self.slot_count.saturating_sub(1).min(asked)
    }

    /// `Err(InsufficientMemory, message)` for an insufficient plan; the plan otherwise.
    pub fn into_result(self) -> Result<Plan> {
        if self.mode == Mode::Insufficient {
            Err(Error::new(Status::InsufficientMemory, self.message))
        } else {
            Ok(self)
        }
    }
}

fn sum_u128(values: impl Iterator<Item = u64>) -> u128 {
    values.map(|v| v as u128).sum()
}

fn clamp_u64(v: u128) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

/// Plans one model on one device.
///
/// * `Full` when global + all layers + reserves fit in the usable budget.
/// * `Streaming` otherwise, when global + at least one slot of the largest layer fit: resident
///   layers are chosen to minimise bytes over the link per run (see `schedule::choose_resident`).
/// * `Insufficient` (an `Ok` plan; see `Plan::into_result`) when not even that fits; the message
///   gives the needed and available bytes and what to do.
///
/// Traffic is computed in closed form (no run simulation), and timing from a one-step pipeline
/// model, so planning stays fast for thousands of layers and hundreds of steps.
pub fn plan(model: &ModelCost, budget: &Budget, workload: &Workload, link: &Link) -> Result<Plan> {
    model.validate()?;
    budget.validate()?;
    workload.validate()?;
    link.validate()?;

    let n = model.layers.len();
    let bytes: Vec<u64> = model.layers.iter().map(|l| l.bytes).collect();
    let values: Vec<u64> = model
        .layers
        .iter()
        .map(|l| l.copy_bytes - l.once_bytes)
        .collect();
    let layer_total = model.layer_bytes_total()?;
    let nonzero = bytes.iter().filter(|&&b| b > 0).count() as u64;
    let (max_index, layer_max) = bytes
        .iter()
        .copied()
        .enumerate()
        .max_by_key(|&(i, b)| (b, std::cmp::Reverse(i)))
        .unwrap_or((0, 0));

    // The host's compute buffer holds the activations; if it declared a smaller one, reserve
    // the workload's activation bytes instead.
    let extra_activation = workload
        .activation_bytes_per_layer
        .saturating_sub(budget.compute_reserve_bytes);
    let reserve_bytes = budget
        .compute_reserve_bytes
        .saturating_add(extra_activation)
        .saturating_add(budget.persistent_bytes);
    let usable = budget.usable_bytes().saturating_sub(extra_activation);
    let global = model.global_bytes;

    let wanted_slots = (workload.prefetch_depth as u64 + 1).min(nonzero).max(1) as u32;
    let full_cache_bytes = clamp_u64(sum_u128([global, layer_total, reserve_bytes].into_iter()));
    let streaming_need = |slots: u32| -> u128 {
        global as u128 + slots as u128 * layer_max as u128 + reserve_bytes as u128
    };
    let streaming_bytes = clamp_u64(streaming_need(wanted_slots));

    let mut plan = Plan {
        mode: Mode::Insufficient,
        resident_layers: Vec::new(),
        streamed_layers: (0..n).collect(),
        slot_count: 0,
        slot_bytes: 0,
        arena_bytes: 0,
        device_bytes: 0,
        usable_bytes: usable,
        full_cache_bytes,
        streaming_bytes,
        layer_bytes_max: layer_max,
        placement_bytes: 0,
        bytes_per_pass: 0,
        bytes_per_step: 0,
        bytes_per_run: 0,
        layer_loads_per_run: 0,
        predicted_step_seconds: 0.0,
        predicted_compute_seconds: 0.0,
        predicted_transfer_seconds: 0.0,
        link: link.clone(),
        compute_measured: model.layers.iter().all(|l| l.compute_seconds.is_some()),
        global_bytes: global,
        reserve_bytes,
        host_bytes: 0,
        message: String::new(),
    };

    let selection = if global as u128 + layer_total as u128 <= usable as u128 {
        Some((vec![true; n], 0u32, 0u64, true))
    } else if global as u128 + layer_max as u128 > usable as u128 {
        None
    } else {
        schedule::choose_resident(&bytes, &values, usable - global, wanted_slots)
            .map(|s| (s.resident, s.slot_count, s.slot_bytes, s.exact))
    };
    let Some((mut resident, mut slot_count, mut slot_bytes, exact)) = selection else {
        plan.message = insufficient_message(model, budget, &plan, max_index, extra_activation);
        return Ok(plan);
    };
    if let Some(max) = workload.max_resident_layers {
        cap_resident(
            &mut resident,
            &mut slot_count,
            &mut slot_bytes,
            (&bytes, &values),
            max as usize,
            (wanted_slots, usable as u128 - global.min(usable) as u128),
        );
    }

    plan.mode = if slot_count == 0 {
        Mode::Full
    } else {
        Mode::Streaming
    };
    plan.resident_layers = (0..n).filter(|&i| resident[i]).collect();
    plan.streamed_layers = (0..n).filter(|&i| !resident[i]).collect();
    plan.slot_count = slot_count;
    plan.slot_bytes = slot_bytes;
    let resident_bytes = sum_u128(plan.resident_layers.iter().map(|&i| bytes[i]));
    let arena = resident_bytes + slot_count as u128 * slot_bytes as u128;
    plan.arena_bytes = clamp_u64(arena);
    plan.device_bytes = clamp_u64(global as u128 + arena + reserve_bytes as u128);

    // Traffic, in closed form.
    let traffic = static_traffic(model, workload, &resident);
    plan.placement_bytes = clamp_u64(
        model.global_copy_bytes as u128
            + sum_u128(
                plan.resident_layers
                    .iter()
                    .map(|&i| model.layers[i].copy_bytes),
            ),
    );
    plan.bytes_per_pass = clamp_u64(sum_u128(plan.streamed_layers.iter().map(|&i| values[i])));
    plan.bytes_per_step = clamp_u64(plan.bytes_per_pass as u128 * workload.passes_per_step as u128);
    plan.bytes_per_run = traffic.bytes_moved.saturating_add(model.global_copy_bytes);
    plan.layer_loads_per_run = traffic.loads;

    // Time of one step.
    let compute: Vec<f64> = model
        .layers
        .iter()
        .map(|l| l.compute_seconds.unwrap_or(0.0))
        .collect();
    let copy: Vec<Option<f64>> = (0..n)
        .map(|i| (!resident[i] && values[i] > 0).then(|| link.transfer_seconds(values[i])))
        .collect();
    let passes = workload.passes_per_step as f64;
    // fold from +0.0: an empty f64 sum is -0.0, which would print as "-0.0000 s".
    // Extreme sizes or rates would overflow to infinity: cap at the largest finite value.
    plan.predicted_compute_seconds =
        (passes * compute.iter().fold(0.0, |a, c| a + c)).min(f64::MAX);
    plan.predicted_transfer_seconds =
        (passes * copy.iter().flatten().fold(0.0, |a, t| a + t)).min(f64::MAX);
    plan.predicted_step_seconds =
        schedule::step_seconds(&compute, &copy, slot_count.max(1), workload.passes_per_step);

    plan.message = ok_message(model, workload, &plan, wanted_slots, exact);
    Ok(plan)
}

fn figures_note(model: &ModelCost, plan: &Plan) -> String {
    let given = model
        .layers
        .iter()
        .filter(|l| l.compute_seconds.is_some())
        .count();
    let compute = if given == model.layers.len() {
        "compute times given for every layer".to_string()
    } else if given == 0 {
        "no compute times given (assumed 0: times are transfer-bound; calibrate to refine)"
            .to_string()
    } else {
        format!(
            "compute times given for {given} of {} layers (others assumed 0)",
            model.layers.len()
        )
    };
    format!("link {}; {compute}", plan.link.describe())
}

fn ok_message(
    model: &ModelCost,
    workload: &Workload,
    plan: &Plan,
    wanted_slots: u32,
    exact: bool,
) -> String {
    let n = model.layers.len();
    let mut msg = match plan.mode {
        Mode::Full => format!(
            "full: all {n} layers resident; device {} of {} usable",
            format_bytes(plan.device_bytes),
            format_bytes(plan.usable_bytes + plan.reserve_bytes),
        ),
        _ => format!(
            "streaming: {} of {n} layers resident, {} streamed through {} slot(s) of {}; \
             device {} (full mode would need {}); {} over the link per step, {} per run",
            plan.resident_layers.len(),
            plan.streamed_layers.len(),
            plan.slot_count,
            format_bytes(plan.slot_bytes),
            format_bytes(plan.device_bytes),
            format_bytes(plan.full_cache_bytes),
            format_bytes(plan.bytes_per_step),
            format_bytes(plan.bytes_per_run),
        ),
    };
    if plan.mode == Mode::Streaming && plan.slot_count < wanted_slots {
        msg.push_str(&format!(
            "; prefetch depth reduced from {} to {} to fit",
            workload.prefetch_depth,
            plan.slot_count - 1
        ));
    }
    if !exact {
        msg.push_str(
            "; resident set from a rounded knapsack (layer sizes too irregular for an exact table)",
        );
    }
    msg.push_str(&format!(
        "; predicted {:.4} s per step ({:.4} s compute, {:.4} s transfer); {}",
        plan.predicted_step_seconds,
        plan.predicted_compute_seconds,
        plan.predicted_transfer_seconds,
        figures_note(model, plan)
    ));
    msg
}

/// Free memory needed for `usable_bytes() - extra >= need` under this budget's margins.
fn free_needed(budget: &Budget, need: u128, extra: u64) -> u128 {
    let target = need
        + budget.compute_reserve_bytes as u128
        + budget.persistent_bytes as u128
        + extra as u128;
    // `as u128` saturates for huge or infinite quotients; the additions must saturate too.
    let by_fraction = ((target as f64 / budget.safety_fraction).ceil() as u128).saturating_add(1);
    by_fraction.max(target.saturating_add(budget.min_free_bytes as u128))
}

fn insufficient_message(
    model: &ModelCost,
    budget: &Budget,
    plan: &Plan,
    max_index: usize,
    extra: u64,
) -> String {
    let global = plan.global_bytes;
    let usable = plan.usable_bytes;
    let biggest = &model.layers[max_index];
    let min_streaming = global as u128 + biggest.bytes as u128;
    let reason = if global > usable {
        format!(
            "the always-resident tensors alone need {} but only {} is usable",
            format_bytes(global),
            format_bytes(usable)
        )
    } else {
        format!(
            "layer {:?} ({}) does not fit in a single slot beside the always-resident tensors ({}): \
             {} usable",
            biggest.name,
            format_bytes(biggest.bytes),
            format_bytes(global),
            format_bytes(usable)
        )
    };
    let mut msg = format!(
        "insufficient device memory: {reason}. Full mode needs {}, streaming needs {} \
         ({} with synchronous loads); usable {} of {} free (safety {:.2}, {} kept free, \
         reserves {}). Options:",
        format_bytes(plan.full_cache_bytes),
        format_bytes(plan.streaming_bytes),
        format_bytes(clamp_u64(min_streaming + plan.reserve_bytes as u128)),
        format_bytes(usable),
        format_bytes(budget.free_bytes),
        budget.safety_fraction,
        format_bytes(budget.min_free_bytes),
        format_bytes(plan.reserve_bytes),
    );
    // 1. Free device memory.
    let free_target = free_needed(budget, min_streaming, extra);
    let more = free_target.saturating_sub(budget.free_bytes as u128);
    if budget.total_bytes != 0 && free_target > budget.total_bytes as u128 {
        msg.push_str(&format!(
            " (1) freeing device memory cannot help: streaming needs about {} free, more than \
             the device's {};",
            format_bytes(clamp_u64(free_target)),
            format_bytes(budget.total_bytes)
        ));
    } else {
        msg.push_str(&format!(
            " (1) free {} more device memory (close other programs, shrink the context or \
             compute buffer);",
            format_bytes(clamp_u64(more))
        ));
    }
    // 2. Smaller weights: the factor by which global + one layer must shrink, from the
    // model's own bits per weight when known.
    let shrink = usable as f64 / min_streaming as f64;
    if shrink > 0.0 {
        let fits = |bits: f64| {
            WeightType::ladder()
                .into_iter()
                .find(|t| t.bits() <= bits)
                .map(|t| format!("{} ({} bits) would fit", t.name(), t.bits()))
                .unwrap_or_else(|| "no standard type is that small".to_string())
        };
        let advice = match model.bits_per_weight {
            Some(now) => format!(
                "from its {now:.2} bits per weight to at most {:.2} ({})",
                now * shrink,
                fits(now * shrink)
            ),
            None => format!(
                "from 16-bit weights to at most {:.2} bits per weight ({}), from 32-bit to at \
                 most {:.2}",
                16.0 * shrink,
                fits(16.0 * shrink),
                32.0 * shrink
            ),
        };
        msg.push_str(&format!(
            " (2) quantize: every resident tensor would have to shrink to {:.0}% of its size, \
             i.e. {advice};",
            shrink * 100.0,
        ));
    } else {
        msg.push_str(" (2) quantizing cannot help: no device memory is usable;");
    }
    msg.push_str(
        " (3) if host RAM is also short, keep the weights on disk and stream them (nvme link); \
         (4) run the model, or the layers that do not fit, on the CPU (see planner::advise).",
    );
    msg
}

/// Plans stages that run one after another (e.g. a text encoder once, then a denoiser for S
/// steps, then a decoder). Each stage gets the whole budget except the global tensors of the
/// stages before it, which are assumed to stay resident (conditioning outputs, shared
/// embeddings); a stage's layers and slots are released when it ends. A host that frees earlier
/// stages completely can plan each stage on its own instead.
pub fn plan_pipeline(
    stages: &[(String, ModelCost, Workload)],
    budget: &Budget,
    link: &Link,
) -> Result<Vec<Plan>> {
    if stages.is_empty() {
        return Err(Error::invalid("pipeline has no stages"));
    }
    let mut left_resident: u64 = 0;
    let mut plans = Vec::with_capacity(stages.len());
    for (name, model, workload) in stages {
        let mut stage_budget = budget.clone();
        stage_budget.persistent_bytes = budget.persistent_bytes.saturating_add(left_resident);
        let mut p = plan(model, &stage_budget, workload, link)
            .map_err(|e| Error::new(e.status, format!("stage {name:?}: {}", e.message)))?;
        p.message = format!(
            "stage {name:?} ({} held by earlier stages): {}",
            format_bytes(left_resident),
            p.message
        );
        left_resident = left_resident.saturating_add(model.global_bytes);
        plans.push(p);
    }
    Ok(plans)
}

/// Records measured compute times: one per layer, or a single per-pass total that is spread
/// over the layers in proportion to their bytes.
pub fn calibrate(model: &mut ModelCost, measured_compute: &[f64]) -> Result<()> {
    if let Some(bad) = measured_compute
        .iter()
        .find(|c| !(c.is_finite() && **c >= 0.0))
    {
        return Err(Error::invalid(format!(
            "calibrate: compute times must be finite and non-negative, got {bad}"
        )));
    }
    let n = model.layers.len();
    if measured_compute.len() == n && n > 0 {
        for (l, &c) in model.layers.iter_mut().zip(measured_compute) {
            l.compute_seconds = Some(c);
        }
        return Ok(());
    }
    if measured_compute.len() == 1 && n > 0 {
        let total = measured_compute[0];
        let bytes = model.layer_bytes_total()? as f64;
        for l in &mut model.layers {
            let share = if bytes > 0.0 {
                l.bytes as f64 / bytes
            } else {
                1.0 / n as f64
            };
            l.compute_seconds = Some(total * share);
        }
        return Ok(());
    }
    Err(Error::invalid(format!(
        "calibrate: got {} compute times for {n} layers (give one per layer or one total)",
        measured_compute.len()
    )))
}

/// One line: a bar of device memory (`x` used elsewhere, `#` global, `=` resident layers,
/// `~` slots, `+` reserves, `.` free) followed by a legend with sizes.
pub fn memory_bar(plan: &Plan, budget: &Budget, width: usize) -> String {
    let width = width.max(10);
    let total = budget.total_bytes.max(budget.free_bytes);
    let other = total - budget.free_bytes;
    let (global, resident, slots, reserves) = if plan.mode == Mode::Insufficient {
        (0, 0, 0, 0)
    } else {
        let slots = plan.slot_count as u64 * plan.slot_bytes;
        (
            plan.global_bytes,
            plan.arena_bytes.saturating_sub(slots),
            slots,
            plan.reserve_bytes,
        )
    };
    let used = sum_u128([other, global, resident, slots, reserves].into_iter());
    let free = clamp_u64((total as u128).saturating_sub(used));
    let parts = [
        ('x', other),
        ('#', global),
        ('=', resident),
        ('~', slots),
        ('+', reserves),
        ('.', free),
    ];
    let scale = (used + free as u128).max(1) as f64;
    // Largest-remainder apportionment; a non-empty part gets at least one cell.
    let mut cells: Vec<usize> = parts
        .iter()
        .map(|&(_, b)| ((b as f64 / scale) * width as f64).floor() as usize)
        .collect();
    for (i, &(_, b)) in parts.iter().enumerate() {
        if b > 0 && cells[i] == 0 {
            cells[i] = 1;
        }
    }
    let mut order: Vec<usize> = (0..parts.len()).collect();
    order.sort_by(|&a, &b| {
        let frac = |i: usize| (parts[i].1 as f64 / scale) * width as f64 - cells[i] as f64;
        frac(b).total_cmp(&frac(a))
    });
    let mut filled: usize = cells.iter().sum();
    for &i in order.iter().cycle().take(parts.len() * width) {
        if filled >= width {
            break;
        }
        if parts[i].1 > 0 {
            cells[i] += 1;
            filled += 1;
        }
    }
    while filled > width {
        // Too many forced minimum cells: take from the largest part.
        let (i, _) = cells
            .iter()
            .enumerate()
            .max_by_key(|&(_, c)| *c)
            .unwrap_or((0, &0));
        cells[i] -= 1;
        filled -= 1;
    }
    let bar: String = parts
        .iter()
        .zip(&cells)
        .flat_map(|(&(ch, _), &c)| std::iter::repeat_n(ch, c))
        .collect();
    let mut legend = Vec::new();
    if other > 0 {
        legend.push(format!("x used elsewhere {}", format_bytes(other)));
    }
    if plan.mode == Mode::Insufficient {
        legend.push(format!(
            "nothing placed: streaming needs {}",
            format_bytes(plan.streaming_bytes)
        ));
    } else {
        legend.push(format!("# global {}", format_bytes(global)));
        legend.push(format!(
            "= resident {} ({} layers)",
            format_bytes(resident),
            plan.resident_layers.len()
        ));
        if plan.slot_count > 0 {
            legend.push(format!(
                "~ slots {} x {}",
                plan.slot_count,
                format_bytes(plan.slot_bytes)
            ));
        }
        legend.push(format!("+ reserves {}", format_bytes(reserves)));
    }
    legend.push(format!(
        ". free {} of {}",
        format_bytes(free),
        format_bytes(total)
    ));
    format!("[{bar}] {}", legend.join(" | "))
}

/// A 1,000-layer model with irregular layer sizes (so the rounded knapsack path runs), 100
/// steps with guidance, prefetch depth 2, about half of it fitting; returns seconds per plan.
pub fn bench_plan_1000_layers() -> f64 {
    let (model, budget, workload) = bench_case();
    let link = Link {
        name: "pcie4-x16".into(),
        bandwidth_bytes_per_s: 24e9,
        latency_s: 10e-6,
        measured: false,
    };
    let _ = plan(&model, &budget, &workload, &link);
    let iterations = 20;
    let start = std::time::Instant::now();
    for _ in 0..iterations {
        let p = plan(&model, &budget, &workload, &link);
        std::hint::black_box(&p);
    }
    start.elapsed().as_secs_f64() / iterations as f64
}

fn bench_case() -> (ModelCost, Budget, Workload) {
    let layers: Vec<LayerCost> = (0..1000u64)
        .map(|i| {
            // 40-52 MiB blocks with 4 KiB-granular jitter; every fourth carries cross-attention
            // K/V read once per run.
            let jitter = (i * 7919 % 3001) * 4096;
            let cross = if i % 4 == 3 { 6 * MIB } else { 0 };
            LayerCost {
                once_bytes: cross,
                compute_seconds: Some(0.002 + (i % 5) as f64 * 1e-4),
                ..LayerCost::new(format!("blk.{i}"), 40 * MIB + jitter + cross)
            }
        })
        .collect();
    let total: u64 = layers.iter().map(|l| l.bytes).sum();
    let model = ModelCost {
        layers,
        global_bytes: 2 << 30,
        global_copy_bytes: 2 << 30,
        bits_per_weight: None,
    };
    let budget = Budget::from_free((2 << 30) + total / 2 + (1 << 30));
    let workload = Workload {
        steps: 100,
        passes_per_step: 2,
        prefetch_depth: 2,
        activation_bytes_per_layer: 256 * MIB,
        max_resident_layers: None,
    };
    (model, budget, workload)
}

#[cfg(test)]
mod tests;
