/*
 * offload_engine.h: the C ABI of offload-engine.
 *
 * offload-engine lets a ggml host run a model whose weights do not all fit in device memory:
 * it registers the host's weight tensors, plans which layers stay on the device and which
 * stream, and moves streamed layers into a device arena just before they run, overlapping
 * the copies with compute. Outputs are bit-identical to a fully resident run.
 *
 * Conventions
 *  - Every fallible call returns an offload_engine_status; OFFLOAD_ENGINE_OK is 0. Status
 *    numbers are fixed and never reused.
 *  - On failure, offload_engine_last_error() describes the most recent failed call made on
 *    the calling thread. Out-parameters are written only on success.
 *  - Handles are opaque. Each _new has a _free; _free(NULL) is a no-op, and freeing a handle
 *    that is not live is ignored (logged). A NULL, freed or wrong-kind handle passed to any
 *    other call returns OFFLOAD_ENGINE_ERR_NULL_POINTER or OFFLOAD_ENGINE_ERR_INVALID_HANDLE.
 *    (A freed handle whose address was reused by a new handle of the same kind cannot be
 *    told apart: do not use handles after _free.)
 *  - A _free that comes while a call on the same handle is running (from another thread,
 *    from a callback of that call, or from the log callback) is deferred: the handle is
 *    refused to new calls at once and destroyed when the running call returns.
 *  - Parameter and result structs start with `size`: fill parameter structs with the matching
 *    *_params_init() and set `size` of result structs to sizeof(struct) before the call, so
 *    the structs can grow without breaking older callers.
 *  - Strings returned by the library are NUL-terminated and owned by the library; each call
 *    says how long they stay valid. Strings passed in must be NUL-terminated UTF-8.
 *  - Threads: the library functions without a handle are thread-safe. A handle may be used
 *    from any thread, but calls on one handle must not overlap; an overlapping call returns
 *    OFFLOAD_ENGINE_ERR_INVALID_STATE instead of racing. Log callbacks may be invoked from
 *    the engine's copy thread.
 *  - No call aborts the process: inputs are checked before they reach ggml, and internal
 *    panics are caught and returned as OFFLOAD_ENGINE_ERR_INTERNAL. The one limit the library
 *    cannot check for the host is how many tensors a graph-building callback creates (see
 *    offload_engine_engine_run_pass).
 *  - A weight tensor belongs to one live engine at a time: an engine over tensors another
 *    live engine holds, or registering such a tensor again, is ERR_INVALID_STATE. An engine
 *    freed while a call still holds it lets go of them when that call returns; a claim in
 *    the meantime waits for that, up to 5 s.
 */
#ifndef OFFLOAD_ENGINE_H
#define OFFLOAD_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct ggml_tensor;
struct ggml_context;
struct ggml_backend;
struct ggml_cgraph;
struct ggml_backend_buffer_type;

/* ---------------------------------------------------------------------------------------
 * Status, errors, version, logging
 * ------------------------------------------------------------------------------------- */

typedef enum offload_engine_status {
    OFFLOAD_ENGINE_OK = 0,
    OFFLOAD_ENGINE_ERR_INVALID_ARGUMENT = 1,
    OFFLOAD_ENGINE_ERR_NULL_POINTER = 2,
    OFFLOAD_ENGINE_ERR_INVALID_HANDLE = 3,
    OFFLOAD_ENGINE_ERR_NOT_FOUND = 4,
    OFFLOAD_ENGINE_ERR_ALREADY_EXISTS = 5,
    OFFLOAD_ENGINE_ERR_IO = 6,
    OFFLOAD_ENGINE_ERR_CORRUPT_FILE = 7,
    OFFLOAD_ENGINE_ERR_INSUFFICIENT_MEMORY = 8, /* the plan cannot fit the budget */
    OFFLOAD_ENGINE_ERR_BACKEND = 9,
    OFFLOAD_ENGINE_ERR_INVALID_STATE = 10, /* call out of sequence or overlapping */
    OFFLOAD_ENGINE_ERR_INTERNAL = 11,
    OFFLOAD_ENGINE_ERR_UNSUPPORTED = 12,
    OFFLOAD_ENGINE_ERR_OUT_OF_MEMORY = 13 /* an allocation failed */
} offload_engine_status;

/* Library version, e.g. "0.1.0". Static string. */
const char *offload_engine_version(void);

/* Short description of a status code (any int). Static string. */
const char *offload_engine_status_str(int status);

/* Message of the most recent failed call on this thread ("" if none). Valid until the next
 * failed call on this thread. */
const char *offload_engine_last_error(void);

typedef enum offload_engine_log_level {
    OFFLOAD_ENGINE_LOG_TRACE = 0,
    OFFLOAD_ENGINE_LOG_DEBUG = 1,
    OFFLOAD_ENGINE_LOG_INFO = 2,
    OFFLOAD_ENGINE_LOG_WARN = 3,
    OFFLOAD_ENGINE_LOG_ERROR = 4
} offload_engine_log_level;

/* `message` is valid only during the callback. May be called from any library thread. */
typedef void (*offload_engine_log_fn)(int level, const char *message, void *user);

/* Routes library logs to `callback` (NULL restores the default: stderr, filtered by the
 * RUST_LOG environment variable, e.g. RUST_LOG=offload_engine=debug). */
int offload_engine_log_set_callback(offload_engine_log_fn callback, void *user);

/* Parses a memory size as people write it, the way every offload-engine tool does: a number
 * with an optional unit, decimal units as powers of ten (K/KB, M/MB, G/GB, T/TB) and binary
 * ones as powers of two (KiB, MiB, GiB, TiB), case-insensitive; a bare number is bytes.
 * "12GB" is 12e9 bytes, "12GiB" 12 * 2^30. A bare number below 1 MiB is accepted and a
 * warning is logged (it almost certainly lacks its unit). Anything else, or a positive number
 * that rounds to 0 bytes, is ERR_INVALID_ARGUMENT. */
int offload_engine_size_parse(const char *text, uint64_t *bytes_out);

/* Test hook: makes the `countdown`-th check of a fault point fail once.
 * fault: 0 device allocation, 1 layer copy, 2 panic in the copy thread, 3 file read. */
int offload_engine_debug_inject_fault(int fault, uint32_t countdown);
void offload_engine_debug_clear_faults(void);

/* ---------------------------------------------------------------------------------------
 * Registry: the weight tensors, grouped into layers in execution order
 * ------------------------------------------------------------------------------------- */

typedef struct offload_engine_registry offload_engine_registry;

typedef enum offload_engine_location {
    OFFLOAD_ENGINE_LOCATION_HOST = 0,
    OFFLOAD_ENGINE_LOCATION_PINNED = 1,
    OFFLOAD_ENGINE_LOCATION_DEVICE = 2,
    OFFLOAD_ENGINE_LOCATION_FILE = 3
} offload_engine_location;

typedef struct offload_engine_registry_params {
    size_t size;
    /* Built-in pattern name ("flux", "llama_gguf", ... ) or a regex with one capture group
     * for the layer index (optionally a named group `kind`). NULL: detect from the names.
     * Borrowed during offload_engine_registry_new only. */
    const char *pattern;
} offload_engine_registry_params;

typedef struct offload_engine_tensor_info {
    size_t size;           /* set to sizeof(offload_engine_tensor_info) before the call */
    const char *name;      /* valid until the next call on the registry */
    int ggml_type;         /* enum ggml_type */
    int n_dims;
    int64_t ne[4];
    uint64_t bytes;
    int64_t layer;         /* -1: the global group (always resident) */
    int location;          /* offload_engine_location */
    const char *component; /* "diffusion_model", "text_encoder", ...; as `name` */
} offload_engine_tensor_info;

typedef struct offload_engine_layer_info {
    size_t size; /* set to sizeof(offload_engine_layer_info) before the call */
    const char *name; /* e.g. "double_blocks.5"; valid until the next call on the registry */
    uint64_t tensor_count;
    uint64_t bytes;
    int location; /* offload_engine_location */
    const char *component;
} offload_engine_layer_info;

void offload_engine_registry_params_init(offload_engine_registry_params *params);
int offload_engine_registry_new(const offload_engine_registry_params *params, offload_engine_registry **registry_out);
void offload_engine_registry_free(offload_engine_registry *registry);

/* Registers a host tensor. `name` NULL uses the name ggml holds. The tensor's data must be
 * allocated in host memory; the tensor must stay alive, at the same address, as long as this
 * registry or any engine made from it. Duplicate names: ERR_ALREADY_EXISTS. A tensor without
 * elements: ERR_INVALID_ARGUMENT. A tensor a live engine holds: ERR_INVALID_STATE. `id_out`
 * may be NULL. */
int offload_engine_registry_add_tensor(offload_engine_registry *registry, struct ggml_tensor *tensor, const char *name, uint64_t *id_out);

/* Registers every tensor of a context (same rules as add_tensor); all or nothing.
 * `count_out` may be NULL. */
int offload_engine_registry_add_context(offload_engine_registry *registry, struct ggml_context *ctx, size_t *count_out);

/* Registers every tensor a GGUF file describes (no weights are read). All or nothing: a
 * corrupt file (an empty name or one with NUL in it, a tensor without elements, a range
 * outside the file...) adds nothing and returns ERR_CORRUPT_FILE naming the problem. A path
 * that is not a regular file (a FIFO, a directory) is ERR_IO, refused before it is opened. */
int offload_engine_registry_add_gguf(offload_engine_registry *registry, const char *path, size_t *count_out);

/* Disk tier: registers the tensors of a no_alloc context (no data) whose weights stay in the
 * GGUF file at `path`; each must exist there with the same type and shape. The engine reads
 * each layer from the file straight into device memory (direct I/O where the file system
 * allows it) when it runs, so host memory holds no copy of the model. Between uses these
 * tensors have no data. All or nothing; a data range outside the file is ERR_CORRUPT_FILE.
 * A read error while streaming fails that layer_begin with ERR_IO naming the tensor and file
 * offset; the engine stays usable (offload_all, free). The file must stay the file that was
 * registered: a prepare that finds another file at the path, or this one rewritten (its
 * inode, size or modification time changed), is ERR_IO and streams nothing from it. To stream from a file the host already
 * mmaps, register the mapped tensors with add_tensor/add_context instead (no copy is made
 * unless pinned_limit_bytes asks for one). */
int offload_engine_registry_add_file_backed(offload_engine_registry *registry, struct ggml_context *ctx, const char *path, size_t *count_out);

/* Disk tier for hosts with their own loader: registers a host tensor (as add_tensor; `name`
 * NULL uses the name ggml holds) whose data lies at byte `offset` of the file at `path`, laid
 * out as ggml lays out the tensor (ggml_nbytes bytes; a GGUF or safetensors file that holds
 * it in its own type). The host need not read it: its memory is never read or written by the
 * engine, which reads the bytes
 * from the file whenever it places the tensor (resident or streamed) and points the tensor
 * back at that memory when it takes it off the device. The file is opened and stamped on its
 * first use in this registry and must stay that file (as add_file_backed). A range outside
 * the file is ERR_CORRUPT_FILE, a path that is not a regular file ERR_IO; nothing is
 * registered then. `id_out` may be NULL. */
int offload_engine_registry_add_tensor_from_file(offload_engine_registry *registry, struct ggml_tensor *tensor, const char *name, const char *path, uint64_t offset, uint64_t *id_out);

/* Registers a tensor by description only (planning and simulation). `ne` holds n_dims (1..4)
 * positive sizes. */
int offload_engine_registry_add_descriptor(offload_engine_registry *registry, const char *name, int ggml_type, int n_dims, const int64_t *ne, uint64_t *id_out);

/* Reads a GGUF file's tensors into ggml tensors the registry owns (engines created from it
 * share them), for hosts and tools without their own loader (Python experiments, the CLI).
 * file_backed 0: the weights are read into host memory now; non-zero: the tensors get no
 * data and stream from the file (the disk tier). The file is validated first; a damaged
 * file is ERR_CORRUPT_FILE and registers nothing. */
int offload_engine_registry_load_gguf(offload_engine_registry *registry, const char *path, int file_backed, size_t *count_out);

int offload_engine_registry_tensor_count(offload_engine_registry *registry, size_t *count_out);
int offload_engine_registry_layer_count(offload_engine_registry *registry, size_t *count_out);
int offload_engine_registry_global_bytes(offload_engine_registry *registry, uint64_t *bytes_out);
int offload_engine_registry_total_bytes(offload_engine_registry *registry, uint64_t *bytes_out);

/* Detected (or chosen) architecture pattern; valid until the next call on the registry. */
int offload_engine_registry_architecture(offload_engine_registry *registry, const char **name_out);

/* Tensor id by name: ERR_NOT_FOUND if unknown. Ids from another registry: ERR_INVALID_HANDLE. */
int offload_engine_registry_find(offload_engine_registry *registry, const char *name, uint64_t *id_out);
/* Puts tensor `id` in layer number `layer`, for hosts that know where each weight is used
 * (stable-diffusion.cpp's graph-cut segments) better than a name pattern. Layers run in the
 * order of their numbers, which need not be contiguous; each is named "layer.<number>".
 * Once a registry has an assignment, assignments alone define its layers: every tensor
 * without one is global (always resident). Not after a plan used the registry
 * (ERR_INVALID_STATE); an id of another registry is ERR_INVALID_HANDLE. */
int offload_engine_registry_assign(offload_engine_registry *registry, uint64_t id, uint32_t layer);
int offload_engine_registry_tensor_info(offload_engine_registry *registry, uint64_t id, offload_engine_tensor_info *info_out);
int offload_engine_registry_layer_info(offload_engine_registry *registry, uint64_t layer, offload_engine_layer_info *info_out);

/* Writes the ids of a layer's tensors to `ids_out` (capacity entries); `count_out` receives
 * the number. Too small a capacity is ERR_INVALID_ARGUMENT (layer_info gives the count). */
int offload_engine_registry_layer_tensors(offload_engine_registry *registry, uint64_t layer, uint64_t *ids_out, size_t capacity, size_t *count_out);

/* ---------------------------------------------------------------------------------------
 * Plans: what stays on the device, what streams, and what it costs
 * ------------------------------------------------------------------------------------- */

typedef struct offload_engine_plan offload_engine_plan;

typedef enum offload_engine_plan_mode {
    OFFLOAD_ENGINE_MODE_FULL = 0,
    OFFLOAD_ENGINE_MODE_STREAMING = 1,
    OFFLOAD_ENGINE_MODE_INSUFFICIENT = 2
} offload_engine_plan_mode;

typedef struct offload_engine_plan_params {
    size_t size;
    uint64_t free_bytes;     /* free device memory; 0 with an engine: measure the device */
    uint64_t total_bytes;    /* device capacity (informational; 0: same as free) */
    uint64_t min_free_bytes; /* left free on the device (default 512 MiB) */
    double safety_fraction;  /* of free memory the plan may use (default 0.90) */
    uint64_t compute_reserve_bytes; /* the host's compute buffers */
    uint64_t persistent_bytes;      /* KV cache, persistent activations */
    uint32_t steps;                 /* default 1 */
    uint32_t passes_per_step;       /* 2 with classifier-free guidance; default 1 */
    uint32_t prefetch_depth;        /* layers copied ahead; default 1 */
    const char *link;  /* "pcie4-x16", "pcie3-x16", "usb2", "nvme", "ddr4", ...; NULL: pcie4-x16 */
    double link_gbps;  /* overrides `link` when non-zero */
    /* At most this many resident layers (the ones that save the most traffic stay; the rest
     * stream); UINT32_MAX (the default): as many as the budget holds. */
    uint32_t max_resident_layers;
} offload_engine_plan_params;

typedef struct offload_engine_plan_summary {
    size_t size; /* set to sizeof(offload_engine_plan_summary) before the call */
    int mode;    /* offload_engine_plan_mode */
    uint64_t resident_layer_count;
    uint64_t streamed_layer_count;
    uint32_t slot_count;
    uint64_t slot_bytes;
    uint64_t arena_bytes;
    uint64_t device_bytes;
    uint64_t usable_bytes;
    uint64_t full_cache_bytes;
    uint64_t streaming_bytes;
    uint64_t layer_bytes_max;
    /* Bytes copied to the device, as the engine's stats count them (offload_engine_stats):
     * placement_bytes once when the engine is placed (the global group and the resident
     * layers), then bytes_per_pass of streamed layers every pass; bytes_per_step is
     * passes_per_step of those, and bytes_per_run the placement plus every pass of the run. */
    uint64_t bytes_per_pass;
    uint64_t bytes_per_step;
    uint64_t bytes_per_run;
    double predicted_step_seconds;
    uint64_t placement_bytes;
} offload_engine_plan_summary;

void offload_engine_plan_params_init(offload_engine_plan_params *params);

/* Plans a registered model against a simulated device (no device needed). When nothing
 * fits, returns ERR_INSUFFICIENT_MEMORY and last_error() gives the bytes each mode needs,
 * the bytes available and the options. */
int offload_engine_plan_new(offload_engine_registry *registry, const offload_engine_plan_params *params, offload_engine_plan **plan_out);
void offload_engine_plan_free(offload_engine_plan *plan);
int offload_engine_plan_get_summary(const offload_engine_plan *plan, offload_engine_plan_summary *summary_out);
int offload_engine_plan_layer_resident(const offload_engine_plan *plan, uint64_t layer, int *resident_out);

/* Human-readable explanation of the plan; valid until the plan is freed ("" for a bad handle). */
const char *offload_engine_plan_message(const offload_engine_plan *plan);

/* Stream or compute on the CPU? For a language model's `overflow_bytes` of weights that do
 * not fit on the device, one pass of `tokens_per_pass` tokens either copies them over the
 * link and computes on the device, or computes them on the CPU where they are (llama.cpp's
 * -ngl with fewer layers on the device). Each weight costs 2 flops per token; the CPU side
 * is bound by host memory bandwidth or host flops, whichever is slower. Decode (1 token)
 * over PCIe usually favours the CPU, prefill (hundreds of tokens) streaming. */
typedef struct offload_engine_advice_params {
    size_t size;
    uint64_t overflow_bytes;
    double bits_per_weight;   /* of the overflowing weights, block scales included (default 4.5: Q4_K) */
    uint32_t tokens_per_pass; /* 1: decode (default); the ubatch size: prefill */
    const char *link;         /* as offload_engine_plan_params; NULL: pcie4-x16 */
    double link_gbps;
    double host_memory_gbps;  /* default 60 (dual-channel DDR5, sustained) */
    double host_gflops;       /* default 500 */
    double device_gflops;     /* default 50000 */
} offload_engine_advice_params;

typedef struct offload_engine_advice {
    size_t size;        /* set to sizeof(offload_engine_advice) before the call */
    int prefer_cpu;     /* 1: compute the overflow on the CPU; 0: stream it */
    double stream_seconds; /* one pass, streaming (copies not overlapped: the conservative side) */
    double cpu_seconds;    /* one pass, on the CPU */
} offload_engine_advice;

void offload_engine_advice_params_init(offload_engine_advice_params *params);
int offload_engine_advise(const offload_engine_advice_params *params, offload_engine_advice *advice_out);

/* ---------------------------------------------------------------------------------------
 * Engine: streaming on a ggml device
 * ------------------------------------------------------------------------------------- */

typedef struct offload_engine_engine offload_engine_engine;

typedef struct offload_engine_engine_params {
    size_t size;
    const char *device;      /* ggml device name ("CPU", "CUDA0", "Vulkan0"); NULL: first GPU, else CPU */
    uint64_t budget_bytes;   /* device memory the engine may use; 0: measure free memory */
    uint64_t min_free_bytes; /* kept free when measuring (default 512 MiB) */
    double safety_fraction;  /* of measured free memory (default 0.90) */
    uint32_t prefetch_depth; /* default 1 */
    int compute_threads;     /* CPU backend threads, 1..256 (default 1) */
    int trace;               /* non-zero: record a timeline for offload_engine_engine_trace_write */
    /* Cap on engine-owned staging copies of streamed layers (pinned where the device has
     * pinned host memory, so copies run asynchronously). UINT64_MAX (the default): stage
     * every streamed layer on devices with pinned memory, none elsewhere. If pinning fails
     * the engine warns once and copies from the host's pageable memory. */
    uint64_t pinned_limit_bytes;
} offload_engine_engine_params;

typedef struct offload_engine_stats {
    size_t size; /* set to sizeof(offload_engine_stats) before the call */
    uint64_t passes;
    uint64_t layer_loads;     /* streamed layer loads used by layer_begin */
    uint64_t bytes_copied;    /* all of it: placement + streamed + prefetch_unused */
    uint64_t copy_us;
    uint64_t wait_us;
    uint64_t compute_us;
    uint64_t prefetch_hits;
    uint64_t prefetch_misses;
    uint64_t arena_bytes;
    uint64_t arena_peak_bytes;
    uint64_t placement_bytes;       /* copied once when placed: global group + resident layers */
    uint64_t streamed_bytes;        /* copied for the loads layer_begin used; the plan's
                                     * bytes_per_pass times the passes, for in-order passes */
    uint64_t prefetch_unused_bytes; /* copied ahead but not used (yet): the next pass's first
                                     * layers after the last pass, or prefetches taken back */
} offload_engine_stats;

typedef struct offload_engine_layer_stats {
    size_t size; /* set to sizeof(offload_engine_layer_stats) before the call */
    int resident;
    uint64_t loads;
    uint64_t bytes;
    uint64_t wait_us;
    uint64_t compute_us;
    uint64_t evict_us;
    uint64_t load_bytes; /* what one load copies (the file stretch it reads, for the disk
                            tier); bytes is loads of these */
} offload_engine_layer_stats;

void offload_engine_engine_params_init(offload_engine_engine_params *params);

/* Creates an engine over a copy of `registry` (tensor ids stay valid; the registry may be
 * freed afterwards, the tensors may not). The engine owns a compute backend on its device:
 * run the host's graphs on it (offload_engine_engine_backend). */
int offload_engine_engine_new(const offload_engine_engine_params *params, offload_engine_registry *registry, offload_engine_engine **engine_out);

/* Restores every registered tensor to its host memory, joins the copy thread and frees the
 * device arena. Safe with a pass open or copies in flight. An engine that is a pipeline
 * component leaves the device here too (its tensors are home when this returns) and the
 * pipeline no longer places it: its stage_begin is ERR_INVALID_STATE. */
void offload_engine_engine_free(offload_engine_engine *engine);

/* The engine's compute backend; owned by the engine, valid until engine_free. */
int offload_engine_engine_backend(offload_engine_engine *engine, struct ggml_backend **backend_out);

/* The backend the host computes the layers on (its own stream), so the events that let a
 * slot be refilled are recorded where the layer's kernels run; NULL goes back to the engine's
 * backend. Needed when the host computes on a backend of its own rather than the engine's
 * (on a GPU, recording on the engine's stream would let a copy overwrite a slot the host's
 * kernels still read). It must be on the engine's device (else ERR_INVALID_ARGUMENT) and
 * stay alive while the engine uses it; not while a pass is open. */
int offload_engine_engine_set_compute_backend(offload_engine_engine *engine, struct ggml_backend *backend);

/* Plans with `params`, allocates the device arena once and places the resident layers.
 * free_bytes non-zero: this placement is planned exactly as offload_engine_plan_new plans
 * with the same params (free memory, min_free_bytes, safety_fraction, reserves); later
 * prepares use the engine's own budget again. free_bytes 0: the engine's budget_bytes (all of
 * it) or else the device's free memory (less the engine's min_free_bytes and safety
 * fraction), with the params' reserves. `plan_out` may be NULL;
 * otherwise the caller frees it. Calling it again between runs (no pass open) re-plans:
 * free memory is measured anew and the per-layer compute times and copy bandwidth measured
 * by earlier passes replace table values (the plan message says which figures were
 * measured). Tensors registered later than the first call are an ERR_INVALID_STATE.
 * The prefetch depth is the engine's (engine params); params.prefetch_depth serves
 * simulations. An engine that is a pipeline component is placed by its pipeline:
 * ERR_INVALID_STATE here. */
int offload_engine_engine_prepare(offload_engine_engine *engine, const offload_engine_plan_params *params, offload_engine_plan **plan_out);

/* Measures host-to-device copy bandwidth in GB/s with copies of `bytes` (clamped to
 * 1 MiB..1 GiB) from pageable memory and, where the device has it, pinned memory
 * (`pinned_gbps_out` gets 0 otherwise; it may be NULL). Allocates and frees device memory. */
int offload_engine_engine_measure_link(offload_engine_engine *engine, uint64_t bytes, double *pageable_gbps_out, double *pinned_gbps_out);

/* Dry run: the bytes ggml's graph allocator would need to compute `graph` on the engine's
 * backend (nothing is computed). Pass it as plan params' compute_reserve_bytes. */
int offload_engine_engine_measure_graph(offload_engine_engine *engine, struct ggml_cgraph *graph, uint64_t *bytes_out);

/* One forward pass of the model: begin, then for each layer in execution order
 * layer_begin / (build and compute the layer's graph) / layer_end, then end.
 * layer_begin waits only if that layer's copy is not done and points its tensors at device
 * memory; layer_end points them back at host memory and frees the slot. One layer is open at
 * a time, and layer_end must name it; out-of-order layers work (loaded on demand). */
int offload_engine_engine_pass_begin(offload_engine_engine *engine);
int offload_engine_engine_pass_end(offload_engine_engine *engine);
int offload_engine_engine_layer_begin(offload_engine_engine *engine, uint64_t layer);
int offload_engine_engine_layer_end(offload_engine_engine *engine, uint64_t layer);
/* Layers first..first+count-1 at once, for a host that computes consecutive layers as one
 * graph (stable-diffusion.cpp merges graph-cut segments): layers_begin makes them all usable,
 * layers_end (with the same first and count) ends them. The streamed layers among them must
 * fit the plan's slots together (slot_count of the plan summary), else ERR_INVALID_ARGUMENT.
 * layer_begin(l) is layers_begin(l, 1). */
int offload_engine_engine_layers_begin(offload_engine_engine *engine, uint64_t first, uint64_t count);
int offload_engine_engine_layers_end(offload_engine_engine *engine, uint64_t first, uint64_t count);

/* Waits for in-flight copies and returns streamed layers to host memory (closes any pass). */
int offload_engine_engine_offload_all(offload_engine_engine *engine);

/* Counters of the current placement (prepare, or a pipeline's stage_begin); for an engine a
 * pipeline has taken off the device, those of its last placement. */
int offload_engine_engine_stats(offload_engine_engine *engine, offload_engine_stats *stats_out);
int offload_engine_engine_layer_stats(offload_engine_engine *engine, uint64_t layer, offload_engine_layer_stats *stats_out);
int offload_engine_engine_stats_reset(offload_engine_engine *engine);

/* Writes the recorded timeline as Chrome trace-event JSON (needs params.trace). */
int offload_engine_engine_trace_write(offload_engine_engine *engine, const char *path);

/* Changes a registered weight at run time (a LoRA merged into it, a fine-tune patch): writes
 * `size` bytes at byte `offset` of tensor `name` to its host memory, the engine's staging
 * copy and, when the layer is resident, its device copy; a streamed layer carries the new
 * data from its next copy on. Not while a pass is open (ERR_INVALID_STATE). A tensor whose
 * home is the model file (the disk tier) cannot change: ERR_UNSUPPORTED, nothing written. */
int offload_engine_engine_tensor_set(offload_engine_engine *engine, const char *name, const void *data, uint64_t offset, uint64_t size);

/* ---------------------------------------------------------------------------------------
 * The three-stage executor: for hosts that split a forward into an input stage, one stage
 * per layer and an output stage. The engine runs the stages on its backend, keeps the
 * activation in two persistent device tensors between layers, runs consecutive resident
 * layers as one graph, and brackets every layer with layer_begin/layer_end itself.
 * Callbacks run on the calling thread, must not throw, and build nodes in the no-alloc
 * context they are given (valid only during the callback and the graph's compute).
 * ------------------------------------------------------------------------------------- */

typedef struct offload_engine_staged_model {
    size_t size;          /* sizeof(offload_engine_staged_model) */
    void *user;           /* passed to every callback */
    uint64_t layer_count; /* must equal the registry's layer count */
    int64_t activation_ne[2]; /* the activation passed between layers (stored as f32) */
    /* Returns the first activation (any tensor with ne[0]*ne[1] elements). */
    struct ggml_tensor *(*build_input)(void *user, struct ggml_context *ctx);
    /* Optional: called once the input graph is allocated, before it runs; set input data
     * with ggml_backend_tensor_set here. Non-zero return aborts the pass. */
    int (*set_inputs)(void *user);
    /* Returns layer `layer`'s output from activation `x` (same element count). */
    struct ggml_tensor *(*build_layer)(void *user, struct ggml_context *ctx, uint64_t layer, struct ggml_tensor *x);
    /* Returns the final output from the last activation. */
    struct ggml_tensor *(*build_output)(void *user, struct ggml_context *ctx, struct ggml_tensor *x);
} offload_engine_staged_model;

/* Runs one pass (the engine must be prepared, with no pass of the host's own open: that is
 * ERR_INVALID_STATE and leaves the open pass as it was). Copies the output tensor's bytes to
 * `output` (may be NULL to only learn the size; too small a capacity is
 * ERR_INVALID_ARGUMENT) and writes its size to `output_size_out` (may be NULL). A NULL or
 * wrongly shaped tensor from a callback, one of a type other than f32, f16 or bf16, or an
 * activation whose size overflows is ERR_INVALID_ARGUMENT, never a ggml abort; on error the
 * pass is abandoned and the engine stays usable. Graphs are sized from what the callbacks
 * built, whatever their size; each callback call may create up to 32768 tensors in its
 * context (more runs ggml out of context memory, which aborts). Consecutive resident layers
 * share a graph while it holds fewer than 32768 tensors. */
int offload_engine_engine_run_pass(offload_engine_engine *engine, const offload_engine_staged_model *model, void *output, size_t output_capacity, size_t *output_size_out);


/* ---------------------------------------------------------------------------------------
 * Pipelines: whole components (text encoder, diffusion model, decoder, ...) placed on and
 * off one device between the stages of a job.
 *
 * Each component is an engine (its own registry). The host brackets a job with run_begin /
 * run_end and each stage with stage_begin / stage_end; between them it runs the component's
 * passes on that engine as usual (pass/layer calls or run_pass). stage_begin puts the
 * component on the device, first moving components the mode lets leave, and only when the
 * stage would not fit otherwise (its weights plus its declared need plus the margin): a
 * device with room keeps everything and pays nothing. After stage_begin, the next
 * component in stage order is placed ahead of its stage when it fits beside the running
 * one; otherwise stage_end places it, so its copies (resident layers, first streamed slots)
 * overlap what the host does between stages.
 * ------------------------------------------------------------------------------------- */

typedef struct offload_engine_pipeline offload_engine_pipeline;

typedef enum offload_engine_offload_mode {
    OFFLOAD_ENGINE_OFFLOAD_NONE = 0,           /* components stay once placed (default) */
    OFFLOAD_ENGINE_OFFLOAD_COND_ONLY = 1,      /* the conditioner may leave after its stage */
    OFFLOAD_ENGINE_OFFLOAD_COND_DIFFUSION = 2, /* conditioner and diffusion model may leave after theirs */
    OFFLOAD_ENGINE_OFFLOAD_AGGRESSIVE = 3,     /* every component leaves as soon as its stage ends */
    OFFLOAD_ENGINE_OFFLOAD_LAYER_STREAMING = 4 /* as cond_diffusion; a component that does not fit resident streams layer by layer */
} offload_engine_offload_mode;

typedef enum offload_engine_component_role {
    OFFLOAD_ENGINE_ROLE_CONDITIONER = 0, /* text encoder(s) */
    OFFLOAD_ENGINE_ROLE_DIFFUSION = 1,   /* the denoiser (DiT, UNet) */
    OFFLOAD_ENGINE_ROLE_DECODER = 2,     /* VAE */
    OFFLOAD_ENGINE_ROLE_ADAPTER = 3,     /* LoRA weights */
    OFFLOAD_ENGINE_ROLE_CONTROL = 4,     /* ControlNet and the like */
    OFFLOAD_ENGINE_ROLE_OTHER = 5
} offload_engine_component_role;

typedef enum offload_engine_placement_override {
    OFFLOAD_ENGINE_PLACE_AUTO = 0,   /* as the mode says */
    OFFLOAD_ENGINE_PLACE_KEEP = 1,   /* never leaves the device */
    OFFLOAD_ENGINE_PLACE_OFFLOAD = 2 /* leaves as soon as its stage ends */
} offload_engine_placement_override;

typedef enum offload_engine_placement {
    OFFLOAD_ENGINE_PLACEMENT_OFF = 0,      /* weights in host memory (or the model file) */
    OFFLOAD_ENGINE_PLACEMENT_RESIDENT = 1, /* every layer on the device */
    OFFLOAD_ENGINE_PLACEMENT_STREAMING = 2 /* some layers stream through slots */
} offload_engine_placement;

typedef struct offload_engine_pipeline_params {
    size_t size;
    int offload_mode;         /* offload_engine_offload_mode */
    uint64_t budget_bytes;    /* device memory for all components; 0: the device's free memory, measured again at each run_begin */
    uint64_t min_free_bytes;  /* left free on the device (--streaming-min-vram; default 512 MiB) */
    uint64_t margin_bytes;    /* a stage's need is met with this much to spare (default 300 MiB) */
    uint32_t prefetch_depth;  /* layers copied ahead in a streamed component (default 1) */
    uint32_t steps;           /* the diffusion stage's passes are steps * passes_per_step; */
    uint32_t passes_per_step; /*   they size its streaming plan (default 1 and 1) */
    int reload_diffusion;     /* run_end puts an evicted diffusion model back when it fits (default 1) */
    int log_moves;            /* log every move with bytes and time at info level (default 0) */
    uint32_t max_resident_layers; /* at most this many resident layers in a streamed component; UINT32_MAX (the default): as many as its room holds */
} offload_engine_pipeline_params;

typedef struct offload_engine_component_info {
    size_t size;          /* set to sizeof(offload_engine_component_info) before the call */
    const char *name;     /* valid until the next call on the pipeline */
    int role;             /* offload_engine_component_role */
    int placement;        /* offload_engine_placement */
    uint64_t device_bytes;   /* held on the device now */
    uint64_t resident_bytes; /* what a fully resident placement takes */
    uint64_t stage_need_bytes;
    uint64_t loads;          /* placements since the pipeline was created */
    uint64_t unloads;
    uint64_t streamed_layers; /* 0 unless placement is STREAMING */
} offload_engine_component_info;

typedef struct offload_engine_pipeline_stats {
    size_t size;             /* set to sizeof(offload_engine_pipeline_stats) before the call */
    uint64_t budget_bytes;   /* the budget of the current (or last) run */
    uint64_t loads;
    uint64_t unloads;
    uint64_t bytes_loaded;
    uint64_t load_us;
    uint64_t unload_us;
    uint64_t prefetched_loads; /* placements made ahead of their stage */
    uint64_t device_bytes;     /* held by all components now, a placement in flight included */
    uint64_t peak_device_bytes; /* weights plus the running stage's need, highest seen */
} offload_engine_pipeline_stats;

void offload_engine_pipeline_params_init(offload_engine_pipeline_params *params);
int offload_engine_pipeline_new(const offload_engine_pipeline_params *params, offload_engine_pipeline **pipeline_out);
/* Puts every component back in host memory and hands its engine back to the host (prepare
 * is allowed again); the engines live on while the host holds them. A component busy in a
 * call on another thread is waited for; one whose call is running on this thread (the free
 * comes from its callback) stays placed until the host frees or prepares it. */
void offload_engine_pipeline_free(offload_engine_pipeline *pipeline);

/* Adds `engine` as component `name` (unique, copied). Add components in the order their
 * stages run. The pipeline shares ownership of the engine (either may be freed first; see
 * engine_free) and plans it from now on: engine_prepare on it is ERR_INVALID_STATE. An
 * engine belongs to one pipeline at a time (a second pipeline's add is ERR_INVALID_STATE).
 * All components must be on one device. Not while a run is open.
 * Pipeline calls made from inside a call on one of its components (a run_pass callback, a
 * log callback) are ERR_INVALID_STATE: they would wait for the call they run in. */
int offload_engine_pipeline_add(offload_engine_pipeline *pipeline, const char *name, int role, offload_engine_engine *engine);
/* offload_engine_placement_override for one component. */
int offload_engine_pipeline_set_override(offload_engine_pipeline *pipeline, const char *name, int override_);
/* Device memory the component's stage needs besides its weights (compute buffers, e.g. from
 * offload_engine_engine_measure_graph). Default 0. */
int offload_engine_pipeline_set_stage_need(offload_engine_pipeline *pipeline, const char *name, uint64_t bytes);

/* A job. run_begin measures free device memory again (budget_bytes 0). run_end applies the
 * reload policy. A failed placement (the stage cannot fit, a device allocation or a reload
 * fails) is an error of the call that needed it, and the pipeline stays usable. */
int offload_engine_pipeline_run_begin(offload_engine_pipeline *pipeline);
int offload_engine_pipeline_run_end(offload_engine_pipeline *pipeline);
/* One stage at a time. stage_begin returns when the component is usable on the device. */
int offload_engine_pipeline_stage_begin(offload_engine_pipeline *pipeline, const char *name);
int offload_engine_pipeline_stage_end(offload_engine_pipeline *pipeline, const char *name);

int offload_engine_pipeline_component_info(offload_engine_pipeline *pipeline, const char *name, offload_engine_component_info *info_out);
int offload_engine_pipeline_get_stats(offload_engine_pipeline *pipeline, offload_engine_pipeline_stats *stats_out);

/* ---------------------------------------------------------------------------------------
 * llama.cpp drop-in: streams an unmodified llama.cpp's layers (docs/LLAMA_CPP.md)
 *
 * Three of llama.cpp's public hooks, no patch to llama.cpp or ggml:
 *  1. offload_engine_llama_new reads the model file and plans it (an impossible budget is
 *     ERR_INSUFFICIENT_MEMORY here, before llama.cpp allocates anything). Give llama.cpp the
 *     hook's buffer type for every tensor: llama_model_params.tensor_buft_overrides =
 *     { {".*", buft}, {NULL, NULL} }. llama.cpp then creates and loads the weights in
 *     host memory from that type (pinned where the device has pinned memory).
 *  2. offload_engine_llama_adopt, after llama_model_load_from_file and before
 *     llama_init_from_model, places the model on the device: the global tensors and the
 *     resident layers at fixed places of a device arena, each streamed layer at a fixed slot
 *     ("parked": its tensors point into the arena from now on, so the scheduler that
 *     llama_init_from_model makes runs their ops on the device).
 *  3. For each context, offload_engine_llama_context_new gives the user data for
 *     llama_context_params.cb_eval = offload_engine_llama_eval. The callback ends each layer
 *     at its output node (l_out-N) and begins the next, whose weights were copied ahead.
 *     A pass is one ubatch (prefill) or one token (decode).
 *
 * Teardown: llama_free(ctx) and offload_engine_llama_context_free for each context, then
 * offload_engine_llama_detach (the tensors point home again), llama_model_free,
 * offload_engine_llama_free. If llama_model_free comes before detach, the engine detaches
 * then. offload_engine_llama_free may come at any time after detach: the buffer type lives
 * on while llama.cpp's buffers do.
 *
 * Outputs are bit-identical to llama.cpp with every weight resident on the same device and
 * the same buffer kinds: run the reference with use_extra_bufts = false too (the engine's
 * arena holds weights in ggml's plain layout, not the CPU's repacked one).
 *
 * Version coupling: the buffer type is built on ggml's internal buffer interface
 * (ggml-backend-impl.h), which may change in any ggml version. offload_engine_llama_new
 * refuses (ERR_UNSUPPORTED) a ggml other than the one this library was built against.
 *
 * Threads: the contexts of one model must compute graphs one at a time (a second context's
 * graph while one runs is a sticky ERR_INVALID_STATE on it). The callback runs on the thread
 * that calls llama_decode. Hook calls made while a graph step holds the engine (from the log
 * callback) are ERR_INVALID_STATE.
 * ------------------------------------------------------------------------------------- */

typedef struct offload_engine_llama offload_engine_llama;
typedef struct offload_engine_llama_context offload_engine_llama_context;

typedef struct offload_engine_llama_params {
    size_t size;
    const char *device;      /* ggml device name; NULL: first GPU, else CPU */
    uint64_t budget_bytes;   /* device memory for the weights and llama.cpp's reserves below; 0: measured free memory */
    uint64_t min_free_bytes; /* kept free when measuring (default 512 MiB) */
    double safety_fraction;  /* of measured free memory (default 0.90) */
    uint32_t prefetch_depth; /* layers copied ahead (default 1) */
    int trace;               /* non-zero: record a timeline for offload_engine_llama_trace_write */
    /* llama.cpp's own device memory next to the weights. UINT64_MAX (the default): estimated
     * from the model's hyperparameters with n_ctx and n_ubatch (docs/LLAMA_CPP.md). */
    uint64_t compute_reserve_bytes;
    uint64_t kv_cache_bytes;
    uint32_t n_ctx;    /* the contexts' n_ctx, for the estimate (default 4096) */
    uint32_t n_ubatch; /* the contexts' n_ubatch, for the estimate (default 512) */
    /* Non-zero: every layer streams from the model file and no weight is held in host
     * memory (the disk tier). Use llama.cpp's mmap loading with it, or the load writes the
     * weights into host memory once before adopt gives it back. */
    int file_backed;
    /* Regex with one capture group, the layer index, matching the graph node that ends a
     * layer; NULL: "^l_out-(\d+)$", which is what most llama.cpp architectures name it.
     * Those that name no l_out node are refused without one (ERR_UNSUPPORTED). */
    const char *layer_output_pattern;
    const char *tensor_pattern; /* built-in name or regex grouping tensors into layers; NULL: llama_gguf (blk.N) */
    const char *link;           /* for predicted times (as offload_engine_plan_params); NULL: pcie4-x16 */
    double link_gbps;
} offload_engine_llama_params;

/* The signature of ggml's ggml_backend_sched_eval_callback. */
typedef bool (*offload_engine_llama_eval_fn)(struct ggml_tensor *tensor, bool ask, void *user_data);

void offload_engine_llama_params_init(offload_engine_llama_params *params);

/* Reads the GGUF file at `model_path` (no tensor data), checks the architecture and ggml
 * version, measures the device once and plans. */
int offload_engine_llama_new(const offload_engine_llama_params *params, const char *model_path, offload_engine_llama **hook_out);
void offload_engine_llama_free(offload_engine_llama *hook);

/* The hook's buffer type, for tensor_buft_overrides. Valid until offload_engine_llama_free
 * and the last llama.cpp buffer made from it are both gone. */
int offload_engine_llama_buffer_type(offload_engine_llama *hook, struct ggml_backend_buffer_type **buft_out);

/* The plan: before adopt the one made from the file, after it the one carried out (equal
 * for the same model and budget). Free it with offload_engine_plan_free. */
int offload_engine_llama_plan(offload_engine_llama *hook, offload_engine_plan **plan_out);

/* Places the loaded model on the device (see above). `plan_out` may be NULL. A second adopt
 * is ERR_INVALID_STATE; so is adopt when llama.cpp created no tensor in the buffer type. */
int offload_engine_llama_adopt(offload_engine_llama *hook, offload_engine_plan **plan_out);

/* Points every tensor at its host memory again and frees the device arena. ERR_INVALID_STATE
 * while a context object is live or when the model is not adopted. With file_backed the
 * host memory holds no weights: free the model after. */
int offload_engine_llama_detach(offload_engine_llama *hook);

/* The engine's counters (passes = graphs computed). ERR_INVALID_STATE before adopt. */
int offload_engine_llama_stats(offload_engine_llama *hook, offload_engine_stats *stats_out);
int offload_engine_llama_trace_write(offload_engine_llama *hook, const char *path);

/* A context object: pass it as cb_eval_user_data. `host_callback` (may be NULL) is an eval
 * callback the host already had (imatrix, a debugger); it is asked about every node and its
 * answers are honoured, with its own `host_user_data`. Free it after llama_free(ctx). */
int offload_engine_llama_context_new(offload_engine_llama *hook, offload_engine_llama_eval_fn host_callback, void *host_user_data, offload_engine_llama_context **context_out);
void offload_engine_llama_context_free(offload_engine_llama_context *context);

/* OK, or the first error the callback met (sticky; last_error() gets its message): a model
 * not adopted or detached, a failed copy, a graph that does not run layer by layer where its
 * layer outputs say. Check it after llama_decode: a decode after which it is not OK may have
 * read weights that were not in place. */
int offload_engine_llama_context_status(offload_engine_llama_context *context);

/* Set as llama_context_params.cb_eval, with a context object as cb_eval_user_data. With any
 * other user data it changes nothing (logged once). */
bool offload_engine_llama_eval(struct ggml_tensor *tensor, bool ask, void *user_data);

#ifdef __cplusplus
}
#endif

#endif /* OFFLOAD_ENGINE_H */
