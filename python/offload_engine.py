"""ctypes bindings for the ggml-free part of liboffload_engine's C ABI (ffi/offload_engine.h):
the version, registries of tensor descriptions (from GGUF files or by hand) and plans.

The engine itself needs ggml tensors from the host process, so it is not wrapped here.

The library is found through the OFFLOAD_ENGINE_LIB environment variable, else as
target/debug or target/release/liboffload_engine.so of this repository (the newer one when
both exist).
"""

import ctypes
import os
from pathlib import Path

__all__ = [
    "OffloadError",
    "Registry",
    "TensorInfo",
    "LayerInfo",
    "plan",
    "status_str",
    "version",
]

# offload_engine_status
OK = 0
ERR_INSUFFICIENT_MEMORY = 8

LOCATIONS = {0: "host", 1: "pinned", 2: "device", 3: "file"}
PLAN_MODES = {0: "full", 1: "streaming", 2: "insufficient"}


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
    ]


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
        _lib = _declare(ctypes.CDLL(str(_library_path())))
    return _lib


def _declare(lib):
    P = ctypes.POINTER
    u64, size_t, c_int = ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int
    handle = ctypes.c_void_p
    signatures = {
        "offload_engine_version": (ctypes.c_char_p, []),
        "offload_engine_status_str": (ctypes.c_char_p, [c_int]),
        "offload_engine_last_error": (ctypes.c_char_p, []),
        "offload_engine_registry_params_init": (None, [P(_RegistryParams)]),
        "offload_engine_registry_new": (c_int, [P(_RegistryParams), P(handle)]),
        "offload_engine_registry_free": (None, [handle]),
        "offload_engine_registry_add_gguf": (c_int, [handle, ctypes.c_char_p, P(size_t)]),
        "offload_engine_registry_add_descriptor": (
            c_int,
            [handle, ctypes.c_char_p, c_int, c_int, P(ctypes.c_int64), P(u64)],
        ),
        "offload_engine_registry_tensor_count": (c_int, [handle, P(size_t)]),
        "offload_engine_registry_layer_count": (c_int, [handle, P(size_t)]),
        "offload_engine_registry_global_bytes": (c_int, [handle, P(u64)]),
        "offload_engine_registry_total_bytes": (c_int, [handle, P(u64)]),
        "offload_engine_registry_architecture": (c_int, [handle, P(ctypes.c_char_p)]),
        "offload_engine_registry_find": (c_int, [handle, ctypes.c_char_p, P(u64)]),
        "offload_engine_registry_tensor_info": (c_int, [handle, u64, P(_TensorInfo)]),
        "offload_engine_registry_layer_info": (c_int, [handle, u64, P(_LayerInfo)]),
        "offload_engine_registry_layer_tensors": (c_int, [handle, u64, P(u64), size_t, P(size_t)]),
        "offload_engine_plan_params_init": (None, [P(_PlanParams)]),
        "offload_engine_plan_new": (c_int, [handle, P(_PlanParams), P(handle)]),
        "offload_engine_plan_free": (None, [handle]),
        "offload_engine_plan_get_summary": (c_int, [handle, P(_PlanSummary)]),
        "offload_engine_plan_layer_resident": (c_int, [handle, u64, P(c_int)]),
        "offload_engine_plan_message": (ctypes.c_char_p, [handle]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes
    return lib


def _check(status):
    if status != OK:
        message = _library().offload_engine_last_error().decode("utf-8", "replace")
        raise OffloadError(status, message)


def _text(value):
    return value.decode("utf-8", "replace") if value is not None else None


def version():
    """The library version, e.g. "0.1.0"."""
    return _text(_library().offload_engine_version())


def status_str(status):
    """Short description of a status code."""
    return _text(_library().offload_engine_status_str(status))


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


class Registry:
    """The tensors of a model, grouped into layers. `pattern`: a built-in pattern name or a
    regex (see the header); None detects the architecture from the names."""

    def __init__(self, pattern=None):
        lib = _library()
        params = _RegistryParams()
        lib.offload_engine_registry_params_init(ctypes.byref(params))
        params.pattern = pattern.encode() if pattern is not None else None
        handle = ctypes.c_void_p()
        _check(lib.offload_engine_registry_new(ctypes.byref(params), ctypes.byref(handle)))
        self._handle = handle

    @classmethod
    def from_gguf(cls, path, pattern=None):
        registry = cls(pattern)
        try:
            registry.add_gguf(path)
        except BaseException:
            registry.close()
            raise
        return registry

    def close(self):
        if self._handle is not None:
            _library().offload_engine_registry_free(self._handle)
            self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        # The library may already be gone at interpreter shutdown.
        if _lib is not None:
            self.close()

    @property
    def handle(self):
        if self._handle is None:
            raise ValueError("the registry is closed")
        return self._handle

    def add_gguf(self, path):
        """Registers every tensor a GGUF file describes; returns how many."""
        count = ctypes.c_size_t()
        _check(_library().offload_engine_registry_add_gguf(self.handle, os.fsencode(path), ctypes.byref(count)))
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


def plan(
    registry,
    free_bytes,
    steps=1,
    passes_per_step=1,
    prefetch=1,
    link=None,
    min_free_bytes=None,
    safety_fraction=None,
    compute_reserve_bytes=0,
):
    """Plans `registry` against a simulated device with `free_bytes` free. Returns the plan
    summary as a dict (mode as "full"/"streaming", byte counts, slots, predicted step time),
    plus "resident_layers" (a bool per layer) and "message". An impossible budget raises
    OffloadError with status ERR_INSUFFICIENT_MEMORY and the engine's explanation.
    `min_free_bytes` and `safety_fraction` default to the library's margins."""
    lib = _library()
    params = _PlanParams()
    lib.offload_engine_plan_params_init(ctypes.byref(params))
    params.free_bytes = free_bytes
    params.steps = steps
    params.passes_per_step = passes_per_step
    params.prefetch_depth = prefetch
    params.link = link.encode() if link is not None else None
    params.compute_reserve_bytes = compute_reserve_bytes
    if min_free_bytes is not None:
        params.min_free_bytes = min_free_bytes
    if safety_fraction is not None:
        params.safety_fraction = safety_fraction
    handle = ctypes.c_void_p()
    _check(lib.offload_engine_plan_new(registry.handle, ctypes.byref(params), ctypes.byref(handle)))
    try:
        raw = _PlanSummary(size=ctypes.sizeof(_PlanSummary))
        _check(lib.offload_engine_plan_get_summary(handle, ctypes.byref(raw)))
        summary = {name: getattr(raw, name) for name, _ in _PlanSummary._fields_ if name != "size"}
        summary["mode"] = PLAN_MODES.get(raw.mode, str(raw.mode))
        layer_count = raw.resident_layer_count + raw.streamed_layer_count
        resident = ctypes.c_int()
        summary["resident_layers"] = []
        for layer in range(layer_count):
            _check(lib.offload_engine_plan_layer_resident(handle, layer, ctypes.byref(resident)))
            summary["resident_layers"].append(bool(resident.value))
        summary["message"] = _text(lib.offload_engine_plan_message(handle))
        return summary
    finally:
        lib.offload_engine_plan_free(handle)
