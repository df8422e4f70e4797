// offload_engine_llama.hpp: the llama.cpp drop-in for C++ hosts, in two calls.
//
//     llama_model_params mparams = llama_model_default_params();
//     auto offload = offload_engine::LlamaOffload::prepare(path, mparams, options);  // 1
//     if (!offload) { /* offload.error().message: e.g. the budget is too small */ }
//     llama_model *model = llama_model_load_from_file(path.c_str(), mparams);
//     llama_context_params cparams = llama_context_default_params();
//     auto plan = offload->attach(model, cparams);                                   // 2
//     llama_context *ctx = llama_init_from_model(model, cparams);
//     ... llama_decode(ctx, batch); if (!offload->status()) { ... } ...
//     llama_free(ctx);
//     offload->detach();          // or let the destructor do it
//     llama_model_free(model);
//
// prepare() plans from the file and fills the model parameters (the buffer-type override;
// no CPU repacking, no lazy tensors, so the weights are in ggml's plain layout). attach()
// adopts the loaded model and fills the context parameters (cb_eval and its user data),
// chaining an eval callback the host had set there. For more contexts on the same model,
// call add_context(cparams) for each. Lifetimes and threads are those of the C header.
#ifndef OFFLOAD_ENGINE_LLAMA_HPP
#define OFFLOAD_ENGINE_LLAMA_HPP

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "llama.h"
#include "offload_engine.hpp"

namespace offload_engine {

struct LlamaOptions {
    std::string device;                    // empty: first GPU, else CPU
    uint64_t vram_budget = 0;              // 0: the device's free memory, measured
    uint32_t prefetch_depth = 1;
    uint64_t compute_reserve = UINT64_MAX; // llama.cpp's compute buffers; UINT64_MAX: estimate
    uint64_t kv_cache = UINT64_MAX;        // llama.cpp's KV cache; UINT64_MAX: estimate
    uint32_t n_ctx = 4096;                 // the contexts' n_ctx and n_ubatch, for the estimates
    uint32_t n_ubatch = 512;
    bool file_backed = false;              // stream every layer from the file (the disk tier)
    std::string layer_output_pattern;      // empty: ^l_out-(\d+)$
    bool trace = false;
};

class LlamaOffload {
public:
    // Call 1, before llama_model_load_from_file.
    static Result<LlamaOffload> prepare(const std::string &model_path, llama_model_params &params,
                                        const LlamaOptions &options = {}) {
        offload_engine_llama_params p;
        offload_engine_llama_params_init(&p);
        p.device = options.device.empty() ? nullptr : options.device.c_str();
        p.budget_bytes = options.vram_budget;
        p.prefetch_depth = options.prefetch_depth;
        p.compute_reserve_bytes = options.compute_reserve;
        p.kv_cache_bytes = options.kv_cache;
        p.n_ctx = options.n_ctx;
        p.n_ubatch = options.n_ubatch;
        p.file_backed = options.file_backed ? 1 : 0;
        p.layer_output_pattern = options.layer_output_pattern.empty() ? nullptr : options.layer_output_pattern.c_str();
        p.trace = options.trace ? 1 : 0;
        offload_engine_llama *raw = nullptr;
        if (int s = offload_engine_llama_new(&p, model_path.c_str(), &raw)) return detail::error_from(s);
        LlamaOffload offload(raw);
        ggml_backend_buffer_type *buft = nullptr;
        if (int s = offload_engine_llama_buffer_type(raw, &buft)) return detail::error_from(s);
        // Heap-held: llama.cpp reads the list during the load, after this object may move.
        offload.overrides_ = std::make_unique<std::array<llama_model_tensor_buft_override, 2>>();
        (*offload.overrides_)[0] = {".*", buft};
        (*offload.overrides_)[1] = {nullptr, nullptr};
        params.tensor_buft_overrides = offload.overrides_->data();
        params.use_extra_bufts = false;
        params.lazy_mode = LLAMA_LAZY_MODE_OFF;
        return offload;
    }

    // Call 2, after llama_model_load_from_file and before llama_init_from_model: places the
    // model and fills `cparams` for the first context. Returns the plan carried out.
    Result<Plan> attach(llama_model *model, llama_context_params &cparams) {
        if (model == nullptr) return Error{Status::null_pointer, "llama.cpp did not load the model"};
        offload_engine_plan *raw = nullptr;
        if (int s = offload_engine_llama_adopt(hook_.get(), &raw)) return detail::error_from(s);
        auto plan = Plan::adopt(raw);
        if (!plan) return plan.error();
        if (auto added = add_context(cparams); !added) return added.error();
        return plan;
    }

    // Fills `cparams` for one more context on the model (one decoding at a time).
    Status_ add_context(llama_context_params &cparams) {
        offload_engine_llama_context *raw = nullptr;
        if (int s = offload_engine_llama_context_new(hook_.get(), cparams.cb_eval, cparams.cb_eval_user_data, &raw))
            return detail::error_from(s);
        contexts_.emplace_back(raw);
        cparams.cb_eval = offload_engine_llama_eval;
        cparams.cb_eval_user_data = raw;
        return Unit{};
    }

    // The first error any context's callback met (check after llama_decode).
    Status_ status() const {
        for (const auto &context : contexts_) {
            if (int s = offload_engine_llama_context_status(context.get())) return detail::error_from(s);
        }
        return Unit{};
    }

    Result<offload_engine_stats> stats() const {
        offload_engine_stats s{};
        s.size = sizeof s;
        if (int st = offload_engine_llama_stats(hook_.get(), &s)) return detail::error_from(st);
        return s;
    }

    Result<Plan> plan() const {
        offload_engine_plan *raw = nullptr;
        if (int s = offload_engine_llama_plan(hook_.get(), &raw)) return detail::error_from(s);
        return Plan::adopt(raw);
    }

    Status_ write_trace(const std::string &path) const {
        return detail::check(offload_engine_llama_trace_write(hook_.get(), path.c_str()));
    }

    // After llama_free of every context, before llama_model_free.
    Status_ detach() {
        contexts_.clear();
        return detail::check(offload_engine_llama_detach(hook_.get()));
    }

    ~LlamaOffload() {
        if (hook_) {
            contexts_.clear();
            offload_engine_llama_detach(hook_.get());  // not adopted (or already detached): a status, ignored
        }
    }
    LlamaOffload(LlamaOffload &&) = default;
    LlamaOffload &operator=(LlamaOffload &&) = default;

private:
    explicit LlamaOffload(offload_engine_llama *raw) : hook_(raw) {}
    using Hook = std::unique_ptr<offload_engine_llama, detail::Deleter<offload_engine_llama, offload_engine_llama_free>>;
    using Context = std::unique_ptr<offload_engine_llama_context,
                                    detail::Deleter<offload_engine_llama_context, offload_engine_llama_context_free>>;
    // Declared first so it is destroyed last.
    Hook hook_;
    std::unique_ptr<std::array<llama_model_tensor_buft_override, 2>> overrides_;
    std::vector<Context> contexts_;
};

}  // namespace offload_engine

#endif  // OFFLOAD_ENGINE_LLAMA_HPP
