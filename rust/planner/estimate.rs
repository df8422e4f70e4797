//! Device-memory estimates for a decoder-only transformer stack from its hyperparameters, for
//! when the host has no weights file at hand (or wants an answer before loading one).
//!
//! What is counted, per layer (weights in `weight_type`, norm vectors always F32 because ggml
//! files keep them unquantized):
//!
//! * attention: `qkv = hidden * (hidden + 2 * kv_dim)`, `o = hidden * hidden`,
//!   where `kv_dim = kv_heads * hidden / heads` (grouped-query attention);
//! * feed-forward (gated): `gate + up + down = 3 * hidden * ffn`;
//! * two norm vectors: `2 * hidden` (F32).
//!
//! Globals: one `hidden * vocab` matrix (the output head, which is the token-embedding matrix
//! when tied), a second one when `tied_embeddings` is false, and the final norm (`hidden`, F32).
//! The tied default matches ggml hosts such as llama.cpp, which keep the token-embedding lookup
//! on the CPU and put only the output projection on the device; set `tied=false` when a host
//! keeps both matrices on the device.
//!
//! KV cache: `2 (K and V) * layers * context * kv_dim` elements in `kv_type`.
//! Biases, rotary tables and the like are ignored (well under 0.1% of the bytes).

use super::{LayerCost, ModelCost};
use crate::error::{Error, Result};

/// Storage type of weights or cache entries. Bits per weight include the block scales of the
/// ggml block formats (Q8_0: 34 bytes per 32 weights = 8.5 bits; Q4_K: 144 bytes per 256 = 4.5).
#[allow(non_camel_case_types)] // ggml's own type names
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WeightType {
    F32,
    F16,
    BF16,
    Fp8,
    Int8,
    Q8_0,
    Q6_K,
    Q5_K,
    Q4_K,
    Q4_0,
    Q3_K,
    Q2_K,
    /// Any other average bits per weight (0 < bits <= 64).
    Bits(f64),
}

/// Named types with their storage cost in bits per 256 weights (exact integers, so byte counts
/// of named types are exact).
const NAMED: [(WeightType, &str, u64); 12] = [
    (WeightType::F32, "f32", 32 * 256),
    (WeightType::F16, "f16", 16 * 256),
    (WeightType::BF16, "bf16", 16 * 256),
    (WeightType::Fp8, "fp8", 8 * 256),
    (WeightType::Int8, "int8", 8 * 256),
    (WeightType::Q8_0, "q8_0", 34 * 8 * 8), // 34 bytes / 32 weights
    (WeightType::Q6_K, "q6_k", 210 * 8),    // 210 bytes / 256 weights
    (WeightType::Q5_K, "q5_k", 176 * 8),    // 176 bytes / 256 weights
    (WeightType::Q4_K, "q4_k", 144 * 8),    // 144 bytes / 256 weights
    (WeightType::Q4_0, "q4_0", 18 * 8 * 8), // 18 bytes / 32 weights
    (WeightType::Q3_K, "q3_k", 110 * 8),    // 110 bytes / 256 weights
    (WeightType::Q2_K, "q2_k", 84 * 8),     // 84 bytes / 256 weights
];

impl WeightType {
    /// Average storage bits per weight, block scales included.
    pub fn bits(self) -> f64 {
        match self {
            WeightType::Bits(b) => b,
            named => NAMED
                .iter()
                .find(|(t, _, _)| *t == named)
                .map(|(_, _, b256)| *b256 as f64 / 256.0)
                .unwrap_or(32.0),
        }
    }

    /// Parses "f16", "Q4_K", "q4_k_m" (the mix suffix is ignored), or a bare number of bits ("5.5").
    pub fn parse(text: &str) -> Result<WeightType> {
        let lower = text.trim().to_ascii_lowercase();
        let base = lower
            .strip_suffix("_m")
            .or_else(|| lower.strip_suffix("_s"))
            .or_else(|| lower.strip_suffix("_l"))
            .unwrap_or(&lower);
        if let Some((t, _, _)) = NAMED.iter().find(|(_, n, _)| *n == base) {
            return Ok(*t);
        }
        if let Ok(bits) = lower.parse::<f64>() {
            return WeightType::from_bits(bits);
        }
        let names: Vec<&str> = NAMED.iter().map(|(_, n, _)| *n).collect();
        Err(Error::invalid(format!(
            "unknown weight type {text:?}; expected one of {} or a number of bits per weight",
            names.join(", ")
        )))
    }

    /// `Bits(b)` after checking `0 < b <= 64`.
    pub fn from_bits(bits: f64) -> Result<WeightType> {
        if bits.is_finite() && bits > 0.0 && bits <= 64.0 {
            Ok(WeightType::Bits(bits))
        } else {
            Err(Error::invalid(format!(
                "bits per weight must be in (0, 64], got {bits}"
            )))
        }
    }

    /// Bytes to store `count` values, rounded up to a whole byte.
    pub fn bytes_for(self, count: u64) -> u64 {
        match self {
            WeightType::Bits(b) => saturate_f64((count as f64 * b / 8.0).ceil()),
            named => {
                let b256 = NAMED
                    .iter()
                    .find(|(t, _, _)| *t == named)
                    .map(|(_, _, b)| *b)
                    .unwrap_or(32 * 256);
                saturate((count as u128 * b256 as u128).div_ceil(8 * 256))
            }
        }
    }

    /// The standard ggml types, largest first; used to name a type that fits.
    pub fn ladder() -> [WeightType; 10] {
        [
            WeightType::F32,
            WeightType::F16,
            WeightType::Q8_0,
            WeightType::Q6_K,
            WeightType::Q5_K,
            WeightType::Q4_K,
            WeightType::Q4_0,
            WeightType::Q3_K,
            WeightType::Q2_K,
            WeightType::Bits(1.58),
        ]
    }

    pub fn name(self) -> String {
        match self {
            WeightType::Bits(b) => format!("{b} bits"),
            named => NAMED
                .iter()
                .find(|(t, _, _)| *t == named)
                .map(|(_, n, _)| n.to_ascii_uppercase())
                .unwrap_or_default(),
        }
    }
}

fn saturate(x: u128) -> u64 {
    u64::try_from(x).unwrap_or(u64::MAX)
}

/// Product of dimensions, saturating at u64::MAX instead of wrapping.
fn product(factors: &[u64]) -> u64 {
    factors.iter().fold(1u64, |acc, &f| acc.saturating_mul(f))
}

fn saturate_f64(x: f64) -> u64 {
    if x >= u64::MAX as f64 {
        u64::MAX
    } else {
        x as u64
    }
}

/// F32 bytes for norm vectors.
const NORM_BYTES: u64 = 4;
/// F32 activations.
const ACT_BYTES: u64 = 4;

/// Hyperparameters of a decoder-only transformer.
#[derive(Debug, Clone, PartialEq)]
pub struct Hparams {
    pub hidden: u64,
    pub layers: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub vocab: u64,
    pub ffn: u64,
    pub context: u64,
    pub weight_type: WeightType,
    /// Default F16 (llama.cpp's default cache type).
    pub kv_type: WeightType,
    /// Default true; see the module comment.
    pub tied_embeddings: bool,
}

/// Largest value accepted for any dimension; keeps every product below u128 overflow and
/// catches typos ("hidden=15360000000").
const MAX_DIM: u64 = 1 << 32;

impl Hparams {
    /// Parses `key=value` pairs separated by commas or whitespace, e.g.
    /// `hidden=1536,layers=28,heads=12,kv_heads=2,vocab=151936,ffn=8960,context=2048,type=f32`.
    /// Keys: hidden, layers, heads, kv_heads (default heads), vocab, ffn, context,
    /// type (default f16), kv_type (default f16), tied (default true).
    pub fn parse(spec: &str) -> Result<Hparams> {
        let mut dims: [Option<u64>; 7] = [None; 7];
        const DIMS: [&str; 7] = [
            "hidden", "layers", "heads", "kv_heads", "vocab", "ffn", "context",
        ];
        let mut weight_type = WeightType::F16;
        let mut kv_type = WeightType::F16;
        let mut tied = true;
        for part in spec
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|p| !p.is_empty())
        {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| Error::invalid(format!("hparams: {part:?} is not key=value")))?;
            let key = key.trim().to_ascii_lowercase();
            let value = value.trim();
            if let Some(i) = DIMS.iter().position(|d| *d == key) {
                let n: u64 = value.parse().map_err(|_| {
                    Error::invalid(format!(
                        "hparams: {key}={value:?} must be a positive whole number"
                    ))
                })?;
                dims[i] = Some(n);
                continue;
            }
            match key.as_str() {
                "type" | "weight_type" | "wtype" => weight_type = WeightType::parse(value)?,
                "kv_type" | "cache_type" => kv_type = WeightType::parse(value)?,
                "tied" | "tied_embeddings" => {
                    tied = match value.to_ascii_lowercase().as_str() {
                        "1" | "true" | "yes" => true,
                        "0" | "false" | "no" => false,
                        _ => {
                            return Err(Error::invalid(format!(
                                "hparams: tied={value:?} must be true or false"
                            )))
                        }
                    }
                }
                _ => {
                    return Err(Error::invalid(format!(
                        "hparams: unknown key {key:?}; known keys: {}, type, kv_type, tied",
                        DIMS.join(", ")
                    )))
                }
            }
        }
        let need = |i: usize| {
            dims[i].ok_or_else(|| Error::invalid(format!("hparams: missing {}=", DIMS[i])))
        };
        let heads = need(2)?;
        let hp = Hparams {
            hidden: need(0)?,
            layers: need(1)?,
            heads,
            kv_heads: dims[3].unwrap_or(heads),
            vocab: need(4)?,
            ffn: need(5)?,
            context: need(6)?,
            weight_type,
            kv_type,
            tied_embeddings: tied,
        };
        hp.validate()?;
        Ok(hp)
    }

    /// Zero, oversized or inconsistent values are invalid arguments.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("hidden", self.hidden),
            ("layers", self.layers),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("vocab", self.vocab),
            ("ffn", self.ffn),
            ("context", self.context),
        ] {
            if v == 0 || v > MAX_DIM {
                return Err(Error::invalid(format!(
                    "hparams: {name}={v} must be between 1 and {MAX_DIM}"
                )));
            }
        }
        if self.hidden % self.heads != 0 {
            return Err(Error::invalid(format!(
                "hparams: heads={} does not divide hidden={}",
                self.heads, self.hidden
            )));
        }
        if self.heads % self.kv_heads != 0 {
            return Err(Error::invalid(format!(
                "hparams: kv_heads={} does not divide heads={}",
                self.kv_heads, self.heads
            )));
        }
        for t in [self.weight_type, self.kv_type] {
            if let WeightType::Bits(b) = t {
                WeightType::from_bits(b)?;
            }
        }
        Ok(())
    }

    fn kv_dim(&self) -> u64 {
        self.kv_heads * (self.hidden / self.heads)
    }

    /// Bytes of one transformer block (see the module comment for what is counted).
    pub fn layer_bytes(&self) -> u64 {
        let w = self.weight_type;
        let h = self.hidden;
        let qkv = w.bytes_for(product(&[h, h + 2 * self.kv_dim()]));
        let o = w.bytes_for(product(&[h, h]));
        let ffn = w.bytes_for(product(&[3, h, self.ffn]));
        let norms = 2 * h * NORM_BYTES;
        qkv.saturating_add(o)
            .saturating_add(ffn)
            .saturating_add(norms)
    }

    /// Bytes of the K and V caches for the whole context.
    pub fn kv_cache_bytes(&self) -> u64 {
        let elems = product(&[2, self.layers, self.context, self.kv_dim()]);
        self.kv_type.bytes_for(elems)
    }

    /// Output head (+ separate token embeddings unless tied) + final norm.
    pub fn global_bytes(&self) -> u64 {
        let matrix = self
            .weight_type
            .bytes_for(product(&[self.hidden, self.vocab]));
        let matrices = if self.tied_embeddings { 1 } else { 2 };
        saturate(matrix as u128 * matrices + (self.hidden * NORM_BYTES) as u128)
    }

    /// Everything on the device at once: globals + all layers + KV cache.
    pub fn full_cache_bytes(&self) -> u64 {
        saturate(
            self.global_bytes() as u128
                + self.layers as u128 * self.layer_bytes() as u128
                + self.kv_cache_bytes() as u128,
        )
    }

    /// Streaming footprint with `slots` layer buffers: globals + slots * layer + KV cache.
    pub fn streaming_bytes(&self, slots: u32) -> u64 {
        saturate(
            self.global_bytes() as u128
                + slots as u128 * self.layer_bytes() as u128
                + self.kv_cache_bytes() as u128,
        )
    }

    /// Compute scratch (F32) for prefilling the whole context through one layer in one batch,
    /// without flash attention; a guide for `Budget::compute_reserve_bytes`:
    /// residual in + out `2 * context * hidden`, q/k/v `context * (hidden + 2 * kv_dim)`,
    /// attention scores `heads * context * context`, gate + up `2 * context * ffn`, and the
    /// last token's logits `vocab`.
    pub fn prefill_bytes(&self) -> u64 {
        let c = self.context as u128;
        let h = self.hidden as u128;
        let elems = 2 * c * h
            + c * (h + 2 * self.kv_dim() as u128)
            + self.heads as u128 * c * c
            + 2 * c * self.ffn as u128
            + self.vocab as u128;
        saturate(elems * ACT_BYTES as u128)
    }

    /// Layers named `blk.N` (ggml's naming) with `layer_bytes` each; the KV cache is folded into
    /// `global_bytes` because it stays on the device for the whole run.
    pub fn to_model_cost(&self) -> ModelCost {
        let bytes = self.layer_bytes();
        ModelCost {
            layers: (0..self.layers)
                .map(|i| LayerCost::new(format!("blk.{i}"), bytes))
                .collect(),
            global_bytes: self.global_bytes().saturating_add(self.kv_cache_bytes()),
            // The KV cache is made on the device, never copied there.
            global_copy_bytes: self.global_bytes(),
            bits_per_weight: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Status;

    pub(crate) const QWEN2_1_5B_F32: &str =
        "hidden=1536,layers=28,heads=12,kv_heads=2,vocab=151936,ffn=8960,context=2048,type=f32,kv_type=f32";

    #[test]
    fn weight_type_bits_include_block_scales() {
        assert_eq!(WeightType::Q8_0.bits(), 8.5);
        assert_eq!(WeightType::Q4_0.bits(), 4.5);
        assert_eq!(WeightType::Q4_K.bits(), 4.5);
        assert_eq!(WeightType::Q6_K.bits(), 6.5625);
        assert_eq!(WeightType::Q5_K.bits(), 5.5);
        assert_eq!(WeightType::Q3_K.bits(), 3.4375);
        assert_eq!(WeightType::Q2_K.bits(), 2.625);
        // 256 Q4_K weights are one 144-byte block; 32 Q8_0 weights one 34-byte block.
        assert_eq!(WeightType::Q4_K.bytes_for(256), 144);
        assert_eq!(WeightType::Q8_0.bytes_for(32), 34);
        assert_eq!(WeightType::Bits(3.0).bytes_for(3), 2); // 9 bits round up to 2 bytes
        assert_eq!(WeightType::parse("Q4_K_M").unwrap(), WeightType::Q4_K);
        assert_eq!(WeightType::parse("5.5").unwrap(), WeightType::Bits(5.5));
        for bad in ["q9", "-1", "0", "NaN", "65"] {
            assert_eq!(
                WeightType::parse(bad).unwrap_err().status,
                Status::InvalidArgument,
                "{bad}"
            );
        }
    }

    #[test]
    fn qwen2_estimates_match_hand_arithmetic() {
        let hp = Hparams::parse(QWEN2_1_5B_F32).unwrap();
        assert!(hp.tied_embeddings);
        // head_dim = 1536 / 12 = 128; kv_dim = 2 * 128 = 256.
        // qkv = 1536 * (1536 + 512) = 3_145_728; o = 1536^2 = 2_359_296;
        // ffn = 3 * 1536 * 8960 = 41_287_680; norms = 2 * 1536 = 3_072 (all 4 bytes).
        let layer = (3_145_728u64 + 2_359_296 + 41_287_680 + 3_072) * 4;
        assert_eq!(layer, 187_183_104);
        assert_eq!(hp.layer_bytes(), layer);
        // KV = 2 * 28 * 2048 * 256 * 4 = 117_440_512 (112 MiB).
        assert_eq!(hp.kv_cache_bytes(), 2 * 28 * 2048 * 256 * 4);
        assert_eq!(hp.kv_cache_bytes(), 112 << 20);
        // Global (tied) = 1536 * 151936 * 4 + 1536 * 4 = 933_494_784 + 6_144.
        assert_eq!(hp.global_bytes(), 933_500_928);
        // Full = global + 28 layers + KV = 6_292_068_352 (~5.86 GiB, inside the 5.5-7 GB
        // that VRAM estimators give such a model).
        assert_eq!(
            hp.full_cache_bytes(),
            933_500_928 + 28 * layer + 117_440_512
        );
        assert_eq!(hp.full_cache_bytes(), 6_292_068_352);
        // Streaming with two slots = global + 2 layers + KV = 1_425_307_648.
        assert_eq!(hp.streaming_bytes(2), 1_425_307_648);
        // Untied adds a second 1536 x 151936 matrix.
        let untied = Hparams {
            tied_embeddings: false,
            ..hp.clone()
        };
        assert_eq!(untied.global_bytes(), 2 * 933_494_784 + 6_144);
        // Prefill scratch: 2*2048*1536 + 2048*2048 + 12*2048*2048 + 2*2048*8960 + 151936
        // = 6_291_456 + 4_194_304 + 50_331_648 + 36_700_160 + 151_936 = 97_669_504 elements.
        assert_eq!(hp.prefill_bytes(), 97_669_504 * 4);
        let cost = hp.to_model_cost();
        assert_eq!(cost.layers.len(), 28);
        assert_eq!(cost.layers[27].name, "blk.27");
        assert_eq!(cost.global_bytes, 933_500_928 + 117_440_512);
    }

    #[test]
    fn quantized_estimates_use_block_sizes() {
        let hp = Hparams::parse(
            "hidden=4096 layers=32 heads=32 kv_heads=8 vocab=128256 ffn=14336 context=8192 \
             type=q4_k kv_type=f16 tied=false",
        )
        .unwrap();
        // kv_dim = 8 * 128 = 1024. Weights per layer: 4096*(4096+2048) + 4096^2
        // + 3*4096*14336 = 25_165_824 + 16_777_216 + 176_160_768; each at 144/256 bytes.
        let layer = 25_165_824u64 * 144 / 256
            + 16_777_216 * 144 / 256
            + 176_160_768 * 144 / 256
            + 2 * 4096 * 4;
        assert_eq!(hp.layer_bytes(), layer);
        // KV f16: 2 * 32 * 8192 * 1024 * 2 = 1 GiB.
        assert_eq!(hp.kv_cache_bytes(), 1 << 30);
        // Untied: two 4096 x 128256 Q4_K matrices + F32 norm.
        assert_eq!(
            hp.global_bytes(),
            2 * (4096 * 128_256 * 144 / 256) + 4096 * 4
        );
    }

    #[test]
    fn hparams_parse_rejects_bad_input() {
        let cases = [
            "hidden=1536,layers=-1,heads=12,vocab=10,ffn=10,context=10",
            "hidden=1536,layers=0,heads=12,vocab=10,ffn=10,context=10",
            "hidden=1536,layers=2.5,heads=12,vocab=10,ffn=10,context=10",
            "hidden=1536,layers=2,heads=7,vocab=10,ffn=10,context=10",
            "hidden=1536,layers=2,heads=12,kv_heads=5,vocab=10,ffn=10,context=10",
            "hidden=1536,layers=2,heads=12,vocab=10,ffn=10",
            "hidden=1536,layers=2,heads=12,vocab=10,ffn=10,context=10,colour=red",
            "hidden=1536,layers=2,heads=12,vocab=10,ffn=10,context=10,type=q9",
            "hidden=1536,layers=2,heads=12,vocab=10,ffn=10,context=10,tied=maybe",
            "hidden 1536",
            "hidden=99999999999,layers=2,heads=1,vocab=10,ffn=10,context=10",
        ];
        for spec in cases {
            let err = Hparams::parse(spec).unwrap_err();
            assert_eq!(err.status, Status::InvalidArgument, "{spec}");
            assert!(err.message.starts_with("hparams") || err.message.contains("type"));
        }
    }
}
