/* llama_hook.c: the llama.cpp drop-in's exports (offload_engine_llama_*, offload_engine_advise)
 * from C: defaults, NULL and stale handles, refusals, sequence errors. With ggml (the static
 * library), also the whole drop-in as any ggml host would use it, without llama.cpp: the
 * weights are allocated from the hook's buffer type, adopted, and a graph whose layer outputs
 * are named l_out-N runs through ggml's scheduler with offload_engine_llama_eval; its result
 * must equal the same graph over plainly allocated weights, bit for bit.
 *
 * Included by abi_test.c (it uses its helpers and the GGUF writer).
 */

#define HOOK_LAYERS 4
#define HOOK_DIM 32

/* blk.N.ffn_up.weight (32x32 f32, values that depend on N) for N < 4, and
 * output_norm.weight (32 f32): the global group. */
static float hook_weight(int tensor, int i)
{
    return (float)((tensor + 1) * 0.01 + (i % 7) * 0.001 - (i % 3) * 0.002);
}

static void hook_tensor_name(char *out, size_t capacity, int tensor)
{
    if (tensor < HOOK_LAYERS)
        snprintf(out, capacity, "blk.%d.ffn_up.weight", tensor);
    else
        snprintf(out, capacity, "output_norm.weight");
}

static size_t hook_tensor_floats(int tensor)
{
    return tensor < HOOK_LAYERS ? (size_t)HOOK_DIM * HOOK_DIM : (size_t)HOOK_DIM;
}

static void write_hook_gguf(const char *path, const char *architecture)
{
    struct bytes b = {NULL, 0, 0};
    uint64_t offset = 0;
    int t;
    size_t i;
    char name[64];
    bytes_append(&b, "GGUF", 4);
    bytes_u32(&b, 3);
    bytes_u64(&b, HOOK_LAYERS + 1);
    bytes_u64(&b, 1);
    bytes_string(&b, "general.architecture");
    bytes_u32(&b, GGUF_TYPE_STRING);
    bytes_string(&b, architecture);
    for (t = 0; t <= HOOK_LAYERS; t++) {
        hook_tensor_name(name, sizeof name, t);
        bytes_string(&b, name);
        if (t < HOOK_LAYERS) {
            bytes_u32(&b, 2);
            bytes_u64(&b, HOOK_DIM);
            bytes_u64(&b, HOOK_DIM);
        } else {
            bytes_u32(&b, 1);
            bytes_u64(&b, HOOK_DIM);
        }
        bytes_u32(&b, GGML_F32);
        bytes_u64(&b, offset);
        offset += hook_tensor_floats(t) * 4; /* multiples of the 32-byte alignment */
    }
    bytes_pad(&b, GGUF_ALIGNMENT);
    for (t = 0; t <= HOOK_LAYERS; t++) {
        for (i = 0; i < hook_tensor_floats(t); i++) {
            float v = hook_weight(t, (int)i);
            bytes_append(&b, &v, sizeof v);
        }
    }
    write_file(path, b.data, b.len);
    free(b.data);
}

static offload_engine_llama_params hook_params(uint64_t budget)
{
    offload_engine_llama_params p;
    offload_engine_llama_params_init(&p);
    p.device = "CPU";
    p.budget_bytes = budget;
    p.compute_reserve_bytes = 0;
    p.kv_cache_bytes = 0;
    return p;
}

#define HOOK_LAYER_BYTES ((uint64_t)HOOK_DIM * HOOK_DIM * 4)
#define HOOK_GLOBAL_BYTES ((uint64_t)HOOK_DIM * 4)

static void check_llama_params_and_advice(void)
{
    offload_engine_llama_params p;
    offload_engine_advice_params a;
    offload_engine_advice advice, untouched;
    memset(&p, 0xAB, sizeof p);
    offload_engine_llama_params_init(&p);
    CHECK(p.size == sizeof p);
    CHECK(p.device == NULL && p.budget_bytes == 0);
    CHECK(p.compute_reserve_bytes == UINT64_MAX && p.kv_cache_bytes == UINT64_MAX);
    CHECK(p.n_ctx == 4096 && p.n_ubatch == 512 && p.prefetch_depth == 1);
    CHECK(p.file_backed == 0 && p.layer_output_pattern == NULL && p.tensor_pattern == NULL);

    memset(&a, 0xAB, sizeof a);
    offload_engine_advice_params_init(&a);
    CHECK(a.size == sizeof a && a.tokens_per_pass == 1 && a.bits_per_weight == 4.5);
    CHECK(a.link == NULL && a.host_memory_gbps == 60.0);
    /* 4 GB of Q4_K over PCIe 4: decode on the CPU, prefill streamed. */
    a.overflow_bytes = 4000000000ull;
    advice.size = sizeof advice;
    CHECK_OK(offload_engine_advise(&a, &advice));
    CHECK(advice.prefer_cpu == 1 && advice.cpu_seconds < advice.stream_seconds);
    a.tokens_per_pass = 512;
    CHECK_OK(offload_engine_advise(&a, &advice));
    CHECK(advice.prefer_cpu == 0 && advice.stream_seconds < advice.cpu_seconds);
    /* Nonsense is refused and the output left alone. */
    a.tokens_per_pass = 0;
    memset(&untouched, 0x5A, sizeof untouched);
    untouched.size = sizeof untouched;
    advice = untouched;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_advise(&a, &advice));
    CHECK(memcmp(&advice, &untouched, sizeof advice) == 0);
    a.tokens_per_pass = 1;
    a.link = "carrier-pigeon";
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_advise(&a, &advice));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_advise(NULL, &advice));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_advise(&a, NULL));
    advice.size = 4;
    a.link = NULL;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_advise(&a, &advice));
}

static void check_llama_refusals(const char *path)
{
    char other[512];
    offload_engine_llama_params p = hook_params((uint64_t)1 << 30);
    offload_engine_llama *hook = (offload_engine_llama *)&p; /* a sentinel: must stay */
    offload_engine_llama *const sentinel = hook;
    offload_engine_plan *plan = NULL;
    offload_engine_stats stats;
    struct ggml_backend_buffer_type *buft = NULL;
    offload_engine_llama_context *context = NULL;

    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_llama_new(NULL, path, &hook));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_llama_new(&p, NULL, &hook));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_llama_new(&p, path, NULL));
    p.size = 8;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_llama_new(&p, path, &hook));
    p = hook_params(HOOK_GLOBAL_BYTES + HOOK_LAYER_BYTES / 2);
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INSUFFICIENT_MEMORY, offload_engine_llama_new(&p, path, &hook));
    CHECK(contains(offload_engine_last_error(), "need"));
    p = hook_params((uint64_t)1 << 30);
    p.device = "NoSuchDevice";
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NOT_FOUND, offload_engine_llama_new(&p, path, &hook));
    p = hook_params((uint64_t)1 << 30);
    p.layer_output_pattern = "l_out-\\d+"; /* no group for the index */
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_llama_new(&p, path, &hook));
    p.layer_output_pattern = "(";
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_llama_new(&p, path, &hook));
    p.layer_output_pattern = NULL;
    p.n_ubatch = 0;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_llama_new(&p, path, &hook));
    p = hook_params((uint64_t)1 << 30);
    scratch_path(other, sizeof other, "missing-hook.gguf");
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_IO, offload_engine_llama_new(&p, other, &hook));
    scratch_path(other, sizeof other, "truncated-hook.gguf");
    write_truncated_gguf(other);
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_CORRUPT_FILE, offload_engine_llama_new(&p, other, &hook));
    /* An architecture whose llama.cpp graph names no l_out node needs a pattern. */
    scratch_path(other, sizeof other, "bert-hook.gguf");
    write_hook_gguf(other, "bert");
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_UNSUPPORTED, offload_engine_llama_new(&p, other, &hook));
    CHECK(contains(offload_engine_last_error(), "l_out"));
    CHECK(hook == sentinel); /* outputs are written only on success */
    p.layer_output_pattern = "^layer_out-(\\d+)$";
    CHECK_OK(offload_engine_llama_new(&p, other, &hook));
    offload_engine_llama_free(hook);

    /* NULL handles everywhere. */
    stats.size = sizeof stats;
    offload_engine_llama_free(NULL);
    offload_engine_llama_context_free(NULL);
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_llama_buffer_type(NULL, &buft));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_llama_plan(NULL, &plan));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_llama_adopt(NULL, &plan));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_llama_detach(NULL));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_llama_stats(NULL, &stats));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_llama_trace_write(NULL, "x"));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_llama_context_new(NULL, NULL, NULL, &context));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_llama_context_status(NULL));
    CHECK(!offload_engine_llama_eval(NULL, true, NULL));
    CHECK(offload_engine_llama_eval(NULL, false, NULL));

    /* A hook before llama.cpp loaded anything into its buffer type. */
    CHECK_OK(offload_engine_llama_new(&p, path, &hook));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_llama_buffer_type(hook, NULL));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_llama_plan(hook, NULL));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_llama_trace_write(hook, NULL));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_llama_stats(hook, NULL));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_llama_context_new(hook, NULL, NULL, NULL));
    CHECK_OK(offload_engine_llama_buffer_type(hook, &buft));
    CHECK(buft != NULL);
    CHECK_OK(offload_engine_llama_plan(hook, &plan));
    offload_engine_plan_free(plan);
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_llama_adopt(hook, NULL));
    CHECK(contains(offload_engine_last_error(), "tensor_buft_overrides"));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_llama_detach(hook));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_llama_stats(hook, &stats));
    stats.size = 4;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_llama_stats(hook, &stats));
    CHECK_OK(offload_engine_llama_context_new(hook, NULL, NULL, &context));
    CHECK_OK(offload_engine_llama_context_status(context));
    CHECK(!offload_engine_llama_eval(NULL, true, context));
    CHECK(offload_engine_llama_eval(NULL, false, context));
    /* Some other pointer as user data: the neutral answers. */
    CHECK(!offload_engine_llama_eval(NULL, true, &p));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_HANDLE, offload_engine_llama_context_status((offload_engine_llama_context *)hook));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_llama_detach(hook));
    offload_engine_llama_context_free(context);
    offload_engine_llama_context_free(context); /* ignored */
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_HANDLE, offload_engine_llama_context_status(context));
    CHECK(offload_engine_llama_eval(NULL, false, context));
    offload_engine_llama_free(hook);
    offload_engine_llama_free(hook); /* ignored */
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_HANDLE, offload_engine_llama_plan(hook, &plan));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_HANDLE, offload_engine_llama_context_new(hook, NULL, NULL, &context));
}

#if ABI_TEST_WITH_GGML
/* The weights of one model: a ggml context without data, its tensors allocated from `buft`
 * (the hook's, or the CPU's for the reference), then filled from the file's values. */
struct hook_model {
    struct ggml_context *ctx;
    ggml_backend_buffer_t buffer;
    struct ggml_tensor *w[HOOK_LAYERS + 1];
};

static void hook_model_load(struct hook_model *m, ggml_backend_buffer_type_t buft)
{
    struct ggml_init_params params = {ggml_tensor_overhead() * (HOOK_LAYERS + 1) + 1024, NULL, true};
    char name[64];
    float values[HOOK_DIM * HOOK_DIM];
    int t;
    size_t i;
    m->ctx = ggml_init(params);
    CHECK(m->ctx != NULL);
    for (t = 0; t <= HOOK_LAYERS; t++) {
        hook_tensor_name(name, sizeof name, t);
        m->w[t] = t < HOOK_LAYERS ? ggml_new_tensor_2d(m->ctx, GGML_TYPE_F32, HOOK_DIM, HOOK_DIM)
                                  : ggml_new_tensor_1d(m->ctx, GGML_TYPE_F32, HOOK_DIM);
        ggml_set_name(m->w[t], name);
    }
    m->buffer = ggml_backend_alloc_ctx_tensors_from_buft(m->ctx, buft);
    CHECK(m->buffer != NULL);
    for (t = 0; t <= HOOK_LAYERS; t++) {
        for (i = 0; i < hook_tensor_floats(t); i++)
            values[i] = hook_weight(t, (int)i);
        ggml_backend_tensor_set(m->w[t], values, 0, hook_tensor_floats(t) * 4);
    }
}

static void hook_model_free(struct hook_model *m)
{
    if (m->buffer != NULL)
        ggml_backend_buffer_free(m->buffer);
    if (m->ctx != NULL)
        ggml_free(m->ctx);
    m->buffer = NULL;
    m->ctx = NULL;
}

/* y = norm * (W3 (W2 (W1 (W0 x)))) with each layer's output named l_out-N, computed by
 * ggml's scheduler on the CPU backend, with `callback` as its eval callback. */
static void hook_forward(struct hook_model *m, ggml_backend_sched_eval_callback callback, void *user, float *out)
{
    struct ggml_init_params params = {ggml_tensor_overhead() * 64 + ggml_graph_overhead() + 1024, NULL, true};
    struct ggml_context *ctx = ggml_init(params);
    ggml_backend_t cpu = ggml_backend_cpu_init();
    ggml_backend_sched_t sched;
    struct ggml_tensor *x, *y;
    struct ggml_cgraph *graph;
    float input[HOOK_DIM];
    int l;
    CHECK(ctx != NULL && cpu != NULL);
    x = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, HOOK_DIM);
    ggml_set_input(x);
    y = x;
    for (l = 0; l < HOOK_LAYERS; l++) {
        y = ggml_mul_mat(ctx, m->w[l], y);
        y = ggml_tanh(ctx, y);
        ggml_format_name(y, "l_out-%d", l);
    }
    y = ggml_mul(ctx, y, m->w[HOOK_LAYERS]);
    ggml_set_output(y);
    graph = ggml_new_graph(ctx);
    ggml_build_forward_expand(graph, y);
    sched = ggml_backend_sched_new(&cpu, NULL, 1, 64, false, false);
    CHECK(sched != NULL);
    ggml_backend_sched_set_eval_callback(sched, callback, user);
    CHECK(ggml_backend_sched_alloc_graph(sched, graph));
    for (l = 0; l < HOOK_DIM; l++)
        input[l] = (float)(l % 5) * 0.25f - 0.5f;
    ggml_backend_tensor_set(x, input, 0, sizeof input);
    CHECK(ggml_backend_sched_graph_compute(sched, graph) == GGML_STATUS_SUCCESS);
    ggml_backend_tensor_get(y, out, 0, HOOK_DIM * sizeof(float));
    ggml_backend_sched_free(sched);
    ggml_backend_free(cpu);
    ggml_free(ctx);
}

struct hook_counter {
    int asked;
};

static bool count_nodes(struct ggml_tensor *t, bool ask, void *user)
{
    (void)t;
    if (ask)
        ((struct hook_counter *)user)->asked++;
    return true; /* wants every node: the engine must honour it */
}

static void check_llama_hook_on_a_ggml_graph(const char *path)
{
    struct hook_model reference, streamed;
    float want[HOOK_DIM], got[HOOK_DIM];
    offload_engine_llama_params p;
    offload_engine_llama *hook = NULL;
    offload_engine_llama_context *context = NULL, *chained = NULL;
    struct ggml_backend_buffer_type *buft = NULL;
    offload_engine_plan *plan = NULL;
    offload_engine_plan_summary summary;
    offload_engine_stats stats;
    struct hook_counter counter = {0};
    int depth, pass;

    memset(&reference, 0, sizeof reference);
    memset(&streamed, 0, sizeof streamed);
    hook_model_load(&reference, ggml_backend_cpu_buffer_type());
    hook_forward(&reference, NULL, NULL, want);

    for (depth = 0; depth <= 2; depth++) {
        /* The global tensor and two slots: four layers stream through them. */
        p = hook_params(HOOK_GLOBAL_BYTES + 2 * HOOK_LAYER_BYTES + 1024);
        p.prefetch_depth = (uint32_t)depth;
        CHECK_OK(offload_engine_llama_new(&p, path, &hook));
        CHECK_OK(offload_engine_llama_buffer_type(hook, &buft));
        hook_model_load(&streamed, buft);
        CHECK_OK(offload_engine_llama_adopt(hook, &plan));
        CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_llama_adopt(hook, NULL));
        summary.size = sizeof summary;
        CHECK_OK(offload_engine_plan_get_summary(plan, &summary));
        CHECK(summary.mode == OFFLOAD_ENGINE_MODE_STREAMING);
        CHECK(summary.streamed_layer_count >= 3);
        offload_engine_plan_free(plan);

        CHECK_OK(offload_engine_llama_context_new(hook, NULL, NULL, &context));
        for (pass = 0; pass < 3; pass++) {
            memset(got, 0, sizeof got);
            hook_forward(&streamed, offload_engine_llama_eval, context, got);
            CHECK_OK(offload_engine_llama_context_status(context));
            CHECK(memcmp(got, want, sizeof got) == 0);
        }
        stats.size = sizeof stats;
        CHECK_OK(offload_engine_llama_stats(hook, &stats));
        CHECK(stats.passes == 3);
        CHECK(stats.streamed_bytes == summary.bytes_per_pass * 3);
        CHECK(stats.bytes_copied > stats.placement_bytes);
        CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_llama_detach(hook));
        offload_engine_llama_context_free(context);

        /* A host callback that wants every node, chained: same result, every node asked. */
        CHECK_OK(offload_engine_llama_context_new(hook, count_nodes, &counter, &chained));
        counter.asked = 0;
        hook_forward(&streamed, offload_engine_llama_eval, chained, got);
        CHECK_OK(offload_engine_llama_context_status(chained));
        CHECK(memcmp(got, want, sizeof got) == 0);
        CHECK(counter.asked == 2 * HOOK_LAYERS + 1);
        offload_engine_llama_context_free(chained);

        if (depth == 1) {
            /* The host frees its model before detaching: the engine detaches then. */
            hook_model_free(&streamed);
            CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_llama_stats(hook, &stats));
            CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_llama_adopt(hook, NULL));
        } else {
            CHECK_OK(offload_engine_llama_detach(hook));
            /* Home again: the plain CPU path computes the same from the home buffer. */
            hook_forward(&streamed, NULL, NULL, got);
            CHECK(memcmp(got, want, sizeof got) == 0);
            /* A context whose model is not adopted: a sticky error, the graph still runs. */
            CHECK_OK(offload_engine_llama_context_new(hook, NULL, NULL, &context));
            hook_forward(&streamed, offload_engine_llama_eval, context, got);
            CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_llama_context_status(context));
            CHECK(contains(offload_engine_last_error(), "adopt"));
            CHECK(memcmp(got, want, sizeof got) == 0);
            offload_engine_llama_context_free(context);
        }
        /* The hook may go before llama.cpp's buffers: they keep the buffer type alive. */
        offload_engine_llama_free(hook);
        hook_model_free(&streamed);
    }
    hook_model_free(&reference);
}
#endif

static void check_llama_hook(void)
{
    char path[512];
    scratch_path(path, sizeof path, "hook.gguf");
    write_hook_gguf(path, "llama");
    check_llama_params_and_advice();
    check_llama_refusals(path);
#if ABI_TEST_WITH_GGML
    check_llama_hook_on_a_ggml_graph(path);
#endif
}
