/* hostile_use.c: the header's promises under use no host should make, one check per class of
 * defect that such use once found: two engines over the same tensors, frees during calls
 * (from another thread, a callback, the log callback), graphs larger than any fixed size,
 * builder results ggml cannot take, pipelines and their engines, unbounded parameters, model
 * files replaced behind the engine's back, state the caller did not ask for, status codes,
 * and sizes that do not fit in memory.
 *
 * Included by abi_test.c (it uses its helpers), so it also runs as C++17, against the
 * shared and the static library, and under valgrind and ASan/UBSan (tests/sanitizers.sh).
 */

#include <sys/stat.h>
#include <time.h>

static void sleep_ms(long ms)
{
    struct timespec t;
    t.tv_sec = ms / 1000;
    t.tv_nsec = (ms % 1000) * 1000000L;
    nanosleep(&t, NULL);
}

/* Engines freed from library threads are torn down in the background: wait for it. */
static int wait_until_home(const struct test_model *model, long timeout_ms)
{
    long waited;
    for (waited = 0; waited < timeout_ms; waited += 5) {
        int i, home = 1;
        for (i = 0; i < MODEL_TENSORS; i++)
            home = home && model->weights[i]->data == model->home[i];
        if (home)
            return 1;
        sleep_ms(5);
    }
    return 0;
}

static offload_engine_engine *engine_with_threads(offload_engine_registry *registry, int threads, int *status)
{
    offload_engine_engine_params params;
    offload_engine_engine *engine = NULL;
    offload_engine_engine_params_init(&params);
    params.device = "CPU";
    params.budget_bytes = 1 << 20;
    params.compute_threads = threads;
    *status = offload_engine_engine_new(&params, registry, &engine);
    return engine;
}

/* ---------------------------------------------------------------------------------------
 * 1. A host tensor belongs to one live engine at a time
 * ------------------------------------------------------------------------------------- */

static void check_one_engine_per_tensor(void)
{
    struct test_model model;
    offload_engine_registry *registry, *other;
    offload_engine_engine *first, *second = NULL;
    offload_engine_engine_params params;
    offload_engine_plan_summary summary;
    struct forward_output reference;
    int streamed[MODEL_LAYERS];
    const uint64_t streaming_budget = 3 * MODEL_WEIGHT_BYTES;

    build_model(&model);
    reference_forward(&model, &reference);
    registry = model_registry(&model);
    first = cpu_engine(registry, streaming_budget, 0);
    prepare(first, streamed, &summary);
    CHECK(summary.mode == OFFLOAD_ENGINE_MODE_STREAMING);

    /* A second engine over the same tensors would take the first one's device memory for
     * their home: refused, with the tensor named. */
    offload_engine_engine_params_init(&params);
    params.device = "CPU";
    params.budget_bytes = streaming_budget;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_engine_new(&params, registry, &second));
    CHECK(second == NULL);
    CHECK(contains(offload_engine_last_error(), "another live engine"));
    CHECK(contains(offload_engine_last_error(), "blk.0.w"));

    /* Nor can a live engine's tensors be registered anew. */
    other = new_registry(NULL);
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_registry_add_tensor(other, model.weights[1], NULL, NULL));
#if ABI_TEST_WITH_GGML
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_registry_add_context(other, model.ctx, NULL));
#endif
    CHECK(tensor_count(other) == 0);

    check_pass(&model, first, streamed, &reference);
    offload_engine_engine_free(first);
    check_all_home(&model);

    /* The first one gone, the tensors are free for the next engine. */
    second = cpu_engine(registry, streaming_budget, 0);
    prepare(second, streamed, &summary);
    check_pass(&model, second, streamed, &reference);
    offload_engine_engine_free(second);
    check_all_home(&model);
    register_model(other, &model);
    offload_engine_registry_free(other);
    offload_engine_registry_free(registry);
    free_model(&model);
}

/* ---------------------------------------------------------------------------------------
 * 2. Frees during calls: the handle dies for new calls at once; the object goes when the
 *    last call holding it returns, never under it
 * ------------------------------------------------------------------------------------- */

static pthread_mutex_t freeing_lock = PTHREAD_MUTEX_INITIALIZER;
static offload_engine_engine *engine_to_free_on_error;
static int freed_on_error;

/* A log callback that frees an engine when the library reports an error (the copy thread
 * logs a failed copy: this runs there). */
static void free_engine_on_error(int level, const char *message, void *user)
{
    offload_engine_engine *engine = NULL;
    (void)message;
    (void)user;
    if (level != OFFLOAD_ENGINE_LOG_ERROR)
        return;
    pthread_mutex_lock(&freeing_lock);
    engine = engine_to_free_on_error;
    engine_to_free_on_error = NULL;
    pthread_mutex_unlock(&freeing_lock);
    if (engine != NULL) {
        offload_engine_engine_free(engine);
        pthread_mutex_lock(&freeing_lock);
        freed_on_error = 1;
        pthread_mutex_unlock(&freeing_lock);
    }
}

static void check_free_from_the_log_callback(void)
{
    struct test_model model;
    offload_engine_registry *registry;
    offload_engine_engine *engine;
    offload_engine_plan_params params;
    offload_engine_stats stats;
    long waited;
    int done = 0;

    build_model(&model);
    registry = model_registry(&model);
    engine = cpu_engine(registry, 3 * MODEL_WEIGHT_BYTES, 0);
    pthread_mutex_lock(&freeing_lock);
    engine_to_free_on_error = engine;
    freed_on_error = 0;
    pthread_mutex_unlock(&freeing_lock);
    CHECK_OK(offload_engine_log_set_callback(free_engine_on_error, NULL));
    /* The first prefetch (started by prepare, on the copy thread) fails and is logged. */
    CHECK_OK(offload_engine_debug_inject_fault(1, 1));
    offload_engine_plan_params_init(&params);
    CHECK_OK(offload_engine_engine_prepare(engine, &params, NULL));
    for (waited = 0; waited < 5000 && !done; waited += 5) {
        pthread_mutex_lock(&freeing_lock);
        done = freed_on_error;
        pthread_mutex_unlock(&freeing_lock);
        if (!done)
            sleep_ms(5);
    }
    CHECK(done);
    memset(&stats, 0, sizeof stats);
    stats.size = sizeof stats;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_HANDLE, offload_engine_engine_stats(engine, &stats));
    CHECK(wait_until_home(&model, 5000));
    offload_engine_debug_clear_faults();
    CHECK_OK(offload_engine_log_set_callback(NULL, NULL));
    offload_engine_registry_free(registry);
    free_model(&model);
}

#if ABI_TEST_WITH_GGML
/* Hooks for build_layer; `hook_data` points at one of these. */
struct hostile_hook {
    offload_engine_engine *engine;
    offload_engine_pipeline *pipeline;
    uint64_t at_layer;
    int status;
    int fired;
    /* For the cross-thread checks: the pass waits at `at_layer` until `go` is set. */
    pthread_mutex_t lock;
    pthread_cond_t changed;
    int inside;
    int go;
};

static void hostile_hook_init(struct hostile_hook *h)
{
    memset(h, 0, sizeof *h);
    h->status = -1;
    pthread_mutex_init(&h->lock, NULL);
    pthread_cond_init(&h->changed, NULL);
}

static void hostile_hook_destroy(struct hostile_hook *h)
{
    pthread_mutex_destroy(&h->lock);
    pthread_cond_destroy(&h->changed);
}

static void free_engine_in_layer(struct staged_host *host, uint64_t layer)
{
    struct hostile_hook *h = (struct hostile_hook *)host->hook_data;
    if (layer == h->at_layer && !h->fired) {
        h->fired = 1;
        offload_engine_engine_free(h->engine);
        /* Dead for new calls at once, though the pass that holds it goes on. */
        h->status = offload_engine_engine_pass_begin(h->engine);
    }
}

static void free_pipeline_in_layer(struct staged_host *host, uint64_t layer)
{
    struct hostile_hook *h = (struct hostile_hook *)host->hook_data;
    if (layer == h->at_layer && !h->fired) {
        h->fired = 1;
        offload_engine_pipeline_free(h->pipeline);
    }
}

static void run_begin_in_layer(struct staged_host *host, uint64_t layer)
{
    struct hostile_hook *h = (struct hostile_hook *)host->hook_data;
    if (layer == h->at_layer && !h->fired) {
        h->fired = 1;
        h->status = offload_engine_pipeline_run_begin(h->pipeline);
    }
}

/* Parks the pass at `at_layer` until another thread says go. */
static void wait_in_layer(struct staged_host *host, uint64_t layer)
{
    struct hostile_hook *h = (struct hostile_hook *)host->hook_data;
    if (layer != h->at_layer || h->fired)
        return;
    h->fired = 1;
    pthread_mutex_lock(&h->lock);
    h->inside = 1;
    pthread_cond_broadcast(&h->changed);
    while (!h->go)
        pthread_cond_wait(&h->changed, &h->lock);
    pthread_mutex_unlock(&h->lock);
}

static void wait_until_inside(struct hostile_hook *h)
{
    pthread_mutex_lock(&h->lock);
    while (!h->inside)
        pthread_cond_wait(&h->changed, &h->lock);
    pthread_mutex_unlock(&h->lock);
}

static void say_go(struct hostile_hook *h)
{
    pthread_mutex_lock(&h->lock);
    h->go = 1;
    pthread_cond_broadcast(&h->changed);
    pthread_mutex_unlock(&h->lock);
}

struct pass_on_thread {
    offload_engine_engine *engine;
    offload_engine_staged_model *staged;
    float output[MODEL_DIM];
    int status;
};

static void *run_pass_thread(void *arg)
{
    struct pass_on_thread *p = (struct pass_on_thread *)arg;
    size_t size = 0;
    p->status = offload_engine_engine_run_pass(p->engine, p->staged, p->output, sizeof p->output, &size);
    return NULL;
}

static void *free_engine_thread(void *arg)
{
    offload_engine_engine_free((offload_engine_engine *)arg);
    return NULL;
}

static void *free_pipeline_thread(void *arg)
{
    offload_engine_pipeline_free((offload_engine_pipeline *)arg);
    return NULL;
}

static void check_free_during_a_pass(void)
{
    struct test_model model;
    struct forward_output reference;
    offload_engine_registry *registry;
    struct staged_host host;
    offload_engine_staged_model staged;
    struct hostile_hook hook;
    struct pass_on_thread pass;
    offload_engine_plan_summary summary;
    int streamed[MODEL_LAYERS];
    float output[MODEL_DIM];
    size_t size = 0;
    pthread_t runner, freer;

    build_model(&model);
    reference_forward(&model, &reference);
    registry = model_registry(&model);

    /* From the pass's own callback: the pass finishes with the right output, the engine is
     * refused to new calls at once, and every tensor is home when the pass returns. */
    hostile_hook_init(&hook);
    hook.engine = cpu_engine(registry, 3 * MODEL_WEIGHT_BYTES, 0);
    hook.at_layer = 1;
    prepare(hook.engine, streamed, &summary);
    CHECK(summary.mode == OFFLOAD_ENGINE_MODE_STREAMING);
    staged = staged_model(&host, &model);
    host.layer_hook = free_engine_in_layer;
    host.hook_data = &hook;
    CHECK_OK(offload_engine_engine_run_pass(hook.engine, &staged, output, sizeof output, &size));
    CHECK(memcmp(output, reference.ggml, sizeof output) == 0);
    CHECK(hook.fired && hook.status == OFFLOAD_ENGINE_ERR_INVALID_HANDLE);
    check_all_home(&model);
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_HANDLE, offload_engine_engine_run_pass(hook.engine, &staged, output, sizeof output, &size));
    hostile_hook_destroy(&hook);

    /* From another thread while the pass runs there: the same. */
    hostile_hook_init(&hook);
    pass.engine = cpu_engine(registry, 3 * MODEL_WEIGHT_BYTES, 0);
    prepare(pass.engine, streamed, &summary);
    staged = staged_model(&host, &model);
    host.layer_hook = wait_in_layer;
    host.hook_data = &hook;
    hook.at_layer = 1;
    pass.staged = &staged;
    pass.status = -1;
    CHECK(pthread_create(&runner, NULL, run_pass_thread, &pass) == 0);
    wait_until_inside(&hook);
    CHECK(pthread_create(&freer, NULL, free_engine_thread, pass.engine) == 0);
    CHECK(pthread_join(freer, NULL) == 0); /* returns at once: the pass holds the engine */
    say_go(&hook);
    CHECK(pthread_join(runner, NULL) == 0);
    CHECK(pass.status == OFFLOAD_ENGINE_OK);
    CHECK(memcmp(pass.output, reference.ggml, sizeof pass.output) == 0);
    check_all_home(&model);
    hostile_hook_destroy(&hook);

    offload_engine_registry_free(registry);
    free_model(&model);
}

/* ---------------------------------------------------------------------------------------
 * 3. and 4. Graphs of any size; builder results ggml cannot take are errors
 * ------------------------------------------------------------------------------------- */

static void check_graph_sizes_and_builder_types(void)
{
    static const int refused_types[] = {GGML_TYPE_I8, GGML_TYPE_I16, GGML_TYPE_I32, GGML_TYPE_F64};
    struct test_model model;
    struct forward_output reference;
    offload_engine_registry *registry;
    offload_engine_engine *engine;
    struct staged_host host;
    offload_engine_staged_model staged;
    offload_engine_plan_summary summary;
    int streamed[MODEL_LAYERS];
    size_t t;

    build_model(&model);
    reference_forward(&model, &reference);
    registry = model_registry(&model);
    engine = cpu_engine(registry, 1 << 20, 0);
    prepare(engine, streamed, &summary);
    CHECK(summary.mode == OFFLOAD_ENGINE_MODE_FULL);

    /* Every layer resident: the three run as one graph of about 18,000 nodes, more than
     * ggml's usual graph sizes; then one layer alone of 20,000. */
    staged = staged_model(&host, &model);
    host.scale_ops = 6000;
    check_staged_pass(engine, &staged, &reference);
    host.scale_ops = 20000;
    check_staged_pass(engine, &staged, &reference);

    /* A tensor ggml cannot copy into the f32 activation, from a layer or the input. */
    for (t = 0; t < sizeof refused_types / sizeof refused_types[0]; t++) {
        float output[MODEL_DIM];
        size_t size = 0;
        staged = staged_model(&host, &model);
        host.layer_type = refused_types[t];
        CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_engine_run_pass(engine, &staged, output, sizeof output, &size));
        CHECK(contains(offload_engine_last_error(), "type"));
        staged = staged_model(&host, &model);
        host.input_type = refused_types[t];
        CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_engine_run_pass(engine, &staged, output, sizeof output, &size));
    }
    /* An activation whose element count overflows int64. */
    {
        float output[MODEL_DIM];
        size_t size = 0;
        staged = staged_model(&host, &model);
        staged.activation_ne[0] = INT64_MAX / 2;
        staged.activation_ne[1] = 3;
        CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_engine_run_pass(engine, &staged, output, sizeof output, &size));
    }
    /* Still usable, and still right. */
    staged = staged_model(&host, &model);
    check_staged_pass(engine, &staged, &reference);

    /* Layers that return f16: in one merged graph (all resident) each still gets an f32
     * activation of the declared shape, as in graphs of their own (streamed), so the two
     * runs agree bit for bit. */
    {
        float merged[MODEL_DIM], separate[MODEL_DIM];
        size_t size = 0;
        offload_engine_engine *streaming;
        staged = staged_model(&host, &model);
        host.f16_results = 1;
        CHECK_OK(offload_engine_engine_run_pass(engine, &staged, merged, sizeof merged, &size));
        offload_engine_engine_free(engine);
        streaming = cpu_engine(registry, 3 * MODEL_WEIGHT_BYTES, 0);
        prepare(streaming, streamed, &summary);
        CHECK(summary.mode == OFFLOAD_ENGINE_MODE_STREAMING && summary.streamed_layer_count >= 1);
        CHECK_OK(offload_engine_engine_run_pass(streaming, &staged, separate, sizeof separate, &size));
        CHECK(memcmp(merged, separate, sizeof merged) == 0);
        engine = streaming;
    }
    offload_engine_engine_free(engine);
    check_all_home(&model);
    offload_engine_registry_free(registry);
    free_model(&model);
}

/* ---------------------------------------------------------------------------------------
 * 5. Pipelines and their engines
 * ------------------------------------------------------------------------------------- */

static offload_engine_pipeline *roomy_pipeline(void)
{
    offload_engine_pipeline_params params;
    offload_engine_pipeline *pipeline = NULL;
    offload_engine_pipeline_params_init(&params);
    params.budget_bytes = 1 << 20;
    params.min_free_bytes = 0;
    params.margin_bytes = 0;
    CHECK_OK(offload_engine_pipeline_new(&params, &pipeline));
    return pipeline;
}

static void check_pipelines_and_engines(void)
{
    struct test_model model;
    struct forward_output reference;
    offload_engine_registry *registry;
    offload_engine_engine *engine;
    offload_engine_pipeline *pipeline, *second;
    struct staged_host host;
    offload_engine_staged_model staged;
    struct hostile_hook hook;
    struct pass_on_thread pass;
    offload_engine_plan_params plan_params;
    pthread_t runner, freer;

    build_model(&model);
    reference_forward(&model, &reference);
    registry = model_registry(&model);
    engine = cpu_engine(registry, 1 << 20, 0);
    offload_engine_plan_params_init(&plan_params);

    /* One pipeline at a time per engine. */
    pipeline = roomy_pipeline();
    second = roomy_pipeline();
    CHECK_OK(offload_engine_pipeline_add(pipeline, "model", OFFLOAD_ENGINE_ROLE_DIFFUSION, engine));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_pipeline_add(second, "model", OFFLOAD_ENGINE_ROLE_DIFFUSION, engine));
    CHECK(contains(offload_engine_last_error(), "another pipeline"));

    /* A pipeline call from inside a call on its component is refused, not a deadlock. */
    CHECK_OK(offload_engine_pipeline_run_begin(pipeline));
    CHECK_OK(offload_engine_pipeline_stage_begin(pipeline, "model"));
    hostile_hook_init(&hook);
    hook.pipeline = pipeline;
    hook.at_layer = 0;
    staged = staged_model(&host, &model);
    host.layer_hook = run_begin_in_layer;
    host.hook_data = &hook;
    check_staged_pass(engine, &staged, &reference);
    CHECK(hook.fired && hook.status == OFFLOAD_ENGINE_ERR_INVALID_STATE);
    hostile_hook_destroy(&hook);
    CHECK_OK(offload_engine_pipeline_stage_end(pipeline, "model"));
    CHECK_OK(offload_engine_pipeline_run_end(pipeline));

    /* Freed from inside that call: the engine is the host's again afterwards (prepare is
     * its own to call), and the other pipeline may take it. */
    CHECK_OK(offload_engine_pipeline_run_begin(pipeline));
    CHECK_OK(offload_engine_pipeline_stage_begin(pipeline, "model"));
    hostile_hook_init(&hook);
    hook.pipeline = pipeline;
    hook.at_layer = 1;
    staged = staged_model(&host, &model);
    host.layer_hook = free_pipeline_in_layer;
    host.hook_data = &hook;
    check_staged_pass(engine, &staged, &reference);
    CHECK(hook.fired);
    hostile_hook_destroy(&hook);
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_HANDLE, offload_engine_pipeline_run_end(pipeline));
    CHECK_OK(offload_engine_engine_prepare(engine, &plan_params, NULL));
    CHECK_OK(offload_engine_pipeline_add(second, "model", OFFLOAD_ENGINE_ROLE_DIFFUSION, engine));

    /* Freed from another thread while the engine is busy on a third: the free waits for
     * that call, and leaves the engine to the host. */
    CHECK_OK(offload_engine_pipeline_run_begin(second));
    CHECK_OK(offload_engine_pipeline_stage_begin(second, "model"));
    hostile_hook_init(&hook);
    hook.at_layer = 1;
    staged = staged_model(&host, &model);
    host.layer_hook = wait_in_layer;
    host.hook_data = &hook;
    pass.engine = engine;
    pass.staged = &staged;
    pass.status = -1;
    CHECK(pthread_create(&runner, NULL, run_pass_thread, &pass) == 0);
    wait_until_inside(&hook);
    CHECK(pthread_create(&freer, NULL, free_pipeline_thread, second) == 0);
    sleep_ms(20); /* the free is now waiting for the pass */
    say_go(&hook);
    CHECK(pthread_join(runner, NULL) == 0);
    CHECK(pthread_join(freer, NULL) == 0);
    CHECK(pass.status == OFFLOAD_ENGINE_OK);
    CHECK(memcmp(pass.output, reference.ggml, sizeof pass.output) == 0);
    hostile_hook_destroy(&hook);
    CHECK_OK(offload_engine_engine_prepare(engine, &plan_params, NULL));

    /* engine_free on a component puts its tensors home before it returns, whatever the
     * pipeline still holds (the host may free its model right after). */
    pipeline = roomy_pipeline();
    CHECK_OK(offload_engine_pipeline_add(pipeline, "model", OFFLOAD_ENGINE_ROLE_DIFFUSION, engine));
    CHECK_OK(offload_engine_pipeline_run_begin(pipeline));
    CHECK_OK(offload_engine_pipeline_stage_begin(pipeline, "model"));
    offload_engine_engine_free(engine);
    check_all_home(&model);
    CHECK_OK(offload_engine_pipeline_stage_end(pipeline, "model"));
    CHECK_OK(offload_engine_pipeline_run_end(pipeline));
    CHECK_OK(offload_engine_pipeline_run_begin(pipeline));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_pipeline_stage_begin(pipeline, "model"));
    CHECK_OK(offload_engine_pipeline_run_end(pipeline));
    offload_engine_registry_free(registry);
    free_model(&model);
    offload_engine_pipeline_free(pipeline); /* after the model is gone: touches none of it */
}
#endif

/* ---------------------------------------------------------------------------------------
 * 6. Parameters within what ggml can do
 * ------------------------------------------------------------------------------------- */

static void check_bounded_parameters(void)
{
    static const int refused[] = {0, -1, 257, 100000, INT32_MIN};
    struct test_model model;
    offload_engine_registry *registry;
    offload_engine_engine *engine;
    size_t i;
    int status = -1;

    build_model(&model);
    registry = model_registry(&model);
    for (i = 0; i < sizeof refused / sizeof refused[0]; i++) {
        engine = engine_with_threads(registry, refused[i], &status);
        CHECK(status == OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT && engine == NULL);
        CHECK(contains(offload_engine_last_error(), "compute threads"));
    }
    engine = engine_with_threads(registry, 256, &status);
    CHECK(status == OFFLOAD_ENGINE_OK && engine != NULL);
    offload_engine_engine_free(engine);
    offload_engine_registry_free(registry);
    free_model(&model);
}

/* ---------------------------------------------------------------------------------------
 * 7. A file-backed model file replaced behind the engine's back
 * ------------------------------------------------------------------------------------- */

/* The tiny model with its tensors' data in the opposite order: a valid GGUF with the same
 * tensors at other offsets. */
static void write_tiny_gguf_reordered(const char *path)
{
    struct bytes b = {NULL, 0, 0};
    size_t i;
    uint64_t offsets[TINY_GGUF_TENSORS], offset = 0;
    for (i = TINY_GGUF_TENSORS; i-- > 0;) {
        offsets[i] = offset;
        offset += tiny_gguf_tensors[i].ne0 * tiny_gguf_tensors[i].ne1 * 4;
    }
    bytes_append(&b, "GGUF", 4);
    bytes_u32(&b, 3);
    bytes_u64(&b, TINY_GGUF_TENSORS);
    bytes_u64(&b, 1);
    bytes_string(&b, "general.architecture");
    bytes_u32(&b, GGUF_TYPE_STRING);
    bytes_string(&b, "llama");
    for (i = 0; i < TINY_GGUF_TENSORS; i++) {
        bytes_string(&b, tiny_gguf_tensors[i].name);
        bytes_u32(&b, 2);
        bytes_u64(&b, tiny_gguf_tensors[i].ne0);
        bytes_u64(&b, tiny_gguf_tensors[i].ne1);
        bytes_u32(&b, GGML_F32);
        bytes_u64(&b, offsets[i]);
    }
    bytes_pad(&b, GGUF_ALIGNMENT);
    bytes_zeros(&b, offset);
    write_file(path, b.data, b.len);
    free(b.data);
}

static void check_replaced_model_file(void)
{
    char path[512], replacement[512];
    offload_engine_registry *registry = new_registry(NULL);
    offload_engine_engine *engine;
    offload_engine_plan_params params;
    size_t count = 0;

    scratch_path(path, sizeof path, "replaced.gguf");
    scratch_path(replacement, sizeof replacement, "replaced.gguf.new");
    write_tiny_gguf(path);
    CHECK_OK(offload_engine_registry_load_gguf(registry, path, 1, &count));
    engine = cpu_engine(registry, TINY_GLOBAL_BYTES + 2 * TINY_LAYER_BYTES + 4 * 4096, 0);
    offload_engine_plan_params_init(&params);
    CHECK_OK(offload_engine_engine_prepare(engine, &params, NULL));
    CHECK_OK(offload_engine_engine_offload_all(engine));
    /* Another valid file at the same path: planning again refuses it instead of streaming
     * the wrong bytes. */
    write_tiny_gguf_reordered(replacement);
    CHECK(rename(replacement, path) == 0);
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_IO, offload_engine_engine_prepare(engine, &params, NULL));
    CHECK(contains(offload_engine_last_error(), "changed"));
    offload_engine_engine_free(engine);
    offload_engine_registry_free(registry);
}

/* ---------------------------------------------------------------------------------------
 * 8. State the caller did not ask for
 * ------------------------------------------------------------------------------------- */

static void check_state_is_what_was_asked(void)
{
    struct test_model model;
    offload_engine_registry *registry;
    offload_engine_engine *engine;
    offload_engine_engine_params no_budget;
    offload_engine_plan_params params;
    offload_engine_plan *plan = NULL;
    struct staged_host host;
    offload_engine_staged_model staged;
    float output[MODEL_DIM];
    size_t size = 0;
    uint64_t layer;

    build_model(&model);
    registry = model_registry(&model);

    /* An engine without a budget plans one placement with the free_bytes it is given, and
     * the next one with the device's free memory again. */
    offload_engine_engine_params_init(&no_budget);
    no_budget.device = "CPU";
    CHECK_OK(offload_engine_engine_new(&no_budget, registry, &engine));
    params = exact_budget(3 * MODEL_WEIGHT_BYTES);
    CHECK_OK(offload_engine_engine_prepare(engine, &params, &plan));
    CHECK(plan_summary(plan).mode == OFFLOAD_ENGINE_MODE_STREAMING);
    offload_engine_plan_free(plan);
    offload_engine_plan_params_init(&params);
    CHECK_OK(offload_engine_engine_prepare(engine, &params, &plan));
    CHECK(plan_summary(plan).mode == OFFLOAD_ENGINE_MODE_FULL);
    offload_engine_plan_free(plan);

    /* All resident: still only the open layer may end. */
    CHECK_OK(offload_engine_engine_pass_begin(engine));
    CHECK_OK(offload_engine_engine_layer_begin(engine, 0));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_engine_layer_end(engine, 1));
    CHECK_OK(offload_engine_engine_layer_end(engine, 0));

    /* run_pass while the host's own pass is open: refused, and that pass is left as it was. */
    staged = staged_model(&host, &model);
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_engine_run_pass(engine, &staged, output, sizeof output, &size));
    for (layer = 1; layer < MODEL_LAYERS; layer++) {
        CHECK_OK(offload_engine_engine_layer_begin(engine, layer));
        CHECK_OK(offload_engine_engine_layer_end(engine, layer));
    }
    CHECK_OK(offload_engine_engine_pass_end(engine));
    offload_engine_engine_free(engine);
    check_all_home(&model);
    offload_engine_registry_free(registry);
    free_model(&model);
}

/* ---------------------------------------------------------------------------------------
 * 9. Status codes the header promises
 * ------------------------------------------------------------------------------------- */

/* One f32 tensor `name` (`name_len` bytes, NULs allowed) of shape ne0 x ne1. */
static void write_one_tensor_gguf(const char *path, const char *name, size_t name_len, uint64_t ne0, uint64_t ne1)
{
    struct bytes b = {NULL, 0, 0};
    bytes_append(&b, "GGUF", 4);
    bytes_u32(&b, 3);
    bytes_u64(&b, 1);
    bytes_u64(&b, 0);
    bytes_u64(&b, (uint64_t)name_len);
    bytes_append(&b, name, name_len);
    bytes_u32(&b, 2);
    bytes_u64(&b, ne0);
    bytes_u64(&b, ne1);
    bytes_u32(&b, GGML_F32);
    bytes_u64(&b, 0);
    bytes_pad(&b, GGUF_ALIGNMENT);
    bytes_zeros(&b, (size_t)(ne0 * ne1 * 4) + 64);
    write_file(path, b.data, b.len);
    free(b.data);
}

static void check_file_statuses(const char *path, int expected)
{
    offload_engine_registry *registry = new_registry(NULL);
    size_t count = 77;
    CHECK_FAILS_WITH(expected, offload_engine_registry_add_gguf(registry, path, &count));
    CHECK_FAILS_WITH(expected, offload_engine_registry_load_gguf(registry, path, 0, &count));
    CHECK_FAILS_WITH(expected, offload_engine_registry_load_gguf(registry, path, 1, &count));
    CHECK(count == 77 && tensor_count(registry) == 0);
    offload_engine_registry_free(registry);
}

static void check_status_codes(void)
{
    char path[512];
    struct test_model model;
    offload_engine_registry *registry;

    /* Damaged names and tensors without elements are damaged files, for every loader. */
    scratch_path(path, sizeof path, "empty-name.gguf");
    write_one_tensor_gguf(path, "", 0, 32, 1);
    check_file_statuses(path, OFFLOAD_ENGINE_ERR_CORRUPT_FILE);
    scratch_path(path, sizeof path, "nul-name.gguf");
    write_one_tensor_gguf(path, "blk.0\0.w", 8, 32, 1);
    check_file_statuses(path, OFFLOAD_ENGINE_ERR_CORRUPT_FILE);
    scratch_path(path, sizeof path, "no-elements.gguf");
    write_one_tensor_gguf(path, "blk.0.w", 7, 0, 32);
    check_file_statuses(path, OFFLOAD_ENGINE_ERR_CORRUPT_FILE);
    CHECK(contains(offload_engine_last_error(), "no elements"));

    /* A FIFO would block an open for ever: refused before it is opened. */
    scratch_path(path, sizeof path, "model.fifo");
    unlink(path);
    CHECK(mkfifo(path, 0600) == 0);
    check_file_statuses(path, OFFLOAD_ENGINE_ERR_IO);
    CHECK(contains(offload_engine_last_error(), "not a regular file"));
    unlink(path);

    /* The same rule for tensors handed over directly. */
    build_model(&model);
    registry = new_registry(NULL);
    {
        struct ggml_tensor *t = model.weights[0];
        int64_t saved = t->ne[1];
        t->ne[1] = 0;
        CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_registry_add_tensor(registry, t, NULL, NULL));
        CHECK(contains(offload_engine_last_error(), "no elements"));
        t->ne[1] = saved;
    }
    {
        const int64_t ne[2] = {16, 0};
        CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_registry_add_descriptor(registry, "blk.0.d", GGML_F32, 2, ne, NULL));
    }
    CHECK(tensor_count(registry) == 0);
    offload_engine_registry_free(registry);
    free_model(&model);
}

/* ---------------------------------------------------------------------------------------
 * 10. Sizes past what memory can hold
 * ------------------------------------------------------------------------------------- */

static void check_huge_sizes(void)
{
    struct test_model model;
    offload_engine_registry *registry;
    offload_engine_engine *engine;
    float row[MODEL_DIM];
    int streamed[MODEL_LAYERS];
    offload_engine_plan_summary summary;

    build_model(&model);
    registry = model_registry(&model);
    engine = cpu_engine(registry, 1 << 20, 0);
    memset(row, 0, sizeof row);
    /* A size larger than the tensor (and than any slice can be) is refused before the
     * library looks at the bytes; so is an offset past the end. */
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_engine_tensor_set(engine, "blk.0.w", row, 0, UINT64_MAX));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_engine_tensor_set(engine, "blk.0.w", row, UINT64_MAX, sizeof row));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_engine_tensor_set(engine, "blk.0.w", row, 1, (uint64_t)1 << 62));
    prepare(engine, streamed, &summary);
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_engine_tensor_set(engine, "blk.0.w", row, 0, UINT64_MAX));
    offload_engine_engine_free(engine);
    check_all_home(&model);
    offload_engine_registry_free(registry);
    free_model(&model);
}

/* ---------------------------------------------------------------------------------------
 * Entry
 * ------------------------------------------------------------------------------------- */

static void check_hostile_use(void)
{
    check_one_engine_per_tensor();
    check_free_from_the_log_callback();
    check_bounded_parameters();
    check_replaced_model_file();
    check_state_is_what_was_asked();
    check_status_codes();
    check_huge_sizes();
#if ABI_TEST_WITH_GGML
    check_free_during_a_pass();
    check_graph_sizes_and_builder_types();
    check_pipelines_and_engines();
#endif
}
