#!/usr/bin/env python3
"""Writes the seed corpora of fuzz_plan and fuzz_abi (fuzz/corpus/<target>/).

The two targets decode structured inputs (fuzz_targets/input.rs); these encoders follow the
same byte layout so the seeds start the fuzzer on realistic plans and on complete engine
sessions instead of on noise. A seed that drifts out of step with the decoder still works as
an input, only a less useful one. Run from anywhere: python3 fuzz/seeds.py
"""
import os
import struct

ROOT = os.path.dirname(os.path.abspath(__file__))


# --- primitives (input.rs) ------------------------------------------------------------------

def size(v):
    """Input::size: exact encodings for the values the seeds use."""
    if v == 0:
        return [0]
    if v < 256:
        return [1, v]
    if v == 2**64 - 1:
        return [5]
    if v % (1 << 20) == 0 and v >> 20 < 65536:
        return [3] + list(struct.pack("<H", v >> 20))
    if v % (1 << 10) == 0 and v >> 10 < 65536:
        return [2] + list(struct.pack("<H", v >> 10))
    return [8] + list(struct.pack("<Q", v))


def count(v):
    if v == 0:
        return [0]
    if v == 1:
        return [1]
    if v < 8:
        return [2, v]
    return [5] + list(struct.pack("<I", v))


def float_(v):
    if v != v:
        return [0]
    if v == 1.0:
        return [6]
    if v == 0.9:
        return [7]
    if v == 0.0:
        return [3]
    return [9] + list(struct.pack("<d", v))


# --- fuzz_plan ------------------------------------------------------------------------------

MIB = 1 << 20
GIB = 1 << 30


def plan_input(layers, global_bytes, free, steps=1, passes=1, prefetch=1, safety=0.9,
               min_free=512 * MIB, total=0, reserve=0, link=(1, 0), hparams=""):
    """layers: list of (bytes, once_mode, compute or None); link: (kind, payload)."""
    out = [len(layers)]
    for b, once_mode, compute in layers:
        out += size(b) + [once_mode]
        out += [0] if compute is None else [1] + float_(compute)
    out += size(global_bytes)
    out += size(free) + size(total) + size(min_free) + float_(safety) + size(reserve) + size(0)
    out += count(steps) + count(passes) + count(prefetch) + size(0)
    kind, payload = link
    out += [kind]
    out += float_(payload) if kind == 0 else [payload]
    out += [0]  # no calibration
    out += [80]  # memory bar width
    out += [0] + size(10 * GIB) + float_(60e9) + float_(1e12) + float_(100e12) + float_(2.0)
    text = hparams.encode()
    out += [0, len(text)] + list(text)
    return bytes(out)


def plan_seeds():
    llama = "hidden=4096,layers=32,heads=32,kv_heads=8,vocab=32000,ffn=11008,context=4096,type=q4_k"
    yield "llama_fits", plan_input([(200 * MIB, 0, None)] * 32, 500 * MIB, 24 * GIB,
                                   hparams=llama)
    yield "llama_streams", plan_input([(400 * MIB, 0, 0.004)] * 32, 1 * GIB, 8 * GIB,
                                      prefetch=2, hparams=llama.replace("q4_k", "f16"))
    yield "diffusion_cfg", plan_input([(300 * MIB, 2, 0.01)] * 19, 2 * GIB, 6 * GIB,
                                      steps=20, passes=2, prefetch=2, link=(0, 12.0))
    yield "insufficient", plan_input([(4 * GIB, 0, None)] * 4, 1 * GIB, 2 * GIB)
    irregular = [((40 * MIB) + (i * 7919 % 3001) * 4096, 0, None) for i in range(64)]
    yield "irregular", plan_input(irregular, 2 * GIB, 3 * GIB, steps=100, passes=2,
                                  prefetch=3, link=(1, 3))
    yield "invalid", plan_input([(0, 0, float("nan"))], 0, 1, steps=0, safety=float("nan"),
                                hparams="hidden=0")


# --- fuzz_abi -------------------------------------------------------------------------------

LIVE = 4  # State::pick selector for the first live handle of the wanted kind
ANY = 3  # the first handle of the wanted kind, live or freed
SECOND = LIVE | 1 << 3  # the second live handle of the wanted kind


def registry_new():
    return [0, 3, 1, 1, 1]


def add_context(model, reg=LIVE):
    return [2, reg, model, 1]


def add_descriptor(name_index, ne0, ne1, reg=LIVE):
    # name from NAMES, F32, two dims (ne[2..4] unused), ne pointer non-NULL
    sel = 2 | (name_index << 2)
    dims = []
    for d in (ne0, ne1, 1, 1):
        dims += [4] + list(struct.pack("<H", d))
    return [4, reg, sel, 0, 3] + dims + [1]


def getters(which, reg=LIVE):
    return [5, reg, 1, which]


def plan_params(free, shift=0, workload=None, budget=None, gbps=None):
    """free << shift bytes free (no margin), or budget = (free, total, min_free, safety,
    compute_reserve, persistent); workload = (steps, passes, prefetch)."""
    out = [3, 1]
    if budget:
        free_, total, min_free, safety, reserve, persistent = budget
        out += [1] + size(free_) + size(total) + size(min_free) + float_(safety)
        out += size(reserve) + size(persistent)
    else:
        out += [0] + list(struct.pack("<H", free)) + [shift]
    if workload:
        out += [1] + count(workload[0]) + count(workload[1]) + count(workload[2])
    else:
        out += [0]
    return out + ([0] if gbps is None else [1] + float_(gbps))


def plan_new(free, shift=0, reg=LIVE, workload=None, budget=None, gbps=None):
    return [10, reg] + plan_params(free, shift, workload, budget, gbps) + [1, 1]


def plan_summary(plan=LIVE):
    return [11, plan, 0, 3, 1]


def engine_new(budget_kib=None, prefetch=None, reg=LIVE):
    out = [13, reg, 3, 2, 0]  # struct size, "CPU", 1 thread
    if budget_kib is None:
        out += [0]
    else:
        out += [1, 2] + list(struct.pack("<H", budget_kib)) + [0] + float_(1.0)
    out += [0] if prefetch is None else [1] + count(prefetch)
    return out + [1, 1, 1, 1]


def prepare(engine=LIVE, workload=None, budget=None):
    return [15, engine] + plan_params(0, 0, workload, budget) + [1, 0]


def whole_pass(layers, reverse=False, engine=LIVE):
    return [25, engine, layers, 1 if reverse else 0]


def layer(begin, index, engine=LIVE):
    return [18 if begin else 19, engine, 0, index]


def stats(engine=LIVE):
    return [21, engine, 0, 3, 1]


def name(index):
    """A string argument from the target's table (NAMES, COMPONENTS, ...)."""
    return [2 | (index << 2)]


def pipeline_new(mode=0, budget_kib=1024, prefetch=1):
    """mode: 0 none .. 4 layer_streaming; budget in KiB, nothing kept free, no margin."""
    out = [26, 3, mode + 1, 0] + list(struct.pack("<H", budget_kib)) + [10]
    return out + [prefetch] + count(1) + count(1) + [1, 0, 1]


def pipeline_add(component=0, role=1, pipe=LIVE, engine=LIVE):
    """component from COMPONENTS (cond, denoise, vae); role 0 conditioner, 1 diffusion, ..."""
    return [28, pipe, engine] + name(component) + [role + 1]


def pipeline_call(op, component=0, pipe=LIVE):
    """op: 0 run_begin, 1 run_end, 2 stage_begin, 3 stage_end."""
    return [29, pipe] + name(component) + [op]


HOSTILE = {"none": [4], "free_engine": [0, LIVE], "free_pipeline": [1, LIVE],
           "run_begin": [2, LIVE], "engine_call": [3]}


def staged_pass(engine=LIVE, hostile="none", at=1, scale_sel=5):
    """run_pass over the engine's layers with honest builders (scale_sel 0: 12000 identity
    scales per layer, 1: 30000), doing `hostile` from inside layer `at`."""
    return [30, engine, 1, 1, 0, scale_sel] + HOSTILE[hostile] + [at, 3, 3]


def arm_log_free(kind=0, handle=LIVE):
    """kind: 0 engine, 1 pipeline, 2 registry, 3 plan."""
    return [31, kind, handle]


def free_during_pass(kind=0, handle=LIVE, delay=10, engine=LIVE, layers=4):
    """A second thread frees the handle while this one runs a whole pass."""
    return [32, kind, handle, delay, 0, engine, layers, 0]


def llama_new(budget, prefetch=1, file_backed=False):
    """A hook on the CPU over the target's llama-like file with exactly `budget` bytes and no
    reserves (its layers are 1 KiB each, the global tensor 64 bytes; streamed from the file,
    in 4 KiB-aligned images, 8 KiB and 4.25 KiB)."""
    return ([33, 0, 3, 2, 2] + list(struct.pack("<H", budget)) + [2, prefetch] + [0, 1]
            + [0 if file_backed else 1] + [1, 3])


def llama_load(hook=LIVE):
    """Loads the model through the hook's buffer type, as llama.cpp would."""
    return [36, 1, hook]


def llama_free_model(index=0):
    return [36, 0, index]


def llama_call(op, hook=LIVE):
    """op: 1 free, 2 buffer_type, 3 plan, 4 adopt, 5 detach, 6 stats, 7 trace."""
    extra = {3: [1], 4: [1], 6: [3], 7: [1]}.get(op, [])
    return [33, op, hook] + extra


def llama_context_new(hook=LIVE, host=False):
    return [35, 0, hook, 1 if host else 0]


def llama_forward(context=LIVE, answers=b"", model=0):
    return [34, model, context, len(answers)] + list(answers)


def abi_seeds():
    yield "stream_session", bytes(
        registry_new() + add_context(0) + getters(1) + plan_new(1, 10) + plan_summary()
        + engine_new(budget_kib=1, prefetch=1) + prepare() + whole_pass(4) + whole_pass(4, True)
        + stats() + [14, LIVE] + [1, LIVE] + [12, LIVE])
    yield "resident_session", bytes(
        registry_new() + add_context(1) + engine_new() + prepare() + whole_pass(2) + stats()
        + [20, LIVE] + [14, LIVE])
    yield "double_free", bytes(
        registry_new() + add_context(0) + engine_new(budget_kib=1) + [14, LIVE] + [14, ANY]
        + [16, ANY] + [1, LIVE] + [1, ANY] + getters(0, reg=ANY))
    yield "out_of_order", bytes(
        registry_new() + add_context(0) + engine_new(budget_kib=1, prefetch=2)
        + prepare(workload=(1, 2, 2)) + layer(True, 2) + [16, LIVE] + layer(True, 3)
        + layer(True, 1) + layer(False, 3) + layer(False, 9) + [17, LIVE] + [17, LIVE])
    yield "staged_pass", bytes(
        registry_new() + add_context(0) + engine_new(budget_kib=1) + prepare()
        + staged_pass() + staged_pass(scale_sel=0) + staged_pass(hostile="engine_call")
        + staged_pass(hostile="free_engine", at=2) + [14, LIVE])
    yield "pipeline_session", bytes(
        registry_new() + add_context(0) + engine_new(budget_kib=64) + pipeline_new(mode=4)
        + pipeline_add(1, 1) + pipeline_call(0) + pipeline_call(2, 1) + staged_pass()
        + staged_pass(hostile="run_begin") + pipeline_call(3, 1) + pipeline_call(1)
        + pipeline_new(mode=0) + pipeline_add(0, 1, pipe=SECOND) + [27, LIVE]
        + pipeline_add(0, 1) + pipeline_call(0) + pipeline_call(2, 0)
        + staged_pass(hostile="free_pipeline") + prepare() + [14, LIVE])
    yield "two_engines", bytes(
        registry_new() + add_context(0) + engine_new(budget_kib=1) + engine_new()
        + registry_new() + add_context(0, reg=ANY) + prepare() + whole_pass(4)
        + [14, LIVE] + engine_new() + prepare() + whole_pass(4))
    yield "frees_in_flight", bytes(
        registry_new() + add_context(0) + engine_new(budget_kib=1) + prepare()
        + free_during_pass(delay=0) + registry_new() + add_context(0, reg=SECOND)
        + engine_new(budget_kib=1, reg=SECOND) + arm_log_free() + [24, 1, 0] + prepare()
        + whole_pass(4) + [16, LIVE] + engine_new(budget_kib=1) + prepare() + whole_pass(4))
    yield "llama_session", bytes(
        llama_new(2600) + llama_load() + llama_call(4) + llama_context_new() + llama_forward()
        + llama_forward() + llama_forward() + llama_call(6) + llama_call(3) + [35, 1, LIVE]
        + llama_call(5) + llama_free_model() + llama_call(1))
    yield "llama_misuse", bytes(
        llama_new(8000) + llama_call(4) + llama_context_new() + llama_load() + llama_forward()
        + [35, 2, LIVE] + llama_call(4) + llama_call(5) + llama_free_model() + llama_call(4)
        + llama_call(6) + [35, 3, LIVE, 1] + [35, 3, 1, 0])
    yield "llama_host_stops", bytes(
        llama_new(2600, prefetch=2) + llama_load() + llama_call(4) + llama_context_new(host=True)
        + llama_forward(answers=bytes([1, 0, 1, 4, 0, 9, 0, 3])) + llama_forward()
        + llama_forward(answers=bytes(range(1, 30))) + llama_call(6))
    yield "llama_file_backed", bytes(
        llama_new(21000, file_backed=True) + llama_load() + llama_call(4) + llama_context_new()
        + llama_forward() + llama_forward() + llama_call(1) + llama_forward())
    yield "descriptors", bytes(
        registry_new() + add_descriptor(0, 4096, 4096) + add_descriptor(1, 4096, 4096)
        + add_descriptor(3, 4096, 1) + getters(1) + plan_new(60000, 11) + plan_summary()
        + engine_new() + prepare())


# --- bugs the targets found (docs/FUZZING.md) ----------------------------------------------------
# Each input once made a target fail; all pass now (known_* were fixed after the first long
# runs, regress_* in commit 9ff9d66).

U64_MAX = 2**64 - 1
U32_MAX = 2**32 - 1
TINY = 5e-324  # the smallest positive double


def bug_seeds():
    one_layer = [(4 * GIB, 0, None)]
    yield "fuzz_plan", "known_loads_overflow", plan_input([(GIB, 0, None)] * 8, 0, 4 * GIB,
                                                          steps=U32_MAX, passes=U32_MAX)
    yield "fuzz_plan", "free_needed_overflow", plan_input(one_layer, 1 * GIB, 2 * GIB,
                                                         safety=TINY)
    yield "fuzz_plan", "passes_hang", plan_input([(MIB, 0, None)] * 8, 0, 8 * GIB,
                                                 passes=U32_MAX)
    yield "fuzz_plan", "infinite_step_time", plan_input([(GIB, 0, None)] * 8, 0, 4 * GIB,
                                                        link=(0, 1e-322))
    yield "fuzz_plan", "parse_size_zero", plan_input([(MIB, 0, None)], 0, 8 * GIB,
                                                     hparams="0.4")
    session = registry_new() + add_context(0)
    yield "fuzz_abi", "free_needed_overflow", bytes(
        session + plan_new(0, budget=(1000, 0, 0, TINY, 0, 0)))
    yield "fuzz_abi", "passes_hang", bytes(session + plan_new(1, 20, workload=(1, U32_MAX, 1)))
    yield "fuzz_abi", "infinite_step_time", bytes(session + plan_new(700, gbps=1e-320)
                                                  + plan_summary())
    yield "fuzz_abi", "reserve_overflow", bytes(
        session + engine_new() + prepare(budget=(0, 0, 0, 0.9, U64_MAX, 1)))
    fault = [24, 0, 1]  # device allocation fails at the next check
    yield "fuzz_abi", "prefetch_retry_overflow", bytes(
        session + engine_new() + fault + prepare(workload=(1, 1, U32_MAX)))
    yield "fuzz_abi", "known_loads_overflow", bytes(
        session + plan_new(700, workload=(U32_MAX, U32_MAX, 1)))
    # The retry after a failed arena allocation, with the largest depth prepare accepts.
    yield "fuzz_abi", "known_retry_plan_figures", bytes(
        session + engine_new() + fault + prepare(workload=(1, 1, 64)))


def write(directory, seeds, prefix=""):
    directory = os.path.join(ROOT, directory)
    os.makedirs(directory, exist_ok=True)
    for name, data in seeds:
        with open(os.path.join(directory, prefix + name + ".bin"), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    write("corpus/fuzz_plan", plan_seeds())
    write("corpus/fuzz_abi", abi_seeds())
    for target, name, data in bug_seeds():
        prefix = "" if name.startswith("known_") else "regress_"
        write("corpus/" + target, [(name, data)], prefix=prefix)
