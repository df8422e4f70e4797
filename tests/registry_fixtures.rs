//! One small GGUF per built-in architecture, with the tensor names real checkpoints use
//! (stable-diffusion.cpp / ComfyUI names for diffusion models and text encoders, llama.cpp
//! and Hugging Face names for language models). Each file is written in shuffled order, so
//! layer order must come from the pattern, not from the file. Plus: corrupt files are
//! refused whole, naming the file, and leave the registry as it was.

use std::path::{Path, PathBuf};

use offload_engine::error::Status;
use offload_engine::gguf::{ggml_type, Writer};
use offload_engine::registry::Registry;

const F32: u32 = ggml_type::F32;
const F16: u32 = ggml_type::F16;
const Q8_0: u32 = ggml_type::Q8_0;

/// One tensor of a layer: name suffix, type, shape (ggml order).
type Part = (&'static str, u32, &'static [u64]);

/// Bytes of a tensor, computed here rather than by the library under test.
fn bytes_of(ty: u32, dims: &[u64]) -> u64 {
    let elements: u64 = dims.iter().product();
    match ty {
        F32 => elements * 4,
        F16 => elements * 2,
        Q8_0 => {
            assert_eq!(dims[0] % 32, 0, "q8_0 rows are whole blocks of 32");
            elements / 32 * 34
        }
        other => panic!("fixture uses unexpected type {other}"),
    }
}

/// A model under construction together with what the registry should make of it.
struct Model {
    /// Host prefix of the component the pattern streams ("model.diffusion_model.", "").
    prefix: &'static str,
    tensors: Vec<(String, u32, Vec<u64>)>,
    /// Expected layers in execution order: name, tensor count, bytes.
    layers: Vec<(String, usize, u64)>,
    global_bytes: u64,
}

impl Model {
    fn new(prefix: &'static str) -> Model {
        Model {
            prefix,
            tensors: Vec::new(),
            layers: Vec::new(),
            global_bytes: 0,
        }
    }

    /// Adds a layer; call in execution order.
    fn layer(&mut self, name: &str, parts: &[Part]) -> &mut Model {
        let mut bytes = 0;
        for &(suffix, ty, dims) in parts {
            self.tensors
                .push((format!("{}{name}.{suffix}", self.prefix), ty, dims.to_vec()));
            bytes += bytes_of(ty, dims);
        }
        self.layers.push((name.to_string(), parts.len(), bytes));
        self
    }

    /// Adds a tensor that belongs to no layer; `name` is the full tensor name.
    fn global(&mut self, name: &str, ty: u32, dims: &[u64]) -> &mut Model {
        self.tensors.push((name.to_string(), ty, dims.to_vec()));
        self.global_bytes += bytes_of(ty, dims);
        self
    }

    /// Prefixed global.
    fn own_global(&mut self, suffix: &str, ty: u32, dims: &[u64]) -> &mut Model {
        let name = format!("{}{suffix}", self.prefix);
        self.global(&name, ty, dims)
    }

    fn total_bytes(&self) -> u64 {
        self.global_bytes + self.layers.iter().map(|l| l.2).sum::<u64>()
    }
}

/// Deterministic shuffle (splitmix64 + Fisher-Yates), seeded per fixture so each file has
/// its own order and failures reproduce.
fn shuffle<T>(items: &mut [T], seed: &str) {
    let mut state = seed.bytes().fold(0x9e37_79b9_7f4a_7c15u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    for i in (1..items.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("registry_fixtures");
    std::fs::create_dir_all(&dir).expect("create the fixture dir");
    dir.join(name)
}

/// Writes the model's tensors, shuffled, to `<fixture>.gguf` and returns the path.
fn write_shuffled(model: &Model, fixture: &str) -> PathBuf {
    let mut order = model.tensors.clone();
    shuffle(&mut order, fixture);
    assert_ne!(
        order, model.tensors,
        "{fixture}: the shuffle left the order unchanged"
    );
    let mut writer = Writer::new();
    for (name, ty, dims) in &order {
        writer
            .add_tensor_zeroed(name, *ty, dims)
            .unwrap_or_else(|e| panic!("{fixture}: {name}: {e}"));
    }
    let path = scratch(&format!("{fixture}.gguf"));
    writer.write_path(&path).expect("write the fixture");
    path
}

/// Registers the fixture and checks the architecture, the layers in execution order with
/// their sizes, and the global group.
fn check(model: &Model, fixture: &str, architecture: &str) {
    let path = write_shuffled(model, fixture);
    let mut registry = Registry::new(None);
    let added = registry.add_gguf(&path).expect("register the fixture");
    assert_eq!(added, model.tensors.len(), "{fixture}: tensors registered");
    assert_eq!(
        registry.architecture(),
        architecture,
        "{fixture}: architecture"
    );

    let got: Vec<(String, usize, u64)> = registry
        .layers()
        .iter()
        .map(|l| (l.name.clone(), l.tensors.len(), l.bytes))
        .collect();
    let got_names: Vec<&str> = got.iter().map(|l| l.0.as_str()).collect();
    let want_names: Vec<&str> = model.layers.iter().map(|l| l.0.as_str()).collect();
    assert_eq!(
        got_names, want_names,
        "{fixture}: layers in execution order"
    );
    assert_eq!(got, model.layers, "{fixture}: (layer, tensors, bytes)");
    assert_eq!(
        registry.layer_count(),
        model.layers.len(),
        "{fixture}: layer count"
    );
    assert_eq!(
        registry.global_bytes(),
        model.global_bytes,
        "{fixture}: global bytes"
    );
    assert_eq!(
        registry.total_bytes(),
        model.total_bytes(),
        "{fixture}: total bytes"
    );
}

// Small shapes: enough to be realistic in kind (matrices, vectors, quantized rows), tiny
// on disk.
const ROW: &[u64] = &[32];
const SMALL: &[u64] = &[16];
const MAT: &[u64] = &[32, 4];
const WIDE: &[u64] = &[32, 12];
const TALL: &[u64] = &[128, 4];
const CONV: &[u64] = &[3, 3, 4, 4];

#[test]
fn flux() {
    const DOUBLE: &[Part] = &[
        ("img_mod.lin.weight", Q8_0, WIDE),
        ("img_mod.lin.bias", F32, ROW),
        ("img_attn.qkv.weight", Q8_0, WIDE),
        ("img_attn.norm.query_norm.scale", F32, SMALL),
        ("img_attn.norm.key_norm.scale", F32, SMALL),
        ("img_attn.proj.weight", Q8_0, MAT),
        ("img_mlp.0.weight", Q8_0, WIDE),
        ("img_mlp.2.weight", Q8_0, TALL),
        ("txt_mod.lin.weight", Q8_0, WIDE),
        ("txt_attn.qkv.weight", Q8_0, WIDE),
        ("txt_attn.proj.weight", Q8_0, MAT),
        ("txt_mlp.0.weight", Q8_0, WIDE),
        ("txt_mlp.2.weight", Q8_0, TALL),
        ("txt_mlp.2.bias", F32, ROW),
    ];
    const SINGLE: &[Part] = &[
        ("linear1.weight", Q8_0, &[32, 28]),
        ("linear1.bias", F32, &[28]),
        ("linear2.weight", Q8_0, &[160, 4]),
        ("norm.query_norm.scale", F32, SMALL),
        ("norm.key_norm.scale", F32, SMALL),
        ("modulation.lin.weight", Q8_0, WIDE),
    ];
    let mut m = Model::new("model.diffusion_model.");
    m.own_global("img_in.weight", F16, &[64, 32])
        .own_global("img_in.bias", F32, ROW)
        .own_global("time_in.in_layer.weight", F16, &[256, 32])
        .own_global("vector_in.in_layer.weight", F16, &[768, 32])
        .own_global("guidance_in.in_layer.weight", F16, &[256, 32])
        .own_global("txt_in.weight", F16, &[4096, 32])
        .own_global("final_layer.adaLN_modulation.1.weight", F16, &[32, 64])
        .own_global("final_layer.linear.weight", F16, &[32, 64])
        // Text encoders and VAE in an all-in-one file stay in the global group.
        .global(
            "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
            F16,
            MAT,
        )
        .global(
            "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight",
            F16,
            MAT,
        )
        .global("first_stage_model.decoder.conv_in.weight", F16, CONV);
    for i in 0..3 {
        m.layer(&format!("double_blocks.{i}"), DOUBLE);
    }
    for i in 0..12 {
        m.layer(&format!("single_blocks.{i}"), SINGLE);
    }
    check(&m, "flux", "flux");
}

#[test]
fn mmdit() {
    const JOINT: &[Part] = &[
        ("context_block.adaLN_modulation.1.weight", Q8_0, WIDE),
        ("context_block.attn.qkv.weight", Q8_0, WIDE),
        ("context_block.attn.proj.weight", Q8_0, MAT),
        ("context_block.mlp.fc1.weight", Q8_0, WIDE),
        ("context_block.mlp.fc2.weight", Q8_0, TALL),
        ("x_block.adaLN_modulation.1.weight", Q8_0, WIDE),
        ("x_block.attn.qkv.weight", Q8_0, WIDE),
        ("x_block.attn.qkv.bias", F32, &[12]),
        ("x_block.attn.proj.weight", Q8_0, MAT),
        ("x_block.mlp.fc1.weight", Q8_0, WIDE),
        ("x_block.mlp.fc2.weight", Q8_0, TALL),
    ];
    // SD3's last joint block is pre-only on the context side: no context attention output
    // or MLP.
    const LAST: &[Part] = &[
        ("context_block.adaLN_modulation.1.weight", Q8_0, MAT),
        ("context_block.attn.qkv.weight", Q8_0, WIDE),
        ("x_block.adaLN_modulation.1.weight", Q8_0, WIDE),
        ("x_block.attn.qkv.weight", Q8_0, WIDE),
        ("x_block.attn.proj.weight", Q8_0, MAT),
        ("x_block.mlp.fc1.weight", Q8_0, WIDE),
        ("x_block.mlp.fc2.weight", Q8_0, TALL),
    ];
    let mut m = Model::new("model.diffusion_model.");
    m.own_global("pos_embed", F32, &[32, 64])
        .own_global("x_embedder.proj.weight", F16, &[2, 2, 16, 32])
        .own_global("t_embedder.mlp.0.weight", F16, &[256, 32])
        .own_global("y_embedder.mlp.0.weight", F16, &[2048, 32])
        .own_global("context_embedder.weight", F16, &[4096, 32])
        .own_global("final_layer.adaLN_modulation.1.weight", F16, &[32, 64])
        .own_global("final_layer.linear.weight", F16, &[32, 64]);
    for i in 0..11 {
        m.layer(&format!("joint_blocks.{i}"), JOINT);
    }
    m.layer("joint_blocks.11", LAST);
    check(&m, "mmdit", "mmdit");
}

#[test]
fn unet() {
    const CONV_IN: &[Part] = &[("0.weight", F16, CONV), ("0.bias", F32, ROW)];
    const RES: &[Part] = &[
        ("0.in_layers.0.weight", F32, ROW),
        ("0.in_layers.2.weight", F16, CONV),
        ("0.emb_layers.1.weight", F16, &[64, 4]),
        ("0.out_layers.3.weight", F16, CONV),
    ];
    const RES_ATTN: &[Part] = &[
        ("0.in_layers.0.weight", F32, ROW),
        ("0.in_layers.2.weight", F16, CONV),
        ("0.emb_layers.1.weight", F16, &[64, 4]),
        ("0.out_layers.3.weight", F16, CONV),
        ("1.norm.weight", F32, ROW),
        ("1.proj_in.weight", F16, MAT),
        ("1.transformer_blocks.0.attn1.to_q.weight", F16, MAT),
        ("1.transformer_blocks.0.attn2.to_k.weight", F16, &[48, 4]),
        ("1.transformer_blocks.0.ff.net.0.proj.weight", F16, WIDE),
        ("1.transformer_blocks.0.ff.net.2.weight", F16, TALL),
        ("1.proj_out.weight", F16, MAT),
    ];
    const DOWNSAMPLE: &[Part] = &[("0.op.weight", F16, CONV), ("0.op.bias", F32, ROW)];
    const MIDDLE: &[Part] = &[
        ("0.in_layers.2.weight", F16, CONV),
        ("0.out_layers.3.weight", F16, CONV),
        ("1.proj_in.weight", F16, MAT),
        ("1.transformer_blocks.0.attn1.to_q.weight", F16, MAT),
        ("1.proj_out.weight", F16, MAT),
        ("2.in_layers.2.weight", F16, CONV),
        ("2.out_layers.3.weight", F16, CONV),
    ];
    const RES_UP: &[Part] = &[
        ("0.in_layers.2.weight", F16, CONV),
        ("0.skip_connection.weight", F16, &[1, 1, 8, 4]),
        ("0.out_layers.3.weight", F16, CONV),
        ("1.conv.weight", F16, CONV),
    ];
    let mut m = Model::new("model.diffusion_model.");
    m.own_global("time_embed.0.weight", F16, &[32, 64])
        .own_global("time_embed.2.weight", F16, &[64, 64])
        .own_global("out.0.weight", F32, ROW)
        .own_global("out.2.weight", F16, CONV)
        .global(
            "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
            F16,
            MAT,
        )
        .global(
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
            F16,
            &[32, 64],
        )
        .global(
            "first_stage_model.decoder.mid.block_1.conv1.weight",
            F16,
            CONV,
        )
        .global(
            "first_stage_model.encoder.down.0.block.0.conv1.weight",
            F16,
            CONV,
        );
    // SD1.x: conv in, then three levels of (res+attn, res+attn, downsample), then two plain res.
    m.layer("input_blocks.0", CONV_IN);
    for i in 1..12 {
        let parts = match i {
            3 | 6 | 9 => DOWNSAMPLE,
            10 | 11 => RES,
            _ => RES_ATTN,
        };
        m.layer(&format!("input_blocks.{i}"), parts);
    }
    m.layer("middle_block", MIDDLE);
    for i in 0..12 {
        let parts = if i % 3 == 2 { RES_UP } else { RES_ATTN };
        m.layer(&format!("output_blocks.{i}"), parts);
    }
    check(&m, "unet", "unet");
}

const WAN_BLOCK: &[Part] = &[
    ("modulation", F32, &[32, 6]),
    ("norm3.weight", F32, ROW),
    ("self_attn.q.weight", Q8_0, MAT),
    ("self_attn.k.weight", Q8_0, MAT),
    ("self_attn.v.weight", Q8_0, MAT),
    ("self_attn.o.weight", Q8_0, MAT),
    ("self_attn.norm_q.weight", F32, ROW),
    ("cross_attn.q.weight", Q8_0, MAT),
    ("cross_attn.k.weight", Q8_0, MAT),
    ("ffn.0.weight", Q8_0, WIDE),
    ("ffn.2.weight", Q8_0, TALL),
];
const WAN_VACE: &[Part] = &[
    ("modulation", F32, &[32, 6]),
    ("self_attn.q.weight", Q8_0, MAT),
    ("cross_attn.q.weight", Q8_0, MAT),
    ("ffn.0.weight", Q8_0, WIDE),
    ("ffn.2.weight", Q8_0, TALL),
    ("after_proj.weight", Q8_0, MAT),
];

fn wan_model(blocks: u64, vace_blocks: u64) -> Model {
    let mut m = Model::new("model.diffusion_model.");
    m.own_global("patch_embedding.weight", F16, &[1, 2, 2, 64])
        .own_global("text_embedding.0.weight", F16, &[4096, 32])
        .own_global("time_embedding.0.weight", F16, &[256, 32])
        .own_global("time_projection.1.weight", F16, &[32, 192])
        .own_global("head.modulation", F32, &[32, 2])
        .own_global("head.head.weight", F16, &[32, 64]);
    if vace_blocks > 0 {
        m.own_global("vace_patch_embedding.weight", F16, &[1, 2, 2, 96]);
    }
    // No VACE: a step no block index reaches.
    let step = blocks.checked_div(vace_blocks).unwrap_or(u64::MAX);
    for i in 0..blocks {
        m.layer(&format!("blocks.{i}"), WAN_BLOCK);
        // VACE block M adds its hint right after main block M * step.
        if i % step == 0 && i / step < vace_blocks {
            let v = i / step;
            if v == 0 {
                // Only the first VACE block projects the control input in.
                let mut first: Vec<Part> = WAN_VACE.to_vec();
                first.push(("before_proj.weight", Q8_0, MAT));
                m.layer("vace_blocks.0", &first);
            } else {
                m.layer(&format!("vace_blocks.{v}"), WAN_VACE);
            }
        }
    }
    m
}

#[test]
fn wan_with_vace_blocks() {
    // Wan2.1 VACE 1.3B proportions: a VACE block every second main block.
    let m = wan_model(12, 6);
    assert_eq!(m.layers[1].0, "vace_blocks.0");
    assert_eq!(m.layers[4].0, "vace_blocks.1");
    check(&m, "wan_vace_step2", "wan");
    // VACE 14B proportions: every fifth.
    let m = wan_model(10, 2);
    assert_eq!(m.layers[7].0, "vace_blocks.1");
    check(&m, "wan_vace_step5", "wan");
    // Plain Wan, no VACE.
    check(&wan_model(11, 0), "wan_plain", "wan");
}

#[test]
fn qwen_image() {
    const BLOCK: &[Part] = &[
        ("img_mod.1.weight", Q8_0, WIDE),
        ("txt_mod.1.weight", Q8_0, WIDE),
        ("attn.to_q.weight", Q8_0, MAT),
        ("attn.to_k.weight", Q8_0, MAT),
        ("attn.to_v.weight", Q8_0, MAT),
        ("attn.add_q_proj.weight", Q8_0, MAT),
        ("attn.add_k_proj.weight", Q8_0, MAT),
        ("attn.add_v_proj.weight", Q8_0, MAT),
        ("attn.norm_q.weight", F32, SMALL),
        ("attn.norm_added_q.weight", F32, SMALL),
        ("attn.to_out.0.weight", Q8_0, MAT),
        ("attn.to_add_out.weight", Q8_0, MAT),
        ("img_mlp.net.0.proj.weight", Q8_0, WIDE),
        ("img_mlp.net.2.weight", Q8_0, TALL),
        ("txt_mlp.net.0.proj.weight", Q8_0, WIDE),
        ("txt_mlp.net.2.weight", Q8_0, TALL),
    ];
    let mut m = Model::new("model.diffusion_model.");
    m.own_global("img_in.weight", F16, &[64, 32])
        .own_global("txt_in.weight", F16, &[3584, 32])
        .own_global("txt_norm.weight", F32, &[3584])
        .own_global(
            "time_text_embed.timestep_embedder.linear_1.weight",
            F16,
            &[256, 32],
        )
        .own_global("norm_out.linear.weight", F16, &[32, 64])
        .own_global("proj_out.weight", F16, &[32, 64])
        // The Qwen2.5-VL text encoder shipped beside it is not a diffusion layer.
        .global(
            "text_encoders.qwen2vl.model.layers.0.mlp.up_proj.weight",
            F16,
            MAT,
        )
        .global(
            "text_encoders.qwen2vl.model.layers.1.mlp.up_proj.weight",
            F16,
            MAT,
        )
        .global(
            "text_encoders.qwen2vl.model.embed_tokens.weight",
            F16,
            &[32, 64],
        );
    for i in 0..12 {
        m.layer(&format!("transformer_blocks.{i}"), BLOCK);
    }
    check(&m, "qwen_image", "qwen_image");
}

#[test]
fn z_image() {
    const JOINT: &[Part] = &[
        ("attention.qkv.weight", Q8_0, WIDE),
        ("attention.out.weight", Q8_0, MAT),
        ("attention.q_norm.weight", F32, SMALL),
        ("attention.k_norm.weight", F32, SMALL),
        ("feed_forward.w1.weight", Q8_0, WIDE),
        ("feed_forward.w2.weight", Q8_0, TALL),
        ("feed_forward.w3.weight", Q8_0, WIDE),
        ("attention_norm1.weight", F32, ROW),
        ("attention_norm2.weight", F32, ROW),
        ("ffn_norm1.weight", F32, ROW),
        ("ffn_norm2.weight", F32, ROW),
    ];
    // Image-side blocks are timestep-modulated; the caption refiner is not.
    let modulated: Vec<Part> = JOINT
        .iter()
        .copied()
        .chain([("adaLN_modulation.0.weight", Q8_0, &[32u64, 16][..])])
        .collect();
    let mut m = Model::new("model.diffusion_model.");
    m.own_global("x_embedder.weight", F16, &[64, 32])
        .own_global("x_pad_token", F32, ROW)
        .own_global("cap_pad_token", F32, ROW)
        .own_global("cap_embedder.0.weight", F32, &[2560])
        .own_global("cap_embedder.1.weight", F16, &[2560, 32])
        .own_global("t_embedder.mlp.0.weight", F16, &[256, 32])
        .own_global("final_layer.adaLN_modulation.1.weight", F16, &[32, 32])
        .own_global("final_layer.linear.weight", F16, &[32, 64])
        // Its Qwen3 text encoder stays global.
        .global(
            "text_encoders.qwen3.model.layers.0.self_attn.q_proj.weight",
            F16,
            MAT,
        )
        .global(
            "text_encoders.qwen3.model.layers.1.self_attn.q_proj.weight",
            F16,
            MAT,
        );
    // stable-diffusion.cpp runs the caption refiner, then the noise refiner, then the layers.
    for i in 0..2 {
        m.layer(&format!("context_refiner.{i}"), JOINT);
    }
    for i in 0..2 {
        m.layer(&format!("noise_refiner.{i}"), &modulated);
    }
    for i in 0..12 {
        m.layer(&format!("layers.{i}"), &modulated);
    }
    check(&m, "z_image", "z_image");
}

#[test]
fn anima() {
    const BLOCK: &[Part] = &[
        ("adaln_modulation_self_attn.1.weight", Q8_0, MAT),
        ("adaln_modulation_self_attn.2.weight", Q8_0, &[128, 12]),
        ("self_attn.q_proj.weight", Q8_0, MAT),
        ("self_attn.k_proj.weight", Q8_0, MAT),
        ("self_attn.v_proj.weight", Q8_0, MAT),
        ("self_attn.q_norm.weight", F32, SMALL),
        ("self_attn.output_proj.weight", Q8_0, MAT),
        ("adaln_modulation_cross_attn.1.weight", Q8_0, MAT),
        ("cross_attn.q_proj.weight", Q8_0, MAT),
        ("cross_attn.k_proj.weight", Q8_0, MAT),
        ("cross_attn.output_proj.weight", Q8_0, MAT),
        ("adaln_modulation_mlp.1.weight", Q8_0, MAT),
        ("mlp.layer1.weight", Q8_0, WIDE),
        ("mlp.layer2.weight", Q8_0, TALL),
    ];
    let mut m = Model::new("model.diffusion_model.");
    m.own_global("net.x_embedder.proj.1.weight", F16, &[68, 32])
        .own_global("net.t_embedder.1.linear_1.weight", F16, &[32, 32])
        .own_global("net.t_embedder.1.linear_2.weight", F16, &[32, 96])
        .own_global("net.t_embedding_norm.weight", F32, ROW)
        .own_global("net.final_layer.adaln_modulation.1.weight", F16, &[32, 32])
        .own_global("net.final_layer.linear.weight", F16, &[32, 64])
        // The LLM adapter (its own `blocks.N`) prepares the context before the main blocks
        // run; it is not one of the streamed layers.
        .own_global("net.llm_adapter.embed.weight", F16, &[32, 64])
        .own_global("net.llm_adapter.blocks.0.self_attn.q_proj.weight", F16, MAT)
        .own_global("net.llm_adapter.blocks.1.mlp.0.weight", F16, MAT)
        .own_global("net.llm_adapter.out_proj.weight", F16, MAT);
    for i in 0..12 {
        m.layer(&format!("net.blocks.{i}"), BLOCK);
    }
    check(&m, "anima", "anima");
}

#[test]
fn hidream() {
    const DOUBLE: &[Part] = &[
        ("block.adaLN_modulation.1.weight", Q8_0, WIDE),
        ("block.attn1.to_q.weight", Q8_0, MAT),
        ("block.attn1.to_k.weight", Q8_0, MAT),
        ("block.attn1.to_q_t.weight", Q8_0, MAT),
        ("block.attn1.q_rms_norm.weight", F32, ROW),
        ("block.attn1.to_out.weight", Q8_0, MAT),
        ("block.ff_i.gate.weight", F32, &[32, 4]),
        ("block.ff_i.shared_experts.w1.weight", Q8_0, WIDE),
        ("block.ff_i.shared_experts.w2.weight", Q8_0, TALL),
        ("block.ff_i.experts.0.w1.weight", Q8_0, WIDE),
        ("block.ff_i.experts.3.w2.weight", Q8_0, TALL),
        ("block.ff_t.w1.weight", Q8_0, WIDE),
        ("block.ff_t.w2.weight", Q8_0, TALL),
    ];
    const SINGLE: &[Part] = &[
        ("block.adaLN_modulation.1.weight", Q8_0, WIDE),
        ("block.attn1.to_q.weight", Q8_0, MAT),
        ("block.attn1.to_out.weight", Q8_0, MAT),
        ("block.ff_i.gate.weight", F32, &[32, 4]),
        ("block.ff_i.shared_experts.w1.weight", Q8_0, WIDE),
        ("block.ff_i.experts.1.w1.weight", Q8_0, WIDE),
    ];
    let mut m = Model::new("model.diffusion_model.");
    m.own_global(
        "t_embedder.timestep_embedder.linear_1.weight",
        F16,
        &[256, 32],
    )
    .own_global(
        "p_embedder.pooled_embedder.linear_1.weight",
        F16,
        &[2048, 32],
    )
    .own_global("x_embedder.proj.weight", F16, &[64, 32])
    .own_global("caption_projection.0.linear.weight", F16, &[4096, 32])
    .own_global("final_layer.linear.weight", F16, &[32, 64]);
    for i in 0..4 {
        m.layer(&format!("double_stream_blocks.{i}"), DOUBLE);
    }
    for i in 0..12 {
        m.layer(&format!("single_stream_blocks.{i}"), SINGLE);
    }
    check(&m, "hidream", "hidream");
}

#[test]
fn llama_gguf() {
    const BLK: &[Part] = &[
        ("attn_norm.weight", F32, ROW),
        ("attn_q.weight", Q8_0, MAT),
        ("attn_k.weight", Q8_0, &[32, 2]),
        ("attn_v.weight", Q8_0, &[32, 2]),
        ("attn_output.weight", Q8_0, MAT),
        ("ffn_norm.weight", F32, ROW),
        ("ffn_gate.weight", Q8_0, WIDE),
        ("ffn_up.weight", Q8_0, WIDE),
        ("ffn_down.weight", Q8_0, &[96, 4]),
    ];
    let mut m = Model::new("");
    m.global("token_embd.weight", Q8_0, &[32, 100])
        .global("rope_freqs.weight", F32, SMALL)
        .global("output_norm.weight", F32, ROW)
        .global("output.weight", Q8_0, &[32, 100]);
    for i in 0..12 {
        m.layer(&format!("blk.{i}"), BLK);
    }
    check(&m, "llama_gguf", "llama_gguf");
}

#[test]
fn hf_transformers() {
    const LAYER: &[Part] = &[
        ("input_layernorm.weight", F32, ROW),
        ("self_attn.q_proj.weight", F16, MAT),
        ("self_attn.k_proj.weight", F16, &[32, 2]),
        ("self_attn.v_proj.weight", F16, &[32, 2]),
        ("self_attn.o_proj.weight", F16, MAT),
        ("post_attention_layernorm.weight", F32, ROW),
        ("mlp.gate_proj.weight", F16, WIDE),
        ("mlp.up_proj.weight", F16, WIDE),
        ("mlp.down_proj.weight", F16, &[96, 4]),
    ];
    let mut m = Model::new("");
    m.global("model.embed_tokens.weight", F16, &[32, 100])
        .global("model.norm.weight", F32, ROW)
        .global("lm_head.weight", F16, &[32, 100]);
    for i in 0..12 {
        m.layer(&format!("model.layers.{i}"), LAYER);
    }
    check(&m, "hf_transformers", "hf_transformers");
}

#[test]
fn t5() {
    const BLOCK: &[Part] = &[
        ("layer.0.layer_norm.weight", F32, ROW),
        ("layer.0.SelfAttention.q.weight", F16, MAT),
        ("layer.0.SelfAttention.k.weight", F16, MAT),
        ("layer.0.SelfAttention.v.weight", F16, MAT),
        ("layer.0.SelfAttention.o.weight", F16, MAT),
        ("layer.1.layer_norm.weight", F32, ROW),
        ("layer.1.DenseReluDense.wi_0.weight", F16, WIDE),
        ("layer.1.DenseReluDense.wi_1.weight", F16, WIDE),
        ("layer.1.DenseReluDense.wo.weight", F16, &[96, 4]),
    ];
    // stable-diffusion.cpp / ComfyUI names (T5-XXL as shipped beside Flux and SD3).
    let mut m = Model::new("text_encoders.");
    m.own_global("t5xxl.transformer.shared.weight", F16, &[32, 100])
        .own_global(
            "t5xxl.transformer.encoder.final_layer_norm.weight",
            F32,
            ROW,
        );
    let first: Vec<Part> = BLOCK
        .iter()
        .copied()
        .chain([(
            "layer.0.SelfAttention.relative_attention_bias.weight",
            F32,
            &[32u64, 32][..],
        )])
        .collect();
    m.layer("t5xxl.transformer.encoder.block.0", &first);
    for i in 1..12 {
        m.layer(&format!("t5xxl.transformer.encoder.block.{i}"), BLOCK);
    }
    check(&m, "t5_sd_cpp", "t5");

    // llama.cpp's T5 encoder GGUF names.
    const ENC_BLK: &[Part] = &[
        ("attn_norm.weight", F32, ROW),
        ("attn_q.weight", Q8_0, MAT),
        ("attn_k.weight", Q8_0, MAT),
        ("attn_v.weight", Q8_0, MAT),
        ("attn_o.weight", Q8_0, MAT),
        ("ffn_norm.weight", F32, ROW),
        ("ffn_gate.weight", Q8_0, WIDE),
        ("ffn_up.weight", Q8_0, WIDE),
        ("ffn_down.weight", Q8_0, &[96, 4]),
    ];
    let mut m = Model::new("");
    m.global("token_embd.weight", Q8_0, &[32, 100])
        .global("enc.output_norm.weight", F32, ROW);
    let first: Vec<Part> = ENC_BLK
        .iter()
        .copied()
        .chain([("attn_rel_b.weight", F32, &[32u64, 32][..])])
        .collect();
    m.layer("enc.blk.0", &first);
    for i in 1..12 {
        m.layer(&format!("enc.blk.{i}"), ENC_BLK);
    }
    check(&m, "t5_llama_cpp", "t5");
}

#[test]
fn clip() {
    const CLIP_L: &[Part] = &[
        ("layer_norm1.weight", F32, ROW),
        ("self_attn.q_proj.weight", F16, MAT),
        ("self_attn.k_proj.weight", F16, MAT),
        ("self_attn.v_proj.weight", F16, MAT),
        ("self_attn.out_proj.weight", F16, MAT),
        ("layer_norm2.weight", F32, ROW),
        ("mlp.fc1.weight", F16, WIDE),
        ("mlp.fc2.weight", F16, TALL),
    ];
    // SD1.x: one CLIP-L under cond_stage_model.
    let mut m = Model::new("cond_stage_model.");
    m.own_global(
        "transformer.text_model.embeddings.token_embedding.weight",
        F16,
        &[32, 100],
    )
    .own_global(
        "transformer.text_model.embeddings.position_embedding.weight",
        F32,
        &[32, 77],
    )
    .own_global("transformer.text_model.final_layer_norm.weight", F32, ROW);
    for i in 0..12 {
        m.layer(
            &format!("transformer.text_model.encoder.layers.{i}"),
            CLIP_L,
        );
    }
    check(&m, "clip_sd1", "clip");

    // SDXL: CLIP-L (embedders.0) runs before OpenCLIP bigG (embedders.1).
    const CLIP_G: &[Part] = &[
        ("ln_1.weight", F32, ROW),
        ("attn.in_proj_weight", F16, WIDE),
        ("attn.in_proj_bias", F32, &[12]),
        ("attn.out_proj.weight", F16, MAT),
        ("ln_2.weight", F32, ROW),
        ("mlp.c_fc.weight", F16, WIDE),
        ("mlp.c_proj.weight", F16, TALL),
    ];
    let mut m = Model::new("conditioner.");
    m.own_global(
        "embedders.0.transformer.text_model.embeddings.token_embedding.weight",
        F16,
        &[32, 100],
    )
    .own_global("embedders.1.model.token_embedding.weight", F16, &[32, 100])
    .own_global("embedders.1.model.positional_embedding", F32, &[32, 77])
    .own_global("embedders.1.model.ln_final.weight", F32, ROW)
    .own_global("embedders.1.model.text_projection", F16, &[32, 32]);
    for i in 0..3 {
        m.layer(
            &format!("embedders.0.transformer.text_model.encoder.layers.{i}"),
            CLIP_L,
        );
    }
    for i in 0..11 {
        m.layer(
            &format!("embedders.1.model.transformer.resblocks.{i}"),
            CLIP_G,
        );
    }
    check(&m, "clip_sdxl", "clip");
}

/// SD3 ships CLIP-L and CLIP-G in the same (Hugging Face) layout under `text_encoders.`;
/// stable-diffusion.cpp runs all of CLIP-L, then all of CLIP-G.
#[test]
fn clip_sd3_two_towers() {
    const LAYER: &[Part] = &[
        ("self_attn.q_proj.weight", F16, MAT),
        ("mlp.fc1.weight", F16, WIDE),
        ("mlp.fc2.weight", F16, TALL),
    ];
    let mut m = Model::new("text_encoders.");
    m.own_global(
        "clip_l.transformer.text_model.embeddings.token_embedding.weight",
        F16,
        &[32, 100],
    )
    .own_global(
        "clip_g.transformer.text_model.embeddings.token_embedding.weight",
        F16,
        &[32, 100],
    )
    .own_global("clip_g.transformer.text_projection.weight", F16, &[32, 32]);
    for i in 0..4 {
        m.layer(
            &format!("clip_l.transformer.text_model.encoder.layers.{i}"),
            LAYER,
        );
    }
    for i in 0..6 {
        m.layer(
            &format!("clip_g.transformer.text_model.encoder.layers.{i}"),
            LAYER,
        );
    }
    check(&m, "clip_sd3", "clip");
}

// ---------------------------------------------------------------------------------------
// Files the registry must refuse, whole.
// ---------------------------------------------------------------------------------------

/// What a registry looks like from outside, to compare before and after a failed add.
fn snapshot(registry: &mut Registry) -> (usize, String, Vec<(String, u64)>, u64, u64) {
    let layers = registry
        .layers()
        .iter()
        .map(|l| (l.name.clone(), l.bytes))
        .collect();
    (
        registry.tensor_count(),
        registry.architecture(),
        layers,
        registry.global_bytes(),
        registry.total_bytes(),
    )
}

/// A small valid llama-style file, in order; the last tensor is large so that cutting the
/// file's tail always cuts into its data.
fn small_llama(tag: &str) -> Writer {
    let mut w = Writer::new();
    w.add_tensor_zeroed(&format!("{tag}token_embd.weight"), F16, &[32, 8])
        .unwrap();
    for i in 0..3 {
        w.add_tensor_zeroed(&format!("{tag}blk.{i}.attn_q.weight"), F16, MAT)
            .unwrap();
        w.add_tensor_zeroed(&format!("{tag}blk.{i}.ffn_up.weight"), F16, WIDE)
            .unwrap();
    }
    w.add_tensor_zeroed(&format!("{tag}output.weight"), F16, &[32, 64])
        .unwrap();
    w
}

/// Points tensor `name`'s data offset (relative to the data section) at `offset`.
fn patch_offset(bytes: &mut [u8], name: &str, n_dims: usize, offset: u64) {
    let mut key = (name.len() as u64).to_le_bytes().to_vec();
    key.extend_from_slice(name.as_bytes());
    let at = bytes
        .windows(key.len())
        .position(|w| w == key.as_slice())
        .unwrap_or_else(|| panic!("tensor info of {name} not found"));
    // name, n_dims (u32), dims (u64 each), type (u32), then the offset (u64).
    let field = at + key.len() + 4 + 8 * n_dims + 4;
    bytes[field..field + 8].copy_from_slice(&offset.to_le_bytes());
}

#[test]
fn corrupt_files_fail_whole_and_leave_the_registry_unchanged() {
    let good = scratch("refuse_good.gguf");
    small_llama("").write_path(&good).unwrap();
    let mut registry = Registry::new(None);
    assert_eq!(registry.add_gguf(&good).unwrap(), 8);
    let before = snapshot(&mut registry);
    assert_eq!(before.1, "llama_gguf");
    assert_eq!(before.2.len(), 3);

    // Other tensor names than the good file's, so only the corruption can fail them.
    let valid = small_llama("x.").to_bytes();
    assert!(!valid.is_empty());

    let mut cases: Vec<(&str, Vec<u8>, &str)> = vec![
        // Cut inside the tensor infos (past what the tensor count needs at minimum, so the
        // reader gets as far as the cut).
        (
            "refuse_truncated_header.gguf",
            valid[..300].to_vec(),
            "truncated",
        ),
        // Header intact, the last tensor's data cut short.
        (
            "refuse_truncated_data.gguf",
            valid[..valid.len() - 64].to_vec(),
            "outside the file",
        ),
        ("refuse_empty.gguf", Vec::new(), "not a GGUF file"),
        (
            "refuse_text.gguf",
            b"this is a text file, not a model\n".to_vec(),
            "not a GGUF file",
        ),
        (
            "refuse_safetensors.gguf",
            {
                // A safetensors header: length, then JSON.
                let json = br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
                let mut b = (json.len() as u64).to_le_bytes().to_vec();
                b.extend_from_slice(json);
                b.extend_from_slice(&[0; 8]);
                b
            },
            "not a GGUF file",
        ),
    ];
    // A tensor whose range lies beyond the end of an otherwise valid file.
    let mut outside = valid.clone();
    patch_offset(&mut outside, "x.blk.1.ffn_up.weight", 2, 1 << 20);
    cases.push(("refuse_range_outside.gguf", outside, "outside the file"));

    for (file, bytes, needle) in &cases {
        let path = scratch(file);
        std::fs::write(&path, bytes).unwrap();
        let err = registry
            .add_gguf(&path)
            .expect_err(&format!("{file} should be refused"));
        assert_eq!(err.status, Status::CorruptFile, "{file}: {err}");
        assert!(
            err.message.contains(&path.display().to_string()),
            "{file}: the message does not name the file: {err}"
        );
        assert!(
            err.message.contains(needle),
            "{file}: expected {needle:?} in: {err}"
        );
        assert_eq!(
            snapshot(&mut registry),
            before,
            "{file}: the registry changed"
        );
        assert!(registry.find("x.token_embd.weight").is_err(), "{file}");
    }

    // A readable file that clashes with registered names half way through: nothing of it
    // may stay (all or nothing), and the error names the file.
    let mut clash = Writer::new();
    clash
        .add_tensor_zeroed("y.blk.0.attn_q.weight", F16, MAT)
        .unwrap();
    clash
        .add_tensor_zeroed("y.blk.1.attn_q.weight", F16, MAT)
        .unwrap();
    clash
        .add_tensor_zeroed("blk.2.ffn_up.weight", F16, WIDE)
        .unwrap();
    clash
        .add_tensor_zeroed("y.blk.2.attn_q.weight", F16, MAT)
        .unwrap();
    let clash_path = scratch("refuse_clash.gguf");
    clash.write_path(&clash_path).unwrap();
    let err = registry.add_gguf(&clash_path).unwrap_err();
    assert_eq!(err.status, Status::AlreadyExists, "{err}");
    assert!(
        err.message.contains(&clash_path.display().to_string()),
        "{err}"
    );
    assert!(err.message.contains("blk.2.ffn_up.weight"), "{err}");
    assert_eq!(snapshot(&mut registry), before, "after the clash");
    for name in ["y.blk.0.attn_q.weight", "y.blk.1.attn_q.weight"] {
        assert_eq!(
            registry.find(name).unwrap_err().status,
            Status::NotFound,
            "{name}"
        );
    }
    // The names taken before the clash are free again: the same tensors register later.
    let mut retry = Writer::new();
    retry
        .add_tensor_zeroed("y.blk.0.attn_q.weight", F16, MAT)
        .unwrap();
    let retry_path = scratch("refuse_retry.gguf");
    retry.write_path(&retry_path).unwrap();
    assert_eq!(registry.add_gguf(&retry_path).unwrap(), 1);

    // A missing file is an I/O error, also naming the path.
    let missing = scratch("refuse_no_such_file.gguf");
    let _ = std::fs::remove_file(&missing);
    let err = registry.add_gguf(&missing).unwrap_err();
    assert_eq!(err.status, Status::Io, "{err}");
    assert!(
        err.message.contains(&missing.display().to_string()),
        "{err}"
    );

    // Failed adds registered no file: the files are numbered good, retry.
    assert_eq!(registry.file_path(0), Some(good.as_path()));
    assert_eq!(registry.file_path(1), Some(retry_path.as_path()));
    assert_eq!(registry.file_path(2), None);
}
