// offload_engine.hpp: header-only C++17 API over the C ABI (ffi/offload_engine.h).
//
// RAII owners for every handle, no exceptions: fallible calls return
// offload_engine::Result<T>, which holds a value or an Error (status + the engine's message).
// Thread rules and lifetimes are those of the C header.
#ifndef OFFLOAD_ENGINE_HPP
#define OFFLOAD_ENGINE_HPP

#include <cstdint>
#include <functional>
#include <iterator>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "offload_engine.h"

namespace offload_engine {

enum class Status : int {
    ok = OFFLOAD_ENGINE_OK,
    invalid_argument = OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT,
    null_pointer = OFFLOAD_ENGINE_ERR_NULL_POINTER,
    invalid_handle = OFFLOAD_ENGINE_ERR_INVALID_HANDLE,
    not_found = OFFLOAD_ENGINE_ERR_NOT_FOUND,
    already_exists = OFFLOAD_ENGINE_ERR_ALREADY_EXISTS,
    io = OFFLOAD_ENGINE_ERR_IO,
    corrupt_file = OFFLOAD_ENGINE_ERR_CORRUPT_FILE,
    insufficient_memory = OFFLOAD_ENGINE_ERR_INSUFFICIENT_MEMORY,
    backend = OFFLOAD_ENGINE_ERR_BACKEND,
    invalid_state = OFFLOAD_ENGINE_ERR_INVALID_STATE,
    internal = OFFLOAD_ENGINE_ERR_INTERNAL,
    unsupported = OFFLOAD_ENGINE_ERR_UNSUPPORTED,
    out_of_memory = OFFLOAD_ENGINE_ERR_OUT_OF_MEMORY,
};

struct Error {
    Status status;
    std::string message;
};

// A value or an Error, in the spirit of std::expected (C++23).
template <class T>
class Result {
public:
    Result(T value) : state_(std::move(value)) {}
    Result(Error error) : state_(std::move(error)) {}
    bool ok() const { return state_.index() == 0; }
    explicit operator bool() const { return ok(); }
    T &value() { return std::get<0>(state_); }
    const T &value() const { return std::get<0>(state_); }
    T &operator*() { return value(); }
    T *operator->() { return &value(); }
    const Error &error() const { return std::get<1>(state_); }

private:
    std::variant<T, Error> state_;
};

struct Unit {};
using Status_ = Result<Unit>;

// A view of contiguous bytes (std::span arrives in C++20): built from any contiguous
// container of trivially copyable elements (std::vector<float>, std::array, std::string).
template <class Byte>
class Bytes {
public:
    template <class Container, class = decltype(std::data(std::declval<Container &>()))>
    Bytes(Container &c)  // NOLINT: implicit, like std::span
        : data_(reinterpret_cast<Byte *>(std::data(c))), size_(std::size(c) * sizeof(*std::data(c))) {}
    Bytes(Byte *data, size_t size) : data_(data), size_(size) {}
    Byte *data() const { return data_; }
    size_t size() const { return size_; }

private:
    Byte *data_;
    size_t size_;
};
using ConstBytes = Bytes<const uint8_t>;
using MutableBytes = Bytes<uint8_t>;

namespace detail {
inline Error error_from(int status) {
    return Error{static_cast<Status>(status), offload_engine_last_error()};
}
inline Status_ check(int status) {
    if (status == OFFLOAD_ENGINE_OK) return Unit{};
    return error_from(status);
}
template <class Handle, void (*Free)(Handle *)>
struct Deleter {
    void operator()(Handle *h) const { Free(h); }
};
}  // namespace detail

inline std::string_view version() { return offload_engine_version(); }

// Bytes in a size as every offload-engine tool reads it: "12GB" is 12e9, "12GiB" 12 * 2^30,
// a bare number is bytes (see offload_engine_size_parse).
inline Result<uint64_t> parse_size(const std::string &text) {
    uint64_t bytes = 0;
    if (int s = offload_engine_size_parse(text.c_str(), &bytes)) return detail::error_from(s);
    return bytes;
}

struct LayerInfo {
    std::string name;
    std::string component;
    uint64_t tensor_count = 0;
    uint64_t bytes = 0;
    offload_engine_location location = OFFLOAD_ENGINE_LOCATION_HOST;
};

class Registry {
public:
    // `pattern`: a built-in name or a regex; empty detects the architecture.
    static Result<Registry> create(const std::string &pattern = {}) {
        offload_engine_registry_params params;
        offload_engine_registry_params_init(&params);
        params.pattern = pattern.empty() ? nullptr : pattern.c_str();
        offload_engine_registry *raw = nullptr;
        if (int s = offload_engine_registry_new(&params, &raw)) return detail::error_from(s);
        return Registry(raw);
    }

    Result<uint64_t> add_tensor(ggml_tensor *tensor, const char *name = nullptr) {
        uint64_t id = 0;
        if (int s = offload_engine_registry_add_tensor(get(), tensor, name, &id)) return detail::error_from(s);
        return id;
    }
    Result<size_t> add_context(ggml_context *ctx) {
        size_t n = 0;
        if (int s = offload_engine_registry_add_context(get(), ctx, &n)) return detail::error_from(s);
        return n;
    }
    // Disk tier for hosts with their own loader: the tensor's data lies at `offset` of the
    // file at `path`; the engine reads it from there and never touches its host memory.
    Result<uint64_t> add_tensor_from_file(ggml_tensor *tensor, const char *name, const std::string &path,
                                          uint64_t offset) {
        uint64_t id = 0;
        if (int s = offload_engine_registry_add_tensor_from_file(get(), tensor, name, path.c_str(), offset, &id))
            return detail::error_from(s);
        return id;
    }
    Result<size_t> add_gguf(const std::string &path) {
        size_t n = 0;
        if (int s = offload_engine_registry_add_gguf(get(), path.c_str(), &n)) return detail::error_from(s);
        return n;
    }
    // Reads a GGUF file into tensors the registry owns: into host memory, or (file_backed)
    // without data, streamed from the file.
    Result<size_t> load_gguf(const std::string &path, bool file_backed = false) {
        size_t n = 0;
        if (int s = offload_engine_registry_load_gguf(get(), path.c_str(), file_backed ? 1 : 0, &n))
            return detail::error_from(s);
        return n;
    }
    Result<size_t> layer_count() {
        size_t n = 0;
        if (int s = offload_engine_registry_layer_count(get(), &n)) return detail::error_from(s);
        return n;
    }
    Result<std::string> architecture() {
        const char *name = nullptr;
        if (int s = offload_engine_registry_architecture(get(), &name)) return detail::error_from(s);
        return std::string(name);
    }
    Result<LayerInfo> layer(uint64_t index) {
        offload_engine_layer_info info{};
        info.size = sizeof info;
        if (int s = offload_engine_registry_layer_info(get(), index, &info)) return detail::error_from(s);
        return LayerInfo{info.name, info.component, info.tensor_count, info.bytes,
                         static_cast<offload_engine_location>(info.location)};
    }
    Result<std::vector<LayerInfo>> layers() {
        auto count = layer_count();
        if (!count) return count.error();
        std::vector<LayerInfo> out;
        for (uint64_t i = 0; i < *count; ++i) {
            auto info = layer(i);
            if (!info) return info.error();
            out.push_back(std::move(*info));
        }
        return out;
    }
    offload_engine_registry *get() const { return handle_.get(); }

private:
    explicit Registry(offload_engine_registry *raw) : handle_(raw) {}
    std::unique_ptr<offload_engine_registry, detail::Deleter<offload_engine_registry, offload_engine_registry_free>> handle_;
};

struct PlanOptions {
    uint64_t free_bytes = 0;  // 0 with an engine: its budget or the device's free memory
    uint32_t steps = 1;
    uint32_t passes_per_step = 1;
    uint32_t prefetch_depth = 1;
    uint64_t compute_reserve_bytes = 0;
    std::string link;  // empty: pcie4-x16
};

class Plan {
public:
    const offload_engine_plan_summary &summary() const { return summary_; }
    offload_engine_plan_mode mode() const { return static_cast<offload_engine_plan_mode>(summary_.mode); }
    std::string_view message() const { return offload_engine_plan_message(handle_.get()); }
    Result<bool> resident(uint64_t layer) const {
        int r = 0;
        if (int s = offload_engine_plan_layer_resident(handle_.get(), layer, &r)) return detail::error_from(s);
        return r != 0;
    }

    static Result<Plan> adopt(offload_engine_plan *raw) {
        Plan plan(raw);
        plan.summary_.size = sizeof plan.summary_;
        if (int s = offload_engine_plan_get_summary(raw, &plan.summary_)) return detail::error_from(s);
        return plan;
    }

    // Simulation: plans a registered model against `options.free_bytes` of device memory.
    static Result<Plan> simulate(Registry &registry, const PlanOptions &options) {
        auto params = to_params(options);
        offload_engine_plan *raw = nullptr;
        if (int s = offload_engine_plan_new(registry.get(), &params, &raw)) return detail::error_from(s);
        return adopt(raw);
    }

    static offload_engine_plan_params to_params(const PlanOptions &o) {
        offload_engine_plan_params p;
        offload_engine_plan_params_init(&p);
        p.free_bytes = o.free_bytes;
        p.steps = o.steps;
        p.passes_per_step = o.passes_per_step;
        p.prefetch_depth = o.prefetch_depth;
        p.compute_reserve_bytes = o.compute_reserve_bytes;
        p.link = o.link.empty() ? nullptr : o.link.c_str();
        return p;
    }

private:
    explicit Plan(offload_engine_plan *raw) : handle_(raw) {}
    std::unique_ptr<offload_engine_plan, detail::Deleter<offload_engine_plan, offload_engine_plan_free>> handle_;
    offload_engine_plan_summary summary_{};
};

// The three stages of a forward pass, as callables (see offload_engine_staged_model).
struct StagedModel {
    uint64_t layer_count = 0;
    int64_t activation_ne[2] = {0, 0};
    std::function<ggml_tensor *(ggml_context *)> build_input;
    std::function<bool()> set_inputs;  // optional
    std::function<ggml_tensor *(ggml_context *, uint64_t layer, ggml_tensor *x)> build_layer;
    std::function<ggml_tensor *(ggml_context *, ggml_tensor *x)> build_output;
};

struct EngineOptions {
    std::string device;        // empty: first GPU, else CPU
    uint64_t budget_bytes = 0; // 0: measure free device memory
    uint32_t prefetch_depth = 1;
    int compute_threads = 1;
    bool trace = false;
};

class Engine {
public:
    static Result<Engine> create(Registry &registry, const EngineOptions &options = {}) {
        offload_engine_engine_params p;
        offload_engine_engine_params_init(&p);
        p.device = options.device.empty() ? nullptr : options.device.c_str();
        p.budget_bytes = options.budget_bytes;
        p.prefetch_depth = options.prefetch_depth;
        p.compute_threads = options.compute_threads;
        p.trace = options.trace ? 1 : 0;
        offload_engine_engine *raw = nullptr;
        if (int s = offload_engine_engine_new(&p, registry.get(), &raw)) return detail::error_from(s);
        return Engine(raw);
    }

    Result<ggml_backend *> backend() {
        ggml_backend *b = nullptr;
        if (int s = offload_engine_engine_backend(get(), &b)) return detail::error_from(s);
        return b;
    }
    Result<Plan> prepare(const PlanOptions &options = {}) {
        auto params = Plan::to_params(options);
        offload_engine_plan *raw = nullptr;
        if (int s = offload_engine_engine_prepare(get(), &params, &raw)) return detail::error_from(s);
        return Plan::adopt(raw);
    }
    Status_ pass_begin() { return detail::check(offload_engine_engine_pass_begin(get())); }
    Status_ pass_end() { return detail::check(offload_engine_engine_pass_end(get())); }
    Status_ layer_begin(uint64_t layer) { return detail::check(offload_engine_engine_layer_begin(get(), layer)); }
    Status_ layer_end(uint64_t layer) { return detail::check(offload_engine_engine_layer_end(get(), layer)); }
    Status_ offload_all() { return detail::check(offload_engine_engine_offload_all(get())); }
    Status_ write_trace(const std::string &path) {
        return detail::check(offload_engine_engine_trace_write(get(), path.c_str()));
    }
    // Changes a weight at run time (see offload_engine_engine_tensor_set).
    Status_ tensor_set(const std::string &name, ConstBytes data, uint64_t offset = 0) {
        return detail::check(offload_engine_engine_tensor_set(get(), name.c_str(), data.data(), offset, data.size()));
    }
    Result<offload_engine_stats> stats() {
        offload_engine_stats s{};
        s.size = sizeof s;
        if (int st = offload_engine_engine_stats(get(), &s)) return detail::error_from(st);
        return s;
    }

    // Runs one pass of a staged model and copies the output tensor's bytes into `output`
    // (sized by the host, which knows the output shape); returns the bytes written.
    Result<size_t> run_pass(StagedModel &model, MutableBytes output) {
        offload_engine_staged_model c{};
        c.size = sizeof c;
        c.user = &model;
        c.layer_count = model.layer_count;
        c.activation_ne[0] = model.activation_ne[0];
        c.activation_ne[1] = model.activation_ne[1];
        c.build_input = [](void *u, ggml_context *ctx) { return static_cast<StagedModel *>(u)->build_input(ctx); };
        c.set_inputs = [](void *u) {
            auto *m = static_cast<StagedModel *>(u);
            return (!m->set_inputs || m->set_inputs()) ? 0 : 1;
        };
        c.build_layer = [](void *u, ggml_context *ctx, uint64_t layer, ggml_tensor *x) {
            return static_cast<StagedModel *>(u)->build_layer(ctx, layer, x);
        };
        c.build_output = [](void *u, ggml_context *ctx, ggml_tensor *x) {
            return static_cast<StagedModel *>(u)->build_output(ctx, x);
        };
        size_t size = 0;
        if (int s = offload_engine_engine_run_pass(get(), &c, output.data(), output.size(), &size))
            return detail::error_from(s);
        return size;
    }

    offload_engine_engine *get() const { return handle_.get(); }

private:
    explicit Engine(offload_engine_engine *raw) : handle_(raw) {}
    std::unique_ptr<offload_engine_engine, detail::Deleter<offload_engine_engine, offload_engine_engine_free>> handle_;
};

enum class OffloadMode : int {
    none = OFFLOAD_ENGINE_OFFLOAD_NONE,
    cond_only = OFFLOAD_ENGINE_OFFLOAD_COND_ONLY,
    cond_diffusion = OFFLOAD_ENGINE_OFFLOAD_COND_DIFFUSION,
    aggressive = OFFLOAD_ENGINE_OFFLOAD_AGGRESSIVE,
    layer_streaming = OFFLOAD_ENGINE_OFFLOAD_LAYER_STREAMING,
};

// "none", "cond_only", "cond_diffusion", "aggressive", "layer_streaming" (the CLI spelling).
inline bool parse_offload_mode(std::string_view text, OffloadMode &mode) {
    static const std::pair<std::string_view, OffloadMode> names[] = {
        {"none", OffloadMode::none},
        {"cond_only", OffloadMode::cond_only},
        {"cond_diffusion", OffloadMode::cond_diffusion},
        {"aggressive", OffloadMode::aggressive},
        {"layer_streaming", OffloadMode::layer_streaming},
    };
    for (const auto &[name, value] : names) {
        if (name == text) {
            mode = value;
            return true;
        }
    }
    return false;
}

enum class Role : int {
    conditioner = OFFLOAD_ENGINE_ROLE_CONDITIONER,
    diffusion = OFFLOAD_ENGINE_ROLE_DIFFUSION,
    decoder = OFFLOAD_ENGINE_ROLE_DECODER,
    adapter = OFFLOAD_ENGINE_ROLE_ADAPTER,
    control = OFFLOAD_ENGINE_ROLE_CONTROL,
    other = OFFLOAD_ENGINE_ROLE_OTHER,
};

enum class Override : int {
    automatic = OFFLOAD_ENGINE_PLACE_AUTO,
    keep = OFFLOAD_ENGINE_PLACE_KEEP,
    offload = OFFLOAD_ENGINE_PLACE_OFFLOAD,
};

struct PipelineOptions {
    OffloadMode mode = OffloadMode::none;
    uint64_t budget_bytes = 0;            // 0: the device's free memory at each run
    uint64_t min_free_bytes = 512ull << 20;  // --streaming-min-vram
    uint64_t margin_bytes = 300ull << 20;
    uint32_t prefetch_depth = 1;
    uint32_t steps = 1;
    uint32_t passes_per_step = 1;
    bool reload_diffusion = true;
    bool log_moves = false;
    uint32_t max_resident_layers = UINT32_MAX;  // in a streamed component; UINT32_MAX: no limit
};

struct ComponentInfo {
    std::string name;
    Role role = Role::other;
    offload_engine_placement placement = OFFLOAD_ENGINE_PLACEMENT_OFF;
    uint64_t device_bytes = 0;
    uint64_t resident_bytes = 0;
    uint64_t stage_need_bytes = 0;
    uint64_t loads = 0;
    uint64_t unloads = 0;
    uint64_t streamed_layers = 0;
};

// Components (engines) placed on and off one device between the stages of a job.
class Pipeline {
public:
    static Result<Pipeline> create(const PipelineOptions &o = {}) {
        offload_engine_pipeline_params p;
        offload_engine_pipeline_params_init(&p);
        p.offload_mode = static_cast<int>(o.mode);
        p.budget_bytes = o.budget_bytes;
        p.min_free_bytes = o.min_free_bytes;
        p.margin_bytes = o.margin_bytes;
        p.prefetch_depth = o.prefetch_depth;
        p.steps = o.steps;
        p.passes_per_step = o.passes_per_step;
        p.reload_diffusion = o.reload_diffusion ? 1 : 0;
        p.log_moves = o.log_moves ? 1 : 0;
        p.max_resident_layers = o.max_resident_layers;
        offload_engine_pipeline *raw = nullptr;
        if (int s = offload_engine_pipeline_new(&p, &raw)) return detail::error_from(s);
        return Pipeline(raw);
    }

    // Components in stage order; the pipeline shares the engine (the Engine may go first).
    Status_ add(const std::string &name, Role role, Engine &engine) {
        return detail::check(offload_engine_pipeline_add(get(), name.c_str(), static_cast<int>(role), engine.get()));
    }
    Status_ set_override(const std::string &name, Override o) {
        return detail::check(offload_engine_pipeline_set_override(get(), name.c_str(), static_cast<int>(o)));
    }
    Status_ set_stage_need(const std::string &name, uint64_t bytes) {
        return detail::check(offload_engine_pipeline_set_stage_need(get(), name.c_str(), bytes));
    }
    Status_ run_begin() { return detail::check(offload_engine_pipeline_run_begin(get())); }
    Status_ run_end() { return detail::check(offload_engine_pipeline_run_end(get())); }
    Status_ stage_begin(const std::string &name) {
        return detail::check(offload_engine_pipeline_stage_begin(get(), name.c_str()));
    }
    Status_ stage_end(const std::string &name) {
        return detail::check(offload_engine_pipeline_stage_end(get(), name.c_str()));
    }
    Result<ComponentInfo> component(const std::string &name) {
        offload_engine_component_info c{};
        c.size = sizeof c;
        if (int s = offload_engine_pipeline_component_info(get(), name.c_str(), &c)) return detail::error_from(s);
        return ComponentInfo{c.name, static_cast<Role>(c.role), static_cast<offload_engine_placement>(c.placement),
                             c.device_bytes, c.resident_bytes, c.stage_need_bytes, c.loads, c.unloads,
                             c.streamed_layers};
    }
    Result<offload_engine_pipeline_stats> stats() {
        offload_engine_pipeline_stats s{};
        s.size = sizeof s;
        if (int st = offload_engine_pipeline_get_stats(get(), &s)) return detail::error_from(st);
        return s;
    }

    // Brackets one stage: stage_begin now, stage_end when the guard goes out of scope (call
    // end() to see its status).
    class Stage {
    public:
        Stage(Pipeline &p, std::string name) : pipeline_(&p), name_(std::move(name)) {}
        Stage(Stage &&o) noexcept : pipeline_(std::exchange(o.pipeline_, nullptr)), name_(std::move(o.name_)) {}
        Stage(const Stage &) = delete;
        Stage &operator=(const Stage &) = delete;
        Stage &operator=(Stage &&) = delete;
        ~Stage() { (void)end(); }
        Status_ end() {
            if (!pipeline_) return Unit{};
            auto *p = std::exchange(pipeline_, nullptr);
            return p->stage_end(name_);
        }

    private:
        Pipeline *pipeline_;
        std::string name_;
    };
    Result<Stage> stage(const std::string &name) {
        if (auto s = stage_begin(name); !s) return s.error();
        return Stage(*this, name);
    }

    offload_engine_pipeline *get() const { return handle_.get(); }

private:
    explicit Pipeline(offload_engine_pipeline *raw) : handle_(raw) {}
    std::unique_ptr<offload_engine_pipeline, detail::Deleter<offload_engine_pipeline, offload_engine_pipeline_free>> handle_;
};

}  // namespace offload_engine

#endif  // OFFLOAD_ENGINE_HPP
