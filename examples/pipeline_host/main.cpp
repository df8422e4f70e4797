// pipeline_host: a miniature text-to-image program built on offload-engine.
//
// Three components, each with its own registry and engine, run as the stages of one
// offload_engine::Pipeline:
//   1. conditioner      a T5-style text encoder turning a prompt into token embeddings;
//   2. diffusion_model  a Flux-style transformer (double- and single-stream blocks) run for
//                       --steps sampling steps with classifier-free guidance;
//   3. vae              a VAE-style convolutional decoder turning the latent into an image.
// The weights are deterministic and live in one GGUF file (written on first use, read with
// ggml's gguf API afterwards). The printed checksum of the decoded image is the same whatever
// the offload mode, budget or prefetch depth: placement changes where the weights are, never
// what is computed.
#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <unistd.h>
#include <utility>
#include <vector>

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"
#include "gguf.h"

#include "offload_engine.hpp"

namespace oe = offload_engine;

namespace {

// ---------------------------------------------------------------------------------------
// Errors: every failure ends up in main as one message and a non-zero exit status.
// ---------------------------------------------------------------------------------------

struct Failure {
    std::string what;
    int status = 0;  // an offload_engine_status, or 0 for the host's own errors
    std::string message;
};

[[noreturn]] void fail(std::string what) { throw Failure{std::move(what), 0, {}}; }

[[noreturn]] void fail(std::string what, const oe::Error &error) {
    throw Failure{std::move(what), static_cast<int>(error.status), error.message};
}

template <class T>
T take(oe::Result<T> result, const std::string &what) {
    if (!result) fail(what, result.error());
    return std::move(result.value());
}

void check(const oe::Status_ &status, const std::string &what) {
    if (!status) fail(what, status.error());
}

void check_c(int status, const std::string &what) {
    if (status != OFFLOAD_ENGINE_OK) {
        fail(what, oe::Error{static_cast<oe::Status>(status), offload_engine_last_error()});
    }
}

bool starts_with(std::string_view text, std::string_view prefix) {
    return text.substr(0, prefix.size()) == prefix;
}

std::string format_bytes(uint64_t bytes) {
    char buf[64];
    if (bytes >= (1ull << 30)) {
        std::snprintf(buf, sizeof buf, "%.2f GiB", static_cast<double>(bytes) / (1ull << 30));
    } else if (bytes >= (1ull << 20)) {
        std::snprintf(buf, sizeof buf, "%.2f MiB", static_cast<double>(bytes) / (1ull << 20));
    } else if (bytes >= (1ull << 10)) {
        std::snprintf(buf, sizeof buf, "%.1f KiB", static_cast<double>(bytes) / (1ull << 10));
    } else {
        std::snprintf(buf, sizeof buf, "%" PRIu64 " B", bytes);
    }
    return buf;
}

double us_to_ms(uint64_t us) { return static_cast<double>(us) / 1000.0; }

double ms_since(std::chrono::steady_clock::time_point start) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
}

// ---------------------------------------------------------------------------------------
// Deterministic numbers
// ---------------------------------------------------------------------------------------

uint64_t fnv1a(const void *data, size_t size, uint64_t hash = 0xcbf29ce484222325ull) {
    const auto *bytes = static_cast<const unsigned char *>(data);
    for (size_t i = 0; i < size; ++i) {
        hash ^= bytes[i];
        hash *= 0x100000001b3ull;
    }
    return hash;
}

// SplitMix64: tiny, fast, and the same sequence everywhere.
struct SplitMix64 {
    uint64_t state;
    uint64_t next() {
        uint64_t z = (state += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        return z ^ (z >> 31);
    }
    // Uniform in [-1, 1), exactly representable as a float.
    float uniform() { return static_cast<float>(static_cast<double>(next() >> 40) * (2.0 / 16777216.0) - 1.0); }
    float normal() {
        double u1 = (static_cast<double>(next() >> 11) + 1.0) * (1.0 / 9007199254740992.0);
        double u2 = static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0);
        return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
    }
};

// ---------------------------------------------------------------------------------------
// The model: hyperparameters, tensor names and shapes
// ---------------------------------------------------------------------------------------

constexpr const char *kArchKey = "general.architecture";
constexpr const char *kArchName = "offload_engine_pipeline_example";
constexpr const char *kScaleKey = "pipeline_example.scale";
constexpr const char *kSeedKey = "pipeline_example.seed";
constexpr uint64_t kWeightSeed = 0x5eed0ff10adull;

// Component prefixes as stable-diffusion.cpp-style checkpoints spell them. ggml tensor names
// hold at most 63 bytes, so the text encoder sits under the short `conditioner.` prefix
// (which the engine also knows as a text encoder) rather than `text_encoders.t5xxl.transformer.`.
constexpr const char *kCondPrefix = "conditioner.";
constexpr const char *kDitPrefix = "model.diffusion_model.";
constexpr const char *kVaePrefix = "first_stage_model.";

constexpr const char *kCondName = "conditioner";
constexpr const char *kDitName = "diffusion_model";
constexpr const char *kVaeName = "vae";

// The VAE decoder has no built-in layer pattern: mid blocks first, then the up blocks.
// Unlisted kinds sort by name, and "mid" comes before "up".
constexpr const char *kVaePattern = R"(decoder\.(?P<kind>mid|up)\.(?:block_)?(?P<index>\d+)\.)";

struct HParams {
    uint32_t scale = 2;
    // text encoder (T5-style)
    int64_t vocab = 128;
    int64_t tokens = 16;
    int64_t text_dim = 0;
    int64_t text_ff = 0;
    int64_t text_heads = 4;
    int64_t text_layers = 3;
    // diffusion transformer (Flux-style)
    int64_t hidden = 0;
    int64_t dit_heads = 4;
    int64_t double_blocks = 2;
    int64_t single_blocks = 2;
    int64_t latent_ch = 16;
    int64_t latent_w = 8;
    int64_t latent_h = 8;
    int64_t freq_dim = 256;
    // VAE decoder
    int64_t vae_ch = 0;
    std::vector<int64_t> up_ch;  // output channels of up.0, up.1, ...
    int64_t vae_groups = 8;

    static HParams for_scale(uint32_t scale) {
        HParams hp;
        hp.scale = scale;
        hp.text_dim = 128 * scale;
        hp.text_ff = 4 * hp.text_dim;
        hp.hidden = 128 * scale;
        hp.vae_ch = 32 * scale;
        hp.up_ch = {hp.vae_ch, hp.vae_ch / 2, hp.vae_ch / 4};
        return hp;
    }
    int64_t image_tokens() const { return latent_w * latent_h; }
    // The diffusion model's activation: text tokens, image tokens, and one column carrying
    // the conditioning vector (timestep + pooled text) from layer to layer.
    int64_t dit_columns() const { return tokens + image_tokens() + 1; }
    int64_t image_w() const { return latent_w << up_ch.size(); }
    int64_t image_h() const { return latent_h << up_ch.size(); }
};

enum class Init { linear, conv, norm, bias, embedding };

struct TensorSpec {
    std::string name;
    std::vector<int64_t> ne;
    Init init;
    int64_t fan_in;
};

class SpecList {
public:
    void add(std::string name, std::vector<int64_t> ne, Init init, int64_t fan_in = 1) {
        if (name.size() >= GGML_MAX_NAME) fail("tensor name too long for ggml: " + name);
        specs.push_back(TensorSpec{std::move(name), std::move(ne), init, fan_in});
    }
    void linear(const std::string &name, int64_t in, int64_t out) { add(name, {in, out}, Init::linear, in); }
    void conv(const std::string &name, int64_t k, int64_t in, int64_t out, bool bias = true) {
        add(name + ".weight", {k, k, in, out}, Init::conv, k * k * in);
        if (bias) add(name + ".bias", {out}, Init::bias);
    }
    void norm(const std::string &name, int64_t n, bool bias) {
        add(name + ".weight", {n}, Init::norm);
        if (bias) add(name + ".bias", {n}, Init::bias);
    }
    std::vector<TensorSpec> specs;
};

std::string text_block(int64_t i) { return std::string(kCondPrefix) + "encoder.block." + std::to_string(i) + "."; }
std::string double_block(int64_t i) { return std::string(kDitPrefix) + "double_blocks." + std::to_string(i) + "."; }
std::string single_block(int64_t i) { return std::string(kDitPrefix) + "single_blocks." + std::to_string(i) + "."; }
std::string vae_name(const std::string &rest) { return std::string(kVaePrefix) + "decoder." + rest; }
std::string mid_block(int i) { return vae_name("mid.block_" + std::to_string(i) + "."); }
std::string up_block(size_t i) { return vae_name("up." + std::to_string(i) + "."); }

void add_resnet(SpecList &s, const std::string &prefix, int64_t cin, int64_t cout) {
    s.norm(prefix + "norm1", cin, true);
    s.conv(prefix + "conv1", 3, cin, cout);
    s.norm(prefix + "norm2", cout, true);
    s.conv(prefix + "conv2", 3, cout, cout);
    if (cin != cout) s.conv(prefix + "nin_shortcut", 1, cin, cout);
}

std::vector<TensorSpec> model_specs(const HParams &hp) {
    SpecList s;
    // 1. text encoder
    const int64_t d = hp.text_dim;
    s.add(std::string(kCondPrefix) + "shared.weight", {d, hp.vocab}, Init::embedding);
    for (int64_t i = 0; i < hp.text_layers; ++i) {
        const std::string b = text_block(i);
        s.add(b + "layer.0.layer_norm.weight", {d}, Init::norm);
        for (const char *m : {"q", "k", "v", "o"}) s.linear(b + "layer.0.SelfAttention." + m + ".weight", d, d);
        s.add(b + "layer.1.layer_norm.weight", {d}, Init::norm);
        s.linear(b + "layer.1.DenseReluDense.wi.weight", d, hp.text_ff);
        s.linear(b + "layer.1.DenseReluDense.wo.weight", hp.text_ff, d);
    }
    s.add(std::string(kCondPrefix) + "encoder.final_layer_norm.weight", {d}, Init::norm);

    // 2. diffusion transformer
    const int64_t h = hp.hidden;
    const std::string g = kDitPrefix;
    s.linear(g + "img_in.weight", hp.latent_ch, h);
    s.add(g + "img_in.bias", {h}, Init::bias);
    s.linear(g + "txt_in.weight", d, h);
    s.add(g + "txt_in.bias", {h}, Init::bias);
    s.linear(g + "time_in.in_layer.weight", hp.freq_dim, h);
    s.linear(g + "time_in.out_layer.weight", h, h);
    s.linear(g + "vector_in.in_layer.weight", d, h);
    s.linear(g + "vector_in.out_layer.weight", h, h);
    for (int64_t i = 0; i < hp.double_blocks; ++i) {
        const std::string b = double_block(i);
        for (const char *stream : {"img", "txt"}) {
            const std::string p = b + stream;
            s.linear(p + "_mod.lin.weight", h, 6 * h);
            s.linear(p + "_attn.qkv.weight", h, 3 * h);
            s.linear(p + "_attn.proj.weight", h, h);
            s.linear(p + "_mlp.0.weight", h, 4 * h);
            s.linear(p + "_mlp.2.weight", 4 * h, h);
        }
    }
    for (int64_t i = 0; i < hp.single_blocks; ++i) {
        const std::string b = single_block(i);
        s.linear(b + "modulation.lin.weight", h, 3 * h);
        s.linear(b + "linear1.weight", h, 7 * h);
        s.linear(b + "linear2.weight", 5 * h, h);
    }
    s.linear(g + "final_layer.adaLN_modulation.1.weight", h, 2 * h);
    s.linear(g + "final_layer.linear.weight", h, hp.latent_ch);

    // 3. VAE decoder
    s.conv(vae_name("conv_in"), 3, hp.latent_ch, hp.vae_ch);
    add_resnet(s, mid_block(1), hp.vae_ch, hp.vae_ch);
    add_resnet(s, mid_block(2), hp.vae_ch, hp.vae_ch);
    int64_t ch = hp.vae_ch;
    for (size_t i = 0; i < hp.up_ch.size(); ++i) {
        add_resnet(s, up_block(i) + "block.0.", ch, hp.up_ch[i]);
        ch = hp.up_ch[i];
        s.conv(up_block(i) + "upsample.conv", 3, ch, ch);
    }
    s.norm(vae_name("norm_out"), ch, true);
    s.conv(vae_name("conv_out"), 3, ch, 3);
    return s.specs;
}

void fill_tensor(const TensorSpec &spec, float *data, int64_t n, uint64_t seed) {
    SplitMix64 rng{seed ^ fnv1a(spec.name.data(), spec.name.size())};
    float amplitude = 1.0f;
    float offset = 0.0f;
    switch (spec.init) {
        case Init::linear:
        case Init::conv:
            amplitude = static_cast<float>(std::sqrt(3.0 / static_cast<double>(spec.fan_in)));
            break;
        case Init::norm:
            amplitude = 0.1f;
            offset = 1.0f;
            break;
        case Init::bias:
            amplitude = 0.02f;
            break;
        case Init::embedding:
            amplitude = 1.0f;
            break;
    }
    for (int64_t i = 0; i < n; ++i) data[i] = offset + amplitude * rng.uniform();
}

// Writes the model's GGUF file (to a temporary name first, so a reader never sees half a file).
void write_model(const std::string &path, const HParams &hp, uint64_t seed) {
    const auto specs = model_specs(hp);
    size_t bytes = 0;
    for (const auto &spec : specs) {
        int64_t n = 1;
        for (int64_t e : spec.ne) n *= e;
        bytes += ggml_row_size(GGML_TYPE_F32, n) + ggml_tensor_overhead() + 64;
    }
    ggml_init_params params{bytes + (1u << 20), nullptr, false};
    std::unique_ptr<ggml_context, decltype(&ggml_free)> ctx(ggml_init(params), ggml_free);
    if (!ctx) fail("cannot allocate " + format_bytes(bytes) + " to generate the model");
    std::unique_ptr<gguf_context, decltype(&gguf_free)> gguf(gguf_init_empty(), gguf_free);
    gguf_set_val_str(gguf.get(), kArchKey, kArchName);
    gguf_set_val_u32(gguf.get(), kScaleKey, hp.scale);
    gguf_set_val_u64(gguf.get(), kSeedKey, seed);
    for (const auto &spec : specs) {
        ggml_tensor *t = ggml_new_tensor(ctx.get(), GGML_TYPE_F32, static_cast<int>(spec.ne.size()), spec.ne.data());
        ggml_set_name(t, spec.name.c_str());
        fill_tensor(spec, static_cast<float *>(t->data), ggml_nelements(t), seed);
        gguf_add_tensor(gguf.get(), t);
    }
    const std::string tmp = path + ".tmp." + std::to_string(static_cast<long>(getpid()));
    if (!gguf_write_to_file(gguf.get(), tmp.c_str(), false)) {
        std::remove(tmp.c_str());
        fail("cannot write the model to " + tmp);
    }
    std::error_code ec;
    std::filesystem::rename(tmp, path, ec);
    if (ec) {
        std::remove(tmp.c_str());
        fail("cannot rename " + tmp + " to " + path + ": " + ec.message());
    }
}

// The model as ggml's gguf loader leaves it: one ggml context holding every tensor's data.
struct LoadedModel {
    std::unique_ptr<ggml_context, decltype(&ggml_free)> ctx{nullptr, ggml_free};
    HParams hp;
    uint64_t seed = 0;
    uint64_t bytes = 0;

    ggml_tensor *get(const std::string &name) const {
        ggml_tensor *t = ggml_get_tensor(ctx.get(), name.c_str());
        if (!t) fail("the model has no tensor " + name);
        return t;
    }
};

LoadedModel load_model(const std::string &path) {
    LoadedModel model;
    ggml_context *raw = nullptr;
    gguf_init_params params{false, &raw};
    std::unique_ptr<gguf_context, decltype(&gguf_free)> gguf(gguf_init_from_file(path.c_str(), params), gguf_free);
    if (!gguf) fail("cannot read the GGUF file " + path + " (ggml's loader rejected it; delete it to regenerate)");
    model.ctx.reset(raw);
    const int64_t arch = gguf_find_key(gguf.get(), kArchKey);
    const int64_t scale = gguf_find_key(gguf.get(), kScaleKey);
    const int64_t seed = gguf_find_key(gguf.get(), kSeedKey);
    if (arch < 0 || gguf_get_kv_type(gguf.get(), arch) != GGUF_TYPE_STRING ||
        std::string(gguf_get_val_str(gguf.get(), arch)) != kArchName || scale < 0 ||
        gguf_get_kv_type(gguf.get(), scale) != GGUF_TYPE_UINT32 || seed < 0 ||
        gguf_get_kv_type(gguf.get(), seed) != GGUF_TYPE_UINT64) {
        fail(path + " is not a model written by this example (general.architecture is not " + kArchName + ")");
    }
    const uint32_t s = gguf_get_val_u32(gguf.get(), scale);
    if (s < 1 || s > 64) fail(path + ": unsupported scale " + std::to_string(s));
    model.hp = HParams::for_scale(s);
    model.seed = gguf_get_val_u64(gguf.get(), seed);
    const auto specs = model_specs(model.hp);
    if (static_cast<size_t>(gguf_get_n_tensors(gguf.get())) != specs.size()) {
        fail(path + ": expected " + std::to_string(specs.size()) + " tensors, found " +
             std::to_string(gguf_get_n_tensors(gguf.get())));
    }
    for (const auto &spec : specs) {
        ggml_tensor *t = model.get(spec.name);
        bool same = t->type == GGML_TYPE_F32;
        for (size_t i = 0; i < GGML_MAX_DIMS; ++i) {
            same = same && t->ne[i] == (i < spec.ne.size() ? spec.ne[i] : 1);
        }
        if (!same) fail(path + ": tensor " + spec.name + " has an unexpected type or shape");
        model.bytes += ggml_nbytes(t);
    }
    return model;
}

// ---------------------------------------------------------------------------------------
// Weights of each component, resolved by name once
// ---------------------------------------------------------------------------------------

struct TextBlock {
    ggml_tensor *ln0, *q, *k, *v, *o, *ln1, *wi, *wo;
};
struct TextWeights {
    ggml_tensor *shared, *final_ln;
    std::vector<TextBlock> blocks;
};

struct StreamWeights {
    ggml_tensor *mod, *qkv, *proj, *mlp0, *mlp2;
};
struct DoubleBlock {
    StreamWeights img, txt;
};
struct SingleBlock {
    ggml_tensor *mod, *linear1, *linear2;
};
struct DitWeights {
    ggml_tensor *img_in_w, *img_in_b, *txt_in_w, *txt_in_b;
    ggml_tensor *time_in, *time_out, *vec_in, *vec_out;
    ggml_tensor *final_mod, *final_linear;
    std::vector<DoubleBlock> doubles;
    std::vector<SingleBlock> singles;
};

struct Conv {
    ggml_tensor *w, *b;
};
struct Norm {
    ggml_tensor *w, *b;
};
struct ResBlock {
    Norm norm1, norm2;
    Conv conv1, conv2;
    Conv shortcut{nullptr, nullptr};
};
struct UpBlock {
    ResBlock res;
    Conv upsample;
};
struct VaeWeights {
    Conv conv_in, conv_out;
    Norm norm_out;
    ResBlock mid[2];
    std::vector<UpBlock> ups;
};

TextWeights text_weights(const LoadedModel &m) {
    TextWeights w{};
    w.shared = m.get(std::string(kCondPrefix) + "shared.weight");
    w.final_ln = m.get(std::string(kCondPrefix) + "encoder.final_layer_norm.weight");
    for (int64_t i = 0; i < m.hp.text_layers; ++i) {
        const std::string b = text_block(i);
        const std::string a = b + "layer.0.SelfAttention.";
        w.blocks.push_back(TextBlock{m.get(b + "layer.0.layer_norm.weight"), m.get(a + "q.weight"),
                                     m.get(a + "k.weight"), m.get(a + "v.weight"), m.get(a + "o.weight"),
                                     m.get(b + "layer.1.layer_norm.weight"),
                                     m.get(b + "layer.1.DenseReluDense.wi.weight"),
                                     m.get(b + "layer.1.DenseReluDense.wo.weight")});
    }
    return w;
}

DitWeights dit_weights(const LoadedModel &m) {
    const std::string g = kDitPrefix;
    DitWeights w{};
    w.img_in_w = m.get(g + "img_in.weight");
    w.img_in_b = m.get(g + "img_in.bias");
    w.txt_in_w = m.get(g + "txt_in.weight");
    w.txt_in_b = m.get(g + "txt_in.bias");
    w.time_in = m.get(g + "time_in.in_layer.weight");
    w.time_out = m.get(g + "time_in.out_layer.weight");
    w.vec_in = m.get(g + "vector_in.in_layer.weight");
    w.vec_out = m.get(g + "vector_in.out_layer.weight");
    w.final_mod = m.get(g + "final_layer.adaLN_modulation.1.weight");
    w.final_linear = m.get(g + "final_layer.linear.weight");
    auto stream = [&](const std::string &p) {
        return StreamWeights{m.get(p + "_mod.lin.weight"), m.get(p + "_attn.qkv.weight"),
                             m.get(p + "_attn.proj.weight"), m.get(p + "_mlp.0.weight"),
                             m.get(p + "_mlp.2.weight")};
    };
    for (int64_t i = 0; i < m.hp.double_blocks; ++i) {
        w.doubles.push_back(DoubleBlock{stream(double_block(i) + "img"), stream(double_block(i) + "txt")});
    }
    for (int64_t i = 0; i < m.hp.single_blocks; ++i) {
        const std::string b = single_block(i);
        w.singles.push_back(SingleBlock{m.get(b + "modulation.lin.weight"), m.get(b + "linear1.weight"),
                                        m.get(b + "linear2.weight")});
    }
    return w;
}

VaeWeights vae_weights(const LoadedModel &m) {
    auto conv = [&](const std::string &name) { return Conv{m.get(name + ".weight"), m.get(name + ".bias")}; };
    auto norm = [&](const std::string &name) { return Norm{m.get(name + ".weight"), m.get(name + ".bias")}; };
    auto res = [&](const std::string &p, int64_t cin, int64_t cout) {
        ResBlock r{norm(p + "norm1"), norm(p + "norm2"), conv(p + "conv1"), conv(p + "conv2")};
        if (cin != cout) r.shortcut = conv(p + "nin_shortcut");
        return r;
    };
    const HParams &hp = m.hp;
    VaeWeights w{};
    w.conv_in = conv(vae_name("conv_in"));
    w.mid[0] = res(mid_block(1), hp.vae_ch, hp.vae_ch);
    w.mid[1] = res(mid_block(2), hp.vae_ch, hp.vae_ch);
    int64_t ch = hp.vae_ch;
    for (size_t i = 0; i < hp.up_ch.size(); ++i) {
        w.ups.push_back(UpBlock{res(up_block(i) + "block.0.", ch, hp.up_ch[i]), conv(up_block(i) + "upsample.conv")});
        ch = hp.up_ch[i];
    }
    w.norm_out = norm(vae_name("norm_out"));
    w.conv_out = conv(vae_name("conv_out"));
    return w;
}

// ---------------------------------------------------------------------------------------
// Graph building blocks. Graphs that read a layer's weights are built and computed between
// that layer's layer_begin and layer_end (ggml views capture data pointers when created).
// ---------------------------------------------------------------------------------------

ggml_tensor *linear(ggml_context *ctx, ggml_tensor *w, ggml_tensor *x, ggml_tensor *b = nullptr) {
    ggml_tensor *y = ggml_mul_mat(ctx, w, x);
    return b ? ggml_add(ctx, y, b) : y;
}

// Columns [first, first + count) of a 2-D tensor.
ggml_tensor *columns(ggml_context *ctx, ggml_tensor *x, int64_t first, int64_t count) {
    return ggml_view_2d(ctx, x, x->ne[0], count, x->nb[1], static_cast<size_t>(first) * x->nb[1]);
}

// Rows [first, first + count) of a 2-D tensor, made contiguous.
ggml_tensor *rows(ggml_context *ctx, ggml_tensor *x, int64_t first, int64_t count) {
    return ggml_cont(ctx, ggml_view_2d(ctx, x, count, x->ne[1], x->nb[1], static_cast<size_t>(first) * x->nb[0]));
}

// Multi-head attention over columns: q, k, v are [dim, tokens].
ggml_tensor *attention(ggml_context *ctx, ggml_tensor *q, ggml_tensor *k, ggml_tensor *v, int64_t heads) {
    const int64_t dim = q->ne[0];
    const int64_t n = q->ne[1];
    const int64_t hd = dim / heads;
    auto per_head = [&](ggml_tensor *t) {  // [hd, n, heads]
        return ggml_cont(ctx, ggml_permute(ctx, ggml_reshape_3d(ctx, ggml_cont(ctx, t), hd, heads, n), 0, 2, 1, 3));
    };
    ggml_tensor *qh = per_head(q);
    ggml_tensor *kh = per_head(k);
    ggml_tensor *vt = ggml_cont(ctx, ggml_permute(ctx, ggml_reshape_3d(ctx, ggml_cont(ctx, v), hd, heads, n), 1, 2, 0, 3));
    ggml_tensor *scores = ggml_mul_mat(ctx, kh, qh);  // [n_k, n_q, heads]
    scores = ggml_soft_max_ext(ctx, scores, nullptr, 1.0f / std::sqrt(static_cast<float>(hd)), 0.0f);
    ggml_tensor *out = ggml_mul_mat(ctx, vt, scores);  // [hd, n_q, heads]
    out = ggml_cont(ctx, ggml_permute(ctx, out, 0, 2, 1, 3));  // [hd, heads, n_q]
    return ggml_reshape_2d(ctx, out, dim, n);
}

// -- text encoder --

ggml_tensor *text_input(ggml_context *ctx, const TextWeights &w, ggml_tensor *tokens) {
    return ggml_get_rows(ctx, w.shared, tokens);
}

ggml_tensor *text_layer(ggml_context *ctx, const HParams &hp, const TextBlock &b, ggml_tensor *x) {
    ggml_tensor *h = ggml_mul(ctx, ggml_rms_norm(ctx, x, 1e-6f), b.ln0);
    ggml_tensor *a = attention(ctx, linear(ctx, b.q, h), linear(ctx, b.k, h), linear(ctx, b.v, h), hp.text_heads);
    x = ggml_add(ctx, x, linear(ctx, b.o, a));
    h = ggml_mul(ctx, ggml_rms_norm(ctx, x, 1e-6f), b.ln1);
    return ggml_add(ctx, x, linear(ctx, b.wo, ggml_relu(ctx, linear(ctx, b.wi, h))));
}

ggml_tensor *text_output(ggml_context *ctx, const TextWeights &w, ggml_tensor *x) {
    return ggml_mul(ctx, ggml_rms_norm(ctx, x, 1e-6f), w.final_ln);
}

// -- diffusion transformer --

// Chunk `i` of a [n * dim, 1] modulation vector.
ggml_tensor *chunk(ggml_context *ctx, ggml_tensor *mod, int64_t dim, int64_t i) {
    return ggml_view_2d(ctx, mod, dim, 1, mod->nb[1], static_cast<size_t>(i * dim) * sizeof(float));
}

ggml_tensor *modulate(ggml_context *ctx, ggml_tensor *x, ggml_tensor *shift, ggml_tensor *scale) {
    ggml_tensor *n = ggml_norm(ctx, x, 1e-6f);
    return ggml_add(ctx, ggml_add(ctx, n, ggml_mul(ctx, n, scale)), shift);
}

ggml_tensor *gated(ggml_context *ctx, ggml_tensor *x, ggml_tensor *gate, ggml_tensor *y) {
    return ggml_add(ctx, x, ggml_mul(ctx, y, gate));
}

ggml_tensor *dit_input(ggml_context *ctx, const DitWeights &w, ggml_tensor *latent, ggml_tensor *text,
                       ggml_tensor *pooled, ggml_tensor *tfreq) {
    ggml_tensor *img = linear(ctx, w.img_in_w, latent, w.img_in_b);
    ggml_tensor *txt = linear(ctx, w.txt_in_w, text, w.txt_in_b);
    ggml_tensor *vec = ggml_add(ctx, linear(ctx, w.time_out, ggml_silu(ctx, linear(ctx, w.time_in, tfreq))),
                                linear(ctx, w.vec_out, ggml_silu(ctx, linear(ctx, w.vec_in, pooled))));
    return ggml_concat(ctx, ggml_concat(ctx, txt, img, 1), vec, 1);
}

ggml_tensor *dit_double(ggml_context *ctx, const HParams &hp, const DoubleBlock &b, ggml_tensor *x) {
    const int64_t h = hp.hidden, t = hp.tokens, n = hp.image_tokens();
    ggml_tensor *txt = columns(ctx, x, 0, t);
    ggml_tensor *img = columns(ctx, x, t, n);
    ggml_tensor *vec = columns(ctx, x, t + n, 1);
    ggml_tensor *sv = ggml_silu(ctx, vec);
    ggml_tensor *im = linear(ctx, b.img.mod, sv);
    ggml_tensor *tm = linear(ctx, b.txt.mod, sv);
    ggml_tensor *img_qkv = linear(ctx, b.img.qkv, modulate(ctx, img, chunk(ctx, im, h, 0), chunk(ctx, im, h, 1)));
    ggml_tensor *txt_qkv = linear(ctx, b.txt.qkv, modulate(ctx, txt, chunk(ctx, tm, h, 0), chunk(ctx, tm, h, 1)));
    auto joint = [&](int64_t part) {
        return ggml_concat(ctx, rows(ctx, txt_qkv, part * h, h), rows(ctx, img_qkv, part * h, h), 1);
    };
    ggml_tensor *a = attention(ctx, joint(0), joint(1), joint(2), hp.dit_heads);
    img = gated(ctx, img, chunk(ctx, im, h, 2), linear(ctx, b.img.proj, columns(ctx, a, t, n)));
    txt = gated(ctx, txt, chunk(ctx, tm, h, 2), linear(ctx, b.txt.proj, columns(ctx, a, 0, t)));
    auto mlp = [&](const StreamWeights &s, ggml_tensor *m, ggml_tensor *y) {
        ggml_tensor *hid = ggml_gelu(ctx, linear(ctx, s.mlp0, modulate(ctx, y, chunk(ctx, m, h, 3), chunk(ctx, m, h, 4))));
        return gated(ctx, y, chunk(ctx, m, h, 5), linear(ctx, s.mlp2, hid));
    };
    img = mlp(b.img, im, img);
    txt = mlp(b.txt, tm, txt);
    return ggml_concat(ctx, ggml_concat(ctx, txt, img, 1), ggml_cont(ctx, vec), 1);
}

ggml_tensor *dit_single(ggml_context *ctx, const HParams &hp, const SingleBlock &b, ggml_tensor *x) {
    const int64_t h = hp.hidden, tn = hp.tokens + hp.image_tokens();
    ggml_tensor *xs = columns(ctx, x, 0, tn);
    ggml_tensor *vec = columns(ctx, x, tn, 1);
    ggml_tensor *m = linear(ctx, b.mod, ggml_silu(ctx, vec));
    ggml_tensor *l1 = linear(ctx, b.linear1, modulate(ctx, xs, chunk(ctx, m, h, 0), chunk(ctx, m, h, 1)));
    ggml_tensor *a = attention(ctx, rows(ctx, l1, 0, h), rows(ctx, l1, h, h), rows(ctx, l1, 2 * h, h), hp.dit_heads);
    ggml_tensor *mlp = ggml_gelu(ctx, rows(ctx, l1, 3 * h, 4 * h));
    ggml_tensor *out = linear(ctx, b.linear2, ggml_concat(ctx, a, mlp, 0));
    xs = gated(ctx, xs, chunk(ctx, m, h, 2), out);
    return ggml_concat(ctx, xs, ggml_cont(ctx, vec), 1);
}

ggml_tensor *dit_output(ggml_context *ctx, const HParams &hp, const DitWeights &w, ggml_tensor *x) {
    const int64_t h = hp.hidden, t = hp.tokens, n = hp.image_tokens();
    ggml_tensor *img = columns(ctx, x, t, n);
    ggml_tensor *m = linear(ctx, w.final_mod, ggml_silu(ctx, columns(ctx, x, t + n, 1)));
    return linear(ctx, w.final_linear, modulate(ctx, img, chunk(ctx, m, h, 0), chunk(ctx, m, h, 1)));
}

// -- VAE decoder (images are [W, H, C]) --

ggml_tensor *channel_vector(ggml_context *ctx, ggml_tensor *v) { return ggml_reshape_4d(ctx, v, 1, 1, v->ne[0], 1); }

ggml_tensor *conv2d(ggml_context *ctx, const Conv &c, ggml_tensor *x) {
    const int pad = static_cast<int>(c.w->ne[0] / 2);
    ggml_tensor *y = ggml_conv_2d(ctx, c.w, x, 1, 1, pad, pad, 1, 1);
    return ggml_add(ctx, y, channel_vector(ctx, c.b));
}

ggml_tensor *group_norm(ggml_context *ctx, const HParams &hp, const Norm &n, ggml_tensor *x) {
    ggml_tensor *y = ggml_group_norm(ctx, x, static_cast<int>(hp.vae_groups), 1e-6f);
    return ggml_add(ctx, ggml_mul(ctx, y, channel_vector(ctx, n.w)), channel_vector(ctx, n.b));
}

ggml_tensor *resnet(ggml_context *ctx, const HParams &hp, const ResBlock &r, ggml_tensor *x) {
    ggml_tensor *h = conv2d(ctx, r.conv1, ggml_silu(ctx, group_norm(ctx, hp, r.norm1, x)));
    h = conv2d(ctx, r.conv2, ggml_silu(ctx, group_norm(ctx, hp, r.norm2, h)));
    ggml_tensor *skip = r.shortcut.w ? conv2d(ctx, r.shortcut, x) : x;
    return ggml_add(ctx, skip, h);
}

ggml_tensor *up_block_graph(ggml_context *ctx, const HParams &hp, const UpBlock &u, ggml_tensor *x) {
    ggml_tensor *h = resnet(ctx, hp, u.res, x);
    h = ggml_upscale(ctx, h, 2, GGML_SCALE_MODE_NEAREST);
    return conv2d(ctx, u.upsample, h);
}

ggml_tensor *vae_output(ggml_context *ctx, const HParams &hp, const VaeWeights &w, ggml_tensor *x) {
    return conv2d(ctx, w.conv_out, ggml_silu(ctx, group_norm(ctx, hp, w.norm_out, x)));
}

// ---------------------------------------------------------------------------------------
// Running graphs the host builds itself (the raw layer protocol)
// ---------------------------------------------------------------------------------------

constexpr size_t kGraphNodes = 4096;

class HostGraph {
public:
    HostGraph() {
        ggml_init_params p{ggml_tensor_overhead() * kGraphNodes + ggml_graph_overhead_custom(kGraphNodes, false),
                           nullptr, true};
        ctx_ = ggml_init(p);
        if (!ctx_) fail("cannot create a ggml context for a graph");
    }
    ~HostGraph() { ggml_free(ctx_); }
    HostGraph(const HostGraph &) = delete;
    HostGraph &operator=(const HostGraph &) = delete;

    ggml_context *ctx() const { return ctx_; }

    ggml_tensor *input_f32(const std::vector<int64_t> &ne, const float *data) {
        ggml_tensor *t = ggml_new_tensor(ctx_, GGML_TYPE_F32, static_cast<int>(ne.size()), ne.data());
        ggml_set_input(t);
        fills_.push_back({t, data});
        return t;
    }

    ggml_cgraph *graph(ggml_tensor *out) {
        ggml_cgraph *g = ggml_new_graph_custom(ctx_, kGraphNodes, false);
        ggml_set_output(out);
        ggml_build_forward_expand(g, out);
        return g;
    }

    // Allocates, fills the inputs, computes and returns the output's values.
    std::vector<float> compute(ggml_backend_t backend, ggml_gallocr_t alloc, ggml_tensor *out) {
        ggml_cgraph *g = graph(out);
        if (!ggml_gallocr_alloc_graph(alloc, g)) fail("cannot allocate a compute buffer on the device");
        for (const auto &fill : fills_) ggml_backend_tensor_set(fill.first, fill.second, 0, ggml_nbytes(fill.first));
        if (ggml_backend_graph_compute(backend, g) != GGML_STATUS_SUCCESS) fail("ggml graph compute failed");
        std::vector<float> result(static_cast<size_t>(ggml_nelements(out)));
        ggml_backend_tensor_get(out, result.data(), 0, ggml_nbytes(out));
        return result;
    }

private:
    ggml_context *ctx_ = nullptr;
    std::vector<std::pair<ggml_tensor *, const float *>> fills_;
};

struct Allocator {
    explicit Allocator(ggml_backend_t backend) : alloc(ggml_gallocr_new(ggml_backend_get_default_buffer_type(backend))) {
        if (!alloc) fail("cannot create a graph allocator");
    }
    ~Allocator() { ggml_gallocr_free(alloc); }
    Allocator(const Allocator &) = delete;
    Allocator &operator=(const Allocator &) = delete;
    ggml_gallocr_t alloc;
};

// ---------------------------------------------------------------------------------------
// Components
// ---------------------------------------------------------------------------------------

struct Component {
    std::string name;
    oe::Role role;
    oe::Registry registry;
    oe::Engine engine;
    ggml_backend_t backend;
    std::string architecture;
    std::vector<std::string> layer_names;
    uint64_t bytes = 0;
    uint64_t stage_need = 0;
};

const char *role_name(oe::Role role) {
    switch (role) {
        case oe::Role::conditioner: return "conditioner";
        case oe::Role::diffusion: return "diffusion";
        case oe::Role::decoder: return "decoder";
        case oe::Role::adapter: return "adapter";
        case oe::Role::control: return "control";
        case oe::Role::other: return "other";
    }
    return "?";
}

const char *placement_name(offload_engine_placement p) {
    switch (p) {
        case OFFLOAD_ENGINE_PLACEMENT_OFF: return "OFF";
        case OFFLOAD_ENGINE_PLACEMENT_RESIDENT: return "RESIDENT";
        case OFFLOAD_ENGINE_PLACEMENT_STREAMING: return "STREAMING";
    }
    return "?";
}

struct EngineSettings {
    std::string device;
    uint32_t prefetch = 1;
    int threads = 1;
};

// Registers the tensors whose names start with `prefix`, creates the engine and checks that
// the engine grouped them into the layers the host runs, in the same order.
Component make_component(const LoadedModel &model, const std::string &name, oe::Role role, const char *prefix,
                         const std::string &pattern, const std::string &expected_arch,
                         const std::vector<std::string> &expected_layers, const EngineSettings &settings,
                         bool trace) {
    oe::Registry registry = take(oe::Registry::create(pattern), name + ": cannot create the registry");
    uint64_t bytes = 0;
    size_t count = 0;
    for (ggml_tensor *t = ggml_get_first_tensor(model.ctx.get()); t; t = ggml_get_next_tensor(model.ctx.get(), t)) {
        if (!starts_with(ggml_get_name(t), prefix)) continue;
        take(registry.add_tensor(t), name + ": cannot register " + ggml_get_name(t));
        bytes += ggml_nbytes(t);
        ++count;
    }
    if (count == 0) fail(name + ": the model has no tensor starting with " + prefix);
    std::string arch = take(registry.architecture(), name + ": architecture");
    if (!expected_arch.empty() && arch != expected_arch) {
        fail(name + ": the engine detected layer pattern '" + arch + "', expected '" + expected_arch + "'");
    }
    auto layers = take(registry.layers(), name + ": layers");
    std::vector<std::string> names;
    for (const auto &l : layers) names.push_back(l.name);
    if (names != expected_layers) {
        std::string got, want;
        for (const auto &n : names) got += (got.empty() ? "" : ", ") + n;
        for (const auto &n : expected_layers) want += (want.empty() ? "" : ", ") + n;
        fail(name + ": the engine grouped the tensors into " + std::to_string(names.size()) + " layers [" + got +
             "], but the host runs " + std::to_string(expected_layers.size()) + " layers [" + want + "]");
    }
    oe::EngineOptions options;
    options.device = settings.device;
    options.prefetch_depth = settings.prefetch;
    options.compute_threads = settings.threads;
    options.trace = trace;
    oe::Engine engine = take(oe::Engine::create(registry, options), name + ": cannot create the engine");
    ggml_backend_t backend = take(engine.backend(), name + ": backend");
    return Component{name, role, std::move(registry), std::move(engine), backend, std::move(arch), std::move(names), bytes, 0};
}

uint64_t measure(Component &c, HostGraph &g, ggml_tensor *out) {
    uint64_t bytes = 0;
    check_c(offload_engine_engine_measure_graph(c.engine.get(), g.graph(out), &bytes),
            c.name + ": measuring a compute graph");
    return bytes;
}

// ---------------------------------------------------------------------------------------
// Stage 1: the text encoder, through the staged executor
// ---------------------------------------------------------------------------------------

class TextEncoder {
public:
    TextEncoder(Component &c, const HParams &hp, TextWeights w) : c_(c), hp_(hp), w_(std::move(w)) {}

    uint64_t measure_need() {
        uint64_t need = 0;
        {
            HostGraph g;
            ggml_tensor *tok = ggml_new_tensor_1d(g.ctx(), GGML_TYPE_I32, hp_.tokens);
            need = std::max(need, measure(c_, g, text_input(g.ctx(), w_, tok)));
        }
        {
            HostGraph g;
            ggml_tensor *x = ggml_new_tensor_2d(g.ctx(), GGML_TYPE_F32, hp_.text_dim, hp_.tokens);
            for (const auto &b : w_.blocks) x = text_layer(g.ctx(), hp_, b, x);
            need = std::max(need, measure(c_, g, text_output(g.ctx(), w_, x)));
        }
        return need + 2 * static_cast<uint64_t>(hp_.text_dim * hp_.tokens) * sizeof(float);
    }

    // Token embeddings [text_dim, tokens] for `tokens`.
    std::vector<float> encode(const std::vector<int32_t> &tokens) {
        ggml_tensor *tok = nullptr;
        oe::StagedModel m;
        m.layer_count = w_.blocks.size();
        m.activation_ne[0] = hp_.text_dim;
        m.activation_ne[1] = hp_.tokens;
        m.build_input = [&](ggml_context *ctx) {
            tok = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, hp_.tokens);
            ggml_set_input(tok);
            return text_input(ctx, w_, tok);
        };
        m.set_inputs = [&]() {
            ggml_backend_tensor_set(tok, tokens.data(), 0, ggml_nbytes(tok));
            return true;
        };
        m.build_layer = [&](ggml_context *ctx, uint64_t layer, ggml_tensor *x) {
            return text_layer(ctx, hp_, w_.blocks[layer], x);
        };
        m.build_output = [&](ggml_context *ctx, ggml_tensor *x) { return text_output(ctx, w_, x); };
        std::vector<float> out(static_cast<size_t>(hp_.text_dim * hp_.tokens));
        size_t got = take(c_.engine.run_pass(m, out),
                          c_.name + ": run_pass");
        if (got != out.size() * sizeof(float)) fail(c_.name + ": unexpected output size");
        return out;
    }

private:
    Component &c_;
    const HParams &hp_;
    TextWeights w_;
};

// A toy tokenizer: one token per word, 1 ends the prompt, 0 pads.
std::vector<int32_t> tokenize(const std::string &prompt, const HParams &hp) {
    std::vector<int32_t> tokens;
    size_t i = 0;
    while (i < prompt.size() && static_cast<int64_t>(tokens.size()) + 1 < hp.tokens) {
        while (i < prompt.size() && !std::isalnum(static_cast<unsigned char>(prompt[i]))) ++i;
        size_t j = i;
        while (j < prompt.size() && std::isalnum(static_cast<unsigned char>(prompt[j]))) ++j;
        if (j > i) {
            uint64_t h = fnv1a(prompt.data() + i, j - i);
            tokens.push_back(static_cast<int32_t>(2 + h % static_cast<uint64_t>(hp.vocab - 2)));
        }
        i = j;
    }
    tokens.push_back(1);
    tokens.resize(static_cast<size_t>(hp.tokens), 0);
    return tokens;
}

std::vector<float> mean_pool(const std::vector<float> &emb, int64_t dim, int64_t tokens) {
    std::vector<float> pooled(static_cast<size_t>(dim), 0.0f);
    for (int64_t t = 0; t < tokens; ++t) {
        for (int64_t i = 0; i < dim; ++i) pooled[i] += emb[t * dim + i];
    }
    for (auto &v : pooled) v /= static_cast<float>(tokens);
    return pooled;
}

// ---------------------------------------------------------------------------------------
// Stage 2: the diffusion transformer, through the staged executor
// ---------------------------------------------------------------------------------------

struct Conditioning {
    std::vector<float> text;    // [text_dim, tokens]
    std::vector<float> pooled;  // [text_dim]
};

class Denoiser {
public:
    Denoiser(Component &c, const HParams &hp, DitWeights w, std::vector<std::pair<bool, size_t>> layers)
        : c_(c), hp_(hp), w_(std::move(w)), layers_(std::move(layers)) {}

    uint64_t measure_need() {
        uint64_t need = 0;
        {
            HostGraph g;
            ggml_tensor *x = input_graph(g.ctx());
            need = std::max(need, measure(c_, g, x));
        }
        {
            HostGraph g;
            ggml_tensor *x = ggml_new_tensor_2d(g.ctx(), GGML_TYPE_F32, hp_.hidden, hp_.dit_columns());
            for (uint64_t l = 0; l < layers_.size(); ++l) x = layer_graph(g.ctx(), l, x);
            need = std::max(need, measure(c_, g, dit_output(g.ctx(), hp_, w_, x)));
        }
        return need + 2 * static_cast<uint64_t>(hp_.hidden * hp_.dit_columns()) * sizeof(float);
    }

    // The model's prediction for `latent` ([latent_ch, image_tokens]) at noise level `sigma`.
    std::vector<float> predict(const std::vector<float> &latent, const Conditioning &cond, float sigma) {
        latent_ = &latent;
        cond_ = &cond;
        timestep_features(sigma);
        oe::StagedModel m;
        m.layer_count = layers_.size();
        m.activation_ne[0] = hp_.hidden;
        m.activation_ne[1] = hp_.dit_columns();
        m.build_input = [this](ggml_context *ctx) { return input_graph(ctx); };
        m.set_inputs = [this]() {
            ggml_backend_tensor_set(in_latent_, latent_->data(), 0, ggml_nbytes(in_latent_));
            ggml_backend_tensor_set(in_text_, cond_->text.data(), 0, ggml_nbytes(in_text_));
            ggml_backend_tensor_set(in_pooled_, cond_->pooled.data(), 0, ggml_nbytes(in_pooled_));
            ggml_backend_tensor_set(in_tfreq_, tfreq_.data(), 0, ggml_nbytes(in_tfreq_));
            return true;
        };
        m.build_layer = [this](ggml_context *ctx, uint64_t layer, ggml_tensor *x) { return layer_graph(ctx, layer, x); };
        m.build_output = [this](ggml_context *ctx, ggml_tensor *x) { return dit_output(ctx, hp_, w_, x); };
        std::vector<float> out(static_cast<size_t>(hp_.latent_ch * hp_.image_tokens()));
        size_t got = take(c_.engine.run_pass(m, out),
                          c_.name + ": run_pass");
        if (got != out.size() * sizeof(float)) fail(c_.name + ": unexpected output size");
        return out;
    }

private:
    ggml_tensor *input_graph(ggml_context *ctx) {
        in_latent_ = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, hp_.latent_ch, hp_.image_tokens());
        in_text_ = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, hp_.text_dim, hp_.tokens);
        in_pooled_ = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, hp_.text_dim, 1);
        in_tfreq_ = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, hp_.freq_dim, 1);
        for (ggml_tensor *t : {in_latent_, in_text_, in_pooled_, in_tfreq_}) ggml_set_input(t);
        return dit_input(ctx, w_, in_latent_, in_text_, in_pooled_, in_tfreq_);
    }

    ggml_tensor *layer_graph(ggml_context *ctx, uint64_t layer, ggml_tensor *x) {
        const auto &[is_double, index] = layers_[layer];
        return is_double ? dit_double(ctx, hp_, w_.doubles[index], x) : dit_single(ctx, hp_, w_.singles[index], x);
    }

    // Sinusoidal features of the timestep (sigma scaled to 0..1000).
    void timestep_features(float sigma) {
        const int64_t half = hp_.freq_dim / 2;
        tfreq_.assign(static_cast<size_t>(hp_.freq_dim), 0.0f);
        const double t = 1000.0 * sigma;
        for (int64_t i = 0; i < half; ++i) {
            const double freq = std::exp(-std::log(10000.0) * static_cast<double>(i) / static_cast<double>(half));
            tfreq_[i] = static_cast<float>(std::cos(t * freq));
            tfreq_[half + i] = static_cast<float>(std::sin(t * freq));
        }
    }

    Component &c_;
    const HParams &hp_;
    DitWeights w_;
    std::vector<std::pair<bool, size_t>> layers_;  // (double block?, index) per engine layer
    const std::vector<float> *latent_ = nullptr;
    const Conditioning *cond_ = nullptr;
    std::vector<float> tfreq_;
    ggml_tensor *in_latent_ = nullptr, *in_text_ = nullptr, *in_pooled_ = nullptr, *in_tfreq_ = nullptr;
};

// ---------------------------------------------------------------------------------------
// Stage 3: the VAE decoder, through the raw layer protocol (its activation changes shape)
// ---------------------------------------------------------------------------------------

struct Image {
    int64_t w = 0, h = 0, c = 0;
    std::vector<float> data;  // [w, h, c]
};

class Decoder {
public:
    Decoder(Component &c, const HParams &hp, VaeWeights w) : c_(c), hp_(hp), w_(std::move(w)) {}

    uint64_t measure_need() {
        uint64_t need = 0;
        Image x{hp_.latent_w, hp_.latent_h, hp_.latent_ch, {}};
        need = std::max(need, measure_step(x, [&](ggml_context *ctx, ggml_tensor *in) { return conv2d(ctx, w_.conv_in, in); }));
        for (size_t l = 0; l < layer_count(); ++l) {
            need = std::max(need, measure_step(x, [&](ggml_context *ctx, ggml_tensor *in) { return layer_graph(ctx, l, in); }));
        }
        need = std::max(need, measure_step(x, [&](ggml_context *ctx, ggml_tensor *in) { return vae_output(ctx, hp_, w_, in); }));
        return need;
    }

    Image decode(const Image &latent) {
        Allocator alloc(c_.backend);
        check(c_.engine.pass_begin(), c_.name + ": pass_begin");
        Image x = step(alloc, latent, [&](ggml_context *ctx, ggml_tensor *in) { return conv2d(ctx, w_.conv_in, in); });
        for (size_t l = 0; l < layer_count(); ++l) {
            check(c_.engine.layer_begin(l), c_.name + ": layer_begin " + std::to_string(l));
            x = step(alloc, x, [&](ggml_context *ctx, ggml_tensor *in) { return layer_graph(ctx, l, in); });
            check(c_.engine.layer_end(l), c_.name + ": layer_end " + std::to_string(l));
        }
        Image out = step(alloc, x, [&](ggml_context *ctx, ggml_tensor *in) { return vae_output(ctx, hp_, w_, in); });
        check(c_.engine.pass_end(), c_.name + ": pass_end");
        return out;
    }

private:
    size_t layer_count() const { return 2 + w_.ups.size(); }

    ggml_tensor *layer_graph(ggml_context *ctx, size_t layer, ggml_tensor *x) {
        if (layer < 2) return resnet(ctx, hp_, w_.mid[layer], x);
        return up_block_graph(ctx, hp_, w_.ups[layer - 2], x);
    }

    template <class Build>
    Image step(Allocator &alloc, const Image &in, Build build) {
        HostGraph g;
        ggml_tensor *x = g.input_f32({in.w, in.h, in.c, 1}, in.data.data());
        ggml_tensor *y = build(g.ctx(), x);
        Image out{y->ne[0], y->ne[1], y->ne[2], {}};
        out.data = g.compute(c_.backend, alloc.alloc, y);
        return out;
    }

    template <class Build>
    uint64_t measure_step(Image &shape, Build build) {
        HostGraph g;
        ggml_tensor *x = ggml_new_tensor_4d(g.ctx(), GGML_TYPE_F32, shape.w, shape.h, shape.c, 1);
        ggml_tensor *y = build(g.ctx(), x);
        shape = Image{y->ne[0], y->ne[1], y->ne[2], {}};
        return measure(c_, g, y);
    }

    Component &c_;
    const HParams &hp_;
    VaeWeights w_;
};

// ---------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------

struct Options {
    std::string model = "pipeline_model.gguf";
    std::string device;
    std::string mode = "none";
    std::string prompt = "a lighthouse on a cliff at sunset, oil painting";
    std::string negative_prompt;
    std::string trace;
    std::string output;
    bool have_prefetch = false;
    uint32_t prefetch = 1;
    bool have_min_free = false;
    uint64_t min_free = 0;
    bool have_margin = false;
    uint64_t margin = 0;
    uint64_t budget = 0;
    bool offload_log = false;
    bool profile = false;
    bool reload_diffusion = true;
    int steps = 4;
    float cfg_scale = 3.5f;
    int runs = 1;
    int threads = 1;
    uint32_t scale = 2;
    bool have_scale = false;
    uint64_t seed = 42;
    std::vector<std::pair<std::string, oe::Override>> overrides;
};

void usage(FILE *out) {
    std::fprintf(out,
                 "usage: pipeline_host [options]\n"
                 "\n"
                 "Runs a toy text-to-image job (text encoder -> diffusion transformer -> VAE decoder)\n"
                 "through an offload_engine::Pipeline and prints placements, timings and a checksum.\n"
                 "\n"
                 "model:\n"
                 "  --model FILE               GGUF file; written on first use (default pipeline_model.gguf)\n"
                 "  --scale N                  model size when writing it (default 2: about 38 MiB)\n"

                 "sampling:\n"
                 "  -p, --prompt TEXT          prompt\n"
                 "  -n, --negative-prompt TEXT unconditional prompt (default empty)\n"
                 "  -s, --seed N               sampling noise seed (default 42)\n"
                 "  --steps S                  sampling steps (default 4)\n"
                 "  --cfg-scale F              classifier-free guidance scale (default 3.5; 1 skips the\n"
                 "                             unconditional pass)\n"
                 "  --runs N                   jobs in this process (default 1)\n"
                 "  -o, --output FILE          write the image as PPM\n"
                 "device and offloading:\n"
                 "  --device NAME              ggml device (CPU, CUDA0, ...); default: first GPU, else CPU\n"
                 "  --threads N                CPU backend threads (default 1)\n"
                 "  --offload-mode MODE        none|cond_only|cond_diffusion|aggressive|layer_streaming\n"
                 "  --vram-budget SIZE         device memory for all components (e.g. 40MiB, 1GB);\n"
                 "                             default: the device's free memory\n"
                 "  --streaming-min-vram SIZE  left free on the device (default 512MiB)\n"
                 "  --margin SIZE              spare memory a stage needs (default 300MiB)\n"
                 "  --streaming-prefetch N     layers copied ahead when streaming (default 1)\n"
                 "  --no-reload-diffusion      leave an evicted diffusion model off at the end of a job\n"
                 "  --offload-cond-stage / --no-offload-cond-stage\n"
                 "  --offload-diffusion / --no-offload-diffusion\n"
                 "  --offload-vae / --no-offload-vae\n"
                 "                             force a component off after its stage / keep it on\n"
                 "diagnostics:\n"
                 "  --offload-log              log every placement move (to stderr)\n"
                 "  --profile                  per-stage breakdown and engine statistics\n"
                 "                             (also OFFLOAD_ENGINE_PROFILE=1)\n"
                 "  --trace FILE               Chrome trace of the diffusion model's engine\n"
                 "  -h, --help\n");
}

[[noreturn]] void usage_error(const std::string &message) {
    std::fprintf(stderr, "pipeline_host: %s (see --help)\n", message.c_str());
    std::exit(2);
}

long parse_int(const std::string &flag, const std::string &text, long min, long max) {
    char *end = nullptr;
    errno = 0;
    long v = std::strtol(text.c_str(), &end, 10);
    if (errno != 0 || end == text.c_str() || *end != '\0' || v < min || v > max) {
        usage_error(flag + ": expected an integer in " + std::to_string(min) + ".." + std::to_string(max) + ", got '" +
                    text + "'");
    }
    return v;
}

Options parse_args(int argc, char **argv) {
    Options o;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) usage_error(a + " needs a value");
            return argv[++i];
        };
        // Sizes as every offload-engine tool reads them: 512MiB, 12GB, 4096 (bytes).
        auto size = [&]() {
            std::string v = value();
            uint64_t bytes = 0;
            if (offload_engine_size_parse(v.c_str(), &bytes) != OFFLOAD_ENGINE_OK)
                usage_error(a + ": " + offload_engine_last_error());
            return bytes;
        };
        if (a == "-h" || a == "--help") {
            usage(stdout);
            std::exit(0);
        } else if (a == "--model" || a == "-m") {
            o.model = value();
        } else if (a == "--scale") {
            o.scale = static_cast<uint32_t>(parse_int(a, value(), 1, 64));
            o.have_scale = true;
        } else if (a == "--seed" || a == "-s") {
            o.seed = static_cast<uint64_t>(parse_int(a, value(), 0, 0x7fffffff));
        } else if (a == "--prompt" || a == "-p") {
            o.prompt = value();
        } else if (a == "--negative-prompt" || a == "-n") {
            o.negative_prompt = value();
        } else if (a == "--steps") {
            o.steps = static_cast<int>(parse_int(a, value(), 1, 1000));
        } else if (a == "--cfg-scale") {
            std::string v = value();
            char *end = nullptr;
            o.cfg_scale = std::strtof(v.c_str(), &end);
            if (end == v.c_str() || *end != '\0' || !std::isfinite(o.cfg_scale)) usage_error(a + ": expected a number");
        } else if (a == "--runs") {
            o.runs = static_cast<int>(parse_int(a, value(), 1, 1000));
        } else if (a == "--output" || a == "-o") {
            o.output = value();
        } else if (a == "--device") {
            o.device = value();
        } else if (a == "--threads" || a == "-t") {
            o.threads = static_cast<int>(parse_int(a, value(), 1, 1024));
        } else if (a == "--offload-mode") {
            o.mode = value();
        } else if (a == "--vram-budget") {
            o.budget = size();
        } else if (a == "--streaming-min-vram") {
            o.min_free = size();
            o.have_min_free = true;
        } else if (a == "--margin") {
            o.margin = size();
            o.have_margin = true;
        } else if (a == "--streaming-prefetch") {
            o.prefetch = static_cast<uint32_t>(parse_int(a, value(), 0, 64));
            o.have_prefetch = true;
        } else if (a == "--no-reload-diffusion") {
            o.reload_diffusion = false;
        } else if (a == "--offload-cond-stage") {
            o.overrides.emplace_back(kCondName, oe::Override::offload);
        } else if (a == "--no-offload-cond-stage") {
            o.overrides.emplace_back(kCondName, oe::Override::keep);
        } else if (a == "--offload-diffusion") {
            o.overrides.emplace_back(kDitName, oe::Override::offload);
        } else if (a == "--no-offload-diffusion") {
            o.overrides.emplace_back(kDitName, oe::Override::keep);
        } else if (a == "--offload-vae") {
            o.overrides.emplace_back(kVaeName, oe::Override::offload);
        } else if (a == "--no-offload-vae") {
            o.overrides.emplace_back(kVaeName, oe::Override::keep);
        } else if (a == "--offload-log") {
            o.offload_log = true;
        } else if (a == "--profile") {
            o.profile = true;
        } else if (a == "--trace") {
            o.trace = value();
        } else {
            usage_error("unknown option " + a);
        }
    }
    const char *env = std::getenv("OFFLOAD_ENGINE_PROFILE");
    if (env && *env && std::string(env) != "0") o.profile = true;
    return o;
}

extern "C" void log_to_stderr(int level, const char *message, void *) {
    static const char *names[] = {"trace", "debug", "info", "warn", "error"};
    if (level < OFFLOAD_ENGINE_LOG_INFO) return;
    std::fprintf(stderr, "[offload-engine %s] %s\n", names[std::clamp(level, 0, 4)], message);
}

void print_placements(oe::Pipeline &pipeline, const std::vector<Component *> &components, int run,
                      const std::string &when) {
    for (const Component *c : components) {
        auto info = take(pipeline.component(c->name), "component " + c->name);
        std::printf("  placement[run %d, %s] %-16s %-9s device_bytes=%" PRIu64 " resident_bytes=%" PRIu64
                    " streamed_layers=%" PRIu64 " loads=%" PRIu64 " unloads=%" PRIu64 "\n",
                    run, when.c_str(), c->name.c_str(), placement_name(info.placement), info.device_bytes,
                    info.resident_bytes, info.streamed_layers, info.loads, info.unloads);
    }
}

void print_engine_stats(Component &c) {
    // Waits for a placement the pipeline may still be making on its helper thread; a
    // component taken off the device reports its last placement's counters.
    auto r = c.engine.stats();
    if (!r) {
        std::printf("  engine %-16s (no statistics: %s)\n", c.name.c_str(), r.error().message.c_str());
        return;
    }
    const offload_engine_stats &s = r.value();
    std::printf("  engine %-16s passes=%" PRIu64 " layer_loads=%" PRIu64 " bytes_copied=%" PRIu64
                " copy_ms=%.1f wait_ms=%.1f compute_ms=%.1f prefetch_hits=%" PRIu64 " prefetch_misses=%" PRIu64
                " arena_bytes=%" PRIu64 " arena_peak_bytes=%" PRIu64 "\n",
                c.name.c_str(), s.passes, s.layer_loads, s.bytes_copied, us_to_ms(s.copy_us), us_to_ms(s.wait_us),
                us_to_ms(s.compute_us), s.prefetch_hits, s.prefetch_misses, s.arena_bytes, s.arena_peak_bytes);
}

void write_ppm(const std::string &path, const Image &img) {
    struct Closer {
        void operator()(FILE *file) const { std::fclose(file); }
    };
    std::unique_ptr<FILE, Closer> f(std::fopen(path.c_str(), "wb"));
    if (!f) fail("cannot open " + path + ": " + std::strerror(errno));
    std::fprintf(f.get(), "P6\n%" PRId64 " %" PRId64 "\n255\n", img.w, img.h);
    std::vector<unsigned char> rgb(static_cast<size_t>(img.w * img.h * 3));
    for (int64_t y = 0; y < img.h; ++y) {
        for (int64_t x = 0; x < img.w; ++x) {
            for (int64_t ch = 0; ch < 3; ++ch) {
                float v = img.data[static_cast<size_t>((ch * img.h + y) * img.w + x)];
                float p = std::clamp((std::tanh(v) + 1.0f) * 127.5f, 0.0f, 255.0f);
                rgb[static_cast<size_t>((y * img.w + x) * 3 + ch)] = static_cast<unsigned char>(p + 0.5f);
            }
        }
    }
    if (std::fwrite(rgb.data(), 1, rgb.size(), f.get()) != rgb.size()) fail("cannot write " + path);
}

int run(const Options &opt) {
    oe::OffloadMode mode;
    if (!oe::parse_offload_mode(opt.mode, mode)) {
        usage_error("--offload-mode: unknown mode '" + opt.mode +
                    "' (none, cond_only, cond_diffusion, aggressive, layer_streaming)");
    }
    if (opt.offload_log) offload_engine_log_set_callback(log_to_stderr, nullptr);

    // The model file.
    auto t0 = std::chrono::steady_clock::now();
    bool created = false;
    if (!std::filesystem::exists(opt.model)) {
        write_model(opt.model, HParams::for_scale(opt.scale), kWeightSeed);
        created = true;
    }
    LoadedModel model = load_model(opt.model);
    if (opt.have_scale && model.hp.scale != opt.scale) {
        fail(opt.model + " holds a scale-" + std::to_string(model.hp.scale) + " model, but --scale " +
             std::to_string(opt.scale) + " was asked for; delete the file or use another --model");
    }
    const HParams &hp = model.hp;
    std::printf("model: %s (%s, %.1f ms): scale %u, weight seed %" PRIx64 ", %s of f32 weights\n", opt.model.c_str(),
                created ? "written" : "read", ms_since(t0), hp.scale, model.seed, format_bytes(model.bytes).c_str());

    // Components: one registry and one engine each.
    EngineSettings settings{opt.device, opt.prefetch, opt.threads};
    std::vector<std::string> cond_layers, dit_layers, vae_layers;
    for (int64_t i = 0; i < hp.text_layers; ++i) cond_layers.push_back("encoder.block." + std::to_string(i));
    std::vector<std::pair<bool, size_t>> dit_map;
    for (int64_t i = 0; i < hp.double_blocks; ++i) {
        dit_layers.push_back("double_blocks." + std::to_string(i));
        dit_map.emplace_back(true, static_cast<size_t>(i));
    }
    for (int64_t i = 0; i < hp.single_blocks; ++i) {
        dit_layers.push_back("single_blocks." + std::to_string(i));
        dit_map.emplace_back(false, static_cast<size_t>(i));
    }
    vae_layers = {"decoder.mid.block_1", "decoder.mid.block_2"};
    for (size_t i = 0; i < hp.up_ch.size(); ++i) vae_layers.push_back("decoder.up." + std::to_string(i));

    Component cond = make_component(model, kCondName, oe::Role::conditioner, kCondPrefix, "", "t5", cond_layers,
                                    settings, false);
    Component dit = make_component(model, kDitName, oe::Role::diffusion, kDitPrefix, "", "flux", dit_layers, settings,
                                   !opt.trace.empty());
    Component vae = make_component(model, kVaeName, oe::Role::decoder, kVaePrefix, kVaePattern, "", vae_layers,
                                   settings, false);
    std::vector<Component *> components{&cond, &dit, &vae};

    TextEncoder encoder(cond, hp, text_weights(model));
    Denoiser denoiser(dit, hp, dit_weights(model), dit_map);
    Decoder decoder(vae, hp, vae_weights(model));
    cond.stage_need = encoder.measure_need();
    dit.stage_need = denoiser.measure_need();
    vae.stage_need = decoder.measure_need();

    std::printf("device: %s\n", ggml_backend_name(dit.backend));
    for (const Component *c : components) {
        std::printf("component %-16s role=%s pattern=%s layers=%zu bytes=%" PRIu64 " stage_need=%" PRIu64
                    " (%s + %s)\n",
                    c->name.c_str(), role_name(c->role), c->architecture.c_str(), c->layer_names.size(), c->bytes,
                    c->stage_need, format_bytes(c->bytes).c_str(), format_bytes(c->stage_need).c_str());
    }

    // The pipeline.
    const bool guidance = opt.cfg_scale != 1.0f;
    oe::PipelineOptions po;
    po.mode = mode;
    po.budget_bytes = opt.budget;
    if (opt.have_min_free) po.min_free_bytes = opt.min_free;
    if (opt.have_margin) po.margin_bytes = opt.margin;
    po.prefetch_depth = opt.prefetch;
    po.steps = static_cast<uint32_t>(opt.steps);
    po.passes_per_step = guidance ? 2 : 1;
    po.reload_diffusion = opt.reload_diffusion;
    po.log_moves = opt.offload_log;
    oe::Pipeline pipeline = take(oe::Pipeline::create(po), "cannot create the pipeline");
    for (Component *c : components) {
        check(pipeline.add(c->name, c->role, c->engine), "pipeline: cannot add " + c->name);
        check(pipeline.set_stage_need(c->name, c->stage_need), "pipeline: stage need of " + c->name);
    }
    for (const auto &[name, o] : opt.overrides) check(pipeline.set_override(name, o), "pipeline: override for " + name);
    std::printf("pipeline: mode=%s budget=%s min_free=%s margin=%s prefetch=%u steps=%d passes_per_step=%u "
                "reload_diffusion=%s\n",
                opt.mode.c_str(), opt.budget ? format_bytes(opt.budget).c_str() : "free memory",
                format_bytes(po.min_free_bytes).c_str(), format_bytes(po.margin_bytes).c_str(), po.prefetch_depth,
                opt.steps, po.passes_per_step, opt.reload_diffusion ? "yes" : "no");

    const std::vector<int32_t> prompt_tokens = tokenize(opt.prompt, hp);
    const std::vector<int32_t> negative_tokens = tokenize(opt.negative_prompt, hp);
    uint64_t first_checksum = 0;
    Image image;
    for (int run = 1; run <= opt.runs; ++run) {
        auto run_start = std::chrono::steady_clock::now();
        check(pipeline.run_begin(), "run_begin");
        std::printf("run %d:\n", run);

        // Stage 1: text conditioning.
        Conditioning positive, negative;
        {
            auto t = std::chrono::steady_clock::now();
            auto stage = take(pipeline.stage(kCondName), std::string("stage_begin ") + kCondName);
            const double placed = ms_since(t);
            print_placements(pipeline, components, run, std::string("during ") + kCondName);
            positive.text = encoder.encode(prompt_tokens);
            positive.pooled = mean_pool(positive.text, hp.text_dim, hp.tokens);
            if (guidance) {
                negative.text = encoder.encode(negative_tokens);
                negative.pooled = mean_pool(negative.text, hp.text_dim, hp.tokens);
            }
            const double computed = ms_since(t);
            check(stage.end(), std::string("stage_end ") + kCondName);
            std::printf("  time[run %d] %-16s %8.1f ms", run, kCondName, ms_since(t));
            if (opt.profile) std::printf("  (placement %.1f ms, compute %.1f ms)", placed, computed - placed);
            std::printf("\n");
            print_placements(pipeline, components, run, std::string("after ") + kCondName);
        }

        // Stage 2: sampling. A flow-matching Euler sampler with linearly spaced sigmas.
        Image latent_image{hp.latent_w, hp.latent_h, hp.latent_ch, {}};
        {
            auto t = std::chrono::steady_clock::now();
            auto stage = take(pipeline.stage(kDitName), std::string("stage_begin ") + kDitName);
            const double placed = ms_since(t);
            print_placements(pipeline, components, run, std::string("during ") + kDitName);
            SplitMix64 noise{opt.seed * 0x9e3779b97f4a7c15ull + 7};
            std::vector<float> x(static_cast<size_t>(hp.latent_ch * hp.image_tokens()));
            for (auto &v : x) v = noise.normal();
            for (int i = 0; i < opt.steps; ++i) {
                const float sigma = 1.0f - static_cast<float>(i) / static_cast<float>(opt.steps);
                const float next = 1.0f - static_cast<float>(i + 1) / static_cast<float>(opt.steps);
                std::vector<float> v = denoiser.predict(x, positive, sigma);
                if (guidance) {
                    std::vector<float> u = denoiser.predict(x, negative, sigma);
                    for (size_t k = 0; k < v.size(); ++k) v[k] = u[k] + opt.cfg_scale * (v[k] - u[k]);
                }
                for (size_t k = 0; k < x.size(); ++k) x[k] += (next - sigma) * v[k];
            }
            const double computed = ms_since(t);
            check(stage.end(), std::string("stage_end ") + kDitName);
            std::printf("  time[run %d] %-16s %8.1f ms", run, kDitName, ms_since(t));
            if (opt.profile) std::printf("  (placement %.1f ms, compute %.1f ms)", placed, computed - placed);
            std::printf("\n");
            print_placements(pipeline, components, run, std::string("after ") + kDitName);
            // Tokens are [channels, w*h]; the decoder reads [w, h, channels].
            latent_image.data.resize(x.size());
            for (int64_t tok = 0; tok < hp.image_tokens(); ++tok) {
                for (int64_t ch = 0; ch < hp.latent_ch; ++ch) {
                    latent_image.data[static_cast<size_t>(ch * hp.image_tokens() + tok)] =
                        x[static_cast<size_t>(tok * hp.latent_ch + ch)];
                }
            }
        }

        // Stage 3: decoding.
        {
            auto t = std::chrono::steady_clock::now();
            auto stage = take(pipeline.stage(kVaeName), std::string("stage_begin ") + kVaeName);
            const double placed = ms_since(t);
            print_placements(pipeline, components, run, std::string("during ") + kVaeName);
            image = decoder.decode(latent_image);
            const double computed = ms_since(t);
            check(stage.end(), std::string("stage_end ") + kVaeName);
            std::printf("  time[run %d] %-16s %8.1f ms", run, kVaeName, ms_since(t));
            if (opt.profile) std::printf("  (placement %.1f ms, compute %.1f ms)", placed, computed - placed);
            std::printf("\n");
            print_placements(pipeline, components, run, std::string("after ") + kVaeName);
        }

        check(pipeline.run_end(), "run_end");
        float lo = INFINITY, hi = -INFINITY;
        double mean = 0;
        for (float v : image.data) {
            if (!std::isfinite(v)) fail("the decoded image has a non-finite value");
            lo = std::min(lo, v);
            hi = std::max(hi, v);
            mean += v;
        }
        mean /= static_cast<double>(image.data.size());
        std::printf("  image[run %d] %" PRId64 "x%" PRId64 "x%" PRId64 " min=%.4f max=%.4f mean=%.4f\n", run, image.w,
                    image.h, image.c, lo, hi, mean);
        print_placements(pipeline, components, run, "after run_end");
        const uint64_t sum = fnv1a(image.data.data(), image.data.size() * sizeof(float));
        std::printf("  time[run %d] total            %8.1f ms\n", run, ms_since(run_start));
        std::printf("  run %d checksum: %016" PRIx64 "\n", run, sum);
        if (run == 1) {
            first_checksum = sum;
        } else if (sum != first_checksum) {
            fail("run " + std::to_string(run) + " produced a different image than run 1");
        }
        std::fflush(stdout);
    }

    auto st = take(pipeline.stats(), "pipeline stats");
    std::printf("pipeline stats: budget_bytes=%" PRIu64 " loads=%" PRIu64 " unloads=%" PRIu64 " bytes_loaded=%" PRIu64
                " load_ms=%.1f unload_ms=%.1f prefetched_loads=%" PRIu64 " device_bytes=%" PRIu64
                " peak_device_bytes=%" PRIu64 "\n",
                st.budget_bytes, st.loads, st.unloads, st.bytes_loaded, us_to_ms(st.load_us), us_to_ms(st.unload_us),
                st.prefetched_loads, st.device_bytes, st.peak_device_bytes);
    if (opt.profile) {
        for (Component *c : components) print_engine_stats(*c);
    }
    if (!opt.trace.empty()) {
        // The diffusion model's timeline spans all its placements of every run.
        check(dit.engine.write_trace(opt.trace), "write_trace " + opt.trace);
        std::printf("trace: %s\n", opt.trace.c_str());
    }
    if (!opt.output.empty()) {
        write_ppm(opt.output, image);
        std::printf("image: %s (%" PRId64 "x%" PRId64 ")\n", opt.output.c_str(), image.w, image.h);
    }
    std::printf("checksum: %016" PRIx64 "\n", first_checksum);
    return 0;
}

}  // namespace

int main(int argc, char **argv) {
    const Options opt = parse_args(argc, argv);
    try {
        return run(opt);
    } catch (const Failure &f) {
        std::fflush(stdout);
        if (f.status != 0) {
            std::fprintf(stderr, "error: %s: %s (status %d): %s\n", f.what.c_str(), offload_engine_status_str(f.status),
                         f.status, f.message.c_str());
        } else {
            std::fprintf(stderr, "error: %s\n", f.what.c_str());
        }
        return 1;
    } catch (const std::exception &e) {
        std::fflush(stdout);
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
