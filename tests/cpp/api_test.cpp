// The C++ API (cpp/offload_engine.hpp) end to end: registry, simulated plan, engine,
// the staged executor with lambdas; streamed output equals the fully resident one. With a
// llama.cpp model as argv[1], the drop-in's two calls (cpp/offload_engine_llama.hpp).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml.h"
#include "offload_engine.hpp"
#include "offload_engine_llama.hpp"

namespace oe = offload_engine;

static int failures = 0;
#define EXPECT(cond)                                                        \
    do {                                                                    \
        if (!(cond)) {                                                      \
            std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, #cond); \
            ++failures;                                                     \
        }                                                                   \
    } while (0)

struct Model {
    static constexpr int kLayers = 6;
    static constexpr int64_t kHidden = 32;
    static constexpr int64_t kTokens = 3;
    ggml_context *ctx = nullptr;
    ggml_backend_buffer_t buffer = nullptr;
    ggml_tensor *weights[kLayers] = {};
    ggml_tensor *head = nullptr;
    ggml_tensor *input = nullptr;

    Model() {
        ggml_init_params params{64 * ggml_tensor_overhead(), nullptr, true};
        ctx = ggml_init(params);
        for (int i = 0; i < kLayers; ++i) {
            weights[i] = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, kHidden, kHidden);
            ggml_format_name(weights[i], "blk.%d.ffn_up.weight", i);
        }
        head = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, kHidden, 8);
        ggml_set_name(head, "output.weight");
        buffer = ggml_backend_alloc_ctx_tensors_from_buft(ctx, ggml_backend_cpu_buffer_type());
        uint32_t state = 12345;
        for (ggml_tensor *t = ggml_get_first_tensor(ctx); t; t = ggml_get_next_tensor(ctx, t)) {
            auto *data = static_cast<float *>(t->data);
            for (int64_t j = 0; j < ggml_nelements(t); ++j) {
                state = state * 1664525u + 1013904223u;
                data[j] = (static_cast<float>(state >> 8) / 16777216.0f - 0.5f) * 0.3f;
            }
        }
    }
    ~Model() {
        ggml_backend_buffer_free(buffer);
        ggml_free(ctx);
    }

    oe::StagedModel staged() {
        oe::StagedModel m;
        m.layer_count = kLayers;
        m.activation_ne[0] = kHidden;
        m.activation_ne[1] = kTokens;
        m.build_input = [this](ggml_context *c) {
            input = ggml_new_tensor_2d(c, GGML_TYPE_F32, kHidden, kTokens);
            ggml_set_input(input);
            return ggml_scale(c, input, 1.0f);
        };
        m.set_inputs = [this]() {
            std::vector<float> x(kHidden * kTokens);
            for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 7) * 0.25f - 0.5f;
            ggml_backend_tensor_set(input, x.data(), 0, x.size() * sizeof(float));
            return true;
        };
        m.build_layer = [this](ggml_context *c, uint64_t layer, ggml_tensor *x) {
            return ggml_add(c, x, ggml_gelu(c, ggml_mul_mat(c, weights[layer], x)));
        };
        m.build_output = [this](ggml_context *c, ggml_tensor *x) { return ggml_mul_mat(c, head, x); };
        return m;
    }
};


// Each tensor of `model` at a multiple of 4 KiB of `path`, in context order: where a host with
// its own loader would leave the weights; returns their offsets.
static std::vector<uint64_t> write_weights(Model &model, const std::string &path) {
    std::vector<uint64_t> offsets;
    FILE *f = std::fopen(path.c_str(), "wb");
    EXPECT(f != nullptr);
    if (f == nullptr) return offsets;
    uint64_t at = 0;
    for (ggml_tensor *t = ggml_get_first_tensor(model.ctx); t; t = ggml_get_next_tensor(model.ctx, t)) {
        std::vector<uint8_t> block((ggml_nbytes(t) + 4095) / 4096 * 4096, 0);
        std::memcpy(block.data(), t->data, ggml_nbytes(t));
        EXPECT(std::fwrite(block.data(), 1, block.size(), f) == block.size());
        offsets.push_back(at);
        at += block.size();
    }
    EXPECT(std::fclose(f) == 0);
    return offsets;
}

// `weights_file`: the tensors are registered from there (write_weights), not from memory.
static std::vector<uint8_t> run(Model &model, uint64_t budget, uint32_t depth, int expected_mode,
                                const std::string *weights_file = nullptr, const std::vector<uint64_t> &offsets = {}) {
    auto registry = oe::Registry::create();
    EXPECT(registry.ok());
    if (weights_file == nullptr) {
        auto added = registry->add_context(model.ctx);
        EXPECT(added.ok() && *added == Model::kLayers + 1);
    } else {
        size_t i = 0;
        for (ggml_tensor *t = ggml_get_first_tensor(model.ctx); t; t = ggml_get_next_tensor(model.ctx, t), ++i) {
            auto added = registry->add_tensor_from_file(t, nullptr, *weights_file, i < offsets.size() ? offsets[i] : 0);
            if (!added.ok()) std::fprintf(stderr, "add_tensor_from_file: %s\n", added.error().message.c_str());
            EXPECT(i < offsets.size() && added.ok());
        }
        auto outside = registry->add_tensor_from_file(model.head, "extra", *weights_file, offsets.back() + 4096);
        EXPECT(!outside.ok() && outside.error().status == oe::Status::corrupt_file);
    }
    auto arch = registry->architecture();
    EXPECT(arch.ok() && *arch == "llama_gguf");
    auto engine = oe::Engine::create(*registry, oe::EngineOptions{"CPU", budget, depth, 1, false});
    EXPECT(engine.ok());
    if (!engine) return {};
    oe::PlanOptions options;
    options.prefetch_depth = depth;
    auto plan = engine->prepare(options);
    EXPECT(plan.ok());
    if (!plan) return {};
    EXPECT(plan->mode() == expected_mode);
    EXPECT(!plan->message().empty());
    auto staged = model.staged();
    std::vector<uint8_t> out(8 * Model::kTokens * sizeof(float));
    for (int pass = 0; pass < 2; ++pass) {
        auto written = engine->run_pass(staged, out);
        EXPECT(written.ok() && *written == out.size());
    }
    auto stats = engine->stats();
    EXPECT(stats.ok() && stats->passes == 2);
    return out;
}

// Two components through a pipeline that has room for one at a time: each leaves for the
// other (cond_diffusion), outputs equal the engine-free ones, and the RAII stage guard closes
// each stage.
static void pipeline_checks(Model &cond_model, Model &dit_model, const std::vector<uint8_t> &expected) {
    std::vector<oe::Registry> registries;
    std::vector<oe::Engine> engines;
    for (Model *m : {&cond_model, &dit_model}) {
        auto registry = oe::Registry::create();
        EXPECT(registry.ok() && registry->add_context(m->ctx).ok());
        auto engine = oe::Engine::create(*registry, oe::EngineOptions{"CPU", 0, 1, 1, false});
        EXPECT(engine.ok());
        if (!engine) return;
        engines.push_back(std::move(*engine));
    }
    oe::OffloadMode mode;
    EXPECT(oe::parse_offload_mode("cond_only", mode) && mode == oe::OffloadMode::cond_only);
    EXPECT(!oe::parse_offload_mode("sometimes", mode));
    const uint64_t layer_bytes = Model::kHidden * Model::kHidden * sizeof(float);
    oe::PipelineOptions options;
    options.mode = oe::OffloadMode::cond_diffusion;
    options.min_free_bytes = 0;
    options.margin_bytes = 0;
    // One model (six layers and the head) fits, two do not.
    options.budget_bytes = (Model::kLayers * layer_bytes + 8 * Model::kHidden * sizeof(float)) * 3 / 2;
    auto pipeline = oe::Pipeline::create(options);
    EXPECT(pipeline.ok());
    if (!pipeline) return;
    EXPECT(pipeline->add("cond", oe::Role::conditioner, engines[0]).ok());
    EXPECT(pipeline->add("dit", oe::Role::diffusion, engines[1]).ok());
    auto duplicate = pipeline->add("dit", oe::Role::diffusion, engines[0]);
    EXPECT(!duplicate.ok() && duplicate.error().status == oe::Status::already_exists);
    Model *models[2] = {&cond_model, &dit_model};
    const char *names[2] = {"cond", "dit"};
    for (int run = 0; run < 2; ++run) {
        EXPECT(pipeline->run_begin().ok());
        for (int i = 0; i < 2; ++i) {
            auto stage = pipeline->stage(names[i]);
            EXPECT(stage.ok());
            if (!stage) return;
            auto staged = models[i]->staged();
            std::vector<uint8_t> out(expected.size());
            auto written = engines[i].run_pass(staged, out);
            EXPECT(written.ok() && out == expected);
            EXPECT(stage->end().ok());
        }
        EXPECT(pipeline->run_end().ok());
    }
    // A weight written back through the engine (a LoRA merge would change it): same outputs.
    std::vector<float> w(Model::kHidden * Model::kHidden);
    ggml_backend_tensor_get(dit_model.weights[0], w.data(), 0, w.size() * sizeof(float));
    EXPECT(engines[1].tensor_set("blk.0.ffn_up.weight", w).ok());
    auto too_far = engines[1].tensor_set("blk.0.ffn_up.weight", w, 8);
    EXPECT(!too_far.ok() && too_far.error().status == oe::Status::invalid_argument);
    EXPECT(pipeline->run_begin().ok());
    for (int i = 0; i < 2; ++i) {
        auto stage = pipeline->stage(names[i]);
        auto staged = models[i]->staged();
        std::vector<uint8_t> out(expected.size());
        auto written = engines[i].run_pass(staged, out);
        EXPECT(stage.ok() && written.ok() && out == expected);
    }
    EXPECT(pipeline->run_end().ok());
    auto cond = pipeline->component("cond");
    auto dit = pipeline->component("dit");
    EXPECT(cond.ok() && cond->unloads == 3 && cond->role == oe::Role::conditioner);
    auto stats = pipeline->stats();
    EXPECT(stats.ok() && stats->unloads == 5 && stats->peak_device_bytes <= options.budget_bytes);
    EXPECT(dit.ok() && dit->placement == OFFLOAD_ENGINE_PLACEMENT_RESIDENT && dit->unloads == 2);
    auto missing = pipeline->stage_begin("vae");
    EXPECT(!missing.ok() && missing.error().status == oe::Status::not_found);
}

// prepare() and attach() on a real model; a streamed decode matches an unmodified one.
static void llama_checks(const char *path) {
    oe::LlamaOptions options;
    options.device = "CPU";
    options.vram_budget = 100ull << 20;  // below the global tensors alone
    options.compute_reserve = 0;
    options.kv_cache = 0;
    llama_model_params mparams = llama_model_default_params();
    auto refused = oe::LlamaOffload::prepare(path, mparams, options);
    EXPECT(!refused.ok() && refused.error().status == oe::Status::insufficient_memory);
    EXPECT(mparams.tensor_buft_overrides == nullptr);  // untouched on failure
    auto missing = oe::LlamaOffload::prepare("/nonexistent/model.gguf", mparams, options);
    EXPECT(!missing.ok() && missing.error().status == oe::Status::io);

    auto decode_once = [&](bool with_engine, std::vector<float> &logits) {
        llama_model_params mp = llama_model_default_params();
        mp.use_extra_bufts = false;
        mp.lazy_mode = LLAMA_LAZY_MODE_OFF;
        std::unique_ptr<oe::LlamaOffload> owned;
        if (with_engine) {
            options.vram_budget = 200ull << 20;  // about half the layers stream
            auto prepared = oe::LlamaOffload::prepare(path, mp, options);
            EXPECT(prepared.ok());
            if (!prepared.ok()) return;
            EXPECT(mp.tensor_buft_overrides != nullptr && !mp.use_extra_bufts);
            owned = std::make_unique<oe::LlamaOffload>(std::move(*prepared));
        }
        llama_model *model = llama_model_load_from_file(path, mp);
        EXPECT(model != nullptr);
        if (model == nullptr) return;
        llama_context_params cp = llama_context_default_params();
        cp.n_ctx = 64;
        cp.n_batch = 64;
        cp.n_ubatch = 64;
        cp.n_threads = 2;
        cp.n_threads_batch = 2;
        if (owned) {
            auto plan = owned->attach(model, cp);
            EXPECT(plan.ok() && plan->mode() == OFFLOAD_ENGINE_MODE_STREAMING);
            EXPECT(cp.cb_eval == offload_engine_llama_eval && cp.cb_eval_user_data != nullptr);
            EXPECT(!owned->attach(model, cp).ok());  // adopt twice
        }
        llama_context *ctx = llama_init_from_model(model, cp);
        EXPECT(ctx != nullptr);
        const llama_vocab *vocab = llama_model_get_vocab(model);
        std::vector<llama_token> tokens(16);
        int n = llama_tokenize(vocab, "Hello", 5, tokens.data(), 16, true, true);
        EXPECT(n > 0 && llama_decode(ctx, llama_batch_get_one(tokens.data(), n)) == 0);
        const float *out = llama_get_logits_ith(ctx, -1);
        logits.assign(out, out + llama_vocab_n_tokens(vocab));
        if (owned) {
            EXPECT(owned->status().ok());
            auto stats = owned->stats();
            EXPECT(stats.ok() && stats->passes == 1 && stats->streamed_bytes > 0);
        }
        llama_free(ctx);
        if (owned) {
            EXPECT(owned->detach().ok());
            EXPECT(!owned->detach().ok());  // not adopted any more: a status, nothing freed twice
        }
        llama_model_free(model);
    };
    std::vector<float> reference, streamed;
    decode_once(false, reference);
    decode_once(true, streamed);
    EXPECT(!reference.empty() && reference.size() == streamed.size());
    EXPECT(std::memcmp(reference.data(), streamed.data(), reference.size() * sizeof(float)) == 0);
}

int main(int argc, char **argv) {
    Model model;
    const uint64_t layer_bytes = Model::kHidden * Model::kHidden * sizeof(float);
    auto resident = run(model, 64 * layer_bytes, 1, OFFLOAD_ENGINE_MODE_FULL);
    auto streamed = run(model, 5 * layer_bytes, 1, OFFLOAD_ENGINE_MODE_STREAMING);
    auto deep = run(model, 6 * layer_bytes, 3, OFFLOAD_ENGINE_MODE_STREAMING);
    EXPECT(!resident.empty() && resident == streamed && resident == deep);
    {
        // The same weights left in a file: only the file holds them, and the output is the same.
        const char *dir = std::getenv("TMPDIR");
        std::string path = std::string(dir != nullptr ? dir : "/tmp") + "/offload-engine-cpp-weights.bin";
        auto offsets = write_weights(model, path);
        Model blank;
        for (ggml_tensor *t = ggml_get_first_tensor(blank.ctx); t; t = ggml_get_next_tensor(blank.ctx, t))
            std::memset(t->data, 0, ggml_nbytes(t));
        auto from_file = run(blank, 5 * layer_bytes, 1, OFFLOAD_ENGINE_MODE_STREAMING, &path, offsets);
        EXPECT(!from_file.empty() && from_file == resident);
        std::remove(path.c_str());
    }
    Model second;
    pipeline_checks(model, second, resident);

    // Errors come back as values with the engine's message, never as exceptions or aborts.
    auto registry = oe::Registry::create("blocks\\.((");
    EXPECT(!registry.ok() && registry.error().status == oe::Status::invalid_argument);
    EXPECT(!registry.ok() && !registry.error().message.empty());
    auto ok_registry = oe::Registry::create();
    auto missing = ok_registry->add_gguf("/nonexistent/model.gguf");
    EXPECT(!missing.ok() && missing.error().status == oe::Status::io);
    auto tiny = oe::Registry::create();
    tiny->add_context(model.ctx);
    oe::PlanOptions too_small;
    too_small.free_bytes = 1024;
    auto refused = oe::Plan::simulate(*tiny, too_small);
    EXPECT(!refused.ok() && refused.error().status == oe::Status::insufficient_memory);

    // One size syntax for every tool.
    EXPECT(oe::parse_size("12GB").ok() && *oe::parse_size("12GB") == 12000000000ull);
    EXPECT(oe::parse_size("12GiB").ok() && *oe::parse_size("12GiB") == (12ull << 30));
    EXPECT(!oe::parse_size("twelve").ok());

    if (argc > 1) llama_checks(argv[1]);

    if (failures == 0) std::printf("C++ API: all checks passed\n");
    return failures == 0 ? 0 : 1;
}
