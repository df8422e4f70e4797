//! Layer-name patterns: which tensors form one streamable layer, and in what order the layers
//! execute.
//!
//! A tensor name is split into a host prefix naming the model component (`model.diffusion_model.`,
//! `text_encoders.`, ...) and the rest. A pattern finds a layer in the rest (`double_blocks.5`,
//! `blk.12`, `middle_block`) and gives it a sort key in execution order. Tensors that no layer
//! claims (embeddings, final norms, heads, modulation) belong to the global group, which stays
//! resident.
//!
//! Built-in patterns are literal prefix matchers, not regexes: they are exact about what may
//! stand before a layer (`blocks.N` must not match inside `double_blocks.N` or `vace_blocks.N`),
//! and fast. User patterns are regexes compiled once with size limits.
//!
//! This module depends on nothing but std, `regex` and `crate::error`, because the fuzz targets
//! compile it on its own through `#[path]`.

use crate::error::{Error, Result};
use regex::{Regex, RegexBuilder};
use std::collections::HashMap;

/// The model component a tensor belongs to, from its host prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Component {
    DiffusionModel,
    TextEncoder,
    Vae,
    ControlModel,
    Lora,
    LanguageModel,
    Unknown,
}

impl Component {
    pub fn as_str(self) -> &'static str {
        match self {
            Component::DiffusionModel => "diffusion_model",
            Component::TextEncoder => "text_encoder",
            Component::Vae => "vae",
            Component::ControlModel => "control_model",
            Component::Lora => "lora",
            Component::LanguageModel => "language_model",
            Component::Unknown => "unknown",
        }
    }
}

/// Host prefixes of stable-diffusion.cpp-style checkpoints, which bundle several components.
const HOST_PREFIXES: &[(&str, Component)] = &[
    ("model.diffusion_model.", Component::DiffusionModel),
    ("diffusion_model.", Component::DiffusionModel),
    ("cond_stage_model.", Component::TextEncoder),
    ("text_encoders.", Component::TextEncoder),
    ("conditioner.", Component::TextEncoder),
    ("first_stage_model.", Component::Vae),
    ("vae.", Component::Vae),
    ("control_model.", Component::ControlModel),
    ("lora.", Component::Lora),
];

/// Unprefixed names that mark a language model: llama.cpp GGUF names and Hugging Face
/// transformers names. These keep an empty prefix.
const LANGUAGE_MODEL_STARTS: &[&str] = &[
    "blk.",
    "token_embd.",
    "output_norm.",
    "output.",
    "rope_freqs.",
    "model.layers.",
    "model.embed_tokens.",
    "model.norm.",
    "lm_head.",
];

/// Splits a tensor name into its component, the host prefix (possibly empty) and the rest.
pub fn split_prefix(name: &str) -> (Component, &str, &str) {
    for &(prefix, component) in HOST_PREFIXES {
        if let Some(rest) = name.strip_prefix(prefix) {
            return (component, prefix, rest);
        }
    }
    if LANGUAGE_MODEL_STARTS
        .iter()
        .any(|start| name.starts_with(start))
    {
        return (Component::LanguageModel, "", name);
    }
    (Component::Unknown, "", name)
}

/// Sort key giving execution order: layers run in ascending `(kind_rank, index, sub_rank)`.
/// Two different layers can share a key only under the generic or user patterns (e.g.
/// `encoder.layers.3` and `decoder.layers.3`); sort by `(order, layer_name)` to be total.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LayerKey {
    /// Which family of layers (`double_blocks` before `single_blocks`).
    pub kind_rank: u32,
    /// Position within the family.
    pub index: u64,
    /// Orders layers that share a position (a Wan VACE block after its main block).
    pub sub_rank: u32,
}

/// The layer a tensor belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Matched {
    /// The layer's name without the host prefix: "double_blocks.5", "blk.12", "middle_block",
    /// "clip_l.transformer.text_model.encoder.layers.3".
    pub layer_name: String,
    pub order: LayerKey,
}

/// Where a built-in layer prefix may start within the rest of a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Anchor {
    /// At the very start: diffusion blocks sit right under the host prefix, and `blk.N` must
    /// not match `v.blk.N` (vision tower) or `enc.blk.N`.
    Start,
    /// At the start or right after a dot: text encoders sit under per-model sub-prefixes
    /// (`clip_l.transformer.`), which stay part of the layer name.
    Segment,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IndexRule {
    /// The number after the prefix is the index.
    Number,
    /// The number after the prefix times this factor is the index (Wan VACE placement).
    Scaled(u64),
    /// A single layer with no number (`middle_block`); its index is 0.
    Single,
}

#[derive(Debug, Clone)]
struct KindRule {
    /// The layer family followed by a dot, e.g. "double_blocks.".
    prefix: &'static str,
    anchor: Anchor,
    kind_rank: u32,
    sub_rank: u32,
    index: IndexRule,
}

#[derive(Debug, Clone)]
struct BuiltinMatcher {
    kinds: Vec<KindRule>,
    /// Components whose tensors this pattern may claim; others stay global, so a diffusion
    /// pattern never swallows text-encoder layers stored in the same file.
    components: &'static [Component],
}

#[derive(Debug, Clone)]
struct UserMatcher {
    regex: Regex,
    index_group: usize,
    kind_group: Option<usize>,
    kind_ranks: HashMap<String, u32>,
}

#[derive(Debug, Clone)]
enum Matcher {
    Builtin(BuiltinMatcher),
    User(UserMatcher),
}

/// A built-in architecture or a user regex.
#[derive(Debug, Clone)]
pub struct Pattern {
    name: String,
    matcher: Matcher,
}

const BUILTIN_NAMES: &[&str] = &[
    "flux",
    "mmdit",
    "unet",
    "wan",
    "qwen_image",
    "z_image",
    "anima",
    "hidream",
    "llama_gguf",
    "hf_transformers",
    "t5",
    "clip",
    "generic",
];

/// Names accepted by `Pattern::builtin`.
pub fn builtin_names() -> &'static [&'static str] {
    BUILTIN_NAMES
}

const DIFFUSION: &[Component] = &[Component::DiffusionModel, Component::Unknown];
const LANGUAGE: &[Component] = &[
    Component::LanguageModel,
    Component::TextEncoder,
    Component::Unknown,
];
const TEXT: &[Component] = &[Component::TextEncoder, Component::Unknown];
const ANY: &[Component] = &[
    Component::DiffusionModel,
    Component::TextEncoder,
    Component::Vae,
    Component::ControlModel,
    Component::Lora,
    Component::LanguageModel,
    Component::Unknown,
];

/// Wan2.1 VACE 1.3B injects a VACE block every second main block (vace_layers 0, 2, 4, ...).
pub const DEFAULT_WAN_VACE_STEP: u64 = 2;

/// A numbered layer family anchored at the start of the rest.
fn numbered(prefix: &'static str, kind_rank: u32) -> KindRule {
    KindRule {
        prefix,
        anchor: Anchor::Start,
        kind_rank,
        sub_rank: 0,
        index: IndexRule::Number,
    }
}

fn segment(prefix: &'static str, kind_rank: u32) -> KindRule {
    KindRule {
        anchor: Anchor::Segment,
        ..numbered(prefix, kind_rank)
    }
}

fn lookup_builtin(name: &str) -> Option<Pattern> {
    let (kinds, components) = match name {
        // Flux (and Flux.2, Chroma, HunyuanVideo): all double-stream blocks, then all
        // single-stream blocks.
        "flux" => (
            vec![numbered("double_blocks.", 0), numbered("single_blocks.", 1)],
            DIFFUSION,
        ),
        "mmdit" => (vec![numbered("joint_blocks.", 0)], DIFFUSION),
        // SD1.x/SDXL UNet: down path, bottleneck, up path.
        "unet" => (
            vec![
                numbered("input_blocks.", 0),
                KindRule {
                    index: IndexRule::Single,
                    ..numbered("middle_block.", 1)
                },
                numbered("output_blocks.", 2),
            ],
            DIFFUSION,
        ),
        "wan" => return Some(Pattern::wan(DEFAULT_WAN_VACE_STEP)),
        "qwen_image" => (vec![numbered("transformer_blocks.", 0)], DIFFUSION),
        // Z-Image (Lumina2-style): text refiner, image refiner, then the joint layers.
        "z_image" => (
            vec![
                numbered("context_refiner.", 0),
                numbered("noise_refiner.", 1),
                numbered("layers.", 2),
            ],
            DIFFUSION,
        ),
        "anima" => (vec![numbered("net.blocks.", 0)], DIFFUSION),
        // HiDream-I1: blocks are named `double_stream_blocks.N.block.…`; the layer is
        // `double_stream_blocks.N`.
        "hidream" => (
            vec![
                numbered("double_stream_blocks.", 0),
                numbered("single_stream_blocks.", 1),
            ],
            DIFFUSION,
        ),
        "llama_gguf" => (vec![numbered("blk.", 0)], LANGUAGE),
        "hf_transformers" => (vec![segment("model.layers.", 0)], LANGUAGE),
        // T5 encoders as stable-diffusion.cpp names them, or llama.cpp-style T5 GGUF files
        // (`enc.blk.N.`).
        "t5" => (
            vec![segment("encoder.block.", 0), numbered("enc.blk.", 0)],
            TEXT,
        ),
        // CLIP-L style, then OpenCLIP (SDXL's CLIP-G) style: SDXL runs CLIP-L first.
        "clip" => (
            vec![
                segment("text_model.encoder.layers.", 0),
                segment("transformer.resblocks.", 1),
            ],
            TEXT,
        ),
        "generic" => return Some(generic()),
        _ => return None,
    };
    Some(Pattern {
        name: name.to_string(),
        matcher: Matcher::Builtin(BuiltinMatcher { kinds, components }),
    })
}

/// Fallback: common numbered families anywhere in the name, so unknown architectures still
/// stream something; the leftmost family in a name wins.
fn generic() -> Pattern {
    let kinds = vec![
        segment("blocks.", 0),
        segment("layers.", 1),
        segment("layer.", 2),
        segment("h.", 3),
        segment("block.", 4),
    ];
    Pattern {
        name: "generic".to_string(),
        matcher: Matcher::Builtin(BuiltinMatcher {
            kinds,
            components: ANY,
        }),
    }
}

impl Pattern {
    /// A built-in pattern by name (see `builtin_names`); NotFound lists the known names.
    pub fn builtin(name: &str) -> Result<Pattern> {
        lookup_builtin(name).ok_or_else(|| {
            Error::not_found(format!(
                "unknown layer pattern '{name}'; known patterns: {}",
                BUILTIN_NAMES.join(", ")
            ))
        })
    }

    /// The Wan pattern: `blocks.N`, with `vace_blocks.M` interleaved.
    ///
    /// In Wan VACE, VACE block M produces the hint that is added right after main block
    /// `M * vace_step` (vace_layers = 0, step, 2*step, ...), and stable-diffusion.cpp runs VACE
    /// block M at exactly that point: after `blocks.(M*step)`, before `blocks.(M*step+1)`. So
    /// `vace_blocks.M` sorts immediately after `blocks.(M*step)`. The step is 2 for Wan2.1
    /// VACE 1.3B (30 blocks, 15 VACE blocks) and 5 for VACE 14B (40 blocks, 8 VACE blocks);
    /// `detect` derives it from the names as blocks / vace_blocks, like stable-diffusion.cpp.
    pub fn wan(vace_step: u64) -> Pattern {
        let kinds = vec![
            numbered("blocks.", 0),
            KindRule {
                sub_rank: 1,
                index: IndexRule::Scaled(vace_step.max(1)),
                ..numbered("vace_blocks.", 0)
            },
        ];
        Pattern {
            name: "wan".to_string(),
            matcher: Matcher::Builtin(BuiltinMatcher {
                kinds,
                components: DIFFUSION,
            }),
        }
    }

    /// A user pattern: a regex whose capture group (the only unnamed group, or the group named
    /// `index`) holds the layer index, with an optional group named `kind` ranked by
    /// `kind_order`. Kinds not listed sort after all listed kinds, by name (the first four
    /// bytes decide). The regex is searched anywhere in the full tensor name; the layer name is
    /// the name without its host prefix, up to the end of the index.
    pub fn user(regex: &str, kind_order: &[&str]) -> Result<Pattern> {
        const MAX_REGEX_LEN: usize = 64 * 1024;
        const COMPILED_LIMIT: usize = 8 << 20;
        if regex.len() > MAX_REGEX_LEN {
            return Err(Error::invalid(format!(
                "layer pattern regex is {} bytes long; the limit is {MAX_REGEX_LEN}",
                regex.len()
            )));
        }
        let compiled = RegexBuilder::new(regex)
            .size_limit(COMPILED_LIMIT)
            .dfa_size_limit(COMPILED_LIMIT)
            .build()
            .map_err(|e| {
                Error::invalid(format!(
                    "layer pattern regex {regex:?} does not compile: {e}"
                ))
            })?;

        let mut index_group = None;
        let mut kind_group = None;
        let mut unnamed = Vec::new();
        for (i, group_name) in compiled.capture_names().enumerate().skip(1) {
            match group_name {
                Some("index") => index_group = Some(i),
                Some("kind") => kind_group = Some(i),
                Some(_) => {}
                None => unnamed.push(i),
            }
        }
        let index_group = match (index_group, unnamed.as_slice()) {
            (Some(i), _) => i,
            (None, [only]) => *only,
            (None, []) => {
                return Err(Error::invalid(format!(
                    "layer pattern regex {regex:?} has no capture group for the layer index; \
                     write one, e.g. blocks\\.(\\d+)\\."
                )))
            }
            (None, many) => {
                return Err(Error::invalid(format!(
                    "layer pattern regex {regex:?} has {} unnamed capture groups; use (?:...) for \
                     grouping or name the index group (?P<index>...)",
                    many.len()
                )))
            }
        };
        let mut kind_ranks = HashMap::new();
        for (rank, kind) in kind_order.iter().enumerate() {
            let rank = u32::try_from(rank)
                .unwrap_or(u32::MAX)
                .min(UNLISTED_KIND_BASE - 1);
            kind_ranks.entry(kind.to_string()).or_insert(rank);
        }
        Ok(Pattern {
            name: "user".to_string(),
            matcher: Matcher::User(UserMatcher {
                regex: compiled,
                index_group,
                kind_group,
                kind_ranks,
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The layer a tensor belongs to; None puts it in the global group. A user pattern whose
    /// index group captured something that is not an integer also gives None here; use
    /// `try_match_name` to see that as an error.
    pub fn match_name(&self, tensor_name: &str) -> Option<Matched> {
        self.try_match_name(tensor_name).ok().flatten()
    }

    /// Like `match_name`, but a user pattern's non-integer index is an InvalidArgument error.
    pub fn try_match_name(&self, tensor_name: &str) -> Result<Option<Matched>> {
        match &self.matcher {
            Matcher::Builtin(m) => Ok(m.match_name(tensor_name)),
            Matcher::User(m) => m.match_name(tensor_name),
        }
    }
}

impl BuiltinMatcher {
    fn match_name(&self, name: &str) -> Option<Matched> {
        let (component, _, rest) = split_prefix(name);
        if !self.components.contains(&component) {
            return None;
        }
        // Leftmost layer wins, so `encoder.block.3.layer.0` is block 3, not layer 0.
        let mut best: Option<(usize, &KindRule)> = None;
        for kind in &self.kinds {
            if let Some(start) = find_anchored(rest, kind.prefix, kind.anchor) {
                let leftmost = match best {
                    None => true,
                    Some((best_start, _)) => start < best_start,
                };
                if leftmost {
                    best = Some((start, kind));
                }
            }
        }
        let (start, kind) = best?;
        let after = start + kind.prefix.len();
        let (index, end) = match kind.index {
            IndexRule::Single => (0, after - 1),
            IndexRule::Number | IndexRule::Scaled(_) => {
                let (number, digits) = leading_index(&rest[after..])?;
                let index = match kind.index {
                    IndexRule::Scaled(step) => number.checked_mul(step)?,
                    _ => number,
                };
                (index, after + digits)
            }
        };
        Some(Matched {
            layer_name: rest[..end].to_string(),
            order: LayerKey {
                kind_rank: kind.kind_rank,
                index,
                sub_rank: kind.sub_rank,
            },
        })
    }
}

/// Where `prefix` starts in `rest` under the anchor rule, if anywhere.
fn find_anchored(rest: &str, prefix: &str, anchor: Anchor) -> Option<usize> {
    match anchor {
        Anchor::Start => rest.starts_with(prefix).then_some(0),
        Anchor::Segment => rest
            .match_indices(prefix)
            .map(|(at, _)| at)
            .find(|&at| at == 0 || rest.as_bytes()[at - 1] == b'.'),
    }
}

/// Parses the decimal index at the start of `text`, which must end there or at a dot.
/// Returns the number and how many digits it took.
fn leading_index(text: &str) -> Option<(u64, usize)> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || !matches!(text.as_bytes().get(digits), None | Some(b'.')) {
        return None;
    }
    let number = text[..digits].parse().ok()?;
    Some((number, digits))
}

/// Ranks from here up belong to kinds a user pattern did not list.
const UNLISTED_KIND_BASE: u32 = 0x8000_0000;

/// An order-preserving rank for an unlisted kind from its first four bytes (31 bits: three
/// full bytes and the fourth capped at 127, exact for ASCII).
fn unlisted_kind_rank(kind: &str) -> u32 {
    let b = kind.as_bytes();
    let byte = |i: usize| u32::from(b.get(i).copied().unwrap_or(0));
    UNLISTED_KIND_BASE | (byte(0) << 23) | (byte(1) << 15) | (byte(2) << 7) | byte(3).min(127)
}

impl UserMatcher {
    fn match_name(&self, name: &str) -> Result<Option<Matched>> {
        let Some(caps) = self.regex.captures(name) else {
            return Ok(None);
        };
        let Some(index_match) = caps.get(self.index_group) else {
            return Ok(None);
        };
        let text = index_match.as_str();
        let index = match text.parse::<u64>() {
            Ok(index) if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) => index,
            _ => {
                return Err(Error::invalid(format!(
                    "layer pattern {:?}: the index group matched {text:?} in tensor '{name}', \
                     which is not a non-negative integer",
                    self.regex.as_str()
                )))
            }
        };
        let kind_rank = match self.kind_group.and_then(|g| caps.get(g)) {
            None => 0,
            Some(kind) => match self.kind_ranks.get(kind.as_str()) {
                Some(&rank) => rank,
                None => unlisted_kind_rank(kind.as_str()),
            },
        };
        let (_, prefix, _) = split_prefix(name);
        let start = if prefix.len() <= index_match.start() {
            prefix.len()
        } else {
            0
        };
        Ok(Some(Matched {
            layer_name: name[start..index_match.end()].to_string(),
            order: LayerKey {
                kind_rank,
                index,
                sub_rank: 0,
            },
        }))
    }
}

/// Detection tiers, most preferred first. A file may hold several components (an all-in-one
/// checkpoint); the diffusion model is the one worth streaming, so any diffusion match beats
/// language-model and text-encoder matches. Within a tier the pattern claiming the most names
/// wins, ties going to the earlier entry.
const DETECTION_TIERS: &[&[&str]] = &[
    &[
        "flux",
        "hidream",
        "mmdit",
        "unet",
        "wan",
        "qwen_image",
        "z_image",
        "anima",
    ],
    &["llama_gguf", "hf_transformers"],
    &["t5", "clip"],
];

/// Picks the built-in pattern for a model from its tensor names; `generic` when nothing more
/// specific claims any name.
pub fn detect(names: &[&str]) -> Pattern {
    for tier in DETECTION_TIERS {
        let mut best: Option<(usize, Pattern)> = None;
        for &name in tier.iter() {
            let Some(pattern) = lookup_builtin(name) else {
                continue;
            };
            let claimed = names
                .iter()
                .filter(|n| pattern.match_name(n).is_some())
                .count();
            let better = match &best {
                None => claimed > 0,
                Some((best_claimed, _)) => claimed > *best_claimed,
            };
            if better {
                best = Some((claimed, pattern));
            }
        }
        if let Some((_, pattern)) = best {
            if pattern.name() == "wan" {
                return Pattern::wan(wan_vace_step(names));
            }
            return pattern;
        }
    }
    generic()
}

/// Main blocks per VACE block, as stable-diffusion.cpp computes it (num_layers / vace_layers).
fn wan_vace_step(names: &[&str]) -> u64 {
    let mut blocks = 0u64;
    let mut vace = 0u64;
    for name in names {
        let (component, _, rest) = split_prefix(name);
        if !DIFFUSION.contains(&component) {
            continue;
        }
        if let Some(after) = rest.strip_prefix("vace_blocks.") {
            if let Some((n, _)) = leading_index(after) {
                vace = vace.max(n.saturating_add(1));
            }
        } else if let Some(after) = rest.strip_prefix("blocks.") {
            if let Some((n, _)) = leading_index(after) {
                blocks = blocks.max(n.saturating_add(1));
            }
        }
    }
    if vace == 0 || blocks == 0 {
        return DEFAULT_WAN_VACE_STEP;
    }
    (blocks / vace).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(p: &Pattern, name: &str) -> Option<String> {
        p.match_name(name).map(|m| m.layer_name)
    }

    fn key(p: &Pattern, name: &str) -> LayerKey {
        p.match_name(name)
            .unwrap_or_else(|| panic!("{name} should match {}", p.name()))
            .order
    }

    /// Asserts every name matches and the names are listed in strictly increasing order.
    fn assert_execution_order(p: &Pattern, names: &[&str]) {
        for pair in names.windows(2) {
            assert!(
                key(p, pair[0]) < key(p, pair[1]),
                "{} runs before {}",
                pair[0],
                pair[1]
            );
        }
    }

    #[test]
    fn split_prefix_components() {
        let cases = [
            (
                "model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
                Component::DiffusionModel,
                "model.diffusion_model.",
            ),
            (
                "diffusion_model.blocks.0.ffn.0.weight",
                Component::DiffusionModel,
                "diffusion_model.",
            ),
            (
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
                Component::TextEncoder,
                "cond_stage_model.",
            ),
            (
                "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight",
                Component::TextEncoder,
                "text_encoders.",
            ),
            (
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                Component::TextEncoder,
                "conditioner.",
            ),
            (
                "first_stage_model.decoder.conv_in.weight",
                Component::Vae,
                "first_stage_model.",
            ),
            (
                "vae.decoder.up_blocks.0.resnets.0.conv1.weight",
                Component::Vae,
                "vae.",
            ),
            (
                "control_model.input_blocks.0.0.weight",
                Component::ControlModel,
                "control_model.",
            ),
            (
                "lora.unet_down_blocks_0_attentions_0.lora_up.weight",
                Component::Lora,
                "lora.",
            ),
            ("blk.0.attn_q.weight", Component::LanguageModel, ""),
            ("token_embd.weight", Component::LanguageModel, ""),
            (
                "model.layers.3.mlp.up_proj.weight",
                Component::LanguageModel,
                "",
            ),
            ("double_blocks.0.img_mod.lin.weight", Component::Unknown, ""),
        ];
        for (name, component, prefix) in cases {
            let (c, p, rest) = split_prefix(name);
            assert_eq!((c, p), (component, prefix), "{name}");
            assert_eq!(format!("{p}{rest}"), name);
        }
        assert_eq!(Component::DiffusionModel.as_str(), "diffusion_model");
        assert_eq!(Component::LanguageModel.as_str(), "language_model");
    }

    #[test]
    fn flux() {
        let p = Pattern::builtin("flux").unwrap();
        assert_eq!(p.name(), "flux");
        assert_eq!(
            layer(
                &p,
                "model.diffusion_model.double_blocks.5.img_attn.qkv.weight"
            )
            .as_deref(),
            Some("double_blocks.5")
        );
        assert_eq!(
            layer(&p, "model.diffusion_model.single_blocks.37.linear1.weight").as_deref(),
            Some("single_blocks.37")
        );
        // city96-style GGUF without a host prefix.
        assert_eq!(
            layer(&p, "double_blocks.0.txt_mlp.2.bias").as_deref(),
            Some("double_blocks.0")
        );
        for global in [
            "model.diffusion_model.img_in.weight",
            "model.diffusion_model.txt_in.bias",
            "model.diffusion_model.time_in.in_layer.weight",
            "model.diffusion_model.final_layer.linear.weight",
            "model.diffusion_model.double_stream_modulation_img.lin.weight",
            "model.diffusion_model.double_blocks.x.img_attn.qkv.weight",
            "text_encoders.t5xxl.transformer.encoder.block.3.layer.0.SelfAttention.q.weight",
            "first_stage_model.decoder.mid.block_1.conv1.weight",
        ] {
            assert_eq!(layer(&p, global), None, "{global}");
        }
        assert_execution_order(
            &p,
            &[
                "model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
                "model.diffusion_model.double_blocks.2.img_attn.qkv.weight",
                "model.diffusion_model.double_blocks.10.img_attn.qkv.weight",
                "model.diffusion_model.double_blocks.18.txt_mlp.0.weight",
                "model.diffusion_model.single_blocks.0.linear1.weight",
                "model.diffusion_model.single_blocks.37.linear2.weight",
            ],
        );
    }

    #[test]
    fn mmdit() {
        let p = Pattern::builtin("mmdit").unwrap();
        assert_eq!(
            layer(
                &p,
                "model.diffusion_model.joint_blocks.23.x_block.attn.qkv.weight"
            )
            .as_deref(),
            Some("joint_blocks.23")
        );
        assert_eq!(
            layer(&p, "model.diffusion_model.x_embedder.proj.weight"),
            None
        );
        assert_eq!(
            layer(
                &p,
                "model.diffusion_model.final_layer.adaLN_modulation.1.weight"
            ),
            None
        );
        assert_execution_order(
            &p,
            &[
                "model.diffusion_model.joint_blocks.9.context_block.mlp.fc1.weight",
                "model.diffusion_model.joint_blocks.10.x_block.mlp.fc1.weight",
            ],
        );
    }

    #[test]
    fn unet() {
        let p = Pattern::builtin("unet").unwrap();
        assert_eq!(
            layer(
                &p,
                "model.diffusion_model.input_blocks.3.0.in_layers.2.weight"
            )
            .as_deref(),
            Some("input_blocks.3")
        );
        assert_eq!(
            layer(
                &p,
                "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight"
            )
            .as_deref(),
            Some("middle_block")
        );
        assert_eq!(
            layer(
                &p,
                "model.diffusion_model.output_blocks.11.1.proj_out.weight"
            )
            .as_deref(),
            Some("output_blocks.11")
        );
        for global in [
            "model.diffusion_model.time_embed.0.weight",
            "model.diffusion_model.out.2.weight",
            "model.diffusion_model.label_emb.0.0.weight",
            "control_model.input_blocks.1.0.in_layers.0.weight",
            "control_model.middle_block.0.in_layers.0.weight",
        ] {
            assert_eq!(layer(&p, global), None, "{global}");
        }
        assert_execution_order(
            &p,
            &[
                "model.diffusion_model.input_blocks.0.0.weight",
                "model.diffusion_model.input_blocks.11.0.out_layers.3.weight",
                "model.diffusion_model.middle_block.0.in_layers.0.weight",
                "model.diffusion_model.output_blocks.0.0.in_layers.0.weight",
                "model.diffusion_model.output_blocks.11.0.in_layers.0.weight",
            ],
        );
        // All of the middle block is one layer.
        assert_eq!(
            key(
                &p,
                "model.diffusion_model.middle_block.0.in_layers.0.weight"
            ),
            key(
                &p,
                "model.diffusion_model.middle_block.2.out_layers.3.weight"
            )
        );
    }

    #[test]
    fn wan_and_vace_placement() {
        let p = Pattern::builtin("wan").unwrap();
        assert_eq!(
            layer(&p, "model.diffusion_model.blocks.12.self_attn.q.weight").as_deref(),
            Some("blocks.12")
        );
        assert_eq!(
            layer(&p, "model.diffusion_model.vace_blocks.3.after_proj.weight").as_deref(),
            Some("vace_blocks.3")
        );
        for global in [
            "model.diffusion_model.patch_embedding.weight",
            "model.diffusion_model.vace_patch_embedding.weight",
            "model.diffusion_model.head.head.weight",
            "model.diffusion_model.text_embedding.0.weight",
            "model.diffusion_model.double_blocks.3.img_mod.lin.weight",
            "model.diffusion_model.net.blocks.3.self_attn.q_proj.weight",
            "model.diffusion_model.transformer_blocks.3.attn.to_q.weight",
        ] {
            assert_eq!(layer(&p, global), None, "{global}");
        }
        // VACE block M runs right after main block 2M, before main block 2M+1.
        assert_execution_order(
            &p,
            &[
                "model.diffusion_model.blocks.0.self_attn.q.weight",
                "model.diffusion_model.vace_blocks.0.before_proj.weight",
                "model.diffusion_model.blocks.1.self_attn.q.weight",
                "model.diffusion_model.blocks.2.self_attn.q.weight",
                "model.diffusion_model.vace_blocks.1.after_proj.weight",
                "model.diffusion_model.blocks.3.self_attn.q.weight",
                "model.diffusion_model.blocks.28.ffn.0.weight",
                "model.diffusion_model.vace_blocks.14.ffn.0.weight",
                "model.diffusion_model.blocks.29.ffn.0.weight",
            ],
        );
        let vace14b = Pattern::wan(5);
        assert_execution_order(
            &vace14b,
            &[
                "blocks.5.ffn.0.weight",
                "vace_blocks.1.ffn.0.weight",
                "blocks.6.ffn.0.weight",
            ],
        );
    }

    #[test]
    fn qwen_image() {
        let p = Pattern::builtin("qwen_image").unwrap();
        assert_eq!(
            layer(
                &p,
                "model.diffusion_model.transformer_blocks.59.img_mlp.net.0.proj.weight"
            )
            .as_deref(),
            Some("transformer_blocks.59")
        );
        assert_eq!(layer(&p, "model.diffusion_model.img_in.weight"), None);
        assert_eq!(
            layer(
                &p,
                "text_encoders.qwen2vl.model.layers.3.mlp.up_proj.weight"
            ),
            None
        );
        assert_execution_order(
            &p,
            &[
                "transformer_blocks.1.attn.to_q.weight",
                "transformer_blocks.2.attn.to_q.weight",
            ],
        );
    }

    #[test]
    fn z_image() {
        let p = Pattern::builtin("z_image").unwrap();
        assert_eq!(
            layer(
                &p,
                "model.diffusion_model.context_refiner.1.attention.qkv.weight"
            )
            .as_deref(),
            Some("context_refiner.1")
        );
        assert_eq!(
            layer(&p, "model.diffusion_model.layers.29.feed_forward.w2.weight").as_deref(),
            Some("layers.29")
        );
        for global in [
            "model.diffusion_model.x_embedder.weight",
            "model.diffusion_model.cap_embedder.1.weight",
            "model.diffusion_model.final_layer.linear.weight",
            // Qwen3 text encoder in the same file is not a diffusion layer.
            "text_encoders.qwen3.model.layers.3.self_attn.q_proj.weight",
        ] {
            assert_eq!(layer(&p, global), None, "{global}");
        }
        assert_execution_order(
            &p,
            &[
                "model.diffusion_model.context_refiner.0.attention.qkv.weight",
                "model.diffusion_model.context_refiner.1.attention.qkv.weight",
                "model.diffusion_model.noise_refiner.0.attention.qkv.weight",
                "model.diffusion_model.noise_refiner.1.adaLN_modulation.0.weight",
                "model.diffusion_model.layers.0.attention.qkv.weight",
                "model.diffusion_model.layers.29.attention.qkv.weight",
            ],
        );
    }

    #[test]
    fn anima() {
        let p = Pattern::builtin("anima").unwrap();
        assert_eq!(
            layer(
                &p,
                "model.diffusion_model.net.blocks.3.self_attn.q_proj.weight"
            )
            .as_deref(),
            Some("net.blocks.3")
        );
        assert_eq!(
            layer(&p, "model.diffusion_model.net.x_embedder.proj.1.weight"),
            None
        );
        assert_eq!(
            layer(&p, "model.diffusion_model.blocks.3.self_attn.q.weight"),
            None
        );
        assert_execution_order(
            &p,
            &[
                "model.diffusion_model.net.blocks.9.mlp.layer1.weight",
                "model.diffusion_model.net.blocks.10.mlp.layer1.weight",
            ],
        );
    }

    #[test]
    fn hidream() {
        let p = Pattern::builtin("hidream").unwrap();
        assert_eq!(
            layer(
                &p,
                "model.diffusion_model.double_stream_blocks.15.block.attn1.to_q.weight"
            )
            .as_deref(),
            Some("double_stream_blocks.15")
        );
        assert_eq!(
            layer(
                &p,
                "model.diffusion_model.single_stream_blocks.31.block.ff_i.shared_experts.w1.weight"
            )
            .as_deref(),
            Some("single_stream_blocks.31")
        );
        assert_eq!(
            layer(
                &p,
                "model.diffusion_model.caption_projection.0.linear.weight"
            ),
            None
        );
        assert_eq!(
            layer(
                &p,
                "model.diffusion_model.double_blocks.1.img_mod.lin.weight"
            ),
            None
        );
        assert_execution_order(
            &p,
            &[
                "model.diffusion_model.double_stream_blocks.15.block.attn1.to_q.weight",
                "model.diffusion_model.single_stream_blocks.0.block.attn1.to_q.weight",
            ],
        );
    }

    #[test]
    fn llama_gguf() {
        let p = Pattern::builtin("llama_gguf").unwrap();
        assert_eq!(layer(&p, "blk.12.attn_q.weight").as_deref(), Some("blk.12"));
        assert_eq!(layer(&p, "blk.0.ffn_down.weight").as_deref(), Some("blk.0"));
        for global in [
            "token_embd.weight",
            "output_norm.weight",
            "output.weight",
            "rope_freqs.weight",
            // A vision tower's or T5 encoder's blocks are a different context.
            "v.blk.3.attn_q.weight",
            "enc.blk.3.attn_q.weight",
            "blk.x.attn_q.weight",
            "blk.12attn_q.weight",
        ] {
            assert_eq!(layer(&p, global), None, "{global}");
        }
        assert_execution_order(
            &p,
            &[
                "blk.0.attn_q.weight",
                "blk.1.attn_q.weight",
                "blk.10.attn_q.weight",
            ],
        );
    }

    #[test]
    fn hf_transformers() {
        let p = Pattern::builtin("hf_transformers").unwrap();
        assert_eq!(
            layer(&p, "model.layers.7.self_attn.q_proj.weight").as_deref(),
            Some("model.layers.7")
        );
        assert_eq!(
            layer(
                &p,
                "text_encoders.qwen2vl.model.layers.3.mlp.up_proj.weight"
            )
            .as_deref(),
            Some("qwen2vl.model.layers.3")
        );
        assert_eq!(layer(&p, "model.embed_tokens.weight"), None);
        assert_eq!(layer(&p, "model.norm.weight"), None);
        assert_eq!(layer(&p, "lm_head.weight"), None);
        assert_execution_order(
            &p,
            &[
                "model.layers.1.mlp.up_proj.weight",
                "model.layers.2.mlp.up_proj.weight",
            ],
        );
    }

    #[test]
    fn t5() {
        let p = Pattern::builtin("t5").unwrap();
        assert_eq!(
            layer(
                &p,
                "text_encoders.t5xxl.transformer.encoder.block.3.layer.0.SelfAttention.q.weight"
            )
            .as_deref(),
            Some("t5xxl.transformer.encoder.block.3")
        );
        assert_eq!(
            layer(&p, "encoder.block.23.layer.1.DenseReluDense.wi_0.weight").as_deref(),
            Some("encoder.block.23")
        );
        assert_eq!(
            layer(&p, "enc.blk.5.attn_q.weight").as_deref(),
            Some("enc.blk.5")
        );
        for global in [
            "text_encoders.t5xxl.transformer.shared.weight",
            "text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight",
            "model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
        ] {
            assert_eq!(layer(&p, global), None, "{global}");
        }
        assert_execution_order(
            &p,
            &[
                "text_encoders.t5xxl.transformer.encoder.block.2.layer.1.DenseReluDense.wo.weight",
                "text_encoders.t5xxl.transformer.encoder.block.3.layer.0.SelfAttention.q.weight",
            ],
        );
    }

    #[test]
    fn clip() {
        let p = Pattern::builtin("clip").unwrap();
        assert_eq!(
            layer(
                &p,
                "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight"
            )
            .as_deref(),
            Some("transformer.text_model.encoder.layers.11")
        );
        assert_eq!(
            layer(&p, "text_encoders.clip_l.transformer.text_model.encoder.layers.3.self_attn.q_proj.weight")
                .as_deref(),
            Some("clip_l.transformer.text_model.encoder.layers.3")
        );
        assert_eq!(
            layer(
                &p,
                "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"
            )
            .as_deref(),
            Some("embedders.1.model.transformer.resblocks.31")
        );
        assert_eq!(
            layer(
                &p,
                "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"
            ),
            None
        );
        assert_execution_order(
            &p,
            &[
                "text_model.encoder.layers.2.mlp.fc1.weight",
                "text_model.encoder.layers.11.mlp.fc1.weight",
                "model.transformer.resblocks.0.attn.in_proj_weight",
            ],
        );
    }

    #[test]
    fn generic_fallback() {
        let p = Pattern::builtin("generic").unwrap();
        assert_eq!(
            layer(&p, "transformer.h.3.attn.c_attn.weight").as_deref(),
            Some("transformer.h.3")
        );
        assert_eq!(
            layer(&p, "encoder.layer.7.attention.self.query.weight").as_deref(),
            Some("encoder.layer.7")
        );
        // The leftmost family wins.
        assert_eq!(
            layer(&p, "encoder.block.3.layer.0.SelfAttention.q.weight").as_deref(),
            Some("encoder.block.3")
        );
        assert_eq!(
            layer(&p, "model.diffusion_model.blocks.4.x").as_deref(),
            Some("blocks.4")
        );
        // `blocks.` inside another word is not a layer.
        assert_eq!(layer(&p, "model.diffusion_model.double_blocks.4.x"), None);
        assert_eq!(layer(&p, "embeddings.weight"), None);
    }

    #[test]
    fn unknown_builtin_lists_names() {
        let e = Pattern::builtin("sdxl-turbo").unwrap_err();
        assert_eq!(e.status, crate::error::Status::NotFound);
        assert!(
            e.message.contains("flux") && e.message.contains("generic"),
            "{e}"
        );
        for name in builtin_names() {
            assert_eq!(Pattern::builtin(name).unwrap().name(), *name);
        }
    }

    fn detected(names: &[&str]) -> String {
        detect(names).name().to_string()
    }

    #[test]
    fn detection() {
        let flux = [
            "model.diffusion_model.img_in.weight",
            "model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
            "model.diffusion_model.double_blocks.0.txt_attn.qkv.weight",
            "model.diffusion_model.single_blocks.0.linear1.weight",
            "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight",
            "text_encoders.t5xxl.transformer.encoder.block.1.layer.0.SelfAttention.q.weight",
            "text_encoders.t5xxl.transformer.encoder.block.2.layer.0.SelfAttention.q.weight",
            "text_encoders.t5xxl.transformer.encoder.block.3.layer.0.SelfAttention.q.weight",
            "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
        ];
        // The diffusion model wins even when the text encoders have more tensors.
        assert_eq!(detected(&flux), "flux");
        assert_eq!(
            detected(&["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"]),
            "mmdit"
        );
        assert_eq!(
            detected(&[
                "model.diffusion_model.input_blocks.0.0.weight",
                "model.diffusion_model.middle_block.0.in_layers.0.weight",
                "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
                "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.weight",
                "first_stage_model.decoder.up.0.block.0.conv1.weight",
            ]),
            "unet"
        );
        assert_eq!(
            detected(&[
                "model.diffusion_model.blocks.0.self_attn.q.weight",
                "model.diffusion_model.head.head.weight"
            ]),
            "wan"
        );
        assert_eq!(
            detected(&["transformer_blocks.0.attn.to_q.weight", "img_in.weight"]),
            "qwen_image"
        );
        assert_eq!(
            detected(&[
                "model.diffusion_model.context_refiner.0.attention.qkv.weight",
                "model.diffusion_model.layers.0.attention.qkv.weight",
                "text_encoders.qwen3.model.layers.0.mlp.up_proj.weight",
                "text_encoders.qwen3.model.layers.1.mlp.up_proj.weight",
                "text_encoders.qwen3.model.layers.2.mlp.up_proj.weight",
            ]),
            "z_image"
        );
        assert_eq!(
            detected(&["model.diffusion_model.net.blocks.0.self_attn.q_proj.weight"]),
            "anima"
        );
        assert_eq!(
            detected(&[
                "model.diffusion_model.double_stream_blocks.0.block.attn1.to_q.weight",
                "model.diffusion_model.single_stream_blocks.0.block.attn1.to_q.weight",
            ]),
            "hidream"
        );
        assert_eq!(
            detected(&["token_embd.weight", "blk.0.attn_q.weight", "output.weight"]),
            "llama_gguf"
        );
        assert_eq!(
            detected(&[
                "model.embed_tokens.weight",
                "model.layers.0.mlp.up_proj.weight"
            ]),
            "hf_transformers"
        );
        assert_eq!(
            detected(&[
                "encoder.block.0.layer.0.SelfAttention.q.weight",
                "shared.weight"
            ]),
            "t5"
        );
        assert_eq!(
            detected(&["enc.blk.0.attn_q.weight", "token_embd.weight"]),
            "t5"
        );
        assert_eq!(
            detected(&["text_model.encoder.layers.0.mlp.fc1.weight"]),
            "clip"
        );
        assert_eq!(detected(&["transformer.h.0.attn.c_attn.weight"]), "generic");
        assert_eq!(detected(&[]), "generic");
    }

    #[test]
    fn detection_derives_the_vace_step() {
        let mut names: Vec<String> = (0..40)
            .map(|i| format!("model.diffusion_model.blocks.{i}.ffn.0.weight"))
            .collect();
        names.extend((0..8).map(|i| format!("model.diffusion_model.vace_blocks.{i}.ffn.0.weight")));
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let p = detect(&refs);
        assert_eq!(p.name(), "wan");
        // Wan VACE 14B: vace_layers 0, 5, 10, ...
        assert_execution_order(
            &p,
            &[
                "model.diffusion_model.blocks.35.ffn.0.weight",
                "model.diffusion_model.vace_blocks.7.ffn.0.weight",
                "model.diffusion_model.blocks.36.ffn.0.weight",
            ],
        );
    }

    #[test]
    fn user_patterns() {
        let p = Pattern::user(
            r"(?P<kind>double_blocks|single_blocks)\.(\d+)\.",
            &["double_blocks", "single_blocks"],
        )
        .unwrap();
        assert_eq!(p.name(), "user");
        let m = p
            .match_name("model.diffusion_model.single_blocks.3.linear1.weight")
            .unwrap();
        assert_eq!(m.layer_name, "single_blocks.3");
        assert_eq!(
            m.order,
            LayerKey {
                kind_rank: 1,
                index: 3,
                sub_rank: 0
            }
        );
        assert_execution_order(&p, &["double_blocks.18.a", "single_blocks.0.a"]);
        assert_eq!(p.match_name("model.diffusion_model.img_in.weight"), None);

        // A named index group may sit beside other unnamed groups.
        let p = Pattern::user(r"(enc|dec)oder\.layers\.(?P<index>\d+)", &[]).unwrap();
        assert_eq!(
            p.match_name("decoder.layers.12.fc.weight")
                .unwrap()
                .layer_name,
            "decoder.layers.12"
        );

        // Unlisted kinds sort after listed ones, alphabetically.
        let p = Pattern::user(r"(?P<kind>[a-z_]+)\.(\d+)\.", &["zeta"]).unwrap();
        assert_execution_order(
            &p,
            &["zeta.9.w", "alpha.0.w", "alpha.5.w", "beta.0.w", "betb.0.w"],
        );

        // A non-integer index is an error from try_match_name and no match from match_name.
        let p = Pattern::user(r"blocks\.(\w+)\.", &[]).unwrap();
        assert_eq!(p.match_name("blocks.7.w").unwrap().order.index, 7);
        let e = p.try_match_name("blocks.first.w").unwrap_err();
        assert_eq!(e.status, crate::error::Status::InvalidArgument);
        assert!(e.message.contains("not a non-negative integer"), "{e}");
        assert_eq!(p.match_name("blocks.first.w"), None);
        assert!(p
            .try_match_name("blocks.99999999999999999999999.w")
            .is_err());
    }

    #[test]
    fn bad_user_patterns() {
        for (regex, needle) in [
            (r"blocks\.(\d+", "does not compile"),
            (r"blocks\.\d+\.", "no capture group"),
            (r"(blocks)\.(\d+)\.", "2 unnamed capture groups"),
            (r"(?P<kind>blocks)\.\d+\.", "no capture group"),
        ] {
            let e = Pattern::user(regex, &[]).unwrap_err();
            assert_eq!(e.status, crate::error::Status::InvalidArgument);
            assert!(e.message.contains(needle), "{regex}: {e}");
        }
        // Huge regexes fail cleanly instead of exhausting memory or panicking.
        let huge = "((a{100}){100}){100}(x)";
        assert!(Pattern::user(huge, &[]).is_err());
        let nested = format!("{}(x){}", "(?:".repeat(1000), ")".repeat(1000));
        assert!(Pattern::user(&nested, &[]).is_err());
        assert!(Pattern::user(&"a".repeat(70_000), &[]).is_err());
    }

    #[test]
    fn matching_sorts_100k_names_into_layers() {
        let names: Vec<String> = (0..100_000)
            .map(|i| match i % 4 {
                0 => format!(
                    "model.diffusion_model.double_blocks.{}.img_attn.qkv.weight",
                    i % 19
                ),
                1 => format!(
                    "model.diffusion_model.single_blocks.{}.linear1.weight",
                    i % 38
                ),
                2 => format!(
                    "text_encoders.t5xxl.transformer.encoder.block.{}.layer.0.weight",
                    i % 24
                ),
                _ => format!("model.diffusion_model.final_layer.{i}.weight"),
            })
            .collect();
        let user = Pattern::user(
            r"(?P<kind>double_blocks|single_blocks)\.(\d+)\.",
            &["double_blocks"],
        )
        .unwrap();
        for (p, expected) in [
            (Pattern::builtin("flux").unwrap(), 50_000),
            (Pattern::builtin("generic").unwrap(), 25_000),
            (user, 50_000),
        ] {
            let matched = names.iter().filter(|n| p.match_name(n).is_some()).count();
            assert_eq!(matched, expected, "{}", p.name());
        }
    }
}
