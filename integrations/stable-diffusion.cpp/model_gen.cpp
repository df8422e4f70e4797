// sd-model-gen: writes test models with stable-diffusion.cpp's own tensor lists and generated
// weights, so the drop-in is tested on real architectures without downloading any.
//
//   sd-model-gen sd1-tiny|flux-tiny OUTDIR
//
// sd1-tiny: SD 1.x with the tiny UNet (sd.cpp's VERSION_SD1_TINY_UNET) and CLIP-L in
// OUTDIR/sd1-tiny.gguf, TAESD in OUTDIR/taesd.gguf, and a rank-4 LoRA of the UNet's attention
// query and value projections in OUTDIR/loras/sd1-tiny-lora.gguf.
// flux-tiny: Flux (VERSION_FLUX, no guidance embedding) with 2 double and 2 single blocks of
// width 1280 (10 heads of 128, the head width Flux's rotary axes need; a block is then larger
// than CLIP-L's largest layer, as in real Flux models) and CLIP-L, without T5 (sd.cpp
// then conditions on zeros of T5's width) in OUTDIR/flux-tiny.gguf, TAEF1 in OUTDIR/taef1.gguf.
// sd.cpp reads Flux's depth and width from the tensors, so the same names at other sizes
// make the same architecture.
//
// sd.cpp's model classes are instantiated as sd.cpp itself does for that version, and every
// parameter they declare is written, f16 for matrices and kernels (f32 for vectors), with
// deterministic values: uniform in +-1/sqrt(fan_in) from a hash of the name, norm scales 1,
// biases small.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <sys/stat.h>

#include "conditioner.hpp"
#include "diffusion_model.hpp"
#include "ggml.h"
#include "gguf.h"
#include "tae.hpp"

namespace {

uint64_t mix(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    return x ^ (x >> 33);
}

uint64_t name_hash(const std::string& name) {
    uint64_t h = 1469598103934665603ULL;
    for (unsigned char c : name) {
        h = (h ^ c) * 1099511628211ULL;
    }
    return h;
}

bool ends_with(const std::string& s, const char* suffix) {
    size_t n = std::strlen(suffix);
    return s.size() >= n && s.compare(s.size() - n, n, suffix) == 0;
}

// The value of element i of the tensor `name` with `n` elements and fan-in `fan_in`.
float weight(const std::string& name, int n_dims, int64_t fan_in, int64_t i) {
    if (n_dims == 1 && ends_with(name, ".weight") && name.find("norm") != std::string::npos) {
        return 1.0f;
    }
    uint64_t r    = mix(name_hash(name) ^ mix(static_cast<uint64_t>(i)));
    double unit   = (r >> 11) * (1.0 / 9007199254740992.0) * 2.0 - 1.0;  // [-1, 1)
    double bound  = n_dims == 1 ? 0.02 : 1.0 / std::sqrt(static_cast<double>(std::max<int64_t>(fan_in, 1)));
    return static_cast<float>(unit * bound);
}

// Writes `tensors` (name -> the runner's tensor, for its shape) with generated data; names
// lose `strip` at their start (a prefix sd.cpp's loader adds back).
bool write_gguf(const std::map<std::string, ggml_tensor*>& tensors, const std::string& path, const std::string& strip) {
    size_t bytes = 0;
    for (const auto& kv : tensors) {
        bytes += ggml_nbytes(kv.second) + 256;
    }
    ggml_init_params params = {ggml_tensor_overhead() * (tensors.size() + 8) + bytes, nullptr, false};
    ggml_context* ctx       = ggml_init(params);
    gguf_context* gguf      = gguf_init_empty();
    if (ctx == nullptr || gguf == nullptr) {
        std::fprintf(stderr, "sd-model-gen: out of memory for %s\n", path.c_str());
        return false;
    }
    for (const auto& kv : tensors) {
        std::string name = kv.first;
        if (!strip.empty() && name.compare(0, strip.size(), strip) == 0) {
            name = name.substr(strip.size());
        }
        const ggml_tensor* like = kv.second;
        int n_dims              = ggml_n_dims(like);
        ggml_type type          = n_dims >= 2 ? GGML_TYPE_F16 : GGML_TYPE_F32;
        ggml_tensor* t          = ggml_new_tensor(ctx, type, GGML_MAX_DIMS, like->ne);
        ggml_set_name(t, name.c_str());
        int64_t n      = ggml_nelements(t);
        int64_t fan_in = n / std::max<int64_t>(like->ne[n_dims - 1], 1);
        for (int64_t i = 0; i < n; ++i) {
            float v = weight(name, n_dims, fan_in, i);
            if (type == GGML_TYPE_F16) {
                static_cast<ggml_fp16_t*>(t->data)[i] = ggml_fp32_to_fp16(v);
            } else {
                static_cast<float*>(t->data)[i] = v;
            }
        }
        gguf_add_tensor(gguf, t);
    }
    bool ok = gguf_write_to_file(gguf, path.c_str(), false);
    std::printf("%s: %zu tensors, %.1f MiB\n", path.c_str(), tensors.size(), bytes / 1048576.0);
    gguf_free(gguf);
    ggml_free(ctx);
    return ok;
}


// The tensors sd.cpp's Flux runner reads its shape from (flux.hpp, FluxRunner), and one
// that makes the conditioner build CLIP-L.
String2TensorStorage flux_shape(int64_t hidden, int depth, int depth_single) {
    String2TensorStorage storage;
    auto add = [&](const std::string& name, std::vector<int64_t> ne) {
        storage[name] = TensorStorage(name, GGML_TYPE_F16, ne.data(), static_cast<int>(ne.size()), 0);
    };
    const std::string p = "model.diffusion_model.";
    add(p + "img_in.weight", {64, hidden});
    add(p + "txt_in.weight", {4096, hidden});
    add(p + "double_blocks.0.txt_attn.norm.key_norm.scale", {128});
    add(p + "double_blocks." + std::to_string(depth - 1) + ".img_attn.qkv.weight", {hidden, 3 * hidden});
    add(p + "single_blocks." + std::to_string(depth_single - 1) + ".linear2.weight", {5 * hidden, hidden});
    add("text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight", {768, 49408});
    return storage;
}

// A rank-4 LoRA over every 2-D weight of `tensors` whose name ends in one of `targets`, in
// sd.cpp's own naming (<weight name without .weight>.lora_down/.lora_up.weight).
bool write_lora(const std::map<std::string, ggml_tensor*>& tensors,
                const std::vector<std::string>& targets,
                const std::string& path) {
    const int64_t rank = 4;
    std::map<std::string, ggml_tensor*> lora;
    ggml_init_params params = {ggml_tensor_overhead() * 4096, nullptr, true};
    ggml_context* shapes    = ggml_init(params);
    for (const auto& kv : tensors) {
        bool wanted = false;
        for (const auto& t : targets) {
            wanted = wanted || ends_with(kv.first, t.c_str());
        }
        if (!wanted || ggml_n_dims(kv.second) != 2) {
            continue;
        }
        std::string base = kv.first.substr(0, kv.first.size() - std::strlen(".weight"));
        int64_t in = kv.second->ne[0], out = kv.second->ne[1];
        lora[base + ".lora_down.weight"] = ggml_new_tensor_2d(shapes, GGML_TYPE_F32, in, rank);
        lora[base + ".lora_up.weight"]   = ggml_new_tensor_2d(shapes, GGML_TYPE_F32, rank, out);
    }
    if (lora.empty()) {
        std::fprintf(stderr, "sd-model-gen: no weight for the LoRA\n");
        ggml_free(shapes);
        return false;
    }
    bool ok = write_gguf(lora, path, "");
    ggml_free(shapes);
    return ok;
}

// Allocates the three components' parameters and writes them: text encoder and diffusion
// model to `model_path`, the TAE decoder to `tae_path`.
bool write_model(Conditioner& cond,
                 DiffusionModel& diffusion,
                 TinyImageAutoEncoder& tae,
                 const std::string& model_path,
                 const std::string& tae_path) {
    cond.alloc_params_buffer();
    diffusion.alloc_params_buffer();
    tae.alloc_params_buffer();
    std::map<std::string, ggml_tensor*> model, decoder;
    cond.get_param_tensors(model);
    diffusion.get_param_tensors(model);
    tae.get_param_tensors(decoder, "tae");
    return write_gguf(model, model_path, "") && write_gguf(decoder, tae_path, "tae.");
}

}  // namespace

int main(int argc, char** argv) {
    std::string which = argc == 3 ? argv[1] : "";
    if (which != "sd1-tiny" && which != "flux-tiny") {
        std::fprintf(stderr, "usage: %s sd1-tiny|flux-tiny OUTDIR\n", argv[0]);
        return 2;
    }
    std::string out        = argv[2];
    ggml_backend_t backend = ggml_backend_cpu_init();
    bool ok                = false;
    // The components as StableDiffusionGGML::init makes them for each version.
    if (which == "flux-tiny") {
        String2TensorStorage storage = flux_shape(1280, 2, 2);
        FluxCLIPEmbedder clip(backend, false, storage);
        FluxModel flux(backend, false, storage, VERSION_FLUX);
        TinyImageAutoEncoder tae(backend, false, storage, "decoder.layers", true, VERSION_FLUX);
        ok = write_model(clip, flux, tae, out + "/flux-tiny.gguf", out + "/taef1.gguf");
    } else {
        SDVersion version = VERSION_SD1_TINY_UNET;
        String2TensorStorage no_storage;
        FrozenCLIPEmbedderWithCustomWords clip(backend, false, no_storage, {}, version);
        UNetModel unet(backend, false, no_storage, version);
        TinyImageAutoEncoder tae(backend, false, no_storage, "decoder.layers", true, version);
        std::string loras = out + "/loras";
        mkdir(loras.c_str(), 0755);
        std::map<std::string, ggml_tensor*> unet_tensors;
        ok = write_model(clip, unet, tae, out + "/sd1-tiny.gguf", out + "/taesd.gguf");
        unet.get_param_tensors(unet_tensors);
        ok = ok && write_lora(unet_tensors, {".to_q.weight", ".to_v.weight"}, loras + "/sd1-tiny-lora.gguf");
    }
    ggml_backend_free(backend);
    return ok ? 0 : 1;
}
