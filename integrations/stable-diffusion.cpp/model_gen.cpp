// sd-model-gen: writes test models with stable-diffusion.cpp's own tensor lists and generated
// weights, so the drop-in is tested on real architectures without downloading any.
//
//   sd-model-gen sd1-tiny OUTDIR
//
// sd1-tiny: SD 1.x with the tiny UNet (sd.cpp's VERSION_SD1_TINY_UNET) and CLIP-L in
// OUTDIR/sd1-tiny.gguf, TAESD in OUTDIR/taesd.gguf. sd.cpp's model classes are instantiated
// as sd.cpp itself does for that version, and every parameter they declare is written, f16
// for matrices and kernels (f32 for vectors), with deterministic values: uniform in
// +-1/sqrt(fan_in) from a hash of the name, norm scales 1, biases small.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <string>

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

}  // namespace

int main(int argc, char** argv) {
    if (argc != 3 || std::string(argv[1]) != "sd1-tiny") {
        std::fprintf(stderr, "usage: %s sd1-tiny OUTDIR\n", argv[0]);
        return 2;
    }
    std::string out        = argv[2];
    ggml_backend_t backend = ggml_backend_cpu_init();
    SDVersion version      = VERSION_SD1_TINY_UNET;
    String2TensorStorage no_storage;

    // As StableDiffusionGGML::init makes them for this version.
    FrozenCLIPEmbedderWithCustomWords clip(backend, false, no_storage, {}, version);
    UNetModel unet(backend, false, no_storage, version);
    TinyImageAutoEncoder tae(backend, false, no_storage, "decoder.layers", true, version);
    clip.alloc_params_buffer();
    unet.alloc_params_buffer();
    tae.alloc_params_buffer();

    std::map<std::string, ggml_tensor*> model, taesd;
    clip.get_param_tensors(model);
    unet.get_param_tensors(model);
    tae.get_param_tensors(taesd, "tae");
    bool ok = write_gguf(model, out + "/sd1-tiny.gguf", "") && write_gguf(taesd, out + "/taesd.gguf", "tae.");
    ggml_backend_free(backend);
    return ok ? 0 : 1;
}
