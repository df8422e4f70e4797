// offload_engine_sd.hpp: offload-engine behind stable-diffusion.cpp's graph-cut segments.
//
// Included by the patched src/ggml_extend.hpp (sd.patch). A runner whose graph has cut
// markers builds one SegmentStreamer from its first plan: every weight one segment reads
// goes into that segment's layer (offload_engine_registry_assign); weights several segments
// read are global, always resident. Every runner's engine is a component of one pipeline
// (layer_streaming mode) under one budget (--max-vram), in the order the runners first
// compute (text encoders, diffusion model, VAE). A runner's computes are its stage: the
// pipeline places its engine (resident, or streaming the layers that do not fit through a
// ring of slots, copied ahead while the previous segment computes), moving a text encoder or
// diffusion model that is no longer running off the device when the room is needed. sd.cpp's
// own per-segment upload (a fresh device buffer and synchronous copies of every weight,
// every pass) is skipped while the engine has placed the weights.
#ifndef OFFLOAD_ENGINE_SD_HPP
#define OFFLOAD_ENGINE_SD_HPP

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
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
    bool from_file          = false;  // --stream-from-file: the model file is the weights' home
};

inline Config& config() {
    static Config c;
    return c;
}

// The disk tier (--stream-from-file). sd.cpp's loader leaves each weight that its file holds
// as ggml lays it out (same type, no conversion, not in a zip) where it is, and records it
// here instead of reading it: its host memory is allocated but never touched. An engine that
// registers it reads it from the file whenever it places it, so no host copy exists; what no
// engine holds (a runner without cut markers, a LoRA applied at run time, the weights a LoRA
// is merged into) is read into its memory before the first compute that needs it.
class FileHomes {
public:
    struct Home {
        std::string path;
        uint64_t offset = 0;
        int holders     = 0;  // live engines that registered it from the file
    };

    static FileHomes& get() {
        static FileHomes homes;
        return homes;
    }

    static bool wanted() { return config().stream_layers && config().from_file; }

    // The loader's (from several threads): `t`'s bytes are at `offset` of `path`.
    void defer(const ggml_tensor* t, const std::string& path, uint64_t offset) {
        std::lock_guard<std::mutex> lock(mutex_);
        homes_[t] = Home{path, offset, 0};
    }

    // Where the file holds `t`, for an engine that registers it from there; the engine then
    // holds it until release(t). nullptr when `t`'s data is in memory.
    const Home* hold(const ggml_tensor* t) {
        std::lock_guard<std::mutex> lock(mutex_);
        auto it = homes_.find(t);
        if (it == homes_.end()) {
            return nullptr;
        }
        ++it->second.holders;
        return &it->second;
    }

    void release(const ggml_tensor* t) {
        std::lock_guard<std::mutex> lock(mutex_);
        auto it = homes_.find(t);
        if (it != homes_.end() && it->second.holders > 0) {
            --it->second.holders;
        }
    }

    // Before a compute: reads every weight `gf` reads that is still only in its file and that
    // no engine holds into its memory (from then on it lives there).
    bool load_unheld(ggml_cgraph* gf, std::string* error) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (homes_.empty()) {
            return true;
        }
        Reader reader;
        auto load = [&](ggml_tensor* t) {
            auto it = t != nullptr ? homes_.find(t) : homes_.end();
            if (it == homes_.end() || it->second.holders > 0) {
                return true;
            }
            if (!reader.read(t, it->second, error)) {
                return false;
            }
            homes_.erase(it);
            return true;
        };
        for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
            for (ggml_tensor* src : ggml_graph_node(gf, i)->src) {
                if (src != nullptr && !(load(src) && load(src->view_src))) {
                    return false;
                }
            }
        }
        return true;
    }

    // Before sd.cpp writes weights in place (a LoRA merged into them), once every engine is
    // released: each weight is read into its memory, which is its home from then on.
    bool load_all(std::string* error) {
        std::lock_guard<std::mutex> lock(mutex_);
        Reader reader;
        for (auto it = homes_.begin(); it != homes_.end(); it = homes_.erase(it)) {
            if (!reader.read(it->first, it->second, error)) {
                return false;
            }
        }
        return true;
    }

    // Before `ctx`'s tensors are freed (their addresses may come back as other tensors).
    void forget(ggml_context* ctx) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (ctx == nullptr || homes_.empty()) {
            return;
        }
        for (ggml_tensor* t = ggml_get_first_tensor(ctx); t != nullptr; t = ggml_get_next_tensor(ctx, t)) {
            homes_.erase(t);
        }
    }

private:
    // Reads weights into their memory, keeping the last file open: a model's weights lie in
    // one file or a few, so each is opened once per call, not once per weight.
    class Reader {
    public:
        ~Reader() { close(); }

        bool read(const ggml_tensor* t, const Home& home, std::string* error) {
            std::string why = "the file ends there";
            if (fd_ < 0 || path_ != home.path) {
                close();
                fd_   = ::open(home.path.c_str(), O_RDONLY | O_CLOEXEC);
                path_ = home.path;
                if (fd_ < 0) {
                    why = std::strerror(errno);
                }
            }
            size_t want = ggml_nbytes(t), got = 0;
            while (fd_ >= 0 && got < want) {
                ssize_t n = ::pread(fd_, static_cast<char*>(t->data) + got, want - got, static_cast<off_t>(home.offset + got));
                if (n < 0 && errno == EINTR) {
                    continue;
                }
                if (n < 0) {
                    why = std::strerror(errno);
                }
                if (n <= 0) {
                    break;
                }
                got += static_cast<size_t>(n);
            }
            if (got == want) {
                return true;
            }
            *error = home.path + ": reading a weight at offset " + std::to_string(home.offset) + ": " +
                     std::to_string(got) + " of " + std::to_string(want) + " bytes (" + why + ")";
            return false;
        }

    private:
        void close() {
            if (fd_ >= 0) {
                ::close(fd_);
            }
            fd_ = -1;
        }

        std::string path_;
        int fd_ = -1;
    };

    std::mutex mutex_;
    std::unordered_map<const ggml_tensor*, Home> homes_;
};

// The first refusal of the process ("<runner>: <why>": the planner's message, a model file the
// engine cannot read), empty while none. sd.cpp's callers assert on a failed compute, so the
// command line needs it to stop cleanly.
inline std::string& refusal() {
    static std::string message;
    return message;
}

// Keeps the first refusal: `who` could not go on because of `why`.
inline void refuse(const std::string& who, const std::string& why) {
    if (refusal().empty()) {
        refusal() = who + ": " + why;
    }
}

// sd.cpp's runners by what they do in a job (their get_desc()).
inline int role_of(const std::string& desc) {
    static const char* const diffusion[] = {"unet", "flux", "mmdit", "wan", "qwen_image", "z_image", "anima", "ernie_image"};
    static const char* const decoders[]  = {"vae", "wan_vae", "taesd", "taehv", "fake_vae"};
    for (const char* name : diffusion) {
        if (desc == name) {
            return OFFLOAD_ENGINE_ROLE_DIFFUSION;
        }
    }
    for (const char* name : decoders) {
        if (desc == name) {
            return OFFLOAD_ENGINE_ROLE_DECODER;
        }
    }
    if (desc == "control_net") {
        return OFFLOAD_ENGINE_ROLE_CONTROL;
    }
    if (desc == "lora") {
        return OFFLOAD_ENGINE_ROLE_ADAPTER;
    }
    if (desc == "esrgan") {
        return OFFLOAD_ENGINE_ROLE_OTHER;
    }
    return OFFLOAD_ENGINE_ROLE_CONDITIONER;  // clip, t5, clip_vision, the LLM text encoders
}

// The process's pipeline: created with the first engine (with that runner's budget; all
// runners of an sd_ctx share --max-vram) and freed with the last. sd.cpp runs one runner at a
// time, so the open stage is the runner computing now, or the last one that did.
class Pipeline {
public:
    static Pipeline& get() {
        static Pipeline p;
        return p;
    }

    // Adds `engine` as a component; between runs, as the pipeline requires.
    bool join(offload_engine_engine* engine, const std::string& name, int role, uint64_t stage_need,
              uint64_t budget, std::string* error) {
        if (pipeline_ == nullptr) {
            offload_engine_pipeline_params pp;
            offload_engine_pipeline_params_init(&pp);
            pp.offload_mode    = OFFLOAD_ENGINE_OFFLOAD_LAYER_STREAMING;
            pp.budget_bytes    = budget;
            pp.margin_bytes    = 0;
            pp.min_free_bytes  = budget > 0 ? 0 : pp.min_free_bytes;  // --max-vram is all of it
            pp.prefetch_depth  = config().prefetch_depth;
            pp.passes_per_step = 2;  // classifier-free guidance; only the prediction uses it
            if (config().resident_layers >= 0) {
                pp.max_resident_layers = static_cast<uint32_t>(config().resident_layers);
            }
            if (offload_engine_pipeline_new(&pp, &pipeline_) != OFFLOAD_ENGINE_OK) {
                *error    = offload_engine_last_error();
                pipeline_ = nullptr;
                return false;
            }
        }
        if (!close_run() || offload_engine_pipeline_add(pipeline_, name.c_str(), role, engine) != OFFLOAD_ENGINE_OK ||
            offload_engine_pipeline_set_stage_need(pipeline_, name.c_str(), stage_need) != OFFLOAD_ENGINE_OK) {
            *error = offload_engine_last_error();
            release_if_empty();
            return false;
        }
        ++components_;
        return true;
    }

    // Makes `name` the running stage; the engine is placed when this returns true.
    bool enter(const std::string& name, std::string* error) {
        if (stage_ == name) {
            return true;
        }
        if (!stage_.empty() && !leave(stage_)) {
            *error = offload_engine_last_error();
            return false;
        }
        if (!in_run_) {
            if (offload_engine_pipeline_run_begin(pipeline_) != OFFLOAD_ENGINE_OK) {
                *error = offload_engine_last_error();
                return false;
            }
            in_run_ = true;
        }
        if (offload_engine_pipeline_stage_begin(pipeline_, name.c_str()) != OFFLOAD_ENGINE_OK) {
            *error = offload_engine_last_error();
            return false;
        }
        stage_ = name;
        return true;
    }

    bool leave(std::string name) {  // a copy: `name` may be stage_ itself
        if (stage_ != name) {
            return true;
        }
        stage_.clear();
        return offload_engine_pipeline_stage_end(pipeline_, name.c_str()) == OFFLOAD_ENGINE_OK;
    }

    // Before the component's engine is freed.
    void remove(const std::string& name) {
        leave(name);
        if (components_ > 0) {
            --components_;
        }
        release_if_empty();
    }

    bool component(const std::string& name, offload_engine_component_info* info) {
        info->size = sizeof *info;
        return offload_engine_pipeline_component_info(pipeline_, name.c_str(), info) == OFFLOAD_ENGINE_OK;
    }

    // "pipeline budget B B, peak P B": what every component held together, at most.
    std::string figures() {
        offload_engine_pipeline_stats s;
        s.size = sizeof s;
        if (pipeline_ == nullptr || offload_engine_pipeline_get_stats(pipeline_, &s) != OFFLOAD_ENGINE_OK) {
            return "";
        }
        char line[160];
        std::snprintf(line, sizeof line, "pipeline budget %" PRIu64 " B, peak %" PRIu64 " B, %" PRIu64 " loads, %" PRIu64 " unloads",
                      s.budget_bytes, s.peak_device_bytes, s.loads, s.unloads);
        return line;
    }

private:
    bool close_run() {
        if (!stage_.empty() && !leave(stage_)) {
            return false;
        }
        if (in_run_) {
            in_run_ = false;
            return offload_engine_pipeline_run_end(pipeline_) == OFFLOAD_ENGINE_OK;
        }
        return true;
    }

    void release_if_empty() {
        if (components_ == 0 && pipeline_ != nullptr) {
            close_run();
            offload_engine_pipeline_free(pipeline_);
            pipeline_ = nullptr;
        }
    }

    offload_engine_pipeline* pipeline_ = nullptr;
    size_t components_                 = 0;
    bool in_run_                       = false;
    std::string stage_;
};

class SegmentStreamer {
public:
    using Plan    = sd::ggml_graph_cut::Plan;
    using Segment = sd::ggml_graph_cut::Segment;

    // An engine over the weights `plan`'s segments read, on `backend`'s device, joined to the
    // process's pipeline of `budget` bytes (0: the device's free memory). nullptr with
    // `*error` set when the library refuses.
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
        release();
        live().erase(std::find(live().begin(), live().end(), this));
    }

    // Before sd.cpp writes weights in place (a LoRA merged into them): every engine puts the
    // weights it placed back home and is freed; each runner makes a new one on its next
    // compute (released()).
    static void release_all() {
        for (SegmentStreamer* s : live()) {
            s->release();
        }
    }

    bool released() const { return engine_ == nullptr; }

    // Before each compute: this runner's stage begins (the pipeline places the engine if it
    // is off the device). false with `*error` set (the planner's message) when it cannot.
    bool place(std::string* error) {
        if (!Pipeline::get().enter(name_, error)) {
            *error += " -- with sd-cli: a larger --max-vram, --layer-prefetch-depth 0 (one slot), or "
                      "--resident-layers 0";
            return false;
        }
        offload_engine_component_info info;
        if (!Pipeline::get().component(name_, &info)) {
            *error = offload_engine_last_error();
            return false;
        }
        streamed_ = info.streamed_layers;
        resident_ = layers_ - streamed_;
        if (info.loads != loads_) {
            loads_ = info.loads;
            // What each pass copies: the streamed layers, once each.
            uint64_t per_pass = 0;
            for (uint64_t l = 0; l < layers_; ++l) {
                offload_engine_layer_stats ls;
                ls.size = sizeof ls;
                if (offload_engine_engine_layer_stats(engine_, l, &ls) == OFFLOAD_ENGINE_OK && !ls.resident) {
                    per_pass += ls.load_bytes;
                }
            }
            std::fprintf(stderr, "offload-engine: %s: placed %s: %" PRIu64 " resident, %" PRIu64
                         " streamed layers (%" PRIu64 " B per pass), %" PRIu64 " B on the device; %s\n",
                         desc_.c_str(), streamed_ > 0 ? "streaming" : "resident", resident_, streamed_, per_pass,
                         info.device_bytes, Pipeline::get().figures().c_str());
        }
        return true;
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
    // segment that reads only global weights opens none. Which layers a segment reads is
    // found on its first pass and kept: every graph of the runner cuts at the same names.
    bool begin_segment(ggml_cgraph* gf, const Segment& segment) {
        auto known = layers_of_segment_.find(segment.group_name);
        if (known == layers_of_segment_.end()) {
            int64_t first = -1, last = -1;
            for (ggml_tensor* t : sd::ggml_graph_cut::param_tensors(gf, segment)) {
                auto it = layer_of_.find(t);
                if (it == layer_of_.end()) {
                    std::fprintf(stderr, "offload-engine: %s: a weight of segment %s is unknown to the engine\n",
                                 desc_.c_str(), segment.group_name.c_str());
                    return false;
                }
                if (it->second >= 0) {
                    first = first < 0 ? it->second : std::min(first, it->second);
                    last  = std::max(last, it->second);
                }
            }
            known = layers_of_segment_.emplace(segment.group_name, std::make_pair(first, last - first + 1)).first;
        }
        int64_t first = known->second.first;
        return first < 0 || open(static_cast<uint64_t>(first), static_cast<uint64_t>(known->second.second));
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
    explicit SegmentStreamer(std::string desc) : desc_(std::move(desc)) { live().push_back(this); }

    static std::vector<SegmentStreamer*>& live() {
        static std::vector<SegmentStreamer*> streamers;
        return streamers;
    }

    void release() {
        if (engine_ != nullptr) {
            summarize();
            if (joined_) {
                Pipeline::get().remove(name_);
                joined_ = false;
            }
            offload_engine_engine_free(engine_);  // every weight points home again
            engine_ = nullptr;
        }
        for (const ggml_tensor* t : held_) {
            FileHomes::get().release(t);
        }
        held_.clear();
    }

    bool ok(int status, const char* what) {
        if (status == OFFLOAD_ENGINE_OK) {
            return true;
        }
        std::fprintf(stderr, "offload-engine: %s: %s failed: %s\n", desc_.c_str(), what, offload_engine_last_error());
        // The compute fails and sd.cpp asserts on that: the host's abort callback reports this.
        refuse(desc_, std::string(what) + ": " + offload_engine_last_error());
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
        std::vector<uint64_t> ids(order.size());
        for (size_t i = 0; i < order.size(); ++i) {
            ggml_tensor* t = order[i];
            // sd.cpp's weights carry no ggml names; the engine needs unique ones.
            char name[48];
            std::snprintf(name, sizeof name, "%s.param.%zu", desc_.c_str(), i);
            uint64_t& id                 = ids[i];
            const FileHomes::Home* home  = FileHomes::get().hold(t);
            if (home != nullptr) {
                held_.push_back(t);
                from_file_bytes_ += ggml_nbytes(t);
            }
            int added = home != nullptr
                            ? offload_engine_registry_add_tensor_from_file(registry, t, name, home->path.c_str(), home->offset, &id)
                            : offload_engine_registry_add_tensor(registry, t, name, &id);
            if (!ok(added, home != nullptr ? "add_tensor_from_file" : "add_tensor") ||
                (owner[t] >= 0 && !ok(offload_engine_registry_assign(registry, id, static_cast<uint32_t>(owner[t])), "assign"))) {
                *error = offload_engine_last_error();
                offload_engine_registry_free(registry);
                return false;
            }
        }
        // Engine layers are the segments that own weights, in segment order; -1: global.
        for (size_t i = 0; i < order.size(); ++i) {
            offload_engine_tensor_info info;
            info.size = sizeof info;
            if (!ok(offload_engine_registry_tensor_info(registry, ids[i], &info), "tensor_info")) {
                *error = offload_engine_last_error();
                offload_engine_registry_free(registry);
                return false;
            }
            layer_of_[order[i]] = info.layer;
        }
        size_t layers = 0;
        offload_engine_registry_layer_count(registry, &layers);
        layers_ = layers;
        offload_engine_registry_global_bytes(registry, &global_bytes_);
        uint64_t total = 0, largest = 0;
        offload_engine_registry_total_bytes(registry, &total);
        layer_bytes_ = total - global_bytes_;
        for (uint64_t l = 0; l < layers; ++l) {
            offload_engine_layer_info info;
            info.size = sizeof info;
            uint64_t bytes = 0;
            if (offload_engine_registry_layer_info(registry, l, &info) == OFFLOAD_ENGINE_OK) {
                bytes = info.bytes;
            }
            largest = std::max(largest, bytes);
        }

        offload_engine_engine_params ep;
        offload_engine_engine_params_init(&ep);
        ep.device         = ggml_backend_dev_name(ggml_backend_get_device(backend));
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
        uint64_t reserve = compute + 2 * activations;
        // Names are unique in the pipeline: two runners may share a description.
        static uint64_t serial = 0;
        name_ = desc_ + "#" + std::to_string(++serial);
        if (!Pipeline::get().join(engine_, name_, role_of(desc_), reserve, budget, error)) {
            return false;
        }
        joined_ = true;
        std::fprintf(stderr,
                     "offload-engine: %s: %zu segments, %zu layers, %zu weights (%zu, %" PRIu64
                     " B, read from the model file); global %" PRIu64 " B, layers %" PRIu64 " B (largest %" PRIu64
                     " B), reserve %" PRIu64 " B\n",
                     desc_.c_str(), plan.segments.size(), layers, order.size(), held_.size(), from_file_bytes_,
                     global_bytes_, layer_bytes_, largest, reserve);
        return true;
    }

    // One line when the engine is freed (in sd-cli, after the runner's sampling run), with its
    // last placement's figures: what stayed, what streamed, what moved, how well the copies
    // were ahead.
    void summarize() {
        offload_engine_stats s;
        s.size = sizeof s;
        if (offload_engine_engine_stats(engine_, &s) != OFFLOAD_ENGINE_OK) {
            return;
        }
        std::fprintf(stderr,
                     "offload-engine: %s: %" PRIu64 " resident, %" PRIu64 " streamed layers; %" PRIu64
                     " passes; %" PRIu64 " bytes moved (%" PRIu64 " placed once, %" PRIu64
                     " streamed); prefetch hits %" PRIu64 " of %" PRIu64 " loads; waited %.1f ms; %s\n",
                     desc_.c_str(), resident_, streamed_, s.passes, s.bytes_copied, s.placement_bytes,
                     s.streamed_bytes, s.prefetch_hits, s.layer_loads, s.wait_us / 1000.0,
                     Pipeline::get().figures().c_str());
    }

    std::string desc_;
    std::string name_;  // the pipeline component's
    bool joined_       = false;
    uint64_t loads_    = 0;
    offload_engine_engine* engine_ = nullptr;
    std::unordered_map<const ggml_tensor*, int64_t> layer_of_;  // engine layer; -1: global
    std::vector<const ggml_tensor*> held_;  // the weights the engine reads from the model file
    uint64_t from_file_bytes_ = 0;
    // Per segment name: its first engine layer (-1: none) and how many it opens.
    std::unordered_map<std::string, std::pair<int64_t, int64_t>> layers_of_segment_;
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
