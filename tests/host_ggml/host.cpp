// A host with its own ggml driving offload-engine through the C ABI: three streamed layers
// computed on the engine's backend must match the same model run without the engine, and
// every ggml object the engine hands back must be this process's (one ggml, not two).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml.h"
#include "offload_engine.h"

namespace {

constexpr int kDim = 64;
constexpr int kLayers = 3;
constexpr uint64_t kLayerBytes = uint64_t(kDim) * kDim * sizeof(float);

#define CHECK(cond)                                                                   \
    do {                                                                              \
        if (!(cond)) {                                                                \
            std::fprintf(stderr, "host.cpp:%d: check failed: %s\n", __LINE__, #cond); \
            std::exit(1);                                                             \
        }                                                                             \
    } while (0)

#define CHECK_OK(call)                                                                     \
    do {                                                                                   \
        int status_ = (call);                                                              \
        if (status_ != OFFLOAD_ENGINE_OK) {                                                \
            std::fprintf(stderr, "host.cpp:%d: %s failed: %s: %s\n", __LINE__, #call,      \
                         offload_engine_status_str(status_), offload_engine_last_error()); \
            std::exit(1);                                                                  \
        }                                                                                  \
    } while (0)

struct Model {
    ggml_context *ctx = nullptr;
    ggml_backend_buffer_t buffer = nullptr;
    ggml_tensor *weights[kLayers] = {};
    ggml_tensor *norm = nullptr;  // global: stays resident, never streamed
    void *home[kLayers] = {};
};

// Values with a fractional part everywhere, so a wrong or stale weight changes the output.
float weight_value(int layer, int row, int col) {
    return float((layer * 7 + row * 3 + col * 5) % 17 - 8) / 64.0f;
}

void build_model(Model &m) {
    ggml_init_params params = {};
    params.mem_size = ggml_tensor_overhead() * (kLayers + 1);
    params.no_alloc = true;  // the data goes into a CPU backend buffer, as a real host does
    m.ctx = ggml_init(params);
    CHECK(m.ctx != nullptr);
    for (int l = 0; l < kLayers; ++l) {
        m.weights[l] = ggml_new_tensor_2d(m.ctx, GGML_TYPE_F32, kDim, kDim);
        char name[32];
        std::snprintf(name, sizeof name, "blk.%d.w", l);
        ggml_set_name(m.weights[l], name);
    }
    m.norm = ggml_new_tensor_1d(m.ctx, GGML_TYPE_F32, kDim);
    ggml_set_name(m.norm, "output_norm.weight");
    m.buffer = ggml_backend_alloc_ctx_tensors_from_buft(m.ctx, ggml_backend_cpu_buffer_type());
    CHECK(m.buffer != nullptr);
    for (int l = 0; l < kLayers; ++l) {
        std::vector<float> w(size_t(kDim) * kDim);
        for (int r = 0; r < kDim; ++r)
            for (int c = 0; c < kDim; ++c) w[size_t(r) * kDim + c] = weight_value(l, r, c);
        ggml_backend_tensor_set(m.weights[l], w.data(), 0, kLayerBytes);
        m.home[l] = m.weights[l]->data;
    }
    std::vector<float> norm(kDim);
    for (int i = 0; i < kDim; ++i) norm[i] = 1.0f + float(i % 4) / 8.0f;
    ggml_backend_tensor_set(m.norm, norm.data(), 0, kDim * sizeof(float));
}

// One small graph: h = W h + h for a layer, h = h * norm at the end. Only the activations are
// allocated here; the weights are wherever the engine (or the host) put them.
void apply(ggml_backend_t backend, ggml_tensor *w, ggml_tensor *norm, std::vector<float> &h) {
    ggml_init_params params = {};
    params.mem_size = ggml_tensor_overhead() * 8 + ggml_graph_overhead();
    params.no_alloc = true;
    ggml_context *ctx = ggml_init(params);
    CHECK(ctx != nullptr);
    ggml_tensor *x = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, kDim);
    ggml_tensor *y = w != nullptr ? ggml_add(ctx, ggml_mul_mat(ctx, w, x), x) : ggml_mul(ctx, x, norm);
    ggml_cgraph *graph = ggml_new_graph(ctx);
    ggml_build_forward_expand(graph, y);
    ggml_backend_buffer_t buffer = ggml_backend_alloc_ctx_tensors(ctx, backend);
    CHECK(buffer != nullptr);
    ggml_backend_tensor_set(x, h.data(), 0, kDim * sizeof(float));
    CHECK(ggml_backend_graph_compute(backend, graph) == GGML_STATUS_SUCCESS);
    ggml_backend_tensor_get(y, h.data(), 0, kDim * sizeof(float));
    ggml_backend_buffer_free(buffer);
    ggml_free(ctx);
}

std::vector<float> input() {
    std::vector<float> h(kDim);
    for (int i = 0; i < kDim; ++i) h[i] = float(i % 5 - 2) * 0.25f;
    return h;
}

// The model with no engine at all.
std::vector<float> reference(Model &m) {
    ggml_backend_t backend = ggml_backend_cpu_init();
    CHECK(backend != nullptr);
    ggml_backend_cpu_set_n_threads(backend, 1);  // as the engine's backend (compute_threads 1)
    std::vector<float> h = input();
    for (int l = 0; l < kLayers; ++l) apply(backend, m.weights[l], nullptr, h);
    apply(backend, nullptr, m.norm, h);
    ggml_backend_free(backend);
    return h;
}

}  // namespace

int main() {
    Model m;
    build_model(m);
    const std::vector<float> expected = reference(m);

    offload_engine_registry_params registry_params;
    offload_engine_registry_params_init(&registry_params);
    offload_engine_registry *registry = nullptr;
    CHECK_OK(offload_engine_registry_new(&registry_params, &registry));
    for (int l = 0; l < kLayers; ++l)
        CHECK_OK(offload_engine_registry_add_tensor(registry, m.weights[l], nullptr, nullptr));
    CHECK_OK(offload_engine_registry_add_tensor(registry, m.norm, nullptr, nullptr));
    size_t layer_count = 0;
    CHECK_OK(offload_engine_registry_layer_count(registry, &layer_count));
    CHECK(layer_count == size_t(kLayers));

    // Room for the global group and two streaming slots, not for all three layers.
    offload_engine_engine_params engine_params;
    offload_engine_engine_params_init(&engine_params);
    engine_params.device = "CPU";
    engine_params.budget_bytes = 2 * kLayerBytes + kLayerBytes / 2;
    offload_engine_engine *engine = nullptr;
    CHECK_OK(offload_engine_engine_new(&engine_params, registry, &engine));
    offload_engine_registry_free(registry);  // the engine works on its own copy

    ggml_backend_t backend = nullptr;
    CHECK_OK(offload_engine_engine_backend(engine, &backend));
    CHECK(backend != nullptr);
    // One ggml: the engine found its device in this process's device registry (pointer
    // identity; a second ggml would have its own registry and its own device objects).
    ggml_backend_dev_t cpu = ggml_backend_dev_by_name("CPU");
    CHECK(cpu != nullptr);
    CHECK(ggml_backend_get_device(backend) == cpu);

    offload_engine_plan_params plan_params;
    offload_engine_plan_params_init(&plan_params);  // free_bytes 0: the engine's budget
    offload_engine_plan *plan = nullptr;
    CHECK_OK(offload_engine_engine_prepare(engine, &plan_params, &plan));
    offload_engine_plan_summary summary;
    std::memset(&summary, 0, sizeof summary);
    summary.size = sizeof summary;
    CHECK_OK(offload_engine_plan_get_summary(plan, &summary));
    CHECK(summary.mode == OFFLOAD_ENGINE_MODE_STREAMING);
    CHECK(summary.streamed_layer_count >= 1);
    int streamed[kLayers];
    for (int l = 0; l < kLayers; ++l) {
        int resident = -1;
        CHECK_OK(offload_engine_plan_layer_resident(plan, uint64_t(l), &resident));
        streamed[l] = !resident;
    }
    offload_engine_plan_free(plan);

    std::vector<float> h = input();
    CHECK_OK(offload_engine_engine_pass_begin(engine));
    for (int l = 0; l < kLayers; ++l) {
        ggml_tensor *w = m.weights[l];
        CHECK_OK(offload_engine_engine_layer_begin(engine, uint64_t(l)));
        // The layer now lives in the engine's arena, a buffer of this process's CPU buffer
        // type: the same static object the host gets from ggml_backend_cpu_buffer_type().
        CHECK(w->data != m.home[l]);
        CHECK(w->buffer != m.buffer);
        CHECK(ggml_backend_buffer_get_type(w->buffer) == ggml_backend_cpu_buffer_type());
        apply(backend, w, nullptr, h);
        CHECK_OK(offload_engine_engine_layer_end(engine, uint64_t(l)));
        if (streamed[l]) CHECK(w->data == m.home[l] && w->buffer == m.buffer);
    }
    apply(backend, nullptr, m.norm, h);
    CHECK_OK(offload_engine_engine_pass_end(engine));

    offload_engine_stats stats;
    std::memset(&stats, 0, sizeof stats);
    stats.size = sizeof stats;
    CHECK_OK(offload_engine_engine_stats(engine, &stats));
    CHECK(stats.passes == 1);
    CHECK(stats.layer_loads >= summary.streamed_layer_count);

    // Bit for bit, as the engine promises.
    CHECK(std::memcmp(h.data(), expected.data(), kDim * sizeof(float)) == 0);

    offload_engine_engine_free(engine);
    for (int l = 0; l < kLayers; ++l) CHECK(m.weights[l]->data == m.home[l]);
    ggml_backend_buffer_free(m.buffer);
    ggml_free(m.ctx);
    std::printf("OK: %d layers, %llu streamed, %llu loads, %llu bytes copied\n", kLayers,
                (unsigned long long)summary.streamed_layer_count,
                (unsigned long long)stats.layer_loads, (unsigned long long)stats.bytes_copied);
    return 0;
}
