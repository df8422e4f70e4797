// abi_test.cpp: the C checks of abi_test.c compiled as C++17, then the header used the way a
// C++ host would: RAII handles, exceptions carrying the engine's message, std::string and
// std::vector at the edges, lambdas as callbacks.
//
// Built and run by tests/abi.rs like abi_test.c (same macros, same argument). Silent on
// success; the first failure prints where and why and exits 1.

#define ABI_TEST_NO_MAIN 1
#include "abi_test.c"

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace {

// ---------------------------------------------------------------------------------------
// What the header promises a C++ compiler
// ---------------------------------------------------------------------------------------

// Plain C data: safe to memset, memcpy and share with C.
template <typename T> constexpr bool is_c_data = std::is_standard_layout<T>::value && std::is_trivial<T>::value;
static_assert(is_c_data<offload_engine_registry_params>, "registry params");
static_assert(is_c_data<offload_engine_tensor_info>, "tensor info");
static_assert(is_c_data<offload_engine_layer_info>, "layer info");
static_assert(is_c_data<offload_engine_plan_params>, "plan params");
static_assert(is_c_data<offload_engine_plan_summary>, "plan summary");
static_assert(is_c_data<offload_engine_engine_params>, "engine params");
static_assert(is_c_data<offload_engine_stats>, "stats");
static_assert(is_c_data<offload_engine_layer_stats>, "layer stats");
static_assert(is_c_data<offload_engine_staged_model>, "staged model");

// The size field leads every versioned struct, so old and new callers agree on where it is.
static_assert(offsetof(offload_engine_plan_params, size) == 0, "size first");
static_assert(offsetof(offload_engine_engine_params, size) == 0, "size first");
static_assert(offsetof(offload_engine_staged_model, size) == 0, "size first");

// Status numbers are part of the ABI.
static_assert(OFFLOAD_ENGINE_OK == 0 && OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT == 1 &&
                  OFFLOAD_ENGINE_ERR_NULL_POINTER == 2 && OFFLOAD_ENGINE_ERR_INVALID_HANDLE == 3 &&
                  OFFLOAD_ENGINE_ERR_NOT_FOUND == 4 && OFFLOAD_ENGINE_ERR_ALREADY_EXISTS == 5 &&
                  OFFLOAD_ENGINE_ERR_IO == 6 && OFFLOAD_ENGINE_ERR_CORRUPT_FILE == 7 &&
                  OFFLOAD_ENGINE_ERR_INSUFFICIENT_MEMORY == 8 && OFFLOAD_ENGINE_ERR_BACKEND == 9 &&
                  OFFLOAD_ENGINE_ERR_INVALID_STATE == 10 && OFFLOAD_ENGINE_ERR_INTERNAL == 11 &&
                  OFFLOAD_ENGINE_ERR_UNSUPPORTED == 12 && OFFLOAD_ENGINE_ERR_OUT_OF_MEMORY == 13,
              "status numbers are fixed");

// The engine's backend is ggml's backend type, so a C++ host can hand it to ggml directly.
static_assert(std::is_same<decltype(&offload_engine_engine_backend),
                           int (*)(offload_engine_engine *, ggml_backend **)>::value,
              "engine_backend yields a ggml_backend");

// ---------------------------------------------------------------------------------------
// A small C++ layer over the C ABI
// ---------------------------------------------------------------------------------------

class EngineError : public std::runtime_error {
public:
    EngineError(int status, const std::string &message)
        : std::runtime_error(message), status_(status) {}
    int status() const noexcept { return status_; }

private:
    int status_;
};

// Copies the thread's message at once: the library reuses that buffer on the next failure.
void ok(int status, const char *call)
{
    if (status != OFFLOAD_ENGINE_OK)
        throw EngineError(status, std::string(call) + ": " + offload_engine_status_str(status) +
                                      ": " + offload_engine_last_error());
}

struct RegistryFree {
    void operator()(offload_engine_registry *registry) const noexcept { offload_engine_registry_free(registry); }
};
struct PlanFree {
    void operator()(offload_engine_plan *plan) const noexcept { offload_engine_plan_free(plan); }
};
struct EngineFree {
    void operator()(offload_engine_engine *engine) const noexcept { offload_engine_engine_free(engine); }
};
using Registry = std::unique_ptr<offload_engine_registry, RegistryFree>;
using Plan = std::unique_ptr<offload_engine_plan, PlanFree>;
using Engine = std::unique_ptr<offload_engine_engine, EngineFree>;

Registry make_registry(const std::string &pattern = std::string())
{
    offload_engine_registry_params params;
    offload_engine_registry_params_init(&params);
    params.pattern = pattern.empty() ? nullptr : pattern.c_str();
    offload_engine_registry *raw = nullptr;
    ok(offload_engine_registry_new(&params, &raw), "registry_new");
    return Registry(raw);
}

std::string architecture(const Registry &registry)
{
    const char *name = nullptr;
    ok(offload_engine_registry_architecture(registry.get(), &name), "registry_architecture");
    return name;
}

struct Layer {
    std::string name;
    std::uint64_t bytes;
    std::vector<std::uint64_t> tensor_ids;
};

std::vector<Layer> layers(const Registry &registry)
{
    std::size_t count = 0;
    ok(offload_engine_registry_layer_count(registry.get(), &count), "registry_layer_count");
    std::vector<Layer> result;
    for (std::uint64_t index = 0; index < count; index++) {
        offload_engine_layer_info info;
        std::memset(&info, 0, sizeof info);
        info.size = sizeof info;
        ok(offload_engine_registry_layer_info(registry.get(), index, &info), "registry_layer_info");
        Layer layer{info.name, info.bytes, std::vector<std::uint64_t>(info.tensor_count)};
        std::size_t written = 0;
        ok(offload_engine_registry_layer_tensors(registry.get(), index, layer.tensor_ids.data(),
                                                 layer.tensor_ids.size(), &written),
           "registry_layer_tensors");
        layer.tensor_ids.resize(written);
        result.push_back(std::move(layer));
    }
    return result;
}

std::uint64_t find(const Registry &registry, const std::string &name)
{
    std::uint64_t id = 0;
    ok(offload_engine_registry_find(registry.get(), name.c_str(), &id), "registry_find");
    return id;
}

Plan make_plan(const Registry &registry, std::uint64_t free_bytes)
{
    offload_engine_plan_params params = exact_budget(free_bytes);
    offload_engine_plan *raw = nullptr;
    ok(offload_engine_plan_new(registry.get(), &params, &raw), "plan_new");
    return Plan(raw);
}

Engine make_engine(const Registry &registry, std::uint64_t budget)
{
    offload_engine_engine_params params;
    offload_engine_engine_params_init(&params);
    params.device = "CPU";
    params.budget_bytes = budget;
    offload_engine_engine *raw = nullptr;
    ok(offload_engine_engine_new(&params, registry.get(), &raw), "engine_new");
    return Engine(raw);
}

// ---------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------

void check_errors_become_exceptions()
{
    Registry registry = make_registry();
    try {
        find(registry, "no.such.tensor");
        CHECK(!"find of an unknown name must throw");
    } catch (const EngineError &error) {
        CHECK(error.status() == OFFLOAD_ENGINE_ERR_NOT_FOUND);
        CHECK(std::string(error.what()).find("no.such.tensor") != std::string::npos);
    }
    // A later failure does not change the message the exception already holds.
    try {
        make_registry("no_such_pattern");
        CHECK(!"an unknown pattern must throw");
    } catch (const EngineError &error) {
        CHECK(error.status() == OFFLOAD_ENGINE_ERR_NOT_FOUND);
        CHECK(std::string(error.what()).find("no_such_pattern") != std::string::npos);
    }
}

void check_raii_handles()
{
    offload_engine_registry *released = nullptr;
    {
        Registry registry(described_model());
        released = registry.get();
        CHECK(architecture(registry) == "llama_gguf");
        Plan plan = make_plan(registry, PLAN_GLOBAL_BYTES + 2 * PLAN_LAYER_BYTES);
        CHECK(plan_summary(plan.get()).mode == OFFLOAD_ENGINE_MODE_STREAMING);
        CHECK(std::string(offload_engine_plan_message(plan.get())).size() > 0);
        try {
            make_plan(registry, PLAN_GLOBAL_BYTES + PLAN_LAYER_BYTES / 2);
            CHECK(!"an impossible budget must throw");
        } catch (const EngineError &error) {
            CHECK(error.status() == OFFLOAD_ENGINE_ERR_INSUFFICIENT_MEMORY);
        }
    }
    // The unique_ptr freed it: the handle is dead now.
    std::size_t count = 0;
    CHECK_STATUS(OFFLOAD_ENGINE_ERR_INVALID_HANDLE, offload_engine_registry_tensor_count(released, &count));
}

void check_gguf_from_cpp(const std::string &scratch)
{
    const std::string path = scratch + "/abi_test_cpp_" + std::to_string(static_cast<long>(getpid())) + ".gguf";
    write_tiny_gguf(path.c_str());
    Registry registry = make_registry();
    std::size_t added = 0;
    ok(offload_engine_registry_add_gguf(registry.get(), path.c_str(), &added), "registry_add_gguf");
    std::remove(path.c_str());
    CHECK(added == TINY_GGUF_TENSORS);
    const std::vector<Layer> found = layers(registry);
    CHECK(found.size() == 2);
    CHECK(found[0].name == "blk.0" && found[1].name == "blk.1");
    for (const Layer &layer : found) {
        CHECK(layer.bytes == TINY_LAYER_BYTES);
        CHECK(layer.tensor_ids.size() == 1);
    }
    CHECK(found[1].tensor_ids[0] == find(registry, "blk.1.attn_q.weight"));
}

// Messages are copied into std::strings inside the callback: the pointer dies with it.
struct LogCollector {
    std::mutex lock;
    std::vector<std::string> messages;
};

void check_lambda_log_callback()
{
    LogCollector collector;
    ok(offload_engine_log_set_callback(
           [](int, const char *message, void *user) {
               LogCollector *sink = static_cast<LogCollector *>(user);
               std::lock_guard<std::mutex> guard(sink->lock);
               sink->messages.emplace_back(message);
           },
           &collector),
       "log_set_callback");
    int not_a_handle = 0;
    offload_engine_plan_free(reinterpret_cast<offload_engine_plan *>(&not_a_handle));
    ok(offload_engine_log_set_callback(nullptr, nullptr), "log_set_callback");
    CHECK(collector.messages.size() == 1);
    CHECK(collector.messages[0].find("not live") != std::string::npos);
}

void check_engine_from_cpp()
{
    test_model model;
    build_model(&model);
    forward_output reference;
    reference_forward(&model, &reference);
    {
        Registry registry = make_registry();
        register_model(registry.get(), &model);
        Engine engine = make_engine(registry, 3 * MODEL_WEIGHT_BYTES);
        registry.reset(); // the engine keeps its own copy
        int streamed[MODEL_LAYERS];
        offload_engine_plan_summary summary;
        prepare(engine.get(), streamed, &summary);
        CHECK(summary.mode == OFFLOAD_ENGINE_MODE_STREAMING);
        check_pass(&model, engine.get(), streamed, &reference);
        // Left with a pass and a layer open: the unique_ptr's free must cope.
        ok(offload_engine_engine_pass_begin(engine.get()), "pass_begin");
        ok(offload_engine_engine_layer_begin(engine.get(), 0), "layer_begin");
    }
    check_all_home(&model);
    free_model(&model);
}

#if ABI_TEST_WITH_GGML
// The staged executor driven by captureless lambdas over a C++ host object.
struct LambdaHost {
    test_model *model;
    ggml_tensor *input;
};

void check_lambda_staged_model()
{
    test_model model;
    build_model(&model);
    forward_output reference;
    reference_forward(&model, &reference);
    Registry registry = make_registry();
    register_model(registry.get(), &model);
    Engine engine = make_engine(registry, 3 * MODEL_WEIGHT_BYTES);
    int streamed[MODEL_LAYERS];
    offload_engine_plan_summary summary;
    prepare(engine.get(), streamed, &summary);

    LambdaHost host{&model, nullptr};
    offload_engine_staged_model staged;
    std::memset(&staged, 0, sizeof staged);
    staged.size = sizeof staged;
    staged.user = &host;
    staged.layer_count = MODEL_LAYERS;
    staged.activation_ne[0] = MODEL_DIM;
    staged.activation_ne[1] = 1;
    staged.build_input = [](void *user, ggml_context *ctx) -> ggml_tensor * {
        LambdaHost *self = static_cast<LambdaHost *>(user);
        self->input = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, MODEL_DIM, 1);
        return self->input;
    };
    staged.set_inputs = [](void *user) -> int {
        std::vector<float> x(MODEL_DIM);
        model_input(x.data());
        ggml_backend_tensor_set(static_cast<LambdaHost *>(user)->input, x.data(), 0, x.size() * sizeof(float));
        return 0;
    };
    staged.build_layer = [](void *user, ggml_context *ctx, std::uint64_t layer, ggml_tensor *x) -> ggml_tensor * {
        ggml_tensor *w = static_cast<LambdaHost *>(user)->model->weights[layer];
        return ggml_add(ctx, ggml_mul_mat(ctx, w, x), x);
    };
    staged.build_output = [](void *user, ggml_context *ctx, ggml_tensor *x) -> ggml_tensor * {
        return ggml_mul_mat(ctx, static_cast<LambdaHost *>(user)->model->weights[MODEL_LAYERS], x);
    };

    std::size_t size = 0;
    ok(offload_engine_engine_run_pass(engine.get(), &staged, nullptr, 0, &size), "run_pass");
    std::vector<float> output(size / sizeof(float));
    ok(offload_engine_engine_run_pass(engine.get(), &staged, output.data(), output.size() * sizeof(float), nullptr),
       "run_pass");
    CHECK(output.size() == MODEL_DIM);
    CHECK(std::memcmp(output.data(), reference.ggml, sizeof reference.ggml) == 0);
    engine.reset();
    free_model(&model);
}
#endif

} // namespace

int main(int argc, char **argv)
{
    try {
        run_c_checks(argc, argv);
        check_errors_become_exceptions();
        check_raii_handles();
        check_gguf_from_cpp(scratch_dir);
        check_lambda_log_callback();
        check_engine_from_cpp();
#if ABI_TEST_WITH_GGML
        check_lambda_staged_model();
#endif
    } catch (const std::exception &error) {
        std::fprintf(stderr, "uncaught exception: %s\n", error.what());
        return 1;
    }
#ifdef ABI_TEST_PRINT_COUNT
    std::printf("%ld checks passed in total\n", checks_passed);
#endif
    return 0;
}
