/*
 * abi_test.c: drives every export of ffi/offload_engine.h from C99, the way a C host would.
 *
 * Build (tests/abi.rs does this):
 *   with ggml (static library, which bundles ggml):
 *     cc -std=c99 -DABI_TEST_WITH_GGML=1 -Iffi -isystem <ggml include> abi_test.c liboffload_engine.a ...
 *   without ggml (shared library, which keeps its ggml private):
 *     cc -std=c99 -Iffi -isystem <ggml include> abi_test.c liboffload_engine.so
 * Run: abi_test [SCRATCH_DIR]   (temporary files go there; default /tmp)
 *
 * Without ABI_TEST_WITH_GGML the program calls no ggml function: ggml.h only supplies the
 * layout of struct ggml_tensor, and the weights are hand-made tensors over malloc'd memory.
 * Linking a second ggml next to the one inside the shared library would put two copies of
 * ggml in one process, which this test must not do.
 *
 * Silent on success (exit 0). The first failed check prints file:line, the check and
 * offload_engine_last_error(), and exits 1. -DABI_TEST_PRINT_COUNT prints how many checks ran.
 *
 * The code is the common subset of C99 and C++17: abi_test.cpp includes this file to run the
 * same checks as C++.
 */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L /* getpid and pthreads under -std=c99 */
#endif

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "offload_engine.h"

#include "ggml.h"
#if ABI_TEST_WITH_GGML
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#endif

/* ---------------------------------------------------------------------------------------
 * Checks
 * ------------------------------------------------------------------------------------- */

static long checks_passed;

static void fail_check(const char *file, int line, const char *what)
{
    fprintf(stderr, "%s:%d: check failed: %s\n  last_error: \"%s\"\n", file, line, what,
            offload_engine_last_error());
    exit(1);
}

static void fail_status(const char *file, int line, const char *call, int expected, int got)
{
    fprintf(stderr, "%s:%d: %s\n  returned %d (%s), expected %d (%s)\n  last_error: \"%s\"\n",
            file, line, call, got, offload_engine_status_str(got), expected,
            offload_engine_status_str(expected), offload_engine_last_error());
    exit(1);
}

#define CHECK(cond)                                                                           \
    do {                                                                                      \
        if (!(cond))                                                                          \
            fail_check(__FILE__, __LINE__, #cond);                                            \
        checks_passed++;                                                                      \
    } while (0)

#define CHECK_STATUS(expected, call)                                                          \
    do {                                                                                      \
        int status_ = (call);                                                                 \
        if (status_ != (int)(expected))                                                       \
            fail_status(__FILE__, __LINE__, #call, (int)(expected), status_);                \
        checks_passed++;                                                                      \
    } while (0)

#define CHECK_OK(call) CHECK_STATUS(OFFLOAD_ENGINE_OK, call)

/* A failed call must leave a message behind (the header's promise to C hosts). */
#define CHECK_FAILS_WITH(expected, call)                                                      \
    do {                                                                                      \
        CHECK_STATUS(expected, call);                                                         \
        CHECK(offload_engine_last_error()[0] != '\0');                                        \
    } while (0)

static int contains(const char *haystack, const char *needle)
{
    return haystack != NULL && strstr(haystack, needle) != NULL;
}

/* ---------------------------------------------------------------------------------------
 * Scratch files
 * ------------------------------------------------------------------------------------- */

static const char *scratch_dir = "/tmp";

static void scratch_path(char *out, size_t capacity, const char *name)
{
    int written = snprintf(out, capacity, "%s/abi_test_%ld_%s", scratch_dir, (long)getpid(), name);
    CHECK(written > 0 && (size_t)written < capacity);
}

/* Growable byte buffer: GGUF files are assembled in memory, then written whole or cut. */
struct bytes {
    unsigned char *data;
    size_t len;
    size_t capacity;
};

static void bytes_append(struct bytes *b, const void *src, size_t n)
{
    if (b->len + n > b->capacity) {
        size_t capacity = b->capacity ? b->capacity : 256;
        while (capacity < b->len + n)
            capacity *= 2;
        b->data = (unsigned char *)realloc(b->data, capacity);
        CHECK(b->data != NULL);
        b->capacity = capacity;
    }
    if (n > 0)
        memcpy(b->data + b->len, src, n);
    b->len += n;
}

/* GGUF is little-endian whatever the host is. */
static void bytes_u32(struct bytes *b, uint32_t v)
{
    unsigned char le[4];
    int i;
    for (i = 0; i < 4; i++)
        le[i] = (unsigned char)(v >> (8 * i));
    bytes_append(b, le, sizeof le);
}

static void bytes_u64(struct bytes *b, uint64_t v)
{
    unsigned char le[8];
    int i;
    for (i = 0; i < 8; i++)
        le[i] = (unsigned char)(v >> (8 * i));
    bytes_append(b, le, sizeof le);
}

static void bytes_string(struct bytes *b, const char *s)
{
    bytes_u64(b, (uint64_t)strlen(s));
    bytes_append(b, s, strlen(s));
}

static void bytes_zeros(struct bytes *b, size_t n)
{
    const unsigned char zero = 0;
    while (n-- > 0)
        bytes_append(b, &zero, 1);
}

static void bytes_pad(struct bytes *b, size_t alignment)
{
    bytes_zeros(b, (alignment - b->len % alignment) % alignment);
}

static void write_file(const char *path, const void *data, size_t len)
{
    FILE *file = fopen(path, "wb");
    CHECK(file != NULL);
    CHECK(fwrite(data, 1, len, file) == len);
    CHECK(fclose(file) == 0);
}

/* ---------------------------------------------------------------------------------------
 * A tiny GGUF model: blk.0.attn_q.weight, blk.1.attn_q.weight (32x32 f32) and
 * token_embd.weight (32x64 f32, in no layer: the always-resident global group).
 * ------------------------------------------------------------------------------------- */

#define GGUF_ALIGNMENT 32 /* ggml's default; the file sets no general.alignment */
#define GGUF_TYPE_STRING 8
#define GGML_F32 0

struct gguf_tensor_spec {
    const char *name;
    uint64_t ne0;
    uint64_t ne1;
};

static const struct gguf_tensor_spec tiny_gguf_tensors[] = {
    {"blk.0.attn_q.weight", 32, 32},
    {"blk.1.attn_q.weight", 32, 32},
    {"token_embd.weight", 32, 64},
};
#define TINY_GGUF_TENSORS (sizeof tiny_gguf_tensors / sizeof tiny_gguf_tensors[0])
#define TINY_LAYER_BYTES ((uint64_t)32 * 32 * 4)
#define TINY_GLOBAL_BYTES ((uint64_t)32 * 64 * 4)

/* Header, metadata and tensor infos: everything before the data section. */
static void tiny_gguf_head(struct bytes *b)
{
    size_t i;
    uint64_t offset = 0;
    bytes_append(b, "GGUF", 4);
    bytes_u32(b, 3);
    bytes_u64(b, TINY_GGUF_TENSORS);
    bytes_u64(b, 1);
    bytes_string(b, "general.architecture");
    bytes_u32(b, GGUF_TYPE_STRING);
    bytes_string(b, "llama");
    for (i = 0; i < TINY_GGUF_TENSORS; i++) {
        const struct gguf_tensor_spec *t = &tiny_gguf_tensors[i];
        bytes_string(b, t->name);
        bytes_u32(b, 2);
        bytes_u64(b, t->ne0);
        bytes_u64(b, t->ne1);
        bytes_u32(b, GGML_F32);
        bytes_u64(b, offset);
        offset += t->ne0 * t->ne1 * 4; /* f32 sizes are multiples of the alignment here */
    }
}

static void write_tiny_gguf(const char *path)
{
    struct bytes b = {NULL, 0, 0};
    tiny_gguf_head(&b);
    bytes_pad(&b, GGUF_ALIGNMENT);
    /* Zero-filled data: the registry reads none of it, but the file must hold it. */
    bytes_zeros(&b, 2 * TINY_LAYER_BYTES + TINY_GLOBAL_BYTES);
    write_file(path, b.data, b.len);
    free(b.data);
}

/* The same header cut in the middle of the tensor infos. */
static void write_truncated_gguf(const char *path)
{
    struct bytes b = {NULL, 0, 0};
    tiny_gguf_head(&b);
    write_file(path, b.data, b.len / 2);
    free(b.data);
}

/* ---------------------------------------------------------------------------------------
 * Library-wide calls
 * ------------------------------------------------------------------------------------- */

static void check_version_and_status_strings(void)
{
    const char *version = offload_engine_version();
    unsigned major = 0, minor = 0, patch = 0;
    int code, other;
    CHECK(version != NULL);
    CHECK(sscanf(version, "%u.%u.%u", &major, &minor, &patch) == 3);
    CHECK(version == offload_engine_version()); /* a static string */

    /* Every code has its own description; anything else gets one shared fallback. */
    for (code = OFFLOAD_ENGINE_OK; code <= OFFLOAD_ENGINE_ERR_OUT_OF_MEMORY; code++) {
        const char *text = offload_engine_status_str(code);
        CHECK(text != NULL && text[0] != '\0');
        CHECK(strcmp(text, offload_engine_status_str(-1)) != 0);
        for (other = OFFLOAD_ENGINE_OK; other < code; other++)
            CHECK(strcmp(text, offload_engine_status_str(other)) != 0);
    }
    CHECK(strcmp(offload_engine_status_str(OFFLOAD_ENGINE_OK), "ok") == 0);
    CHECK(contains(offload_engine_status_str(OFFLOAD_ENGINE_ERR_INSUFFICIENT_MEMORY), "memory"));
    CHECK(offload_engine_status_str(-1)[0] != '\0');
    CHECK(strcmp(offload_engine_status_str(14), offload_engine_status_str(-1)) == 0);
    CHECK(strcmp(offload_engine_status_str(INT32_MAX), offload_engine_status_str(-1)) == 0);
}

/* One size syntax: decimal units are powers of ten, binary ones powers of two. */
static void check_size_parse(void)
{
    uint64_t bytes = 0;
    CHECK_OK(offload_engine_size_parse("12GB", &bytes));
    CHECK(bytes == (uint64_t)12000000000ULL);
    CHECK_OK(offload_engine_size_parse("12GiB", &bytes));
    CHECK(bytes == (uint64_t)12 << 30);
    CHECK_OK(offload_engine_size_parse("512M", &bytes));
    CHECK(bytes == (uint64_t)512000000);
    CHECK_OK(offload_engine_size_parse("1.5 MiB", &bytes));
    CHECK(bytes == (uint64_t)3 << 19);
    CHECK_OK(offload_engine_size_parse("4096", &bytes));
    CHECK(bytes == 4096);
    CHECK_OK(offload_engine_size_parse("0", &bytes));
    CHECK(bytes == 0);
    bytes = 77;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_size_parse("12 parsecs", &bytes));
    CHECK(contains(offload_engine_last_error(), "unit"));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_size_parse("0.4", &bytes));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_size_parse("", &bytes));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_size_parse(NULL, &bytes));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_size_parse("1G", NULL));
    CHECK(bytes == 77); /* untouched on failure */
}

static void check_params_init(void)
{
    offload_engine_registry_params registry_params;
    offload_engine_plan_params plan_params;
    offload_engine_engine_params engine_params;

    /* The library's idea of each struct's size must match the compiler's. */
    memset(&registry_params, 0xAB, sizeof registry_params);
    offload_engine_registry_params_init(&registry_params);
    CHECK(registry_params.size == sizeof registry_params);
    CHECK(registry_params.pattern == NULL);

    memset(&plan_params, 0xAB, sizeof plan_params);
    offload_engine_plan_params_init(&plan_params);
    CHECK(plan_params.size == sizeof plan_params);
    CHECK(plan_params.free_bytes == 0);
    CHECK(plan_params.min_free_bytes == (uint64_t)512 << 20);
    CHECK(plan_params.safety_fraction > 0.899 && plan_params.safety_fraction < 0.901);
    CHECK(plan_params.steps == 1);
    CHECK(plan_params.passes_per_step == 1);
    CHECK(plan_params.prefetch_depth == 1);
    CHECK(plan_params.link == NULL);
    CHECK(plan_params.link_gbps == 0.0);

    memset(&engine_params, 0xAB, sizeof engine_params);
    offload_engine_engine_params_init(&engine_params);
    CHECK(engine_params.size == sizeof engine_params);
    CHECK(engine_params.device == NULL);
    CHECK(engine_params.budget_bytes == 0);
    CHECK(engine_params.min_free_bytes == (uint64_t)512 << 20);
    CHECK(engine_params.safety_fraction > 0.899 && engine_params.safety_fraction < 0.901);
    CHECK(engine_params.prefetch_depth == 1);
    CHECK(engine_params.compute_threads == 1);
    CHECK(engine_params.trace == 0);
    CHECK(engine_params.pinned_limit_bytes == UINT64_MAX);

    /* A newer caller's larger struct is accepted: the library reads the part it knows. */
    {
        struct {
            offload_engine_registry_params params;
            uint64_t field_from_the_future;
        } newer;
        offload_engine_registry *registry = NULL;
        offload_engine_registry_params_init(&newer.params);
        newer.params.size = sizeof newer;
        newer.field_from_the_future = 42;
        CHECK_OK(offload_engine_registry_new(&newer.params, &registry));
        offload_engine_registry_free(registry);
    }

    /* NULL is ignored rather than dereferenced. */
    offload_engine_registry_params_init(NULL);
    offload_engine_plan_params_init(NULL);
    offload_engine_engine_params_init(NULL);
}

/* Log sink: counts what the library reports. It may run on the engine's copy thread, so the
 * counts sit behind a lock. */
struct log_counts {
    int messages;
    int warnings;
    int errors;
    int malformed; /* a level outside the enum, a NULL message or the wrong user pointer */
    int probe_status;
};

static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;
static struct log_counts log_counts;
/* When set, the next warning makes the callback call into this engine while the library is
 * still inside a call on it: that overlapping call must be refused, not deadlock or race. */
static offload_engine_engine *log_probe_engine;

static void count_log(int level, const char *message, void *user)
{
    offload_engine_engine *probe = NULL;
    pthread_mutex_lock(&log_lock);
    log_counts.messages++;
    if (level == OFFLOAD_ENGINE_LOG_WARN)
        log_counts.warnings++;
    if (level == OFFLOAD_ENGINE_LOG_ERROR)
        log_counts.errors++;
    if (level < OFFLOAD_ENGINE_LOG_TRACE || level > OFFLOAD_ENGINE_LOG_ERROR || message == NULL ||
        user != (void *)&log_counts)
        log_counts.malformed++;
    if (level == OFFLOAD_ENGINE_LOG_WARN) {
        probe = log_probe_engine;
        log_probe_engine = NULL;
    }
    pthread_mutex_unlock(&log_lock);
    /* Outside the lock: the library logs the refusal through this same callback. The probe
     * is a call that succeeds on any engine not in use. */
    if (probe != NULL) {
        struct ggml_backend *backend = NULL;
        int status = offload_engine_engine_backend(probe, &backend);
        pthread_mutex_lock(&log_lock);
        log_counts.probe_status = status;
        pthread_mutex_unlock(&log_lock);
    }
}

static struct log_counts logged(void)
{
    struct log_counts counts;
    pthread_mutex_lock(&log_lock);
    counts = log_counts;
    pthread_mutex_unlock(&log_lock);
    return counts;
}

static void install_log_counter(offload_engine_engine *probe)
{
    pthread_mutex_lock(&log_lock);
    memset(&log_counts, 0, sizeof log_counts);
    log_counts.probe_status = -1;
    log_probe_engine = probe;
    pthread_mutex_unlock(&log_lock);
    CHECK_OK(offload_engine_log_set_callback(count_log, &log_counts));
}

static void check_log_callback(void)
{
    offload_engine_registry *registry = NULL;
    offload_engine_registry_params params;
    int not_a_handle = 0;
    int before;

    install_log_counter(NULL);
    /* Freeing something that is not a live handle is ignored and logged as a warning. */
    offload_engine_registry_free((offload_engine_registry *)(void *)&not_a_handle);
    offload_engine_plan_free((offload_engine_plan *)(void *)&not_a_handle);
    offload_engine_engine_free((offload_engine_engine *)(void *)&not_a_handle);
    CHECK(logged().warnings == 3);

    /* A double free is the same case. */
    offload_engine_registry_params_init(&params);
    CHECK_OK(offload_engine_registry_new(&params, &registry));
    offload_engine_registry_free(registry);
    offload_engine_registry_free(registry);
    CHECK(logged().warnings == 4);
    CHECK(logged().malformed == 0);

    /* Removed: nothing reaches the callback any more (failures log at debug level, which the
     * default stderr logger filters out, so this stays quiet too). */
    CHECK_OK(offload_engine_log_set_callback(NULL, NULL));
    before = logged().messages;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_registry_new(NULL, &registry));
    CHECK(logged().messages == before);
}

static void *fail_on_other_thread(void *arg)
{
    offload_engine_registry *registry = NULL;
    int *status = (int *)arg;
    *status = offload_engine_registry_new(NULL, &registry);
    if (!contains(offload_engine_last_error(), "params"))
        *status = -1;
    return NULL;
}

static void check_last_error_is_per_thread(void)
{
    offload_engine_registry_params params;
    offload_engine_registry *registry = NULL;
    pthread_t thread;
    int thread_status = 0;
    char mine[256];

    offload_engine_registry_params_init(&params);
    params.size = 0;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_registry_new(&params, &registry));
    CHECK(registry == NULL); /* out-parameters are written only on success */
    CHECK(contains(offload_engine_last_error(), "size"));
    snprintf(mine, sizeof mine, "%s", offload_engine_last_error());

    CHECK(pthread_create(&thread, NULL, fail_on_other_thread, &thread_status) == 0);
    CHECK(pthread_join(thread, NULL) == 0);
    CHECK(thread_status == OFFLOAD_ENGINE_ERR_NULL_POINTER);
    CHECK(strcmp(offload_engine_last_error(), mine) == 0);

    /* A successful call leaves the last failure's message alone. */
    offload_engine_registry_params_init(&params);
    CHECK_OK(offload_engine_registry_new(&params, &registry));
    CHECK(strcmp(offload_engine_last_error(), mine) == 0);
    offload_engine_registry_free(registry);
}

static void check_fault_api(void)
{
    int fault;
    for (fault = 0; fault <= 3; fault++)
        CHECK_OK(offload_engine_debug_inject_fault(fault, 1));
    offload_engine_debug_clear_faults();
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_debug_inject_fault(4, 1));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_debug_inject_fault(-1, 1));
    offload_engine_debug_clear_faults();
    offload_engine_debug_clear_faults(); /* idempotent */
}

/* ---------------------------------------------------------------------------------------
 * Registries
 * ------------------------------------------------------------------------------------- */

static offload_engine_registry *new_registry(const char *pattern)
{
    offload_engine_registry_params params;
    offload_engine_registry *registry = NULL;
    offload_engine_registry_params_init(&params);
    params.pattern = pattern;
    CHECK_OK(offload_engine_registry_new(&params, &registry));
    CHECK(registry != NULL);
    return registry;
}

static size_t tensor_count(offload_engine_registry *registry)
{
    size_t n = 0;
    CHECK_OK(offload_engine_registry_tensor_count(registry, &n));
    return n;
}

static size_t layer_count(offload_engine_registry *registry)
{
    size_t n = 0;
    CHECK_OK(offload_engine_registry_layer_count(registry, &n));
    return n;
}

static void check_gguf_registry(void)
{
    char good[512], truncated[512], not_gguf[512], missing[512];
    offload_engine_registry *registry = new_registry(NULL);
    offload_engine_registry *other = new_registry(NULL);
    offload_engine_tensor_info info;
    offload_engine_layer_info layer;
    const char *architecture = NULL;
    uint64_t id = 0, embd_id = 0, bytes = 0, ids[4];
    size_t count = 0;
    uint64_t layer_index;

    scratch_path(good, sizeof good, "tiny.gguf");
    scratch_path(truncated, sizeof truncated, "truncated.gguf");
    scratch_path(not_gguf, sizeof not_gguf, "not_gguf.gguf");
    scratch_path(missing, sizeof missing, "missing.gguf");
    write_tiny_gguf(good);
    write_truncated_gguf(truncated);
    write_file(not_gguf, "GGUX, not a model at all", 24);

    CHECK_OK(offload_engine_registry_add_gguf(registry, good, &count));
    CHECK(count == TINY_GGUF_TENSORS);
    CHECK(tensor_count(registry) == TINY_GGUF_TENSORS);
    CHECK(layer_count(registry) == 2);
    CHECK_OK(offload_engine_registry_architecture(registry, &architecture));
    CHECK(architecture != NULL && strcmp(architecture, "llama_gguf") == 0);
    CHECK_OK(offload_engine_registry_global_bytes(registry, &bytes));
    CHECK(bytes == TINY_GLOBAL_BYTES);
    CHECK_OK(offload_engine_registry_total_bytes(registry, &bytes));
    CHECK(bytes == TINY_GLOBAL_BYTES + 2 * TINY_LAYER_BYTES);

    CHECK_OK(offload_engine_registry_find(registry, "blk.1.attn_q.weight", &id));
    memset(&info, 0, sizeof info);
    info.size = sizeof info;
    CHECK_OK(offload_engine_registry_tensor_info(registry, id, &info));
    CHECK(info.size == sizeof info);
    CHECK(info.name != NULL && strcmp(info.name, "blk.1.attn_q.weight") == 0);
    CHECK(info.ggml_type == GGML_F32);
    CHECK(info.n_dims == 2);
    CHECK(info.ne[0] == 32 && info.ne[1] == 32 && info.ne[2] == 1 && info.ne[3] == 1);
    CHECK(info.bytes == TINY_LAYER_BYTES);
    CHECK(info.layer == 1);
    CHECK(info.location == OFFLOAD_ENGINE_LOCATION_FILE);
    CHECK(info.component != NULL);

    CHECK_OK(offload_engine_registry_find(registry, "token_embd.weight", &embd_id));
    CHECK(embd_id != id);
    info.size = sizeof info;
    CHECK_OK(offload_engine_registry_tensor_info(registry, embd_id, &info));
    CHECK(info.layer == -1);
    CHECK(info.bytes == TINY_GLOBAL_BYTES);
    CHECK(info.ne[0] == 32 && info.ne[1] == 64);

    /* Unknown names, and ids of another registry. */
    id = 12345;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NOT_FOUND, offload_engine_registry_find(registry, "blk.9.attn_q.weight", &id));
    CHECK(id == 12345);
    CHECK(contains(offload_engine_last_error(), "blk.9.attn_q.weight"));
    info.size = sizeof info;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_HANDLE, offload_engine_registry_tensor_info(other, embd_id, &info));

    for (layer_index = 0; layer_index < 2; layer_index++) {
        char expected_name[32];
        snprintf(expected_name, sizeof expected_name, "blk.%u", (unsigned)layer_index);
        memset(&layer, 0, sizeof layer);
        layer.size = sizeof layer;
        CHECK_OK(offload_engine_registry_layer_info(registry, layer_index, &layer));
        CHECK(layer.size == sizeof layer);
        CHECK(layer.name != NULL && strcmp(layer.name, expected_name) == 0);
        CHECK(layer.tensor_count == 1);
        CHECK(layer.bytes == TINY_LAYER_BYTES);
        CHECK(layer.location == OFFLOAD_ENGINE_LOCATION_FILE);
        CHECK(layer.component != NULL);
    }
    layer.size = sizeof layer;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NOT_FOUND, offload_engine_registry_layer_info(registry, 2, &layer));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NOT_FOUND, offload_engine_registry_layer_info(registry, UINT64_MAX, &layer));

    /* layer_tensors: too small an array is refused without writing; big enough gets the ids. */
    count = 99;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_registry_layer_tensors(registry, 1, ids, 0, &count));
    CHECK(count == 99);
    CHECK_OK(offload_engine_registry_layer_tensors(registry, 1, ids, 4, &count));
    CHECK(count == 1);
    CHECK_OK(offload_engine_registry_find(registry, "blk.1.attn_q.weight", &id));
    CHECK(ids[0] == id);
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NOT_FOUND, offload_engine_registry_layer_tensors(registry, 7, ids, 4, &count));

    /* Bad files add nothing; the message names the file. */
    count = 77;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_CORRUPT_FILE, offload_engine_registry_add_gguf(registry, truncated, &count));
    CHECK(contains(offload_engine_last_error(), "truncated.gguf"));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_CORRUPT_FILE, offload_engine_registry_add_gguf(registry, not_gguf, &count));
    CHECK(contains(offload_engine_last_error(), "GGUF"));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_IO, offload_engine_registry_add_gguf(registry, missing, &count));
    CHECK(contains(offload_engine_last_error(), "missing.gguf"));
    CHECK(count == 77);
    /* The same file twice: every name is a duplicate, and it is all or nothing. */
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_ALREADY_EXISTS, offload_engine_registry_add_gguf(registry, good, &count));
    CHECK(tensor_count(registry) == TINY_GGUF_TENSORS);
    /* count_out may be NULL. */
    CHECK_OK(offload_engine_registry_add_gguf(other, good, NULL));
    CHECK(tensor_count(other) == TINY_GGUF_TENSORS);

    offload_engine_registry_free(registry);
    offload_engine_registry_free(other);
    remove(good);
    remove(truncated);
    remove(not_gguf);
}

/* A llama-like model by description only: 4 layers of 4 MiB, a 1 MiB global group. */
#define PLAN_LAYERS 4
#define PLAN_LAYER_BYTES ((uint64_t)1024 * 1024 * 4)
#define PLAN_GLOBAL_BYTES ((uint64_t)256 * 1024 * 4)

static offload_engine_registry *described_model(void)
{
    offload_engine_registry *registry = new_registry("llama_gguf");
    const int64_t layer_ne[2] = {1024, 1024};
    const int64_t global_ne[2] = {1024, 256};
    uint64_t id = 0;
    int i;
    for (i = 0; i < PLAN_LAYERS; i++) {
        char name[64];
        snprintf(name, sizeof name, "blk.%d.ffn_up.weight", i);
        CHECK_OK(offload_engine_registry_add_descriptor(registry, name, GGML_F32, 2, layer_ne, &id));
    }
    CHECK_OK(offload_engine_registry_add_descriptor(registry, "token_embd.weight", GGML_F32, 2, global_ne, NULL));
    return registry;
}

static void check_descriptors(void)
{
    offload_engine_registry *registry = described_model();
    offload_engine_registry *user_pattern = new_registry("^layer\\.(\\d+)\\.");
    offload_engine_registry *probe = NULL;
    offload_engine_registry_params params;
    const int64_t ne[4] = {64, 2, 1, 1};
    const int64_t negative[2] = {64, -2};
    const int64_t odd[1] = {33};
    const char *architecture = NULL;
    uint64_t id = 0, bytes = 0;

    CHECK(tensor_count(registry) == PLAN_LAYERS + 1);
    CHECK(layer_count(registry) == PLAN_LAYERS);
    CHECK_OK(offload_engine_registry_architecture(registry, &architecture));
    CHECK(strcmp(architecture, "llama_gguf") == 0);
    CHECK_OK(offload_engine_registry_global_bytes(registry, &bytes));
    CHECK(bytes == PLAN_GLOBAL_BYTES);
    CHECK_OK(offload_engine_registry_total_bytes(registry, &bytes));
    CHECK(bytes == PLAN_GLOBAL_BYTES + PLAN_LAYERS * PLAN_LAYER_BYTES);

    /* Descriptor validation. */
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_ALREADY_EXISTS, offload_engine_registry_add_descriptor(registry, "token_embd.weight", GGML_F32, 2, ne, &id));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_registry_add_descriptor(registry, "x0", GGML_F32, 0, ne, &id));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_registry_add_descriptor(registry, "x5", GGML_F32, 5, ne, &id));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_registry_add_descriptor(registry, "neg", GGML_F32, 2, negative, &id));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_registry_add_descriptor(registry, "type", 9999, 2, ne, &id));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_registry_add_descriptor(registry, "type", -1, 2, ne, &id));
    /* q4_0 packs 32 elements per block: 33 columns cannot be stored. */
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_registry_add_descriptor(registry, "q4", 2, 1, odd, &id));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_registry_add_descriptor(registry, "", GGML_F32, 2, ne, &id));
    CHECK(tensor_count(registry) == PLAN_LAYERS + 1);

    /* A 4-D descriptor keeps all four sizes. */
    {
        offload_engine_tensor_info info;
        CHECK_OK(offload_engine_registry_add_descriptor(user_pattern, "layer.0.w", GGML_F32, 4, ne, &id));
        CHECK_OK(offload_engine_registry_add_descriptor(user_pattern, "layer.1.w", GGML_F32, 4, ne, NULL));
        CHECK_OK(offload_engine_registry_add_descriptor(user_pattern, "head.w", GGML_F32, 1, ne, NULL));
        memset(&info, 0, sizeof info);
        info.size = sizeof info;
        CHECK_OK(offload_engine_registry_tensor_info(user_pattern, id, &info));
        CHECK(info.n_dims == 4 && info.ne[0] == 64 && info.ne[1] == 2 && info.bytes == 64 * 2 * 4);
        CHECK(info.location == OFFLOAD_ENGINE_LOCATION_HOST);
        CHECK(layer_count(user_pattern) == 2);
    }

    /* Pattern parameters: an unknown built-in name, a regex that does not compile. */
    offload_engine_registry_params_init(&params);
    params.pattern = "no_such_pattern";
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NOT_FOUND, offload_engine_registry_new(&params, &probe));
    params.pattern = "blk\\.(\\d+";
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_registry_new(&params, &probe));
    CHECK(probe == NULL);

    offload_engine_registry_free(user_pattern);
    offload_engine_registry_free(registry);
}

/* ---------------------------------------------------------------------------------------
 * Plans
 * ------------------------------------------------------------------------------------- */

static offload_engine_plan_params exact_budget(uint64_t free_bytes)
{
    offload_engine_plan_params params;
    offload_engine_plan_params_init(&params);
    params.free_bytes = free_bytes;
    params.min_free_bytes = 0; /* the budget is exactly what the plan may use */
    params.safety_fraction = 1.0;
    return params;
}

static offload_engine_plan_summary plan_summary(const offload_engine_plan *plan)
{
    offload_engine_plan_summary summary;
    memset(&summary, 0, sizeof summary);
    summary.size = sizeof summary;
    CHECK_OK(offload_engine_plan_get_summary(plan, &summary));
    CHECK(summary.size == sizeof summary);
    return summary;
}

static uint64_t resident_layers(const offload_engine_plan *plan, uint64_t layers)
{
    uint64_t layer, resident_count = 0;
    for (layer = 0; layer < layers; layer++) {
        int resident = -1;
        CHECK_OK(offload_engine_plan_layer_resident(plan, layer, &resident));
        CHECK(resident == 0 || resident == 1);
        resident_count += (uint64_t)resident;
    }
    return resident_count;
}

static void check_plans(void)
{
    offload_engine_registry *registry = described_model();
    offload_engine_registry *empty = new_registry(NULL);
    offload_engine_plan *plan = NULL;
    offload_engine_plan_params params;
    offload_engine_plan_summary summary;
    const char *message;
    int resident = 7;

    /* Plenty of memory, default margins: everything stays resident. */
    offload_engine_plan_params_init(&params);
    params.free_bytes = (uint64_t)8 << 30;
    CHECK_OK(offload_engine_plan_new(registry, &params, &plan));
    summary = plan_summary(plan);
    CHECK(summary.mode == OFFLOAD_ENGINE_MODE_FULL);
    CHECK(summary.resident_layer_count == PLAN_LAYERS);
    CHECK(summary.streamed_layer_count == 0);
    CHECK(summary.slot_count == 0);
    CHECK(summary.bytes_per_pass == 0);
    CHECK(summary.layer_bytes_max == PLAN_LAYER_BYTES);
    CHECK(summary.full_cache_bytes >= PLAN_GLOBAL_BYTES + PLAN_LAYERS * PLAN_LAYER_BYTES);
    CHECK(summary.device_bytes <= summary.usable_bytes);
    CHECK(resident_layers(plan, PLAN_LAYERS) == PLAN_LAYERS);
    message = offload_engine_plan_message(plan);
    CHECK(message != NULL && message[0] != '\0');
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NOT_FOUND, offload_engine_plan_layer_resident(plan, PLAN_LAYERS, &resident));
    CHECK(resident == 7);
    offload_engine_plan_free(plan);

    /* Room for the global group and two slots only: layers stream. */
    params = exact_budget(PLAN_GLOBAL_BYTES + 2 * PLAN_LAYER_BYTES);
    params.steps = 3;
    params.passes_per_step = 2;
    params.link = "pcie3-x16";
    plan = NULL;
    CHECK_OK(offload_engine_plan_new(registry, &params, &plan));
    summary = plan_summary(plan);
    CHECK(summary.mode == OFFLOAD_ENGINE_MODE_STREAMING);
    CHECK(summary.streamed_layer_count >= 1);
    CHECK(summary.resident_layer_count + summary.streamed_layer_count == PLAN_LAYERS);
    CHECK(resident_layers(plan, PLAN_LAYERS) == summary.resident_layer_count);
    CHECK(summary.slot_count >= 1);
    CHECK(summary.slot_bytes >= PLAN_LAYER_BYTES);
    CHECK(summary.arena_bytes <= summary.usable_bytes);
    CHECK(summary.device_bytes <= params.free_bytes);
    CHECK(summary.usable_bytes == params.free_bytes);
    CHECK(summary.bytes_per_pass == summary.streamed_layer_count * PLAN_LAYER_BYTES);
    CHECK(summary.bytes_per_step == 2 * summary.bytes_per_pass);
    CHECK(summary.bytes_per_run > 0);
    CHECK(summary.predicted_step_seconds > 0.0);
    CHECK(offload_engine_plan_message(plan)[0] != '\0');
    offload_engine_plan_free(plan);

    /* A custom link speed instead of a named link. */
    params = exact_budget(PLAN_GLOBAL_BYTES + 2 * PLAN_LAYER_BYTES);
    params.link_gbps = 1.5;
    plan = NULL;
    CHECK_OK(offload_engine_plan_new(registry, &params, &plan));
    CHECK(plan_summary(plan).mode == OFFLOAD_ENGINE_MODE_STREAMING);
    offload_engine_plan_free(plan);

    /* Not even one layer fits beside the global group: refused, with the numbers. */
    params = exact_budget(PLAN_GLOBAL_BYTES + PLAN_LAYER_BYTES / 2);
    plan = NULL;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INSUFFICIENT_MEMORY, offload_engine_plan_new(registry, &params, &plan));
    CHECK(plan == NULL);
    CHECK(contains(offload_engine_last_error(), "insufficient"));
    CHECK(contains(offload_engine_last_error(), "MiB") || contains(offload_engine_last_error(), "bytes"));

    /* Parameters the planner refuses. */
    params = exact_budget(PLAN_GLOBAL_BYTES + 2 * PLAN_LAYER_BYTES);
    params.size = 0;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_plan_new(registry, &params, &plan));
    params = exact_budget(PLAN_GLOBAL_BYTES + 2 * PLAN_LAYER_BYTES);
    params.steps = 0;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_plan_new(registry, &params, &plan));
    params = exact_budget(PLAN_GLOBAL_BYTES + 2 * PLAN_LAYER_BYTES);
    params.passes_per_step = 0;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_plan_new(registry, &params, &plan));
    params = exact_budget(PLAN_GLOBAL_BYTES + 2 * PLAN_LAYER_BYTES);
    params.link = "carrier-pigeon";
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_plan_new(registry, &params, &plan));
    CHECK(contains(offload_engine_last_error(), "carrier-pigeon"));
    params = exact_budget(PLAN_GLOBAL_BYTES + 2 * PLAN_LAYER_BYTES);
    params.safety_fraction = 1.5;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_plan_new(registry, &params, &plan));
    params = exact_budget(0);
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_plan_new(registry, &params, &plan));
    params = exact_budget((uint64_t)8 << 30);
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_plan_new(empty, &params, &plan));
    CHECK(plan == NULL);

    /* A plan outlives its registry. */
    params = exact_budget((uint64_t)8 << 30);
    CHECK_OK(offload_engine_plan_new(registry, &params, &plan));
    offload_engine_registry_free(registry);
    CHECK(plan_summary(plan).mode == OFFLOAD_ENGINE_MODE_FULL);
    offload_engine_plan_free(plan);
    offload_engine_registry_free(empty);
}

/* ---------------------------------------------------------------------------------------
 * Handle and pointer misuse: errors, never crashes
 * ------------------------------------------------------------------------------------- */

static void check_null_handles_and_out_pointers(void)
{
    offload_engine_registry *registry = described_model();
    offload_engine_registry_params registry_params;
    offload_engine_plan_params plan_params = exact_budget((uint64_t)8 << 30);
    offload_engine_engine_params engine_params;
    offload_engine_plan *plan = NULL;
    offload_engine_registry *registry_out = NULL;
    offload_engine_engine *engine_out = NULL;
    offload_engine_tensor_info tensor_info;
    offload_engine_layer_info layer_info;
    offload_engine_plan_summary summary;
    offload_engine_stats stats;
    offload_engine_layer_stats layer_stats;
    struct ggml_backend *backend = NULL;
    const char *name = NULL;
    const int64_t ne[2] = {4, 4};
    uint64_t id = 0, bytes = 0, ids[4];
    size_t count = 0;
    int resident = 0, tensor_storage = 0;
    int status;

    offload_engine_registry_params_init(&registry_params);
    offload_engine_engine_params_init(&engine_params);
    tensor_info.size = sizeof tensor_info;
    layer_info.size = sizeof layer_info;
    summary.size = sizeof summary;
    stats.size = sizeof stats;
    layer_stats.size = sizeof layer_stats;
    CHECK_OK(offload_engine_plan_new(registry, &plan_params, &plan));

    /* _free(NULL) is a no-op. */
    offload_engine_registry_free(NULL);
    offload_engine_plan_free(NULL);
    offload_engine_engine_free(NULL);

    /* NULL handles. */
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_registry_add_tensor(NULL, NULL, "x", &id));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_registry_add_context(NULL, NULL, &count));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_registry_add_gguf(NULL, "x.gguf", &count));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_registry_add_descriptor(NULL, "x", GGML_F32, 2, ne, &id));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_registry_tensor_count(NULL, &count));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_registry_layer_count(NULL, &count));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_registry_global_bytes(NULL, &bytes));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_registry_total_bytes(NULL, &bytes));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_registry_architecture(NULL, &name));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_registry_find(NULL, "x", &id));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_registry_tensor_info(NULL, 0, &tensor_info));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_registry_layer_info(NULL, 0, &layer_info));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_registry_layer_tensors(NULL, 0, ids, 4, &count));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_plan_new(NULL, &plan_params, &plan));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_plan_get_summary(NULL, &summary));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_plan_layer_resident(NULL, 0, &resident));
    CHECK(offload_engine_plan_message(NULL) != NULL && offload_engine_plan_message(NULL)[0] == '\0');
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_engine_new(&engine_params, NULL, &engine_out));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_engine_backend(NULL, &backend));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_engine_prepare(NULL, &plan_params, NULL));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_engine_pass_begin(NULL));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_engine_pass_end(NULL));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_engine_layer_begin(NULL, 0));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_engine_layer_end(NULL, 0));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_engine_offload_all(NULL));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_engine_stats(NULL, &stats));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_engine_layer_stats(NULL, 0, &layer_stats));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_engine_stats_reset(NULL));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_engine_trace_write(NULL, "trace.json"));
    {
        double gbps = 0.0;
        CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_engine_measure_link(NULL, 1 << 20, &gbps, NULL));
        CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_engine_measure_graph(NULL, NULL, &bytes));
    }

    /* NULL parameter structs, out-pointers and required strings. */
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_registry_new(NULL, &registry_out));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_registry_new(&registry_params, NULL));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_registry_add_tensor(registry, NULL, "x", &id));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_registry_add_context(registry, NULL, &count));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_registry_add_gguf(registry, NULL, &count));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_registry_add_descriptor(registry, NULL, GGML_F32, 2, ne, &id));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_registry_add_descriptor(registry, "x", GGML_F32, 2, NULL, &id));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_registry_tensor_count(registry, NULL));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_registry_layer_count(registry, NULL));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_registry_global_bytes(registry, NULL));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_registry_total_bytes(registry, NULL));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_registry_architecture(registry, NULL));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_registry_find(registry, NULL, &id));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_registry_find(registry, "token_embd.weight", NULL));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_registry_tensor_info(registry, 0, NULL));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_registry_layer_info(registry, 0, NULL));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_registry_layer_tensors(registry, 0, ids, 4, NULL));
    /* A NULL array that claims room for the ids: refused (the code is not pinned down by the
     * header: NULL_POINTER or INVALID_ARGUMENT are both reasonable). */
    status = offload_engine_registry_layer_tensors(registry, 0, NULL, 4, &count);
    CHECK(status == OFFLOAD_ENGINE_ERR_NULL_POINTER || status == OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT);
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_plan_new(registry, NULL, &plan));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_plan_new(registry, &plan_params, NULL));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_plan_get_summary(plan, NULL));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_plan_layer_resident(plan, 0, NULL));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_engine_new(NULL, registry, &engine_out));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_engine_new(&engine_params, registry, NULL));
    CHECK(registry_out == NULL && engine_out == NULL);

    /* Struct sizes of 0: a caller that skipped the _init function or sizeof. */
    registry_params.size = 0;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_registry_new(&registry_params, &registry_out));
    plan_params.size = 0;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_plan_new(registry, &plan_params, &plan));
    engine_params.size = 0;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_engine_new(&engine_params, registry, &engine_out));
    tensor_info.size = 0;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_registry_tensor_info(registry, 0, &tensor_info));
    layer_info.size = 0;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_registry_layer_info(registry, 0, &layer_info));
    summary.size = 0;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_plan_get_summary(plan, &summary));
    summary.size = sizeof summary - 1;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_plan_get_summary(plan, &summary));
    CHECK(registry_out == NULL && engine_out == NULL);

    /* Wrong-kind handles: a plan is not a registry, a registry is not an engine or a plan. */
    plan_params = exact_budget((uint64_t)8 << 30);
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_HANDLE, offload_engine_registry_tensor_count((offload_engine_registry *)(void *)plan, &count));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_HANDLE, offload_engine_plan_new((offload_engine_registry *)(void *)plan, &plan_params, &plan));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_HANDLE, offload_engine_engine_pass_begin((offload_engine_engine *)(void *)registry));
    summary.size = sizeof summary;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_HANDLE, offload_engine_plan_get_summary((const offload_engine_plan *)(void *)registry, &summary));
    CHECK(offload_engine_plan_message((const offload_engine_plan *)(void *)registry)[0] == '\0');
    /* Something that was never a handle. */
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_HANDLE, offload_engine_registry_layer_count((offload_engine_registry *)(void *)&tensor_storage, &count));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_HANDLE, offload_engine_engine_stats_reset((offload_engine_engine *)(void *)&tensor_storage));

    /* Freed handles, checked before anything else is allocated that could reuse the address. */
    offload_engine_plan_free(plan);
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_HANDLE, offload_engine_plan_get_summary(plan, &summary));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_HANDLE, offload_engine_plan_layer_resident(plan, 0, &resident));
    CHECK(offload_engine_plan_message(plan)[0] == '\0');
    offload_engine_registry_free(registry);
    count = 31337;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_HANDLE, offload_engine_registry_tensor_count(registry, &count));
    CHECK(count == 31337);
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_HANDLE, offload_engine_registry_add_descriptor(registry, "x", GGML_F32, 2, ne, &id));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_HANDLE, offload_engine_registry_find(registry, "token_embd.weight", &id));
    plan_params = exact_budget((uint64_t)8 << 30);
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_HANDLE, offload_engine_plan_new(registry, &plan_params, &plan));
    engine_params.size = sizeof engine_params;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_HANDLE, offload_engine_engine_new(&engine_params, registry, &engine_out));
    CHECK(engine_out == NULL);
}

/* ---------------------------------------------------------------------------------------
 * The engine on a real model
 *
 * Three layers blk.0.w .. blk.2.w and a global out.w, each a MODEL_DIM x MODEL_DIM f32
 * matrix. One pass: h = W_i h + h for each layer, then y = W_out h.
 * ------------------------------------------------------------------------------------- */

#define MODEL_DIM 16
#define MODEL_LAYERS 3
#define MODEL_TENSORS (MODEL_LAYERS + 1)
#define MODEL_WEIGHT_BYTES ((size_t)MODEL_DIM * MODEL_DIM * sizeof(float))

static const char *const model_tensor_names[MODEL_TENSORS] = {"blk.0.w", "blk.1.w", "blk.2.w", "out.w"};

struct test_model {
    struct ggml_tensor *weights[MODEL_TENSORS]; /* the layers in order, then out.w */
    void *home[MODEL_TENSORS];                  /* each tensor's data in host memory */
#if ABI_TEST_WITH_GGML
    struct ggml_context *ctx;
    ggml_backend_buffer_t buffer;
#else
    struct ggml_tensor tensors[MODEL_TENSORS];
    float *storage;
#endif
};

/* Deterministic, small enough that three residual layers stay well within f32 range. */
static float weight_value(int tensor, int row, int col)
{
    return (float)((tensor * 31 + row * 7 + col * 3) % 17 - 8) / 64.0f;
}

static void fill_weights(float *dst, int tensor)
{
    int row, col;
    for (row = 0; row < MODEL_DIM; row++)
        for (col = 0; col < MODEL_DIM; col++)
            dst[row * MODEL_DIM + col] = weight_value(tensor, row, col);
}

static void model_input(float *x)
{
    int i;
    for (i = 0; i < MODEL_DIM; i++)
        x[i] = (float)(i % 5 - 2) * 0.25f;
}

#if ABI_TEST_WITH_GGML
static void build_model(struct test_model *model)
{
    struct ggml_init_params params;
    int i;
    params.mem_size = ggml_tensor_overhead() * MODEL_TENSORS;
    params.mem_buffer = NULL;
    params.no_alloc = true; /* tensor data goes into the backend buffer below */
    model->ctx = ggml_init(params);
    CHECK(model->ctx != NULL);
    for (i = 0; i < MODEL_TENSORS; i++) {
        model->weights[i] = ggml_new_tensor_2d(model->ctx, GGML_TYPE_F32, MODEL_DIM, MODEL_DIM);
        ggml_set_name(model->weights[i], model_tensor_names[i]);
    }
    model->buffer = ggml_backend_alloc_ctx_tensors_from_buft(model->ctx, ggml_backend_cpu_buffer_type());
    CHECK(model->buffer != NULL);
    CHECK(ggml_backend_buffer_is_host(model->buffer));
    for (i = 0; i < MODEL_TENSORS; i++) {
        float values[MODEL_DIM * MODEL_DIM];
        fill_weights(values, i);
        ggml_backend_tensor_set(model->weights[i], values, 0, sizeof values);
        model->home[i] = model->weights[i]->data;
    }
}

static void free_model(struct test_model *model)
{
    ggml_backend_buffer_free(model->buffer);
    ggml_free(model->ctx);
}

/* Registers through add_context, the way a ggml host hands over a whole model. */
static void register_model(offload_engine_registry *registry, struct test_model *model)
{
    size_t count = 0;
    CHECK_OK(offload_engine_registry_add_context(registry, model->ctx, &count));
    CHECK(count == MODEL_TENSORS);
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_ALREADY_EXISTS, offload_engine_registry_add_context(registry, model->ctx, NULL));
}
#else
/* Hand-made tensors: what ggml would build, without calling ggml. */
static void build_model(struct test_model *model)
{
    int i;
    model->storage = (float *)malloc(MODEL_WEIGHT_BYTES * MODEL_TENSORS);
    CHECK(model->storage != NULL);
    memset(model->tensors, 0, sizeof model->tensors);
    for (i = 0; i < MODEL_TENSORS; i++) {
        struct ggml_tensor *t = &model->tensors[i];
        t->type = GGML_TYPE_F32;
        t->ne[0] = MODEL_DIM;
        t->ne[1] = MODEL_DIM;
        t->ne[2] = 1;
        t->ne[3] = 1;
        t->nb[0] = sizeof(float);
        t->nb[1] = t->nb[0] * MODEL_DIM;
        t->nb[2] = t->nb[1] * MODEL_DIM;
        t->nb[3] = t->nb[2];
        t->data = model->storage + (size_t)i * MODEL_DIM * MODEL_DIM;
        snprintf(t->name, sizeof t->name, "%s", model_tensor_names[i]);
        fill_weights((float *)t->data, i);
        model->weights[i] = t;
        model->home[i] = t->data;
    }
}

static void free_model(struct test_model *model)
{
    free(model->storage);
}

/* Registers tensor by tensor, the names coming from the tensors themselves. */
static void register_model(offload_engine_registry *registry, struct test_model *model)
{
    int i;
    for (i = 0; i < MODEL_TENSORS; i++)
        CHECK_OK(offload_engine_registry_add_tensor(registry, model->weights[i], NULL, NULL));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_ALREADY_EXISTS, offload_engine_registry_add_tensor(registry, model->weights[0], NULL, NULL));
}
#endif

static offload_engine_registry *model_registry(struct test_model *model)
{
    offload_engine_registry *registry = new_registry(NULL);
    register_model(registry, model);
    CHECK(tensor_count(registry) == MODEL_TENSORS);
    CHECK(layer_count(registry) == MODEL_LAYERS);
    return registry;
}

/* h = W h + h, reading W through the tensor's current data pointer (host memory here: the
 * engine's device is the CPU). */
static void plain_layer(const struct ggml_tensor *w, float *h)
{
    const float *weights = (const float *)w->data;
    float next[MODEL_DIM];
    int row, col;
    for (row = 0; row < MODEL_DIM; row++) {
        float sum = 0.0f;
        for (col = 0; col < MODEL_DIM; col++)
            sum += weights[row * MODEL_DIM + col] * h[col];
        next[row] = sum + h[row];
    }
    memcpy(h, next, sizeof next);
}

static void plain_output(const struct ggml_tensor *w, const float *h, float *y)
{
    const float *weights = (const float *)w->data;
    int row, col;
    for (row = 0; row < MODEL_DIM; row++) {
        float sum = 0.0f;
        for (col = 0; col < MODEL_DIM; col++)
            sum += weights[row * MODEL_DIM + col] * h[col];
        y[row] = sum;
    }
}

#if ABI_TEST_WITH_GGML
/* One small graph on `backend`: y = W x + x for a layer, y = W x for the output. */
static void ggml_apply(ggml_backend_t backend, struct ggml_tensor *w, int residual, float *h)
{
    struct ggml_init_params params;
    struct ggml_context *ctx;
    struct ggml_tensor *x, *y;
    struct ggml_cgraph *graph;
    ggml_backend_buffer_t buffer;
    params.mem_size = ggml_tensor_overhead() * 8 + ggml_graph_overhead();
    params.mem_buffer = NULL;
    params.no_alloc = true;
    ctx = ggml_init(params);
    CHECK(ctx != NULL);
    x = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, MODEL_DIM);
    y = ggml_mul_mat(ctx, w, x);
    if (residual)
        y = ggml_add(ctx, y, x);
    graph = ggml_new_graph(ctx);
    ggml_build_forward_expand(graph, y);
    buffer = ggml_backend_alloc_ctx_tensors(ctx, backend); /* x and the results, not w */
    CHECK(buffer != NULL);
    ggml_backend_tensor_set(x, h, 0, MODEL_DIM * sizeof(float));
    CHECK(ggml_backend_graph_compute(backend, graph) == GGML_STATUS_SUCCESS);
    ggml_backend_tensor_get(y, h, 0, MODEL_DIM * sizeof(float));
    ggml_backend_buffer_free(buffer);
    ggml_free(ctx);
}
#endif

/* Outputs of one forward pass: through ggml graphs (when linked) and through plain C. */
struct forward_output {
    float ggml[MODEL_DIM];
    float plain[MODEL_DIM];
};

static int same_output(const struct forward_output *a, const struct forward_output *b)
{
    return memcmp(a, b, sizeof *a) == 0;
}

/* While a layer is open its tensor must show exactly the host's bytes. */
static void check_weights_visible(const struct ggml_tensor *w, int tensor)
{
    float expected[MODEL_DIM * MODEL_DIM];
    fill_weights(expected, tensor);
    CHECK(w->data != NULL);
    CHECK(memcmp(w->data, expected, sizeof expected) == 0);
}

/* One pass. `engine` NULL runs the model in host memory with no engine at all; otherwise
 * `streamed` says which layers the plan streams. */
static void forward(struct test_model *model, offload_engine_engine *engine,
                    const int *streamed, void *backend, struct forward_output *out)
{
    float h_plain[MODEL_DIM], h_ggml[MODEL_DIM];
    int layer;
    model_input(h_plain);
    model_input(h_ggml);
    if (engine != NULL)
        CHECK_OK(offload_engine_engine_pass_begin(engine));
    for (layer = 0; layer < MODEL_LAYERS; layer++) {
        struct ggml_tensor *w = model->weights[layer];
        if (engine != NULL) {
            CHECK_OK(offload_engine_engine_layer_begin(engine, (uint64_t)layer));
            /* Prepared layers live in the engine's arena, never in the host's buffer. */
            CHECK(w->data != model->home[layer]);
        }
        check_weights_visible(w, layer);
        plain_layer(w, h_plain);
#if ABI_TEST_WITH_GGML
        ggml_apply((ggml_backend_t)backend, w, 1, h_ggml);
#endif
        if (engine != NULL) {
            CHECK_OK(offload_engine_engine_layer_end(engine, (uint64_t)layer));
            if (streamed[layer])
                CHECK(w->data == model->home[layer]);
        }
    }
    check_weights_visible(model->weights[MODEL_LAYERS], MODEL_LAYERS);
    plain_output(model->weights[MODEL_LAYERS], h_plain, out->plain);
#if ABI_TEST_WITH_GGML
    ggml_apply((ggml_backend_t)backend, model->weights[MODEL_LAYERS], 0, h_ggml);
#endif
    (void)backend;
    memcpy(out->ggml, h_ggml, sizeof h_ggml);
    if (engine != NULL)
        CHECK_OK(offload_engine_engine_pass_end(engine));
}

/* The model with no engine at all, weights where the host put them. */
static void reference_forward(struct test_model *model, struct forward_output *out)
{
    void *backend = NULL;
#if ABI_TEST_WITH_GGML
    backend = ggml_backend_cpu_init();
    CHECK(backend != NULL);
    ggml_backend_cpu_set_n_threads((ggml_backend_t)backend, 1); /* as the engine's backend */
#endif
    forward(model, NULL, NULL, backend, out);
#if ABI_TEST_WITH_GGML
    ggml_backend_free((ggml_backend_t)backend);
#endif
}

static offload_engine_engine *cpu_engine(offload_engine_registry *registry, uint64_t budget, int trace)
{
    offload_engine_engine_params params;
    offload_engine_engine *engine = NULL;
    offload_engine_engine_params_init(&params);
    params.device = "CPU";
    params.budget_bytes = budget;
    params.trace = trace;
    CHECK_OK(offload_engine_engine_new(&params, registry, &engine));
    CHECK(engine != NULL);
    return engine;
}

/* The engine's compute backend: the host runs its graphs there. */
static void *engine_backend(offload_engine_engine *engine)
{
    struct ggml_backend *backend = NULL;
    CHECK_OK(offload_engine_engine_backend(engine, &backend));
    CHECK(backend != NULL);
#if ABI_TEST_WITH_GGML
    CHECK(strcmp(ggml_backend_name(backend), "CPU") == 0);
#endif
    return backend;
}

/* Reads a plan's summary and which layers it streams, then frees it. */
static void take_plan(offload_engine_plan *plan, int *streamed, offload_engine_plan_summary *summary)
{
    int layer;
    CHECK(plan != NULL);
    *summary = plan_summary(plan);
    for (layer = 0; layer < MODEL_LAYERS; layer++) {
        int resident = -1;
        CHECK_OK(offload_engine_plan_layer_resident(plan, (uint64_t)layer, &resident));
        streamed[layer] = !resident;
    }
    offload_engine_plan_free(plan);
}

static void prepare_with(offload_engine_engine *engine, const offload_engine_plan_params *params,
                         int *streamed, offload_engine_plan_summary *summary)
{
    offload_engine_plan *plan = NULL;
    CHECK_OK(offload_engine_engine_prepare(engine, params, &plan));
    take_plan(plan, streamed, summary);
}

static void prepare(offload_engine_engine *engine, int *streamed, offload_engine_plan_summary *summary)
{
    offload_engine_plan_params params;
    offload_engine_plan_params_init(&params); /* free_bytes 0: the engine's budget */
    prepare_with(engine, &params, streamed, summary);
}

static void check_all_home(const struct test_model *model)
{
    int i;
    for (i = 0; i < MODEL_TENSORS; i++)
        CHECK(model->weights[i]->data == model->home[i]);
}

/* After offload_all: streamed layers are back home; resident ones and out.w stay put. */
static void check_streamed_home(const struct test_model *model, const int *streamed)
{
    int layer;
    for (layer = 0; layer < MODEL_LAYERS; layer++)
        CHECK((model->weights[layer]->data == model->home[layer]) == !!streamed[layer]);
    CHECK(model->weights[MODEL_LAYERS]->data != model->home[MODEL_LAYERS]);
}

/* One more pass on a prepared engine: its outputs must equal `expected` bit for bit. */
static void check_pass(struct test_model *model, offload_engine_engine *engine,
                       const int *streamed, const struct forward_output *expected)
{
    struct forward_output output;
    forward(model, engine, streamed, engine_backend(engine), &output);
    CHECK(same_output(&output, expected));
}

/* Prepares `engine` and runs two passes, both equal to `expected`. */
static void prepare_and_run(struct test_model *model, offload_engine_engine *engine, uint64_t budget,
                            int expected_mode, const struct forward_output *expected,
                            int *streamed, offload_engine_plan_summary *summary)
{
    prepare(engine, streamed, summary);
    CHECK(summary->mode == expected_mode);
    CHECK(summary->arena_bytes <= budget);
    check_pass(model, engine, streamed, expected);
    check_pass(model, engine, streamed, expected);
}

/* `since_prepare`: no stats_reset yet. After one, a load may use a copy made before the
 * reset, so bytes_copied no longer bounds the loads. */
static void check_stats(offload_engine_engine *engine, const int *streamed, uint64_t passes,
                        int since_prepare)
{
    offload_engine_stats stats;
    offload_engine_layer_stats layer_stats;
    uint64_t streamed_count = 0;
    int layer;
    for (layer = 0; layer < MODEL_LAYERS; layer++)
        streamed_count += (uint64_t)streamed[layer];

    memset(&stats, 0, sizeof stats);
    stats.size = sizeof stats;
    CHECK_OK(offload_engine_engine_stats(engine, &stats));
    CHECK(stats.size == sizeof stats);
    CHECK(stats.passes == passes);
    /* Each streamed layer is loaded once per pass; resident ones never. */
    CHECK(stats.layer_loads == passes * streamed_count);
    CHECK(stats.prefetch_hits + stats.prefetch_misses == stats.layer_loads);
    if (since_prepare)
        CHECK(stats.bytes_copied >= stats.layer_loads * MODEL_WEIGHT_BYTES);
    CHECK(stats.arena_peak_bytes <= stats.arena_bytes);
    CHECK(stats.arena_bytes > 0);

    for (layer = 0; layer < MODEL_LAYERS; layer++) {
        memset(&layer_stats, 0, sizeof layer_stats);
        layer_stats.size = sizeof layer_stats;
        CHECK_OK(offload_engine_engine_layer_stats(engine, (uint64_t)layer, &layer_stats));
        CHECK(layer_stats.size == sizeof layer_stats);
        CHECK(layer_stats.resident == !streamed[layer]);
        CHECK(layer_stats.loads == (streamed[layer] ? passes : 0));
        CHECK(layer_stats.load_bytes == MODEL_WEIGHT_BYTES); /* resident ones too: what a load would copy */
        CHECK(layer_stats.bytes == layer_stats.loads * MODEL_WEIGHT_BYTES);
    }
    layer_stats.size = sizeof layer_stats;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NOT_FOUND, offload_engine_engine_layer_stats(engine, MODEL_LAYERS, &layer_stats));
    layer_stats.size = 0;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_engine_layer_stats(engine, 0, &layer_stats));
    stats.size = 0;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_engine_stats(engine, &stats));
}

static void check_trace_file(const char *path)
{
    char head = 0;
    FILE *file = fopen(path, "rb");
    CHECK(file != NULL);
    CHECK(fread(&head, 1, 1, file) == 1);
    CHECK(head == '{'); /* Chrome trace-event JSON */
    fclose(file);
    remove(path);
}

static void check_engine(void)
{
    struct test_model model;
    offload_engine_registry *registry;
    offload_engine_engine *engine;
    offload_engine_plan_summary summary;
    struct forward_output reference;
    int streamed[MODEL_LAYERS];
    /* Room for the global group and two streaming slots, not for a resident layer besides. */
    const uint64_t streaming_budget = 3 * MODEL_WEIGHT_BYTES;
    const uint64_t roomy_budget = 1 << 20;
    char trace_path[512], bad_trace_path[512];

    build_model(&model);
    registry = model_registry(&model);
    reference_forward(&model, &reference);

    /* Everything resident. */
    engine = cpu_engine(registry, roomy_budget, 0);
    prepare_and_run(&model, engine, roomy_budget, OFFLOAD_ENGINE_MODE_FULL, &reference, streamed, &summary);
    CHECK(summary.resident_layer_count == MODEL_LAYERS && summary.streamed_layer_count == 0);
    check_stats(engine, streamed, 2, 1);
    scratch_path(trace_path, sizeof trace_path, "untraced.json");
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_engine_trace_write(engine, trace_path));
    offload_engine_engine_free(engine);
    check_all_home(&model);

    /* Streaming and traced. The registry goes first: the engine works on its own copy. */
    engine = cpu_engine(registry, streaming_budget, 1);
    offload_engine_registry_free(registry);
    prepare_and_run(&model, engine, streaming_budget, OFFLOAD_ENGINE_MODE_STREAMING, &reference, streamed, &summary);
    CHECK(summary.streamed_layer_count >= 1);
    check_stats(engine, streamed, 2, 1);
    scratch_path(trace_path, sizeof trace_path, "trace.json");
    CHECK_OK(offload_engine_engine_trace_write(engine, trace_path));
    check_trace_file(trace_path);
    snprintf(bad_trace_path, sizeof bad_trace_path, "%s/no-such-dir/trace.json", scratch_dir);
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_IO, offload_engine_engine_trace_write(engine, bad_trace_path));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_engine_trace_write(engine, NULL));

    /* stats_reset zeroes the counters; the next pass counts from there. */
    CHECK_OK(offload_engine_engine_stats_reset(engine));
    check_stats(engine, streamed, 0, 0);
    check_pass(&model, engine, streamed, &reference);
    check_stats(engine, streamed, 1, 0);

    /* offload_all inside a pass, with a layer open: closes the pass, tensors back home. */
    CHECK_OK(offload_engine_engine_pass_begin(engine));
    CHECK_OK(offload_engine_engine_layer_begin(engine, 0));
    CHECK_OK(offload_engine_engine_offload_all(engine));
    check_streamed_home(&model, streamed);
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_engine_pass_end(engine));
    CHECK_OK(offload_engine_engine_offload_all(engine)); /* nothing open: still fine */
    check_pass(&model, engine, streamed, &reference);

    /* Between runs prepare re-plans (with what the runs measured); outputs do not change. */
    {
        offload_engine_plan_params params;
        offload_engine_plan *replanned = NULL;
        offload_engine_plan_params_init(&params);
        CHECK_OK(offload_engine_engine_prepare(engine, &params, &replanned));
        take_plan(replanned, streamed, &summary);
    }
    CHECK(summary.mode == OFFLOAD_ENGINE_MODE_STREAMING);
    check_streamed_home(&model, streamed);
    check_pass(&model, engine, streamed, &reference);

    /* Freed with a pass open, a layer open and a prefetch likely in flight. */
    CHECK_OK(offload_engine_engine_pass_begin(engine));
    CHECK_OK(offload_engine_engine_layer_begin(engine, 0));
    offload_engine_engine_free(engine);
    check_all_home(&model);
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_HANDLE, offload_engine_engine_pass_begin(engine));

    free_model(&model);
}

static void check_engine_protocol(void)
{
    struct test_model model;
    offload_engine_registry *registry;
    offload_engine_registry *descriptors = described_model();
    offload_engine_engine *engine = NULL;
    offload_engine_engine_params params;
    offload_engine_plan_params plan_params;
    offload_engine_stats stats;
    offload_engine_plan *plan = NULL;
    uint64_t id = 0;
    const int64_t ne[1] = {8};

    build_model(&model);
    registry = model_registry(&model);

    /* Engine parameters the library refuses. */
    offload_engine_engine_params_init(&params);
    params.device = "NoSuchDevice0";
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NOT_FOUND, offload_engine_engine_new(&params, registry, &engine));
    CHECK(contains(offload_engine_last_error(), "NoSuchDevice0"));
    offload_engine_engine_params_init(&params);
    params.device = "CPU";
    params.safety_fraction = 0.0;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_engine_new(&params, registry, &engine));
    offload_engine_engine_params_init(&params);
    params.device = "CPU";
    params.prefetch_depth = 1000;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_engine_new(&params, registry, &engine));
    CHECK(engine == NULL);

    /* A budget below the global group plus one slot; the refused engine stays unprepared. */
    offload_engine_plan_params_init(&plan_params);
    engine = cpu_engine(registry, MODEL_WEIGHT_BYTES, 0);
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INSUFFICIENT_MEMORY, offload_engine_engine_prepare(engine, &plan_params, &plan));
    CHECK(plan == NULL);
    CHECK(contains(offload_engine_last_error(), "insufficient"));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_engine_pass_begin(engine));
    offload_engine_engine_free(engine);

    /* Before prepare, nothing runs. */
    engine = cpu_engine(registry, 3 * MODEL_WEIGHT_BYTES, 0);
    stats.size = sizeof stats;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_engine_pass_begin(engine));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_engine_layer_begin(engine, 0));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_engine_stats(engine, &stats));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_engine_stats_reset(engine));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_engine_offload_all(engine));
    /* The registry stays the host's: it still takes tensors after the engine copied it, and
     * the engine (which could not stream a descriptor) never sees them. */
    CHECK_OK(offload_engine_registry_add_descriptor(registry, "extra.w", GGML_F32, 1, ne, &id));

    offload_engine_plan_params_init(&plan_params);
    plan_params.size = 0;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_engine_prepare(engine, &plan_params, NULL));
    offload_engine_plan_params_init(&plan_params);
    CHECK_OK(offload_engine_engine_prepare(engine, &plan_params, NULL)); /* plan_out may be NULL */

    /* The pass protocol. */
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_engine_pass_end(engine));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_engine_layer_begin(engine, 0));
    CHECK_OK(offload_engine_engine_pass_begin(engine));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_engine_pass_begin(engine));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_engine_layer_end(engine, 0));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NOT_FOUND, offload_engine_engine_layer_begin(engine, MODEL_LAYERS));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NOT_FOUND, offload_engine_engine_layer_begin(engine, UINT64_MAX));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NOT_FOUND, offload_engine_engine_layer_end(engine, MODEL_LAYERS));
    CHECK_OK(offload_engine_engine_layer_begin(engine, 0));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_engine_layer_begin(engine, 0));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_engine_layer_begin(engine, 1));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_engine_layer_end(engine, 1));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_engine_pass_end(engine));
    check_weights_visible(model.weights[0], 0);
    CHECK_OK(offload_engine_engine_layer_end(engine, 0));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_engine_layer_end(engine, 0));
    /* Out of order works: loaded on demand. */
    CHECK_OK(offload_engine_engine_layer_begin(engine, 2));
    check_weights_visible(model.weights[2], 2);
    CHECK_OK(offload_engine_engine_layer_end(engine, 2));
    CHECK_OK(offload_engine_engine_layer_begin(engine, 1));
    check_weights_visible(model.weights[1], 1);
    CHECK_OK(offload_engine_engine_layer_end(engine, 1));
    /* Re-planning is for between runs: refused while a pass is open. */
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_engine_prepare(engine, &plan_params, &plan));
    CHECK(plan == NULL);
    CHECK(contains(offload_engine_last_error(), "pass"));
    CHECK_OK(offload_engine_engine_pass_end(engine));
    offload_engine_engine_free(engine);
    check_all_home(&model);

    /* An engine without a budget takes the plan's free_bytes as one. (A fresh registry: the
     * one above now holds a descriptor no engine can stream.) */
    {
        offload_engine_registry *fresh = model_registry(&model);
        offload_engine_engine_params no_budget;
        offload_engine_plan *planned = NULL;
        offload_engine_engine_params_init(&no_budget);
        no_budget.device = "CPU";
        CHECK_OK(offload_engine_engine_new(&no_budget, fresh, &engine));
        offload_engine_registry_free(fresh);
        plan_params = exact_budget(3 * MODEL_WEIGHT_BYTES);
        CHECK_OK(offload_engine_engine_prepare(engine, &plan_params, &planned));
        CHECK(plan_summary(planned).mode == OFFLOAD_ENGINE_MODE_STREAMING);
        CHECK(plan_summary(planned).arena_bytes <= 3 * MODEL_WEIGHT_BYTES);
        offload_engine_plan_free(planned);
        offload_engine_engine_free(engine);
    }
    /* Descriptors have no bytes in memory to stream. */
    engine = cpu_engine(descriptors, (uint64_t)1 << 30, 0);
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_UNSUPPORTED, offload_engine_engine_prepare(engine, &plan_params, NULL));
    offload_engine_engine_free(engine);

    offload_engine_registry_free(descriptors);
    offload_engine_registry_free(registry);
    free_model(&model);
}

/* Injected failures: each comes back as a status, and the engine keeps working after it. */
static void check_engine_faults(void)
{
    struct test_model model;
    offload_engine_registry *registry;
    offload_engine_engine *engine;
    offload_engine_plan_params plan_params;
    offload_engine_plan_summary summary;
    struct forward_output reference;
    int streamed[MODEL_LAYERS];
    int fault, status;

    build_model(&model);
    registry = model_registry(&model);
    reference_forward(&model, &reference);
    offload_engine_plan_params_init(&plan_params);
    /* The copy thread logs its failures as errors: count them rather than print them. */
    install_log_counter(NULL);

    /* Device allocation fails with nothing resident to give up: out of memory, and a second
     * prepare on the same engine succeeds. */
    engine = cpu_engine(registry, 3 * MODEL_WEIGHT_BYTES, 0);
    CHECK_OK(offload_engine_debug_inject_fault(0, 1));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_OUT_OF_MEMORY, offload_engine_engine_prepare(engine, &plan_params, NULL));
    offload_engine_debug_clear_faults();
    prepare(engine, streamed, &summary);
    CHECK(summary.mode == OFFLOAD_ENGINE_MODE_STREAMING);

    /* A failed layer copy (1) and a panicking copy thread (2) fail that layer's begin. */
    for (fault = 1; fault <= 2; fault++) {
        int first_streamed = 0;
        while (!streamed[first_streamed])
            first_streamed++;
        /* Drop what the last pass prefetched, so the next copy is this layer's. */
        CHECK_OK(offload_engine_engine_offload_all(engine));
        CHECK_OK(offload_engine_debug_inject_fault(fault, 1));
        CHECK_OK(offload_engine_engine_pass_begin(engine));
        status = offload_engine_engine_layer_begin(engine, (uint64_t)first_streamed);
        offload_engine_debug_clear_faults();
        CHECK(status == OFFLOAD_ENGINE_ERR_BACKEND || status == OFFLOAD_ENGINE_ERR_INTERNAL);
        CHECK(offload_engine_last_error()[0] != '\0');
        CHECK_OK(offload_engine_engine_offload_all(engine));
        check_streamed_home(&model, streamed);
        check_pass(&model, engine, streamed, &reference);
    }
    CHECK(logged().errors >= 2);
    CHECK(logged().malformed == 0);
    offload_engine_engine_free(engine);

    /* With resident layers a failed allocation is retried with fewer of them, logging a
     * warning while the library holds the engine: a call on it from the callback is refused. */
    engine = cpu_engine(registry, 1 << 20, 0);
    install_log_counter(engine);
    CHECK_OK(offload_engine_debug_inject_fault(0, 1));
    prepare(engine, streamed, &summary);
    offload_engine_debug_clear_faults();
    CHECK_OK(offload_engine_log_set_callback(NULL, NULL));
    CHECK(logged().warnings >= 1);
    CHECK(logged().probe_status == OFFLOAD_ENGINE_ERR_INVALID_STATE);
    CHECK(summary.mode == OFFLOAD_ENGINE_MODE_STREAMING);
    CHECK(summary.resident_layer_count < MODEL_LAYERS);
    check_pass(&model, engine, streamed, &reference);
    offload_engine_engine_free(engine);

    offload_engine_registry_free(registry);
    free_model(&model);
}

/* ---------------------------------------------------------------------------------------
 * Measurements: link bandwidth and a graph's compute buffer
 * ------------------------------------------------------------------------------------- */

#if ABI_TEST_WITH_GGML
/* The compute buffer of one layer's graph, as the engine measures it without computing. */
static uint64_t measure_layer_graph(offload_engine_engine *engine, struct test_model *model)
{
    struct ggml_init_params params;
    struct ggml_context *ctx;
    struct ggml_tensor *x, *y;
    struct ggml_cgraph *graph;
    uint64_t bytes = 0;
    params.mem_size = ggml_tensor_overhead() * 8 + ggml_graph_overhead();
    params.mem_buffer = NULL;
    params.no_alloc = true;
    ctx = ggml_init(params);
    CHECK(ctx != NULL);
    x = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, MODEL_DIM);
    y = ggml_add(ctx, ggml_mul_mat(ctx, model->weights[0], x), x);
    graph = ggml_new_graph(ctx);
    ggml_build_forward_expand(graph, y);
    CHECK_OK(offload_engine_engine_measure_graph(engine, graph, &bytes));
    CHECK(x->data == NULL && y->data == NULL); /* a dry run allocates nothing */
    ggml_free(ctx);
    return bytes;
}
#endif

static void check_measurements(void)
{
    struct test_model model;
    offload_engine_registry *registry;
    offload_engine_engine *engine;
    double pageable = -1.0, pinned = -1.0;
    uint64_t bytes = 12345;

    build_model(&model);
    registry = model_registry(&model);
    engine = cpu_engine(registry, 3 * MODEL_WEIGHT_BYTES, 0);

    /* Link bandwidth, on an engine not yet prepared; 0 bytes is clamped up to 1 MiB. */
    CHECK_OK(offload_engine_engine_measure_link(engine, 0, &pageable, &pinned));
    CHECK(pageable > 0.0);
    CHECK(pinned >= 0.0); /* 0 where the device has no pinned memory, as the CPU */
    CHECK_OK(offload_engine_engine_measure_link(engine, 1 << 20, &pageable, NULL));
    pageable = -1.0;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_engine_measure_link(engine, 1 << 20, NULL, &pinned));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_engine_measure_graph(engine, NULL, &bytes));
    CHECK(bytes == 12345);

#if ABI_TEST_WITH_GGML
    {
        /* The measured compute buffer, declared as the reserve, comes out of the budget. */
        offload_engine_plan_params params;
        offload_engine_plan_summary summary;
        struct forward_output reference;
        int streamed[MODEL_LAYERS];
        const uint64_t reserve = measure_layer_graph(engine, &model);
        const uint64_t streaming_budget = 3 * MODEL_WEIGHT_BYTES + reserve;
        CHECK(reserve >= 2 * MODEL_DIM * sizeof(float)); /* at least x and the result */
        CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_engine_measure_graph(engine, NULL, NULL));
        offload_engine_plan_params_init(&params);
        params.compute_reserve_bytes = reserve;
        offload_engine_engine_free(engine);

        /* The global group and one layer no longer fit once the reserve is taken out... */
        engine = cpu_engine(registry, 2 * MODEL_WEIGHT_BYTES + reserve - 1, 0);
        CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INSUFFICIENT_MEMORY, offload_engine_engine_prepare(engine, &params, NULL));
        offload_engine_engine_free(engine);
        /* ...and the streaming budget grown by the reserve streams as before. */
        engine = cpu_engine(registry, streaming_budget, 0);
        prepare_with(engine, &params, streamed, &summary);
        CHECK(summary.mode == OFFLOAD_ENGINE_MODE_STREAMING);
        CHECK(summary.device_bytes <= streaming_budget);
        reference_forward(&model, &reference);
        check_pass(&model, engine, streamed, &reference);
    }
#endif
    offload_engine_engine_free(engine);
    offload_engine_registry_free(registry);
    free_model(&model);
}

/* ---------------------------------------------------------------------------------------
 * The three-stage executor (offload_engine_engine_run_pass) on the same model
 * ------------------------------------------------------------------------------------- */

/* The host side of a staged model, with knobs to make each stage misbehave. */
struct staged_host {
    struct test_model *model;
    struct ggml_tensor *input;
    /* Called into from build_layer: the engine is busy running the pass then. */
    offload_engine_engine *probe_engine;
    int probe_status;
    int set_inputs_result;
    int null_layer;        /* build_layer returns NULL for this layer; -1: never */
    int misshapen_layer;   /* build_layer returns a tensor of the wrong size; -1: never */
    int null_output;
    /* Called first thing in build_layer: a host doing something hostile in mid-pass. */
    void (*layer_hook)(struct staged_host *host, uint64_t layer);
    void *hook_data;
    int scale_ops;  /* build_layer appends this many identity scales (big graphs) */
    int layer_type; /* build_layer returns a fresh tensor of this ggml type; -1: never */
    int input_type; /* build_input does the same; -1: never */
    int f16_results; /* build_layer returns its result cast to f16 */
};

static struct ggml_tensor *stage_input(void *user, struct ggml_context *ctx)
{
    struct staged_host *host = (struct staged_host *)user;
#if ABI_TEST_WITH_GGML
    if (host->input_type >= 0)
        return ggml_new_tensor_1d(ctx, (enum ggml_type)host->input_type, MODEL_DIM);
    host->input = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, MODEL_DIM, 1);
#else
    /* Nothing can be built without ggml: the executor must refuse the NULL. */
    host->input = NULL;
    (void)ctx;
#endif
    return host->input;
}

static int stage_set_inputs(void *user)
{
    struct staged_host *host = (struct staged_host *)user;
#if ABI_TEST_WITH_GGML
    float x[MODEL_DIM];
    model_input(x);
    ggml_backend_tensor_set(host->input, x, 0, sizeof x);
#endif
    return host->set_inputs_result;
}

static struct ggml_tensor *stage_layer(void *user, struct ggml_context *ctx, uint64_t layer, struct ggml_tensor *x)
{
    struct staged_host *host = (struct staged_host *)user;
    if (host->layer_hook != NULL)
        host->layer_hook(host, layer);
    if (host->probe_engine != NULL) {
        struct ggml_backend *backend = NULL; /* a call that succeeds on an engine not in use */
        host->probe_status = offload_engine_engine_backend(host->probe_engine, &backend);
        host->probe_engine = NULL;
    }
    if ((int)layer == host->null_layer)
        return NULL;
#if ABI_TEST_WITH_GGML
    if ((int)layer == host->misshapen_layer)
        return ggml_new_tensor_1d(ctx, GGML_TYPE_F32, 2 * MODEL_DIM);
    if (host->layer_type >= 0)
        return ggml_new_tensor_1d(ctx, (enum ggml_type)host->layer_type, MODEL_DIM);
    {
        struct ggml_tensor *y = ggml_add(ctx, ggml_mul_mat(ctx, host->model->weights[layer], x), x);
        int i;
        for (i = 0; i < host->scale_ops; i++)
            y = ggml_scale(ctx, y, 1.0f); /* exact: the output stays bit-identical */
        return host->f16_results ? ggml_cast(ctx, y, GGML_TYPE_F16) : y;
    }
#else
    (void)ctx;
    return x;
#endif
}

static struct ggml_tensor *stage_output(void *user, struct ggml_context *ctx, struct ggml_tensor *x)
{
    struct staged_host *host = (struct staged_host *)user;
    if (host->null_output)
        return NULL;
#if ABI_TEST_WITH_GGML
    return ggml_mul_mat(ctx, host->model->weights[MODEL_LAYERS], x);
#else
    (void)ctx;
    return x;
#endif
}

static offload_engine_staged_model staged_model(struct staged_host *host, struct test_model *model)
{
    offload_engine_staged_model staged;
    memset(host, 0, sizeof *host);
    host->model = model;
    host->probe_status = -1;
    host->null_layer = -1;
    host->misshapen_layer = -1;
    host->layer_type = -1;
    host->input_type = -1;
    memset(&staged, 0, sizeof staged);
    staged.size = sizeof staged;
    staged.user = host;
    staged.layer_count = MODEL_LAYERS;
    staged.activation_ne[0] = MODEL_DIM;
    staged.activation_ne[1] = 1;
    staged.build_input = stage_input;
    staged.set_inputs = stage_set_inputs;
    staged.build_layer = stage_layer;
    staged.build_output = stage_output;
    return staged;
}

/* Calls the library refuses before any stage runs: they need no ggml. */
static void check_run_pass_arguments(offload_engine_engine *engine, struct test_model *model,
                                     offload_engine_registry *not_an_engine)
{
    struct staged_host host;
    offload_engine_staged_model staged = staged_model(&host, model);
    float output[MODEL_DIM];
    size_t size = 12345;

    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_engine_run_pass(NULL, &staged, output, sizeof output, &size));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_HANDLE, offload_engine_engine_run_pass((offload_engine_engine *)(void *)not_an_engine, &staged, output, sizeof output, &size));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_engine_run_pass(engine, NULL, output, sizeof output, &size));
    staged.size = 0;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_engine_run_pass(engine, &staged, output, sizeof output, &size));
    staged = staged_model(&host, model);
    staged.build_layer = NULL;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_engine_run_pass(engine, &staged, output, sizeof output, &size));
    staged = staged_model(&host, model);
    staged.layer_count = MODEL_LAYERS + 1;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_engine_run_pass(engine, &staged, output, sizeof output, &size));
    CHECK(contains(offload_engine_last_error(), "layers"));
    staged = staged_model(&host, model);
    staged.activation_ne[0] = 0;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_engine_run_pass(engine, &staged, output, sizeof output, &size));
#if !ABI_TEST_WITH_GGML
    staged = staged_model(&host, model);
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_engine_run_pass(engine, &staged, output, sizeof output, &size));
    CHECK(contains(offload_engine_last_error(), "NULL"));
#endif
    CHECK(size == 12345);
}

#if ABI_TEST_WITH_GGML
/* One staged pass that must succeed and give the reference output bit for bit. */
static void check_staged_pass(offload_engine_engine *engine, offload_engine_staged_model *staged,
                              const struct forward_output *reference)
{
    float output[MODEL_DIM];
    size_t size = 0;
    memset(output, 0, sizeof output);
    CHECK_OK(offload_engine_engine_run_pass(engine, staged, output, sizeof output, &size));
    CHECK(size == sizeof output);
    CHECK(memcmp(output, reference->ggml, sizeof output) == 0);
}

static void check_run_pass_engine(struct test_model *model, offload_engine_registry *registry,
                                  uint64_t budget, const struct forward_output *reference)
{
    offload_engine_engine *engine = cpu_engine(registry, budget, 0);
    offload_engine_plan_summary summary;
    offload_engine_stats stats;
    struct staged_host host;
    offload_engine_staged_model staged = staged_model(&host, model);
    float output[MODEL_DIM], untouched[MODEL_DIM];
    size_t size = 0;
    int streamed[MODEL_LAYERS];

    /* Not prepared: the input stage may run, the pass may not. */
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_engine_run_pass(engine, &staged, output, sizeof output, &size));
    prepare(engine, streamed, &summary);

    check_staged_pass(engine, &staged, reference);
    check_staged_pass(engine, &staged, reference);
    stats.size = sizeof stats;
    CHECK_OK(offload_engine_engine_stats(engine, &stats));
    CHECK(stats.passes == 2);
    CHECK(stats.layer_loads == 2 * summary.streamed_layer_count);

    /* NULL output: only the size. Too small a buffer: refused, nothing written. */
    CHECK_OK(offload_engine_engine_run_pass(engine, &staged, NULL, 0, &size));
    CHECK(size == sizeof output);
    CHECK_OK(offload_engine_engine_run_pass(engine, &staged, NULL, 0, NULL));
    memset(output, 0x5A, sizeof output);
    memcpy(untouched, output, sizeof output);
    size = 999;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_engine_run_pass(engine, &staged, output, sizeof output - 1, &size));
    CHECK(memcmp(output, untouched, sizeof output) == 0);
    CHECK(size == 999);

    /* A call on the engine from inside a stage overlaps the running pass: refused. */
    host.probe_engine = engine;
    check_staged_pass(engine, &staged, reference);
    CHECK(host.probe_status == OFFLOAD_ENGINE_ERR_INVALID_STATE);

    /* Each misbehaving stage is an error; the pass is abandoned and the next one works. */
    host.set_inputs_result = 5;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_engine_run_pass(engine, &staged, output, sizeof output, &size));
    CHECK(contains(offload_engine_last_error(), "set_inputs"));
    host.set_inputs_result = 0;
    check_staged_pass(engine, &staged, reference);
    host.null_layer = 1;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_engine_run_pass(engine, &staged, output, sizeof output, &size));
    check_streamed_home(model, streamed);
    host.null_layer = -1;
    check_staged_pass(engine, &staged, reference);
    host.misshapen_layer = 2;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_engine_run_pass(engine, &staged, output, sizeof output, &size));
    CHECK(contains(offload_engine_last_error(), "elements"));
    host.misshapen_layer = -1;
    check_staged_pass(engine, &staged, reference);
    host.null_output = 1;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_engine_run_pass(engine, &staged, output, sizeof output, &size));
    host.null_output = 0;
    check_staged_pass(engine, &staged, reference);

    /* The executor and the manual protocol share the engine. */
    check_pass(model, engine, streamed, reference);
    check_staged_pass(engine, &staged, reference);
    offload_engine_engine_free(engine);
    check_all_home(model);
}
#endif

static void check_run_pass(void)
{
    struct test_model model;
    offload_engine_registry *registry;
    offload_engine_engine *engine;
    struct forward_output reference;
    int streamed[MODEL_LAYERS];
    offload_engine_plan_summary summary;

    build_model(&model);
    registry = model_registry(&model);
    reference_forward(&model, &reference);

    engine = cpu_engine(registry, 3 * MODEL_WEIGHT_BYTES, 0);
    prepare(engine, streamed, &summary);
    check_run_pass_arguments(engine, &model, registry);
    check_pass(&model, engine, streamed, &reference); /* refused calls left no trace */
    offload_engine_engine_free(engine);

#if ABI_TEST_WITH_GGML
    check_run_pass_engine(&model, registry, 1 << 20, &reference);         /* all resident */
    check_run_pass_engine(&model, registry, 3 * MODEL_WEIGHT_BYTES, &reference); /* streaming */
#endif
    offload_engine_registry_free(registry);
    free_model(&model);
}

#if ABI_TEST_WITH_GGML
/* add_tensor with ggml-made tensors: explicit names, NULL id_out, no data, bad type. */
static void check_add_tensor(void)
{
    struct test_model model;
    offload_engine_registry *registry = new_registry(NULL);
    struct ggml_tensor unallocated;
    uint64_t id = 0, found = 0;
    build_model(&model);
    CHECK_OK(offload_engine_registry_add_tensor(registry, model.weights[0], "renamed.w", &id));
    CHECK_OK(offload_engine_registry_find(registry, "renamed.w", &found));
    CHECK(found == id);
    CHECK_OK(offload_engine_registry_add_tensor(registry, model.weights[1], NULL, NULL));
    CHECK_OK(offload_engine_registry_find(registry, "blk.1.w", &found));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_ALREADY_EXISTS, offload_engine_registry_add_tensor(registry, model.weights[2], "renamed.w", NULL));
    unallocated = *model.weights[3];
    unallocated.data = NULL;
    unallocated.buffer = NULL;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_registry_add_tensor(registry, &unallocated, "no-data.w", NULL));
    unallocated = *model.weights[3];
    unallocated.type = (enum ggml_type)1000;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_registry_add_tensor(registry, &unallocated, "bad-type.w", NULL));
    CHECK(tensor_count(registry) == 2);
    offload_engine_registry_free(registry);
    free_model(&model);
}
#else
static void check_add_tensor(void)
{
    struct test_model model;
    offload_engine_registry *registry = new_registry(NULL);
    struct ggml_tensor unallocated;
    uint64_t id = 0, found = 0;
    build_model(&model);
    CHECK_OK(offload_engine_registry_add_tensor(registry, model.weights[0], "renamed.w", &id));
    CHECK_OK(offload_engine_registry_find(registry, "renamed.w", &found));
    CHECK(found == id);
    unallocated = *model.weights[3];
    unallocated.data = NULL;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_registry_add_tensor(registry, &unallocated, "no-data.w", NULL));
    unallocated = *model.weights[3];
    unallocated.type = (enum ggml_type)1000;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_registry_add_tensor(registry, &unallocated, "bad-type.w", NULL));
    CHECK(tensor_count(registry) == 1);
    offload_engine_registry_free(registry);
    free_model(&model);
}
#endif

/* ---------------------------------------------------------------------------------------
 * Pipelines, run-time weight changes, GGUF files loaded by the registry
 * ------------------------------------------------------------------------------------- */

static offload_engine_pipeline *new_pipeline(int mode, uint64_t budget)
{
    offload_engine_pipeline_params params;
    offload_engine_pipeline *pipeline = NULL;
    offload_engine_pipeline_params_init(&params);
    params.offload_mode = mode;
    params.budget_bytes = budget;
    params.min_free_bytes = 0;
    params.margin_bytes = 0;
    CHECK_OK(offload_engine_pipeline_new(&params, &pipeline));
    CHECK(pipeline != NULL);
    return pipeline;
}

static offload_engine_component_info component(offload_engine_pipeline *pipeline, const char *name)
{
    offload_engine_component_info info;
    memset(&info, 0, sizeof info);
    info.size = sizeof info;
    CHECK_OK(offload_engine_pipeline_component_info(pipeline, name, &info));
    CHECK(strcmp(info.name, name) == 0);
    return info;
}

/* One job: each component's stage runs one pass, checked against the engine-free outputs. */
static int run_job(offload_engine_pipeline *pipeline, struct test_model *models, offload_engine_engine **engines,
                   const struct forward_output *reference)
{
    static const char *const names[2] = {"cond", "denoise"};
    static const int no_streamed_check[MODEL_LAYERS] = {0};
    int i, status;
    CHECK_OK(offload_engine_pipeline_run_begin(pipeline));
    for (i = 0; i < 2; i++) {
        struct forward_output output;
        status = offload_engine_pipeline_stage_begin(pipeline, names[i]);
        if (status != OFFLOAD_ENGINE_OK) {
            CHECK_OK(offload_engine_pipeline_run_end(pipeline));
            return status;
        }
        forward(&models[i], engines[i], no_streamed_check, engine_backend(engines[i]), &output);
        CHECK(same_output(&output, reference));
        CHECK_OK(offload_engine_pipeline_stage_end(pipeline, names[i]));
    }
    CHECK_OK(offload_engine_pipeline_run_end(pipeline));
    return OFFLOAD_ENGINE_OK;
}

static void check_pipeline(void)
{
    struct test_model models[2];
    offload_engine_registry *registries[2];
    offload_engine_engine *engines[2];
    offload_engine_pipeline_params params;
    offload_engine_pipeline *pipeline = NULL, *out = NULL;
    offload_engine_component_info info;
    offload_engine_pipeline_stats stats;
    struct forward_output reference;
    uint64_t cond_bytes, denoise_bytes, tight;
    float row[MODEL_DIM];
    int i;

    offload_engine_pipeline_params_init(&params);
    CHECK(params.size == sizeof params && params.offload_mode == OFFLOAD_ENGINE_OFFLOAD_NONE);
    CHECK(params.min_free_bytes == (uint64_t)512 << 20 && params.margin_bytes == (uint64_t)300 << 20);
    CHECK(params.prefetch_depth == 1 && params.steps == 1 && params.passes_per_step == 1);
    CHECK(params.reload_diffusion == 1 && params.log_moves == 0 && params.budget_bytes == 0);
    CHECK(params.max_resident_layers == UINT32_MAX);

    /* Bad input: NULLs, struct sizes, codes out of range. */
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_pipeline_new(NULL, &out));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_pipeline_new(&params, NULL));
    params.offload_mode = 5;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_pipeline_new(&params, &out));
    params.offload_mode = OFFLOAD_ENGINE_OFFLOAD_NONE;
    params.steps = 0;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_pipeline_new(&params, &out));
    offload_engine_pipeline_params_init(&params);
    params.size = 0;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_pipeline_new(&params, &out));
    CHECK(out == NULL);
    offload_engine_pipeline_free(NULL);
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_pipeline_add(NULL, "x", 0, NULL));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_pipeline_set_override(NULL, "x", 0));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_pipeline_set_stage_need(NULL, "x", 0));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_pipeline_run_begin(NULL));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_pipeline_run_end(NULL));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_pipeline_stage_begin(NULL, "x"));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_pipeline_stage_end(NULL, "x"));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_pipeline_component_info(NULL, "x", &info));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_pipeline_get_stats(NULL, &stats));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_engine_tensor_set(NULL, "x", row, 0, 4));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_registry_load_gguf(NULL, "x.gguf", 0, NULL));

    for (i = 0; i < 2; i++) {
        build_model(&models[i]);
        registries[i] = model_registry(&models[i]);
        engines[i] = cpu_engine(registries[i], 1 << 20, 0);
        offload_engine_registry_free(registries[i]);
    }
    reference_forward(&models[0], &reference);

    /* Room for everything: one load each, nothing leaves, outputs unchanged. */
    pipeline = new_pipeline(OFFLOAD_ENGINE_OFFLOAD_COND_DIFFUSION, 1 << 20);
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_pipeline_run_begin(pipeline));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_pipeline_add(pipeline, "cond", 6, engines[0]));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_HANDLE, offload_engine_pipeline_add(pipeline, "cond", 0, (offload_engine_engine *)(void *)pipeline));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_pipeline_add(pipeline, NULL, 0, engines[0]));
    CHECK_OK(offload_engine_pipeline_add(pipeline, "cond", OFFLOAD_ENGINE_ROLE_CONDITIONER, engines[0]));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_ALREADY_EXISTS, offload_engine_pipeline_add(pipeline, "cond", OFFLOAD_ENGINE_ROLE_OTHER, engines[1]));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_ALREADY_EXISTS, offload_engine_pipeline_add(pipeline, "again", OFFLOAD_ENGINE_ROLE_OTHER, engines[0]));
    CHECK_OK(offload_engine_pipeline_add(pipeline, "denoise", OFFLOAD_ENGINE_ROLE_DIFFUSION, engines[1]));
    CHECK_OK(offload_engine_pipeline_set_stage_need(pipeline, "denoise", 1024));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NOT_FOUND, offload_engine_pipeline_set_override(pipeline, "nope", OFFLOAD_ENGINE_PLACE_KEEP));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_pipeline_set_override(pipeline, "cond", 3));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_pipeline_stage_begin(pipeline, "cond"));
    memset(&info, 0, sizeof info);
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_pipeline_component_info(pipeline, "cond", &info));
    info.size = sizeof info;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NOT_FOUND, offload_engine_pipeline_component_info(pipeline, "nope", &info));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_pipeline_component_info(pipeline, "cond", NULL));
    CHECK(run_job(pipeline, models, engines, &reference) == OFFLOAD_ENGINE_OK);
    CHECK(run_job(pipeline, models, engines, &reference) == OFFLOAD_ENGINE_OK);
    info = component(pipeline, "cond");
    CHECK(info.role == OFFLOAD_ENGINE_ROLE_CONDITIONER && info.placement == OFFLOAD_ENGINE_PLACEMENT_RESIDENT);
    CHECK(info.loads == 1 && info.unloads == 0 && info.device_bytes > 0);
    cond_bytes = info.resident_bytes;
    info = component(pipeline, "denoise");
    CHECK(info.stage_need_bytes == 1024 && info.loads == 1 && info.unloads == 0);
    denoise_bytes = info.resident_bytes;
    memset(&stats, 0, sizeof stats);
    stats.size = sizeof stats;
    CHECK_OK(offload_engine_pipeline_get_stats(pipeline, &stats));
    CHECK(stats.budget_bytes == 1 << 20 && stats.loads == 2 && stats.unloads == 0);
    CHECK(stats.device_bytes > 0 && stats.peak_device_bytes <= stats.budget_bytes);

    /* A weight changed between runs (as a LoRA merge would): write the same values back
     * through the engine, so outputs stay comparable; bad writes change nothing. */
    memcpy(row, models[1].home[1], sizeof row);
    CHECK_OK(offload_engine_engine_tensor_set(engines[1], "blk.1.w", row, 0, sizeof row));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NOT_FOUND, offload_engine_engine_tensor_set(engines[1], "nope", row, 0, sizeof row));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_engine_tensor_set(engines[1], "blk.1.w", NULL, 0, sizeof row));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT, offload_engine_engine_tensor_set(engines[1], "blk.1.w", row, MODEL_WEIGHT_BYTES, sizeof row));
    CHECK(run_job(pipeline, models, engines, &reference) == OFFLOAD_ENGINE_OK);
    offload_engine_pipeline_free(pipeline);
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_HANDLE, offload_engine_pipeline_run_begin(pipeline));
    check_all_home(&models[0]);
    check_all_home(&models[1]);

    /* Room for one component at a time: cond_only moves the conditioner out for the
     * diffusion model; none refuses with the insufficient-memory status and says why. */
    tight = (cond_bytes > denoise_bytes ? cond_bytes : denoise_bytes) + 1024 + 64;
    CHECK(tight < cond_bytes + denoise_bytes + 1024);
    pipeline = new_pipeline(OFFLOAD_ENGINE_OFFLOAD_COND_ONLY, tight);
    CHECK_OK(offload_engine_pipeline_add(pipeline, "cond", OFFLOAD_ENGINE_ROLE_CONDITIONER, engines[0]));
    CHECK_OK(offload_engine_pipeline_add(pipeline, "denoise", OFFLOAD_ENGINE_ROLE_DIFFUSION, engines[1]));
    CHECK_OK(offload_engine_pipeline_set_stage_need(pipeline, "denoise", 1024));
    CHECK(run_job(pipeline, models, engines, &reference) == OFFLOAD_ENGINE_OK);
    CHECK(component(pipeline, "cond").unloads == 1);
    offload_engine_pipeline_free(pipeline);

    pipeline = new_pipeline(OFFLOAD_ENGINE_OFFLOAD_NONE, tight);
    CHECK_OK(offload_engine_pipeline_add(pipeline, "cond", OFFLOAD_ENGINE_ROLE_CONDITIONER, engines[0]));
    CHECK_OK(offload_engine_pipeline_add(pipeline, "denoise", OFFLOAD_ENGINE_ROLE_DIFFUSION, engines[1]));
    CHECK_OK(offload_engine_pipeline_set_stage_need(pipeline, "denoise", 1024));
    CHECK(run_job(pipeline, models, engines, &reference) == OFFLOAD_ENGINE_ERR_INSUFFICIENT_MEMORY);
    CHECK(contains(offload_engine_last_error(), "denoise"));
    CHECK(contains(offload_engine_last_error(), "layer_streaming"));
    /* engine_free on a component takes it off the device at once, so the host may free its
     * model, and out of the pipeline's hands: its stage is refused; the rest still runs. */
    offload_engine_engine_free(engines[0]);
    check_all_home(&models[0]);
    CHECK_OK(offload_engine_pipeline_run_begin(pipeline));
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_INVALID_STATE, offload_engine_pipeline_stage_begin(pipeline, "cond"));
    CHECK(contains(offload_engine_last_error(), "freed"));
    CHECK_OK(offload_engine_pipeline_stage_begin(pipeline, "denoise"));
    CHECK_OK(offload_engine_pipeline_stage_end(pipeline, "denoise"));
    CHECK_OK(offload_engine_pipeline_run_end(pipeline));
    offload_engine_pipeline_free(pipeline);
    offload_engine_engine_free(engines[1]);
    check_all_home(&models[0]);
    check_all_home(&models[1]);
    free_model(&models[0]);
    free_model(&models[1]);
}

static void check_load_gguf(void)
{
    char path[512];
    offload_engine_registry *registry = new_registry(NULL);
    size_t count = 0;
    int file_backed;
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_NULL_POINTER, offload_engine_registry_load_gguf(registry, NULL, 0, &count));
    scratch_path(path, sizeof path, "missing.gguf");
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_IO, offload_engine_registry_load_gguf(registry, path, 0, &count));
    scratch_path(path, sizeof path, "truncated-load.gguf");
    write_truncated_gguf(path);
    CHECK_FAILS_WITH(OFFLOAD_ENGINE_ERR_CORRUPT_FILE, offload_engine_registry_load_gguf(registry, path, 0, &count));
    CHECK(count == 0 && tensor_count(registry) == 0);
    offload_engine_registry_free(registry);
    scratch_path(path, sizeof path, "tiny-load.gguf");
    write_tiny_gguf(path);
    for (file_backed = 0; file_backed < 2; file_backed++) {
        registry = new_registry(NULL);
        CHECK_OK(offload_engine_registry_load_gguf(registry, path, file_backed, &count));
        CHECK(count == TINY_GGUF_TENSORS && tensor_count(registry) == TINY_GGUF_TENSORS);
        CHECK(layer_count(registry) == 2);
        offload_engine_registry_free(registry);
    }
}

#include "hostile_use.c"
#include "llama_hook.c"
#include "layer_api.c"

/* ---------------------------------------------------------------------------------------
 * Entry point
 * ------------------------------------------------------------------------------------- */

/* Runs every check; returns only when all passed. */
static void run_c_checks(int argc, char **argv)
{
    if (argc > 1)
        scratch_dir = argv[1];
    /* Nothing failed yet on this thread. */
    CHECK(offload_engine_last_error() != NULL && offload_engine_last_error()[0] == '\0');
    check_version_and_status_strings();
    check_size_parse();
    check_params_init();
    check_log_callback();
    check_last_error_is_per_thread();
    check_fault_api();
    check_gguf_registry();
    check_descriptors();
    check_plans();
    check_null_handles_and_out_pointers();
    check_add_tensor();
    check_engine();
    check_engine_protocol();
    check_engine_faults();
    check_run_pass();
    check_measurements();
    check_pipeline();
    check_load_gguf();
    check_hostile_use();
    check_llama_hook();
    check_layer_api();
#ifdef ABI_TEST_PRINT_COUNT
    printf("%ld checks passed\n", checks_passed);
#endif
}

#ifndef ABI_TEST_NO_MAIN
int main(int argc, char **argv)
{
    run_c_checks(argc, argv);
    return 0;
}
#endif
