// offload_engine_sd.hpp: offload-engine behind stable-diffusion.cpp's graph-cut segments.
//
// Included by the patched src/ggml_extend.hpp (sd.patch). A runner whose graph has cut
// markers builds one SegmentStreamer from its first plan: every weight one segment reads
// goes into that segment's layer (offload_engine_registry_assign); weights several segments
// read are global, always resident. The engine plans the layers under the runner's budget
// (--max-vram), places the global group and the resident layers once, and streams the others
// through a ring of slots, copied ahead while the previous segment computes. sd.cpp's own
// per-segment upload (a fresh device buffer and synchronous copies of every weight, every
// pass) is skipped while the engine has placed the weights.
#ifndef OFFLOAD_ENGINE_SD_HPP
#define OFFLOAD_ENGINE_SD_HPP

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "ggml-backend.h"
#include "ggml_graph_cut.h"
#include "offload_engine.h"

namespace offload_engine_sd {

// What the command line asked for (sd_set_layer_streaming); process-wide, so sd.cpp's public
// parameter struct (and the bindings that mirror it) keep their layout.
struct Config {
    bool stream_layers     = false;
    uint32_t prefetch_depth = 1;
    int64_t resident_layers = -1;  // a maximum; -1: as many as the budget holds (auto)
};

inline Config& config() {
    static Config c;
    return c;
}

// The first budget refusal of the process ("<runner>: <planner message>"), empty while none.
// sd.cpp's callers assert on a failed compute, so the command line needs it to stop cleanly.
inline std::string& refusal() {
    static std::string message;
    return message;
}

class SegmentStreamer {
public:
    using Plan    = sd::ggml_graph_cut::Plan;
    using Segment = sd::ggml_graph_cut::Segment;

    // An engine over the weights `plan`'s segments read, on `backend`'s device, within
    // `budget` bytes (0: the device's free memory). nullptr with `*error` set when the
    // budget cannot hold it (the planner's message) or the library refuses.
    static std::unique_ptr<SegmentStreamer> create(ggml_cgraph* gf,
                                                   const Plan& plan,
                                                   ggml_backend_t backend,
                                                   uint64_t budget,
                                                   const std::string& desc,
                                                   std::string* error) {
        std::unique_ptr<SegmentStreamer> s(new SegmentStreamer(desc));
        if (!s->build(gf, plan, backend, budget, error)) {
            return nullptr;
        }
        return s;
    }

    ~SegmentStreamer() {
        if (engine_ != nullptr) {
            summarize();
            offload_engine_engine_free(engine_);  // every weight points home again
        }
    }

    bool all_resident() const { return streamed_ == 0; }

    bool begin_pass() {
        return ok(offload_engine_engine_pass_begin(engine_), "pass_begin");
    }

    bool end_pass() {
        if (open_count_ > 0 && !end_segment()) {
            return false;
        }
        return ok(offload_engine_engine_pass_end(engine_), "pass_end");
    }

    // The whole graph in one piece (every layer resident).
    bool begin_all() { return begin_pass() && open(0, layers_); }
    bool end_all() { return end_pass(); }

    // Opens the layers whose weights `segment` reads (a merged segment spans several); a
    // segment that reads only global weights opens none.
    bool begin_segment(ggml_cgraph* gf, const Segment& segment) {
        int64_t first = -1, last = -1;
        for (ggml_tensor* t : sd::ggml_graph_cut::param_tensors(gf, segment)) {
            auto it = layer_of_.find(t);
            if (it == layer_of_.end()) {
                std::fprintf(stderr, "offload-engine: %s: a weight of segment %s is unknown to the engine\n",
                             desc_.c_str(), segment.group_name.c_str());
                return false;
            }
            if (it->second < 0) {
                continue;
            }
            first = first < 0 ? it->second : std::min(first, it->second);
            last  = std::max(last, it->second);
        }
        return first < 0 || open(static_cast<uint64_t>(first), static_cast<uint64_t>(last - first + 1));
    }

    bool end_segment() {
        if (open_count_ == 0) {
            return true;
        }
        uint64_t first = open_first_, count = open_count_;
        open_count_    = 0;
        return ok(offload_engine_engine_layers_end(engine_, first, count), "layers_end");
    }

    // After a failure: nothing half open, every streamed weight home.
    void abandon() {
        open_count_ = 0;
        offload_engine_engine_offload_all(engine_);
    }

private:
    explicit SegmentStreamer(std::string desc) : desc_(std::move(desc)) {}

    bool ok(int status, const char* what) {
        if (status == OFFLOAD_ENGINE_OK) {
            return true;
        }
        std::fprintf(stderr, "offload-engine: %s: %s failed: %s\n", desc_.c_str(), what, offload_engine_last_error());
        return false;
    }

    bool open(uint64_t first, uint64_t count) {
        if (count == 0) {
            return true;
        }
        if (!ok(offload_engine_engine_layers_begin(engine_, first, count), "layers_begin")) {
            return false;
        }
        open_first_ = first;
        open_count_ = count;
        return true;
    }

    bool build(ggml_cgraph* gf, const Plan& plan, ggml_backend_t backend, uint64_t budget, std::string* error) {
        // Which segment reads each weight: one (its layer) or several (global).
        std::unordered_map<const ggml_tensor*, int64_t> owner;
        std::vector<ggml_tensor*> order;
        for (size_t s = 0; s < plan.segments.size(); ++s) {
            for (ggml_tensor* t : sd::ggml_graph_cut::param_tensors(gf, plan.segments[s])) {
                auto inserted = owner.emplace(t, static_cast<int64_t>(s));
                if (inserted.second) {
                    order.push_back(t);
                } else if (inserted.first->second != static_cast<int64_t>(s)) {
                    inserted.first->second = -1;
                }
            }
        }
        offload_engine_registry_params rp;
        offload_engine_registry_params_init(&rp);
        offload_engine_registry* registry = nullptr;
        if (!ok(offload_engine_registry_new(&rp, &registry), "registry_new")) {
            *error = offload_engine_last_error();
            return false;
        }
        std::unordered_map<uint64_t, const ggml_tensor*> by_id;
        for (size_t i = 0; i < order.size(); ++i) {
            ggml_tensor* t = order[i];
            // sd.cpp's weights carry no ggml names; the engine needs unique ones.
            char name[48];
            std::snprintf(name, sizeof name, "%s.param.%zu", desc_.c_str(), i);
            uint64_t id = 0;
            if (!ok(offload_engine_registry_add_tensor(registry, t, name, &id), "add_tensor") ||
                (owner[t] >= 0 && !ok(offload_engine_registry_assign(registry, id, static_cast<uint32_t>(owner[t])), "assign"))) {
                *error = offload_engine_last_error();
                offload_engine_registry_free(registry);
                return false;
            }
        }
        // Engine layers are the segments that own weights, in segment order: "layer.<segment>".
        size_t layers = 0;
        offload_engine_registry_layer_count(registry, &layers);
        std::unordered_map<int64_t, int64_t> layer_of_segment;
        for (uint64_t l = 0; l < layers; ++l) {
            offload_engine_layer_info info;
            info.size = sizeof info;
            if (ok(offload_engine_registry_layer_info(registry, l, &info), "layer_info")) {
                layer_of_segment[std::atoll(info.name + 6)] = static_cast<int64_t>(l);
            }
        }
        for (ggml_tensor* t : order) {
            layer_of_[t] = owner[t] >= 0 ? layer_of_segment[owner[t]] : -1;
        }
        layers_ = layers;
        offload_engine_registry_global_bytes(registry, &global_bytes_);
        uint64_t total = 0;
        offload_engine_registry_total_bytes(registry, &total);
        layer_bytes_ = total - global_bytes_;

        offload_engine_engine_params ep;
        offload_engine_engine_params_init(&ep);
        ep.device         = ggml_backend_dev_name(ggml_backend_get_device(backend));
        ep.budget_bytes   = budget;
        ep.prefetch_depth = config().prefetch_depth;
        int status        = offload_engine_engine_new(&ep, registry, &engine_);
        offload_engine_registry_free(registry);  // the engine keeps its own copy
        if (!ok(status, "engine_new")) {
            *error  = offload_engine_last_error();
            engine_ = nullptr;
            return false;
        }
        // The slots are freed after sd.cpp's kernels ran on its own backend.
        if (!ok(offload_engine_engine_set_compute_backend(engine_, backend), "set_compute_backend")) {
            *error = offload_engine_last_error();
            return false;
        }
        // Besides the weights: the largest segment's compute buffer, and the activations kept
        // between segments (old and new cache copies live together for a moment).
        size_t compute = 0, activations = 0;
        for (const auto& seg : plan.segments) {
            compute     = std::max(compute, seg.compute_buffer_size);
            activations = std::max(activations, seg.input_previous_cut_bytes + seg.output_bytes);
        }
        offload_engine_plan_params pp;
        offload_engine_plan_params_init(&pp);
        pp.compute_reserve_bytes = compute + 2 * activations;
        pp.passes_per_step       = 2;  // classifier-free guidance; only the prediction uses it
        if (config().resident_layers >= 0) {
            pp.max_resident_layers = static_cast<uint32_t>(config().resident_layers);
        }
        offload_engine_plan* plan_handle = nullptr;
        if (offload_engine_engine_prepare(engine_, &pp, &plan_handle) != OFFLOAD_ENGINE_OK) {
            *error = std::string(offload_engine_last_error()) +
                     " -- with sd-cli: a larger --max-vram, --layer-prefetch-depth 0 (one slot), or "
                     "--resident-layers 0";
            offload_engine_engine_free(engine_);
            engine_ = nullptr;
            return false;
        }
        offload_engine_plan_summary summary;
        summary.size = sizeof summary;
        offload_engine_plan_get_summary(plan_handle, &summary);
        resident_ = summary.resident_layer_count;
        streamed_ = summary.streamed_layer_count;
        std::fprintf(stderr,
                     "offload-engine: %s: %zu segments, %zu layers, %zu weights; global %" PRIu64
                     " B, layers %" PRIu64 " B (largest %" PRIu64 " B), reserve %" PRIu64 " B; %s\n",
                     desc_.c_str(), plan.segments.size(), layers, order.size(), global_bytes_, layer_bytes_,
                     summary.layer_bytes_max, static_cast<uint64_t>(pp.compute_reserve_bytes),
                     offload_engine_plan_message(plan_handle));
        offload_engine_plan_free(plan_handle);
        return true;
    }

    // One line per sampling run (the runner's weights are freed after it): what stayed, what
    // streamed, what moved, how well the copies were ahead.
    void summarize() {
        offload_engine_stats s;
        s.size = sizeof s;
        if (offload_engine_engine_stats(engine_, &s) != OFFLOAD_ENGINE_OK) {
            return;
        }
        std::fprintf(stderr,
                     "offload-engine: %s: %" PRIu64 " resident, %" PRIu64 " streamed layers; %" PRIu64
                     " passes; %" PRIu64 " bytes moved (%" PRIu64 " placed once, %" PRIu64
                     " streamed); prefetch hits %" PRIu64 " of %" PRIu64 " loads; waited %.1f ms\n",
                     desc_.c_str(), resident_, streamed_, s.passes, s.bytes_copied, s.placement_bytes,
                     s.streamed_bytes, s.prefetch_hits, s.layer_loads, s.wait_us / 1000.0);
    }

    std::string desc_;
    offload_engine_engine* engine_ = nullptr;
    std::unordered_map<const ggml_tensor*, int64_t> layer_of_;  // engine layer; -1: global
    uint64_t layers_   = 0;
    uint64_t global_bytes_ = 0;
    uint64_t layer_bytes_  = 0;
    uint64_t resident_ = 0;
    uint64_t streamed_ = 0;
    uint64_t open_first_ = 0;
    uint64_t open_count_ = 0;
};

}  // namespace offload_engine_sd

#endif  // OFFLOAD_ENGINE_SD_HPP
