"""ctypes bindings for liboffload_engine's C ABI (ffi/offload_engine.h): the version,
registries of tensor descriptions (from GGUF files or by hand), plans, and streaming
experiments on a ggml device: models loaded from GGUF files by the library itself
(Registry.load_gguf), engines that stream their layers under a memory budget (Engine) and
pipelines that place whole components on and off the device (Pipeline).

Python builds no ggml graphs, so Engine.run_pass walks the layers without computing: it
measures what streaming costs (copies, waits, bytes moved) for a model and a budget.

The library is found through the OFFLOAD_ENGINE_LIB environment variable, else as
target/debug or target/release/liboffload_engine.so of this repository (the newer one when
both exist). Functions a given build does not export raise OffloadError with status
ERR_UNSUPPORTED when called; the rest of the module keeps working.
"""

import ctypes
import os
import struct
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

__all__ = [
    "OffloadError",
    "Registry",
    "TensorInfo",
    "LayerInfo",
    "Engine",
    "Stats",
    "LayerStats",
    "Pipeline",
    "ComponentInfo",
    "PipelineStats",
    "LlamaHook",
    "advise",
    "has_function",
    "plan",
    "status_str",
    "version",
]

# offload_engine_status
OK = 0
ERR_INVALID_ARGUMENT = 1
ERR_NULL_POINTER = 2
ERR_INVALID_HANDLE = 3
ERR_NOT_FOUND = 4
ERR_ALREADY_EXISTS = 5
ERR_IO = 6
ERR_CORRUPT_FILE = 7
ERR_INSUFFICIENT_MEMORY = 8
ERR_BACKEND = 9
ERR_INVALID_STATE = 10
ERR_INTERNAL = 11
ERR_UNSUPPORTED = 12
ERR_OUT_OF_MEMORY = 13

LOCATIONS = {0: "host", 1: "pinned", 2: "device", 3: "file"}
PLAN_MODES = {0: "full", 1: "streaming", 2: "insufficient"}

# Pipelines (offload_engine_offload_mode, _component_role, _placement_override, _placement)
OFFLOAD_MODES = {"none": 0, "cond_only": 1, "cond_diffusion": 2, "aggressive": 3, "layer_streaming": 4}
ROLES = {"conditioner": 0, "diffusion": 1, "decoder": 2, "adapter": 3, "control": 4, "other": 5}
OVERRIDES = {"auto": 0, "keep": 1, "offload": 2}
PLACEMENTS = {0: "off", 1: "resident", 2: "streaming"}

class OffloadError(Exception):
    """A failed call: `status` is the offload_engine_status code, `message` the engine's
    explanation (offload_engine_last_error)."""

    def __init__(self, status, message):
        super().__init__(f"{status_str(status)} ({status}): {message}")
        self.status = status
        self.message = message


# ---------------------------------------------------------------------------------------
# The C structs, field for field as in the header
# ---------------------------------------------------------------------------------------


class _RegistryParams(ctypes.Structure):
    _fields_ = [("size", ctypes.c_size_t), ("pattern", ctypes.c_char_p)]


class _TensorInfo(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_size_t),
        ("name", ctypes.c_char_p),
        ("ggml_type", ctypes.c_int),
        ("n_dims", ctypes.c_int),
        ("ne", ctypes.c_int64 * 4),
        ("bytes", ctypes.c_uint64),
        ("layer", ctypes.c_int64),
        ("location", ctypes.c_int),
        ("component", ctypes.c_char_p),
    ]


class _LayerInfo(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_size_t),
        ("name", ctypes.c_char_p),
        ("tensor_count", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("location", ctypes.c_int),
        ("component", ctypes.c_char_p),
    ]


class _PlanParams(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_size_t),
        ("free_bytes", ctypes.c_uint64),
        ("total_bytes", ctypes.c_uint64),
        ("min_free_bytes", ctypes.c_uint64),
        ("safety_fraction", ctypes.c_double),
        ("compute_reserve_bytes", ctypes.c_uint64),
        ("persistent_bytes", ctypes.c_uint64),
        ("steps", ctypes.c_uint32),
        ("passes_per_step", ctypes.c_uint32),
        ("prefetch_depth", ctypes.c_uint32),
        ("link", ctypes.c_char_p),
        ("link_gbps", ctypes.c_double),
        ("max_resident_layers", ctypes.c_uint32),
    ]


class _PlanSummary(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_size_t),
        ("mode", ctypes.c_int),
        ("resident_layer_count", ctypes.c_uint64),
        ("streamed_layer_count", ctypes.c_uint64),
        ("slot_count", ctypes.c_uint32),
        ("slot_bytes", ctypes.c_uint64),
        ("arena_bytes", ctypes.c_uint64),
        ("device_bytes", ctypes.c_uint64),
        ("usable_bytes", ctypes.c_uint64),
        ("full_cache_bytes", ctypes.c_uint64),
        ("streaming_bytes", ctypes.c_uint64),
        ("layer_bytes_max", ctypes.c_uint64),
        ("bytes_per_pass", ctypes.c_uint64),
        ("bytes_per_step", ctypes.c_uint64),
        ("bytes_per_run", ctypes.c_uint64),
        ("predicted_step_seconds", ctypes.c_double),
        ("placement_bytes", ctypes.c_uint64),
    ]


class _EngineParams(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_size_t),
        ("device", ctypes.c_char_p),
        ("budget_bytes", ctypes.c_uint64),
        ("min_free_bytes", ctypes.c_uint64),
        ("safety_fraction", ctypes.c_double),
        ("prefetch_depth", ctypes.c_uint32),
        ("compute_threads", ctypes.c_int),
        ("trace", ctypes.c_int),
        ("pinned_limit_bytes", ctypes.c_uint64),
    ]


class _Stats(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_size_t),
        ("passes", ctypes.c_uint64),
        ("layer_loads", ctypes.c_uint64),
        ("bytes_copied", ctypes.c_uint64),
        ("copy_us", ctypes.c_uint64),
        ("wait_us", ctypes.c_uint64),
        ("compute_us", ctypes.c_uint64),
        ("prefetch_hits", ctypes.c_uint64),
        ("prefetch_misses", ctypes.c_uint64),
        ("arena_bytes", ctypes.c_uint64),
        ("arena_peak_bytes", ctypes.c_uint64),
        ("placement_bytes", ctypes.c_uint64),
        ("streamed_bytes", ctypes.c_uint64),
        ("prefetch_unused_bytes", ctypes.c_uint64),
    ]


class _LayerStats(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_size_t),
        ("resident", ctypes.c_int),
        ("loads", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("wait_us", ctypes.c_uint64),
        ("compute_us", ctypes.c_uint64),
        ("evict_us", ctypes.c_uint64),
        ("load_bytes", ctypes.c_uint64),
    ]


class _PipelineParams(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_size_t),
        ("offload_mode", ctypes.c_int),
        ("budget_bytes", ctypes.c_uint64),
        ("min_free_bytes", ctypes.c_uint64),
        ("margin_bytes", ctypes.c_uint64),
        ("prefetch_depth", ctypes.c_uint32),
        ("steps", ctypes.c_uint32),
        ("passes_per_step", ctypes.c_uint32),
        ("reload_diffusion", ctypes.c_int),
        ("log_moves", ctypes.c_int),
        ("max_resident_layers", ctypes.c_uint32),
    ]


class _ComponentInfo(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_size_t),
        ("name", ctypes.c_char_p),
        ("role", ctypes.c_int),
        ("placement", ctypes.c_int),
        ("device_bytes", ctypes.c_uint64),
        ("resident_bytes", ctypes.c_uint64),
        ("stage_need_bytes", ctypes.c_uint64),
        ("loads", ctypes.c_uint64),
        ("unloads", ctypes.c_uint64),
        ("streamed_layers", ctypes.c_uint64),
    ]


class _PipelineStats(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_size_t),
        ("budget_bytes", ctypes.c_uint64),
        ("loads", ctypes.c_uint64),
        ("unloads", ctypes.c_uint64),
        ("bytes_loaded", ctypes.c_uint64),
        ("load_us", ctypes.c_uint64),
        ("unload_us", ctypes.c_uint64),
        ("prefetched_loads", ctypes.c_uint64),
        ("device_bytes", ctypes.c_uint64),
        ("peak_device_bytes", ctypes.c_uint64),
    ]


class _LlamaParams(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_size_t),
        ("device", ctypes.c_char_p),
        ("budget_bytes", ctypes.c_uint64),
        ("min_free_bytes", ctypes.c_uint64),
        ("safety_fraction", ctypes.c_double),
        ("prefetch_depth", ctypes.c_uint32),
        ("trace", ctypes.c_int),
        ("compute_reserve_bytes", ctypes.c_uint64),
        ("kv_cache_bytes", ctypes.c_uint64),
        ("n_ctx", ctypes.c_uint32),
        ("n_ubatch", ctypes.c_uint32),
        ("file_backed", ctypes.c_int),
        ("layer_output_pattern", ctypes.c_char_p),
        ("tensor_pattern", ctypes.c_char_p),
        ("link", ctypes.c_char_p),
        ("link_gbps", ctypes.c_double),
    ]


class _AdviceParams(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_size_t),
        ("overflow_bytes", ctypes.c_uint64),
        ("bits_per_weight", ctypes.c_double),
        ("tokens_per_pass", ctypes.c_uint32),
        ("link", ctypes.c_char_p),
        ("link_gbps", ctypes.c_double),
        ("host_memory_gbps", ctypes.c_double),
        ("host_gflops", ctypes.c_double),
        ("device_gflops", ctypes.c_double),
    ]


class _Advice(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_size_t),
        ("prefer_cpu", ctypes.c_int),
        ("stream_seconds", ctypes.c_double),
        ("cpu_seconds", ctypes.c_double),
    ]


# The header's struct names, for checks against a C compiler's sizeof/offsetof.
C_STRUCTS = {
    "offload_engine_llama_params": _LlamaParams,
    "offload_engine_advice_params": _AdviceParams,
    "offload_engine_advice": _Advice,
    "offload_engine_registry_params": _RegistryParams,
    "offload_engine_tensor_info": _TensorInfo,
    "offload_engine_layer_info": _LayerInfo,
    "offload_engine_plan_params": _PlanParams,
    "offload_engine_plan_summary": _PlanSummary,
    "offload_engine_engine_params": _EngineParams,
    "offload_engine_stats": _Stats,
    "offload_engine_layer_stats": _LayerStats,
    "offload_engine_pipeline_params": _PipelineParams,
    "offload_engine_component_info": _ComponentInfo,
    "offload_engine_pipeline_stats": _PipelineStats,
}


# ---------------------------------------------------------------------------------------
# Loading the library
# ---------------------------------------------------------------------------------------

_REPO = Path(__file__).resolve().parent.parent
_LIBRARY_NAME = "liboffload_engine.so"


def _library_path():
    explicit = os.environ.get("OFFLOAD_ENGINE_LIB")
    if explicit:
        return Path(explicit)
    built = [_REPO / "target" / profile / _LIBRARY_NAME for profile in ("debug", "release")]
    built = [path for path in built if path.is_file()]
    if not built:
        raise OSError(
            f"{_LIBRARY_NAME} not found in {_REPO / 'target'}/{{debug,release}}: "
            "run `cargo build` or set OFFLOAD_ENGINE_LIB"
        )
    # A stale build next to a fresh one would silently test old code.
    return max(built, key=lambda path: path.stat().st_mtime)


_lib = None


def _library():
    global _lib
    if _lib is None:
        path = _library_path()
        _lib = _declare(ctypes.CDLL(str(path)), path)
    return _lib


def _signatures():
    P = ctypes.POINTER
    u64, size_t, c_int, c_double = ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int, ctypes.c_double
    text = ctypes.c_char_p
    handle = ctypes.c_void_p
    return {
        "offload_engine_version": (text, []),
        "offload_engine_status_str": (text, [c_int]),
        "offload_engine_last_error": (text, []),
        "offload_engine_size_parse": (c_int, [text, P(u64)]),
        "offload_engine_registry_params_init": (None, [P(_RegistryParams)]),
        "offload_engine_registry_new": (c_int, [P(_RegistryParams), P(handle)]),
        "offload_engine_registry_free": (None, [handle]),
        "offload_engine_registry_add_gguf": (c_int, [handle, text, P(size_t)]),
        "offload_engine_registry_load_gguf": (c_int, [handle, text, c_int, P(size_t)]),
        "offload_engine_registry_add_descriptor": (
            c_int,
            [handle, text, c_int, c_int, P(ctypes.c_int64), P(u64)],
        ),
        "offload_engine_registry_tensor_count": (c_int, [handle, P(size_t)]),
        "offload_engine_registry_layer_count": (c_int, [handle, P(size_t)]),
        "offload_engine_registry_global_bytes": (c_int, [handle, P(u64)]),
        "offload_engine_registry_total_bytes": (c_int, [handle, P(u64)]),
        "offload_engine_registry_architecture": (c_int, [handle, P(text)]),
        "offload_engine_registry_find": (c_int, [handle, text, P(u64)]),
        "offload_engine_registry_tensor_info": (c_int, [handle, u64, P(_TensorInfo)]),
        "offload_engine_registry_layer_info": (c_int, [handle, u64, P(_LayerInfo)]),
        "offload_engine_registry_layer_tensors": (c_int, [handle, u64, P(u64), size_t, P(size_t)]),
        "offload_engine_plan_params_init": (None, [P(_PlanParams)]),
        "offload_engine_plan_new": (c_int, [handle, P(_PlanParams), P(handle)]),
        "offload_engine_plan_free": (None, [handle]),
        "offload_engine_plan_get_summary": (c_int, [handle, P(_PlanSummary)]),
        "offload_engine_plan_layer_resident": (c_int, [handle, u64, P(c_int)]),
        "offload_engine_plan_message": (text, [handle]),
        "offload_engine_advice_params_init": (None, [P(_AdviceParams)]),
        "offload_engine_advise": (c_int, [P(_AdviceParams), P(_Advice)]),
        "offload_engine_llama_params_init": (None, [P(_LlamaParams)]),
        "offload_engine_llama_new": (c_int, [P(_LlamaParams), text, P(handle)]),
        "offload_engine_llama_free": (None, [handle]),
        "offload_engine_llama_buffer_type": (c_int, [handle, P(handle)]),
        "offload_engine_llama_plan": (c_int, [handle, P(handle)]),
        "offload_engine_llama_adopt": (c_int, [handle, P(handle)]),
        "offload_engine_llama_detach": (c_int, [handle]),
        "offload_engine_llama_stats": (c_int, [handle, P(_Stats)]),
        "offload_engine_llama_trace_write": (c_int, [handle, text]),
        "offload_engine_llama_context_new": (c_int, [handle, handle, handle, P(handle)]),
        "offload_engine_llama_context_free": (None, [handle]),
        "offload_engine_llama_context_status": (c_int, [handle]),
        "offload_engine_llama_eval": (ctypes.c_bool, [handle, ctypes.c_bool, handle]),
        "offload_engine_engine_params_init": (None, [P(_EngineParams)]),
        "offload_engine_engine_new": (c_int, [P(_EngineParams), handle, P(handle)]),
        "offload_engine_engine_free": (None, [handle]),
        "offload_engine_engine_prepare": (c_int, [handle, P(_PlanParams), P(handle)]),
        "offload_engine_engine_measure_link": (c_int, [handle, u64, P(c_double), P(c_double)]),
        "offload_engine_engine_pass_begin": (c_int, [handle]),
        "offload_engine_engine_pass_end": (c_int, [handle]),
        "offload_engine_engine_layer_begin": (c_int, [handle, u64]),
        "offload_engine_engine_layer_end": (c_int, [handle, u64]),
        "offload_engine_engine_offload_all": (c_int, [handle]),
        "offload_engine_engine_stats": (c_int, [handle, P(_Stats)]),
        "offload_engine_engine_layer_stats": (c_int, [handle, u64, P(_LayerStats)]),
        "offload_engine_engine_stats_reset": (c_int, [handle]),
        "offload_engine_engine_trace_write": (c_int, [handle, text]),
        "offload_engine_engine_tensor_set": (c_int, [handle, text, ctypes.c_void_p, u64, u64]),
        "offload_engine_pipeline_params_init": (None, [P(_PipelineParams)]),
        "offload_engine_pipeline_new": (c_int, [P(_PipelineParams), P(handle)]),
        "offload_engine_pipeline_free": (None, [handle]),
        "offload_engine_pipeline_add": (c_int, [handle, text, c_int, handle]),
        "offload_engine_pipeline_set_override": (c_int, [handle, text, c_int]),
        "offload_engine_pipeline_set_stage_need": (c_int, [handle, text, u64]),
        "offload_engine_pipeline_run_begin": (c_int, [handle]),
        "offload_engine_pipeline_run_end": (c_int, [handle]),
        "offload_engine_pipeline_stage_begin": (c_int, [handle, text]),
        "offload_engine_pipeline_stage_end": (c_int, [handle, text]),
        "offload_engine_pipeline_component_info": (c_int, [handle, text, P(_ComponentInfo)]),
        "offload_engine_pipeline_get_stats": (c_int, [handle, P(_PipelineStats)]),
    }


class _Library:
    """The loaded library with every function declared. A function this build does not
    export raises OffloadError(ERR_UNSUPPORTED) when called."""

    def __init__(self, cdll, path):
        self.path = path
        self.missing = []
        for name, (restype, argtypes) in _signatures().items():
            try:
                function = getattr(cdll, name)
            except AttributeError:
                self.missing.append(name)
                function = _missing_function(name, path)
            else:
                function.restype = restype
                function.argtypes = argtypes
            setattr(self, name, function)

    def has(self, name):
        return name not in self.missing


def _missing_function(name, path):
    def missing(*_args):
        raise OffloadError(ERR_UNSUPPORTED, f"{path} does not export {name} (an older build?)")

    return missing


def _declare(cdll, path):
    return _Library(cdll, path)


def has_function(name):
    """Whether the loaded library exports `name` (e.g. "offload_engine_pipeline_new")."""
    return _library().has(name)


def _check(status):
    if status != OK:
        message = _library().offload_engine_last_error().decode("utf-8", "replace")
        raise OffloadError(status, message)


def _text(value):
    return value.decode("utf-8", "replace") if value is not None else None


def _encode(value):
    return value.encode() if value is not None else None


def _initialized(struct_type, init_function, **overrides):
    """A params struct from the library's _init function, with the given fields set (None
    keeps the library's default; strings are encoded)."""
    params = struct_type()
    getattr(_library(), init_function)(ctypes.byref(params))
    for name, value in overrides.items():
        if value is not None:
            setattr(params, name, _encode(value) if isinstance(value, str) else value)
    return params


def version():
    """The library version, e.g. "0.1.0"."""
    return _text(_library().offload_engine_version())


def status_str(status):
    """Short description of a status code."""
    return _text(_library().offload_engine_status_str(status))


def parse_size(text):
    """Bytes in a size written the way every offload-engine tool reads it: "12GB" is 12e9,
    "12GiB" 12 * 2**30, a bare number is bytes. Raises OffloadError for anything else."""
    value = ctypes.c_uint64()
    _check(_library().offload_engine_size_parse(_encode(text), ctypes.byref(value)))
    return value.value


class _Handle:
    """An owned library handle: closed by close(), the context manager or the collector."""

    _handle = None
    _free_function = None  # name of the library's _free
    _kind = "handle"

    def close(self):
        if self._handle is not None:
            handle, self._handle = self._handle, None
            getattr(_library(), self._free_function)(handle)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        # The library may already be gone at interpreter shutdown.
        if _lib is not None:
            self.close()

    @property
    def closed(self):
        return self._handle is None

    @property
    def handle(self):
        if self._handle is None:
            raise ValueError(f"the {self._kind} is closed")
        return self._handle


# ---------------------------------------------------------------------------------------
# Registries
# ---------------------------------------------------------------------------------------


class TensorInfo:
    """One registered tensor. `layer` is None for the always-resident global group."""

    def __init__(self, raw):
        self.name = _text(raw.name)
        self.ggml_type = raw.ggml_type
        self.shape = tuple(raw.ne[: raw.n_dims])
        self.bytes = raw.bytes
        self.layer = None if raw.layer < 0 else raw.layer
        self.location = LOCATIONS.get(raw.location, str(raw.location))
        self.component = _text(raw.component)

    def __repr__(self):
        return f"TensorInfo({self.name!r}, shape={self.shape}, bytes={self.bytes}, layer={self.layer})"


class LayerInfo:
    """One layer in execution order, with the ids of its tensors."""

    def __init__(self, index, raw, tensor_ids):
        # ctypes copies char* fields into bytes on access, so these outlive the library's
        # strings (valid only until the next call on the registry).
        self.index = index
        self.name = _text(raw.name)
        self.bytes = raw.bytes
        self.tensor_ids = tensor_ids
        self.location = LOCATIONS.get(raw.location, str(raw.location))
        self.component = _text(raw.component)

    def __repr__(self):
        return f"LayerInfo({self.index}, {self.name!r}, bytes={self.bytes}, tensors={len(self.tensor_ids)})"


class Registry(_Handle):
    """The tensors of a model, grouped into layers. `pattern`: a built-in pattern name or a
    regex (see the header); None detects the architecture from the names."""

    _free_function = "offload_engine_registry_free"
    _kind = "registry"

    def __init__(self, pattern=None):
        lib = _library()
        params = _RegistryParams()
        lib.offload_engine_registry_params_init(ctypes.byref(params))
        params.pattern = _encode(pattern)
        handle = ctypes.c_void_p()
        _check(lib.offload_engine_registry_new(ctypes.byref(params), ctypes.byref(handle)))
        self._handle = handle

    @classmethod
    def from_gguf(cls, path, pattern=None, load=False, file_backed=False):
        """A registry of the tensors `path` describes. With `load` the library also reads
        them into ggml tensors an Engine can stream (see load_gguf); without, the registry
        holds descriptions only (inspection and planning)."""
        registry = cls(pattern)
        try:
            if load or file_backed:
                registry.load_gguf(path, file_backed=file_backed)
            else:
                registry.add_gguf(path)
        except BaseException:
            registry.close()
            raise
        return registry

    def add_gguf(self, path):
        """Registers every tensor a GGUF file describes (no data: planning only); returns
        how many."""
        count = ctypes.c_size_t()
        _check(_library().offload_engine_registry_add_gguf(self.handle, os.fsencode(path), ctypes.byref(count)))
        return count.value

    def load_gguf(self, path, file_backed=False):
        """Reads a GGUF file's tensors into ggml tensors the registry owns, so an Engine can
        stream them; returns how many. `file_backed`: the tensors hold no data and each
        layer streams from the file when it runs (the disk tier). A damaged file raises
        OffloadError with ERR_CORRUPT_FILE and registers nothing."""
        count = ctypes.c_size_t()
        _check(
            _library().offload_engine_registry_load_gguf(
                self.handle, os.fsencode(path), 1 if file_backed else 0, ctypes.byref(count)
            )
        )
        return count.value

    def add_descriptor(self, name, ggml_type, shape):
        """Registers a tensor by description (ggml_type: enum ggml_type, e.g. 0 for f32);
        returns its id."""
        ne = (ctypes.c_int64 * 4)(*shape)
        tensor_id = ctypes.c_uint64()
        _check(
            _library().offload_engine_registry_add_descriptor(
                self.handle, name.encode(), ggml_type, len(shape), ne, ctypes.byref(tensor_id)
            )
        )
        return tensor_id.value

    def _get(self, function, ctype):
        value = ctype()
        _check(function(self.handle, ctypes.byref(value)))
        return value.value

    @property
    def tensor_count(self):
        return self._get(_library().offload_engine_registry_tensor_count, ctypes.c_size_t)

    @property
    def layer_count(self):
        return self._get(_library().offload_engine_registry_layer_count, ctypes.c_size_t)

    @property
    def global_bytes(self):
        return self._get(_library().offload_engine_registry_global_bytes, ctypes.c_uint64)

    @property
    def total_bytes(self):
        return self._get(_library().offload_engine_registry_total_bytes, ctypes.c_uint64)

    @property
    def architecture(self):
        return _text(self._get(_library().offload_engine_registry_architecture, ctypes.c_char_p))

    def find(self, name):
        """The id of the tensor called `name`."""
        tensor_id = ctypes.c_uint64()
        _check(_library().offload_engine_registry_find(self.handle, name.encode(), ctypes.byref(tensor_id)))
        return tensor_id.value

    def tensor(self, tensor_id):
        info = _TensorInfo(size=ctypes.sizeof(_TensorInfo))
        _check(_library().offload_engine_registry_tensor_info(self.handle, tensor_id, ctypes.byref(info)))
        return TensorInfo(info)

    def layer(self, index):
        lib = _library()
        info = _LayerInfo(size=ctypes.sizeof(_LayerInfo))
        _check(lib.offload_engine_registry_layer_info(self.handle, index, ctypes.byref(info)))
        layer = LayerInfo(index, info, [])
        ids = (ctypes.c_uint64 * max(info.tensor_count, 1))()
        written = ctypes.c_size_t()
        _check(
            lib.offload_engine_registry_layer_tensors(
                self.handle, index, ids, info.tensor_count, ctypes.byref(written)
            )
        )
        layer.tensor_ids = list(ids[: written.value])
        return layer

    @property
    def layers(self):
        """Every layer, in execution order."""
        return [self.layer(index) for index in range(self.layer_count)]


# ---------------------------------------------------------------------------------------
# Plans
# ---------------------------------------------------------------------------------------


def _plan_params(
    free_bytes=0,
    steps=1,
    passes_per_step=1,
    prefetch=None,
    link=None,
    link_gbps=None,
    min_free_bytes=None,
    safety_fraction=None,
    compute_reserve_bytes=0,
    persistent_bytes=0,
    total_bytes=None,
):
    """offload_engine_plan_params from the library's defaults and the given overrides."""
    params = _PlanParams()
    _library().offload_engine_plan_params_init(ctypes.byref(params))
    params.free_bytes = free_bytes
    params.steps = steps
    params.passes_per_step = passes_per_step
    if prefetch is not None:
        params.prefetch_depth = prefetch
    params.link = _encode(link)
    if link_gbps is not None:
        params.link_gbps = link_gbps
    params.compute_reserve_bytes = compute_reserve_bytes
    params.persistent_bytes = persistent_bytes
    if total_bytes is not None:
        params.total_bytes = total_bytes
    if min_free_bytes is not None:
        params.min_free_bytes = min_free_bytes
    if safety_fraction is not None:
        params.safety_fraction = safety_fraction
    return params


def _summarize(handle):
    """The summary dict of a live plan handle (see plan())."""
    lib = _library()
    raw = _PlanSummary(size=ctypes.sizeof(_PlanSummary))
    _check(lib.offload_engine_plan_get_summary(handle, ctypes.byref(raw)))
    summary = {name: getattr(raw, name) for name, _ in _PlanSummary._fields_ if name != "size"}
    summary["mode"] = PLAN_MODES.get(raw.mode, str(raw.mode))
    layer_count = raw.resident_layer_count + raw.streamed_layer_count
    resident = ctypes.c_int()
    # Layer indices, as the command line's JSON gives them.
    summary["resident_layers"] = []
    summary["streamed_layers"] = []
    for layer in range(layer_count):
        _check(lib.offload_engine_plan_layer_resident(handle, layer, ctypes.byref(resident)))
        summary["resident_layers" if resident.value else "streamed_layers"].append(layer)
    summary["message"] = _text(lib.offload_engine_plan_message(handle))
    return summary


def _take_plan(handle):
    """Summarizes a plan handle the caller owns, then frees it."""
    try:
        return _summarize(handle)
    finally:
        _library().offload_engine_plan_free(handle)


def plan(
    registry,
    free_bytes=None,
    steps=1,
    passes_per_step=1,
    prefetch=1,
    link=None,
    min_free_bytes=None,
    safety_fraction=None,
    compute_reserve_bytes=0,
    persistent_bytes=0,
    budget_bytes=None,
):
    """Plans `registry` against a simulated device, with the knobs `offload-engine plan` has:
    `free_bytes` of free device memory (less `min_free_bytes` and `safety_fraction`, which
    default to the library's margins), or exactly `budget_bytes` (an engine's budget_bytes: no
    margin), less `compute_reserve_bytes` and `persistent_bytes` (KV cache) either way.

    Returns the plan summary as a dict (mode as "full"/"streaming", byte counts, slots,
    predicted step time), plus "resident_layers" and "streamed_layers" (layer indices, as in
    the command line's JSON) and "message". An impossible budget raises OffloadError with
    status ERR_INSUFFICIENT_MEMORY and the engine's explanation."""
    if (free_bytes is None) == (budget_bytes is None):
        raise ValueError("give free_bytes or budget_bytes (one of them)")
    exact = budget_bytes is not None
    params = _plan_params(
        budget_bytes if exact else free_bytes,
        steps=steps,
        passes_per_step=passes_per_step,
        prefetch=prefetch,
        link=link,
        min_free_bytes=0 if exact else min_free_bytes,
        safety_fraction=1.0 if exact else safety_fraction,
        compute_reserve_bytes=compute_reserve_bytes,
        persistent_bytes=persistent_bytes,
    )
    handle = ctypes.c_void_p()
    _check(_library().offload_engine_plan_new(registry.handle, ctypes.byref(params), ctypes.byref(handle)))
    return _take_plan(handle)


def advise(
    overflow_bytes,
    bits_per_weight=None,
    tokens_per_pass=1,
    link=None,
    link_gbps=None,
    host_memory_gbps=None,
    host_gflops=None,
    device_gflops=None,
):
    """Stream `overflow_bytes` of a language model's weights, or compute them on the CPU
    (llama.cpp -ngl)? One pass of `tokens_per_pass` tokens (1: decode; the ubatch: prefill);
    unset figures take the library's defaults (offload_engine_advice_params_init). Returns
    {"prefer": "cpu" or "stream", "stream_seconds", "cpu_seconds"}, the numbers
    `offload-engine plan` prints."""
    params = _initialized(
        _AdviceParams,
        "offload_engine_advice_params_init",
        overflow_bytes=overflow_bytes,
        tokens_per_pass=tokens_per_pass,
        link=link,
        bits_per_weight=bits_per_weight,
        link_gbps=link_gbps,
        host_memory_gbps=host_memory_gbps,
        host_gflops=host_gflops,
        device_gflops=device_gflops,
    )
    raw = _Advice(size=ctypes.sizeof(_Advice))
    _check(_library().offload_engine_advise(ctypes.byref(params), ctypes.byref(raw)))
    return {
        "prefer": "cpu" if raw.prefer_cpu else "stream",
        "stream_seconds": raw.stream_seconds,
        "cpu_seconds": raw.cpu_seconds,
    }


# ---------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------


def _from_struct(cls, raw, **converted):
    values = {field.name: getattr(raw, field.name) for field in fields(cls)}
    values.update(converted)
    return cls(**values)


class _Record:
    """Counters read from the library; asdict() gives them as a plain dict."""

    def asdict(self):
        return asdict(self)


@dataclass(frozen=True)
class Stats(_Record):
    """offload_engine_stats: counters since the engine was prepared or last reset."""

    passes: int
    layer_loads: int
    bytes_copied: int
    copy_us: int
    wait_us: int
    compute_us: int
    prefetch_hits: int
    prefetch_misses: int
    arena_bytes: int
    arena_peak_bytes: int
    placement_bytes: int
    streamed_bytes: int
    prefetch_unused_bytes: int


@dataclass(frozen=True)
class LayerStats(_Record):
    """offload_engine_layer_stats: one layer's counters."""

    resident: bool
    loads: int
    bytes: int
    wait_us: int
    compute_us: int
    evict_us: int
    load_bytes: int


class Engine(_Handle):
    """Streams a loaded registry's layers onto a ggml device under a memory budget.

    `registry` must hold tensors with data or a file behind them (Registry.load_gguf).
    `device`: a ggml device name ("CPU", "CUDA0", ...; None: the first GPU, else the CPU).
    `budget_bytes`: device memory the engine may use (0: measure the device's free memory;
    the CPU device reports system RAM, so give a budget there). The other arguments default
    to the library's values (offload_engine_engine_params_init).

        with oe.Registry() as registry:
            registry.load_gguf("model.gguf")
            with oe.Engine(registry, device="CPU", budget_bytes=2 << 30) as engine:
                print(engine.prepare()["mode"])
                engine.run_pass()
                print(engine.stats())
    """

    _free_function = "offload_engine_engine_free"
    _kind = "engine"

    def __init__(
        self,
        registry,
        device=None,
        budget_bytes=0,
        min_free_bytes=None,
        safety_fraction=None,
        prefetch=None,
        compute_threads=None,
        trace=False,
        pinned_limit_bytes=None,
    ):
        lib = _library()
        params = _initialized(
            _EngineParams,
            "offload_engine_engine_params_init",
            device=device,
            budget_bytes=budget_bytes,
            min_free_bytes=min_free_bytes,
            safety_fraction=safety_fraction,
            prefetch_depth=prefetch,
            compute_threads=compute_threads,
            trace=1 if trace else 0,
            pinned_limit_bytes=pinned_limit_bytes,
        )
        # The engine works on its own copy of the registry: the layer count is fixed now.
        layer_count = registry.layer_count
        handle = ctypes.c_void_p()
        _check(lib.offload_engine_engine_new(ctypes.byref(params), registry.handle, ctypes.byref(handle)))
        self._handle = handle
        self.layer_count = layer_count
        self.device = device
        self.budget_bytes = budget_bytes
        self.prefetch = prefetch
        self._plan = None
        self._pipeline = None  # weak reference to the open Pipeline that plans this engine

    def prepare(
        self,
        free_bytes=0,
        steps=1,
        passes_per_step=1,
        link=None,
        link_gbps=None,
        min_free_bytes=None,
        safety_fraction=None,
        compute_reserve_bytes=0,
        persistent_bytes=0,
    ):
        """Plans (free_bytes 0: the engine's budget or the device's free memory), allocates
        the device arena and places the resident layers. Returns the plan summary as plan()
        does. Calling it again between passes re-plans with measured figures. An impossible
        budget raises OffloadError with ERR_INSUFFICIENT_MEMORY. The prefetch depth is the
        engine's (its `prefetch` argument)."""
        pipeline = self._pipeline() if self._pipeline is not None else None
        if pipeline is not None and not pipeline.closed:
            raise ValueError("the engine is a pipeline component: the pipeline plans it")
        params = _plan_params(
            free_bytes,
            steps=steps,
            passes_per_step=passes_per_step,
            prefetch=self.prefetch,
            link=link,
            link_gbps=link_gbps,
            min_free_bytes=min_free_bytes,
            safety_fraction=safety_fraction,
            compute_reserve_bytes=compute_reserve_bytes,
            persistent_bytes=persistent_bytes,
        )
        plan_handle = ctypes.c_void_p()
        _check(
            _library().offload_engine_engine_prepare(self.handle, ctypes.byref(params), ctypes.byref(plan_handle))
        )
        self._plan = _take_plan(plan_handle)
        return self._plan

    @property
    def plan(self):
        """The summary the last prepare() returned (None before)."""
        return self._plan

    def _call(self, name, *args):
        _check(getattr(_library(), name)(self.handle, *args))

    def pass_begin(self):
        self._call("offload_engine_engine_pass_begin")

    def pass_end(self):
        self._call("offload_engine_engine_pass_end")

    def layer_begin(self, layer):
        """Waits for `layer`'s copy when it is late and points its tensors at the device."""
        self._call("offload_engine_engine_layer_begin", layer)

    def layer_end(self, layer):
        self._call("offload_engine_engine_layer_end", layer)

    def offload_all(self):
        """Waits for copies in flight and returns streamed layers to host memory (closes any
        open pass)."""
        self._call("offload_engine_engine_offload_all")

    def run_pass(self, compute=None):
        """One forward pass with no compute: pass_begin, layer_begin/layer_end for every
        layer in order, pass_end. With `compute`, calls compute(layer) between each layer's
        begin and end (a sleep, say, to stand in for the layer's compute time). On an error
        the pass is abandoned (offload_all) and the error raised."""
        self.pass_begin()
        try:
            for layer in range(self.layer_count):
                self.layer_begin(layer)
                if compute is not None:
                    compute(layer)
                self.layer_end(layer)
            self.pass_end()
        except BaseException:
            _quietly(self.offload_all)
            raise

    def run_passes(self, count, compute=None):
        for _ in range(count):
            self.run_pass(compute)

    def stats(self):
        """The engine's counters (Stats)."""
        raw = _Stats(size=ctypes.sizeof(_Stats))
        self._call("offload_engine_engine_stats", ctypes.byref(raw))
        return _from_struct(Stats, raw)

    def layer_stats(self, layer):
        """One layer's counters (LayerStats); a layer out of range is ERR_NOT_FOUND."""
        raw = _LayerStats(size=ctypes.sizeof(_LayerStats))
        self._call("offload_engine_engine_layer_stats", layer, ctypes.byref(raw))
        return _from_struct(LayerStats, raw, resident=bool(raw.resident))

    def reset_stats(self):
        self._call("offload_engine_engine_stats_reset")

    def write_trace(self, path):
        """Writes the recorded timeline as Chrome trace-event JSON (the engine needs
        trace=True; otherwise ERR_INVALID_STATE)."""
        self._call("offload_engine_engine_trace_write", os.fsencode(path))

    def measure_link(self, nbytes=64 << 20):
        """Host-to-device copy bandwidth in GB/s, as (pageable, pinned); pinned is 0.0 where
        the device has no pinned memory. `nbytes` is clamped to 1 MiB..1 GiB."""
        pageable, pinned = ctypes.c_double(), ctypes.c_double()
        self._call("offload_engine_engine_measure_link", nbytes, ctypes.byref(pageable), ctypes.byref(pinned))
        return pageable.value, pinned.value

    def set_tensor(self, name, data, offset=0):
        """Writes the bytes of `data` (any C-contiguous bytes-like object) at byte `offset`
        of tensor `name`: host memory, staging copy and, for a resident layer, the device
        copy. Not while a pass is open (ERR_INVALID_STATE); a file-backed tensor is
        ERR_UNSUPPORTED."""
        if isinstance(data, bytes):
            pointer, size = data, len(data)
        else:
            view = memoryview(data)
            if not view.c_contiguous:
                raise ValueError("set_tensor needs a C-contiguous buffer")
            view = view.cast("B")
            size = view.nbytes
            if view.readonly:
                pointer = view.tobytes()
            elif size:
                pointer = ctypes.addressof(ctypes.c_char.from_buffer(view))
            else:
                pointer = None
        self._call("offload_engine_engine_tensor_set", name.encode(), pointer, offset, size)


# ---------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------


def _quietly(function, *args):
    try:
        function(*args)
    except OffloadError:
        pass


def _enum(table, value, what):
    if isinstance(value, str):
        try:
            return table[value]
        except KeyError:
            raise ValueError(f"unknown {what} {value!r}: one of {', '.join(table)}") from None
    return int(value)


@dataclass(frozen=True)
class ComponentInfo(_Record):
    """offload_engine_component_info: where one pipeline component is and what it moved."""

    name: str
    role: str
    placement: str
    device_bytes: int
    resident_bytes: int
    stage_need_bytes: int
    loads: int
    unloads: int
    streamed_layers: int


@dataclass(frozen=True)
class PipelineStats(_Record):
    """offload_engine_pipeline_stats."""

    budget_bytes: int
    loads: int
    unloads: int
    bytes_loaded: int
    load_us: int
    unload_us: int
    prefetched_loads: int
    device_bytes: int
    peak_device_bytes: int


class Pipeline(_Handle):
    """Whole components (engines) placed on and off one device between the stages of a job.

    `offload_mode`: "none", "cond_only", "cond_diffusion", "aggressive" or
    "layer_streaming" (or the enum's number). Other arguments default to the library's
    values (offload_engine_pipeline_params_init).

        with oe.Pipeline("aggressive", budget_bytes=budget) as pipeline:
            pipeline.add("te", "conditioner", text_encoder)
            pipeline.add("dit", "diffusion", dit)
            with pipeline.run():
                with pipeline.stage("te"):
                    text_encoder.run_pass()
                with pipeline.stage("dit"):
                    dit.run_passes(20)
    """

    _free_function = "offload_engine_pipeline_free"
    _kind = "pipeline"

    def __init__(
        self,
        offload_mode=None,
        budget_bytes=None,
        min_free_bytes=None,
        margin_bytes=None,
        prefetch=None,
        steps=None,
        passes_per_step=None,
        reload_diffusion=None,
        log_moves=None,
        max_resident_layers=None,
    ):
        lib = _library()
        params = _PipelineParams()
        lib.offload_engine_pipeline_params_init(ctypes.byref(params))
        if offload_mode is not None:
            params.offload_mode = _enum(OFFLOAD_MODES, offload_mode, "offload mode")
        for name, value in [
            ("budget_bytes", budget_bytes),
            ("min_free_bytes", min_free_bytes),
            ("margin_bytes", margin_bytes),
            ("prefetch_depth", prefetch),
            ("steps", steps),
            ("passes_per_step", passes_per_step),
            ("max_resident_layers", max_resident_layers),
        ]:
            if value is not None:
                setattr(params, name, value)
        if reload_diffusion is not None:
            params.reload_diffusion = 1 if reload_diffusion else 0
        if log_moves is not None:
            params.log_moves = 1 if log_moves else 0
        handle = ctypes.c_void_p()
        _check(lib.offload_engine_pipeline_new(ctypes.byref(params), ctypes.byref(handle)))
        self._handle = handle
        self.components = {}

    def _call(self, name, *args):
        _check(getattr(_library(), name)(self.handle, *args))

    def add(self, name, role, engine):
        """Adds `engine` as component `name`; add components in the order their stages run.
        `role`: "conditioner", "diffusion", "decoder", "adapter", "control" or "other". The
        pipeline plans the engine from now on: do not call its prepare()."""
        self._call("offload_engine_pipeline_add", name.encode(), _enum(ROLES, role, "role"), engine.handle)
        self.components[name] = engine
        engine._pipeline = weakref.ref(self)

    def set_override(self, name, override):
        """"auto", "keep" (never leaves the device) or "offload" (leaves after its stage)."""
        self._call("offload_engine_pipeline_set_override", name.encode(), _enum(OVERRIDES, override, "override"))

    def set_stage_need(self, name, nbytes):
        """Device memory the component's stage needs besides its weights."""
        self._call("offload_engine_pipeline_set_stage_need", name.encode(), nbytes)

    def run_begin(self):
        self._call("offload_engine_pipeline_run_begin")

    def run_end(self):
        self._call("offload_engine_pipeline_run_end")

    def stage_begin(self, name):
        self._call("offload_engine_pipeline_stage_begin", name.encode())

    def stage_end(self, name):
        self._call("offload_engine_pipeline_stage_end", name.encode())

    @contextmanager
    def run(self):
        """run_begin ... run_end around a job. When the body raises, run_end is still
        called (its own error dropped) so the pipeline stays usable."""
        self.run_begin()
        try:
            yield self
        except BaseException:
            _quietly(self.run_end)
            raise
        self.run_end()

    @contextmanager
    def stage(self, name):
        """stage_begin ... stage_end around one component's stage; yields the component's
        engine. When the body raises, stage_end is still called (its own error dropped)."""
        self.stage_begin(name)
        try:
            yield self.components.get(name)
        except BaseException:
            _quietly(self.stage_end, name)
            raise
        self.stage_end(name)

    def component_info(self, name):
        raw = _ComponentInfo(size=ctypes.sizeof(_ComponentInfo))
        self._call("offload_engine_pipeline_component_info", name.encode(), ctypes.byref(raw))
        roles = {number: role for role, number in ROLES.items()}
        return _from_struct(
            ComponentInfo,
            raw,
            name=_text(raw.name),
            role=roles.get(raw.role, str(raw.role)),
            placement=PLACEMENTS.get(raw.placement, str(raw.placement)),
        )

    def stats(self):
        raw = _PipelineStats(size=ctypes.sizeof(_PipelineStats))
        self._call("offload_engine_pipeline_get_stats", ctypes.byref(raw))
        return _from_struct(PipelineStats, raw)


# ---------------------------------------------------------------------------------------
# GGUF files for experiments and tests
# ---------------------------------------------------------------------------------------

_GGUF_ALIGNMENT = 32
_GGUF_TYPE_UINT32 = 4
_GGUF_TYPE_STRING = 8
_GGML_F32 = 0


# ---------------------------------------------------------------------------------------
# llama.cpp drop-in
# ---------------------------------------------------------------------------------------

# "Estimate it from the model" for LlamaHook's reserves.
ESTIMATE = (1 << 64) - 1


class LlamaHook(_Handle):
    """The llama.cpp drop-in's hook for one model file (offload_engine_llama_new): it reads
    the file, plans it under the budget and offers the buffer type a llama.cpp host gives its
    loader. Python runs no llama.cpp, so from here a hook is for planning (`plan()` is the
    plan a host would get) and for checking the C ABI; see docs/LLAMA_CPP.md for hosts.

    `compute_reserve_bytes` and `kv_cache_bytes` default to the library's estimates from the
    model's hyperparameters with `n_ctx` and `n_ubatch`. An impossible budget raises
    OffloadError(ERR_INSUFFICIENT_MEMORY) here."""

    _free_function = "offload_engine_llama_free"
    _kind = "llama hook"

    def __init__(
        self,
        path,
        device=None,
        budget_bytes=0,
        prefetch=None,
        compute_reserve_bytes=ESTIMATE,
        kv_cache_bytes=ESTIMATE,
        n_ctx=None,
        n_ubatch=None,
        file_backed=False,
        layer_output_pattern=None,
        link=None,
    ):
        params = _initialized(
            _LlamaParams,
            "offload_engine_llama_params_init",
            device=device,
            budget_bytes=budget_bytes,
            prefetch_depth=prefetch,
            compute_reserve_bytes=compute_reserve_bytes,
            kv_cache_bytes=kv_cache_bytes,
            n_ctx=n_ctx,
            n_ubatch=n_ubatch,
            file_backed=1 if file_backed else 0,
            layer_output_pattern=layer_output_pattern,
            link=link,
        )
        handle = ctypes.c_void_p()
        _check(_library().offload_engine_llama_new(ctypes.byref(params), os.fsencode(path), ctypes.byref(handle)))
        self._handle = handle

    def _call(self, name, *args):
        _check(getattr(_library(), name)(self.handle, *args))

    def plan(self):
        """The plan summary (as plan() returns it)."""
        plan_handle = ctypes.c_void_p()
        self._call("offload_engine_llama_plan", ctypes.byref(plan_handle))
        return _take_plan(plan_handle)

    def buffer_type(self):
        """The ggml buffer type's address, for a host's tensor_buft_overrides."""
        buft = ctypes.c_void_p()
        self._call("offload_engine_llama_buffer_type", ctypes.byref(buft))
        return buft.value

    def adopt(self):
        """Places the loaded model (needs llama.cpp to have loaded it from buffer_type())."""
        self._call("offload_engine_llama_adopt", None)

    def detach(self):
        self._call("offload_engine_llama_detach")

    def stats(self):
        raw = _Stats(size=ctypes.sizeof(_Stats))
        self._call("offload_engine_llama_stats", ctypes.byref(raw))
        return _from_struct(Stats, raw)

    def context(self):
        """A context object (LlamaContext) for one llama_context's cb_eval_user_data."""
        return LlamaContext(self)


class LlamaContext(_Handle):
    """offload_engine_llama_context: the eval callback's user data for one llama.cpp
    context. `status()` raises the callback's sticky error, if any."""

    _free_function = "offload_engine_llama_context_free"
    _kind = "llama context"

    def __init__(self, hook):
        handle = ctypes.c_void_p()
        _check(_library().offload_engine_llama_context_new(hook.handle, None, None, ctypes.byref(handle)))
        self._handle = handle
        self._hook = hook

    def status(self):
        _check(_library().offload_engine_llama_context_status(self.handle))


def _gguf_string(text):
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def write_gguf(path, tensors, metadata=None):
    """Writes a GGUF v3 file of f32 tensors (synthetic models, test fixtures). `tensors`: a
    list of (name, shape as (ne0, ne1, ...), data) where data is the tensor's bytes, a float
    every element takes, or None for zeros. `metadata`: {key: str or int}; without
    general.architecture it is "llama". Tensors are written one at a time, so large files
    need little memory."""
    metadata = {"general.architecture": "llama", **(metadata or {})}
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    for key, value in metadata.items():
        if isinstance(value, str):
            head += _gguf_string(key) + struct.pack("<I", _GGUF_TYPE_STRING) + _gguf_string(value)
        else:
            head += _gguf_string(key) + struct.pack("<II", _GGUF_TYPE_UINT32, value)
    sizes = []
    offset = 0
    for name, shape, _ in tensors:
        size = 4
        for extent in shape:
            size *= extent
        head += _gguf_string(name) + struct.pack("<I", len(shape))
        head += struct.pack(f"<{len(shape)}Q", *shape)
        head += struct.pack("<IQ", _GGML_F32, offset)
        sizes.append(size)
        offset += size + (-size % _GGUF_ALIGNMENT)
    head += b"\0" * (-len(head) % _GGUF_ALIGNMENT)
    with open(path, "wb") as f:
        f.write(head)
        for (name, _, data), size in zip(tensors, sizes):
            if data is None:
                data = bytes(size)
            elif isinstance(data, float):
                data = struct.pack("<f", data) * (size // 4)
            data = bytes(data)
            if len(data) != size:
                raise ValueError(f"tensor {name}: {len(data)} bytes of data for {size} bytes")
            f.write(data)
            f.write(b"\0" * (-size % _GGUF_ALIGNMENT))
