/* layer_api.c: what hosts with their own idea of layers need, checked from C: explicit
 * tensor-to-layer assignment, several consecutive layers open at once, and the host's own
 * backend for the events that free a slot.
 *
 * Included by abi_test.c (it uses its test model and helpers).
 */

static uint64_t summary_slots(offload_engine_plan *plan, uint64_t *streamed)
{
    offload_engine_plan_summary summary;
    summary.size = sizeof summary;
    CHECK_OK(offload_engine_plan_get_summary(plan, &summary));
    *streamed = summary.streamed_layer_count;
    return summary.slot_count;
}

static void check_layer_ranges(void)
{
    struct test_model model;
    offload_engine_registry *registry;
    offload_engine_engine *engine;
    offload_engine_plan_params plan_params;
    offload_engine_plan *plan = NULL;
    offload_engine_stats stats;
    uint64_t streamed = 0;
    int l;

    build_model(&model);
    registry = model_registry(&model);
    /* out.w and two slots: the three layers stream through them. */
    engine = cpu_engine(registry, 3 * MODEL_WEIGHT_BYTES + 512, 0);
    offload_engine_plan_params_init(&plan_params);
    CHECK_OK(offload_engine_engine_prepare(engine, &plan_params, &plan));
    CHECK(summary_slots(plan, &streamed) == 2 && streamed == MODEL_LAYERS);
    offload_engine_plan_free(plan);

    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_engine_layers_begin(engine, 0, 2));
    CHECK_OK(offload_engine_engine_pass_begin(engine));
    /* Two layers at once: both usable together. */
    CHECK_OK(offload_engine_engine_layers_begin(engine, 0, 2));
    check_weights_visible(model.weights[0], 0);
    check_weights_visible(model.weights[1], 1);
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_engine_layer_begin(engine, 2));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_engine_layers_end(engine, 0, 1));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_engine_layer_end(engine, 1));
    CHECK_OK(offload_engine_engine_layers_end(engine, 0, 2));
    /* Ranges the model or the ring cannot hold. */
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NOT_FOUND, offload_engine_engine_layers_begin(engine, 1, 3));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NOT_FOUND, offload_engine_engine_layers_begin(engine, 2, 0));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NOT_FOUND, offload_engine_engine_layers_begin(engine, 0, UINT64_MAX));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_engine_layers_begin(engine, 0, 3));
    CHECK(contains(offload_engine_last_error(), "slots"));
    /* The refused ranges left nothing open: the pass goes on. */
    CHECK_OK(offload_engine_engine_layers_begin(engine, 2, 1));
    check_weights_visible(model.weights[2], 2);
    CHECK_OK(offload_engine_engine_layers_end(engine, 2, 1));
    CHECK_OK(offload_engine_engine_pass_end(engine));

    /* Ranges and single layers mix from pass to pass; each layer loads once per pass. */
    for (l = 0; l < 2; l++) {
        CHECK_OK(offload_engine_engine_pass_begin(engine));
        CHECK_OK(offload_engine_engine_layer_begin(engine, 0));
        check_weights_visible(model.weights[0], 0);
        CHECK_OK(offload_engine_engine_layer_end(engine, 0));
        CHECK_OK(offload_engine_engine_layers_begin(engine, 1, 2));
        check_weights_visible(model.weights[1], 1);
        check_weights_visible(model.weights[2], 2);
        CHECK_OK(offload_engine_engine_layers_end(engine, 1, 2));
        CHECK_OK(offload_engine_engine_pass_end(engine));
    }
    stats.size = sizeof stats;
    CHECK_OK(offload_engine_engine_stats(engine, &stats));
    CHECK(stats.passes == 3 && stats.layer_loads == 3 * MODEL_LAYERS);
    CHECK(stats.streamed_bytes == 3 * MODEL_LAYERS * MODEL_WEIGHT_BYTES);
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_engine_layers_begin(NULL, 0, 1));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_engine_layers_end(NULL, 0, 1));
    offload_engine_engine_free(engine);
    check_all_home(&model);
    offload_engine_registry_free(registry);
    free_model(&model);
}

static void check_registry_assign(void)
{
    struct test_model model;
    offload_engine_registry *registry = new_registry(NULL);
    offload_engine_registry *other = new_registry(NULL);
    offload_engine_layer_info info;
    offload_engine_engine *engine;
    offload_engine_plan_params plan_params;
    uint64_t ids[MODEL_TENSORS], bytes = 0;
    const char *names[MODEL_TENSORS] = {"a.weight", "b.weight", "c.weight", "d.weight"};
    int i;

    build_model(&model);
    /* Names no pattern knows: only the host knows which segment uses which weight. */
    for (i = 0; i < MODEL_TENSORS; i++)
        CHECK_OK(offload_engine_registry_add_tensor(registry, model.weights[i], names[i], &ids[i]));
    CHECK(layer_count(registry) == 0);
    /* Layer numbers order the layers; they need not be contiguous. d stays global. */
    CHECK_OK(offload_engine_registry_assign(registry, ids[2], 7));
    CHECK_OK(offload_engine_registry_assign(registry, ids[0], 2));
    CHECK_OK(offload_engine_registry_assign(registry, ids[1], 7));
    CHECK(layer_count(registry) == 2);
    info.size = sizeof info;
    CHECK_OK(offload_engine_registry_layer_info(registry, 0, &info));
    CHECK(strcmp(info.name, "layer.2") == 0 && info.tensor_count == 1);
    CHECK_OK(offload_engine_registry_layer_info(registry, 1, &info));
    CHECK(strcmp(info.name, "layer.7") == 0 && info.tensor_count == 2);
    CHECK_OK(offload_engine_registry_global_bytes(registry, &bytes));
    CHECK(bytes == MODEL_WEIGHT_BYTES);
    /* Reassigning moves the tensor. */
    CHECK_OK(offload_engine_registry_assign(registry, ids[1], 9));
    CHECK(layer_count(registry) == 3);
    CHECK_OK(offload_engine_registry_assign(registry, ids[1], 7));
    /* Ids of nothing, or of another registry. */
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_registry_assign(NULL, ids[0], 1));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_HANDLE, offload_engine_registry_assign(other, ids[0], 1));
    CHECK(offload_engine_registry_assign(registry, ids[0] + 1000, 1) != OFFLOAD_ENGINE_OK);

    /* An engine streams the assigned layers, in number order (d, then two slots of the
     * larger layer: nothing resident). */
    engine = cpu_engine(registry, 5 * MODEL_WEIGHT_BYTES + 512, 0);
    offload_engine_plan_params_init(&plan_params);
    CHECK_OK(offload_engine_engine_prepare(engine, &plan_params, NULL));
    CHECK_OK(offload_engine_engine_pass_begin(engine));
    CHECK_OK(offload_engine_engine_layer_begin(engine, 0));
    check_weights_visible(model.weights[0], 0);
    CHECK_OK(offload_engine_engine_layer_end(engine, 0));
    CHECK_OK(offload_engine_engine_layer_begin(engine, 1));
    check_weights_visible(model.weights[1], 1);
    check_weights_visible(model.weights[2], 2);
    CHECK_OK(offload_engine_engine_layer_end(engine, 1));
    CHECK_OK(offload_engine_engine_pass_end(engine));
    offload_engine_engine_free(engine);
    check_all_home(&model);
    offload_engine_registry_free(other);
    offload_engine_registry_free(registry);
    free_model(&model);
}

static void check_host_compute_backend(void)
{
    struct test_model model;
    offload_engine_registry *registry;
    offload_engine_engine *engine;
    offload_engine_plan_params plan_params;
    int l;
#if ABI_TEST_WITH_GGML
    ggml_backend_t host = ggml_backend_cpu_init();
    CHECK(host != NULL);
#endif

    build_model(&model);
    registry = model_registry(&model);
    engine = cpu_engine(registry, 3 * MODEL_WEIGHT_BYTES + 512, 0);
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_engine_set_compute_backend(NULL, NULL));
    CHECK_OK(offload_engine_engine_set_compute_backend(engine, NULL)); /* back to the engine's own */
#if ABI_TEST_WITH_GGML
    CHECK_OK(offload_engine_engine_set_compute_backend(engine, host));
#endif
    offload_engine_plan_params_init(&plan_params);
    CHECK_OK(offload_engine_engine_prepare(engine, &plan_params, NULL));
    CHECK_OK(offload_engine_engine_pass_begin(engine));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_engine_set_compute_backend(engine, NULL));
    for (l = 0; l < MODEL_LAYERS; l++) {
        CHECK_OK(offload_engine_engine_layer_begin(engine, (uint64_t)l));
        check_weights_visible(model.weights[l], l);
        CHECK_OK(offload_engine_engine_layer_end(engine, (uint64_t)l));
    }
    CHECK_OK(offload_engine_engine_pass_end(engine));
    CHECK_OK(offload_engine_engine_set_compute_backend(engine, NULL));
    offload_engine_engine_free(engine);
    check_all_home(&model);
    offload_engine_registry_free(registry);
    free_model(&model);
#if ABI_TEST_WITH_GGML
    ggml_backend_free(host);
#endif
}

/* Hosts with their own loader that leave the weights in the file: each tensor registered by
 * its file and offset (here after a 100-byte header, no alignment) streams from there, and
 * the host memory the tensors point at is neither needed nor touched. */
static void check_tensors_from_a_file(void)
{
    struct test_model model;
    offload_engine_registry *registry;
    offload_engine_engine *engine;
    offload_engine_plan_params plan_params;
    char path[512], name[32];
    unsigned char header[100];
    float values[MODEL_DIM * MODEL_DIM];
    FILE *file;
    offload_engine_plan *plan = NULL;
    uint64_t id = 0, streamed = 0;
    int i, pass, layer;
    const uint64_t first = sizeof header;

    build_model(&model);
    snprintf(path, sizeof path, "%s/offload-engine-from-file-%d.bin", scratch_dir, (int)getpid());
    file = fopen(path, "wb");
    CHECK(file != NULL);
    memset(header, 0xA5, sizeof header);
    CHECK(fwrite(header, 1, sizeof header, file) == sizeof header);
    for (i = 0; i < MODEL_TENSORS; i++) {
        fill_weights(values, i);
        CHECK(fwrite(values, 1, sizeof values, file) == sizeof values);
        memset(model.weights[i]->data, 0, MODEL_WEIGHT_BYTES); /* only the file has them */
    }
    CHECK(fclose(file) == 0);

    registry = new_registry(NULL);
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER,
                     offload_engine_registry_add_tensor_from_file(NULL, model.weights[0], "blk.0.w", path, first, NULL));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER,
                     offload_engine_registry_add_tensor_from_file(registry, NULL, "blk.0.w", path, first, NULL));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER,
                     offload_engine_registry_add_tensor_from_file(registry, model.weights[0], "blk.0.w", NULL, first, NULL));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_IO,
                     offload_engine_registry_add_tensor_from_file(registry, model.weights[0], "blk.0.w", scratch_dir, 0, NULL));
    /* One byte past the end, and an offset whose end overflows. */
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_CORRUPT_FILE,
                     offload_engine_registry_add_tensor_from_file(registry, model.weights[0], "blk.0.w", path,
                                                                  first + MODEL_TENSORS * MODEL_WEIGHT_BYTES - MODEL_WEIGHT_BYTES + 1, NULL));
    CHECK(contains(offload_engine_last_error(), "lie outside") && contains(offload_engine_last_error(), path));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_CORRUPT_FILE,
                     offload_engine_registry_add_tensor_from_file(registry, model.weights[0], "blk.0.w", path, UINT64_MAX - 8, NULL));
    CHECK(tensor_count(registry) == 0);
    for (i = 0; i < MODEL_TENSORS; i++) {
        snprintf(name, sizeof name, "%s", model_tensor_names[i]);
        CHECK_OK(offload_engine_registry_add_tensor_from_file(registry, model.weights[i], name, path,
                                                              first + (uint64_t)i * MODEL_WEIGHT_BYTES, &id));
    }
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_ALREADY_EXISTS,
                     offload_engine_registry_add_tensor_from_file(registry, model.weights[0], "blk.0.w", path, first, NULL));
    CHECK(tensor_count(registry) == MODEL_TENSORS && layer_count(registry) == MODEL_LAYERS);

    /* Read straight from the file, each tensor takes whole direct-I/O blocks (4 KiB): out.w
     * and two slots, 13 KiB, but not all four tensors. Every layer streams, twice. */
    engine = cpu_engine(registry, 14 * 1024, 0);
    offload_engine_plan_params_init(&plan_params);
    CHECK_OK(offload_engine_engine_prepare(engine, &plan_params, &plan));
    CHECK(summary_slots(plan, &streamed) == 2 && streamed == MODEL_LAYERS);
    offload_engine_plan_free(plan);
    for (pass = 0; pass < 2; pass++) {
        CHECK_OK(offload_engine_engine_pass_begin(engine));
        for (layer = 0; layer < MODEL_LAYERS; layer++) {
            CHECK_OK(offload_engine_engine_layer_begin(engine, (uint64_t)layer));
            check_weights_visible(model.weights[layer], layer);
            CHECK_OK(offload_engine_engine_layer_end(engine, (uint64_t)layer));
        }
        check_weights_visible(model.weights[MODEL_LAYERS], MODEL_LAYERS);
        CHECK_OK(offload_engine_engine_pass_end(engine));
    }
    /* Each load reads the layer's stretch of the file: the bytes are loads of those. */
    for (layer = 0; layer < MODEL_LAYERS; layer++) {
        offload_engine_layer_stats layer_stats;
        layer_stats.size = sizeof layer_stats;
        CHECK_OK(offload_engine_engine_layer_stats(engine, (uint64_t)layer, &layer_stats));
        CHECK(!layer_stats.resident && layer_stats.loads == 2);
        CHECK(layer_stats.load_bytes >= MODEL_WEIGHT_BYTES);
        CHECK(layer_stats.bytes == layer_stats.loads * layer_stats.load_bytes);
    }
    offload_engine_engine_free(engine);
    check_all_home(&model);
    for (i = 0; i < MODEL_TENSORS; i++) {
        memset(values, 0, sizeof values);
        CHECK(memcmp(model.weights[i]->data, values, sizeof values) == 0); /* never written */
    }
    offload_engine_registry_free(registry);
    free_model(&model);
    CHECK(unlink(path) == 0);
}

static void check_layer_api(void)
{
    check_tensors_from_a_file();
    check_layer_ranges();
    check_registry_assign();
    check_host_compute_backend();
}
