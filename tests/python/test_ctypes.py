"""The C ABI from Python through ctypes (python/offload_engine.py): GGUF inspection, planning,
models loaded by the library, streaming engines, pipelines and error reporting. Run with
plain `python3 tests/python/test_ctypes.py` (unittest, no other dependency); OFFLOAD_ENGINE_LIB
picks the library, else the repository's target/ build."""

import array
import ctypes
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))

import offload_engine  # noqa: E402  (needs the path above)
from offload_engine import Engine, OffloadError, Pipeline, Registry  # noqa: E402

HEADER = Path(__file__).resolve().parents[2] / "ffi" / "offload_engine.h"

GGML_F32 = 0

LAYERS = 4
LAYER_SHAPE = (64, 64)  # ne[0], ne[1]
EMBEDDING_SHAPE = (64, 128)
LAYER_BYTES = LAYER_SHAPE[0] * LAYER_SHAPE[1] * 4
EMBEDDING_BYTES = EMBEDDING_SHAPE[0] * EMBEDDING_SHAPE[1] * 4
MODEL_BYTES = EMBEDDING_BYTES + LAYERS * LAYER_BYTES

# Room for the global group and two streaming slots (prefetch 1), not for a resident layer
# besides them; a budget that holds everything with room to spare; and one too small for
# even a single slot.
STREAMING_BUDGET = EMBEDDING_BYTES + 2 * LAYER_BYTES
ROOMY_BUDGET = 1 << 20
IMPOSSIBLE_BUDGET = EMBEDDING_BYTES + LAYER_BYTES // 2

STATUS_INVALID_ARGUMENT = 1
STATUS_NULL_POINTER = 2
STATUS_INVALID_HANDLE = 3
STATUS_NOT_FOUND = 4
STATUS_ALREADY_EXISTS = 5
STATUS_IO = 6
STATUS_CORRUPT_FILE = 7
STATUS_INSUFFICIENT_MEMORY = 8
STATUS_INVALID_STATE = 10
STATUS_UNSUPPORTED = 12


def gguf_file(tensors, architecture="llama"):
    """The bytes of a GGUF v3 file with general.architecture and f32 `tensors`: (name,
    shape, data) with data the tensor's bytes, or None for zeros."""
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "model.gguf")
        offload_engine.write_gguf(path, tensors, {"general.architecture": architecture})
        with open(path, "rb") as f:
            return f.read()


def layer_data(layer):
    """Recognizable weights: layer i holds the floats i + k / 4096."""
    count = LAYER_SHAPE[0] * LAYER_SHAPE[1]
    return array.array("f", (layer + k / count for k in range(count))).tobytes()


def tiny_llama_gguf(with_data=False):
    """blk.0..3.attn_q.weight and token_embd.weight, all f32, zero-filled unless
    `with_data`."""
    tensors = [
        (f"blk.{i}.attn_q.weight", LAYER_SHAPE, layer_data(i) if with_data else None) for i in range(LAYERS)
    ]
    tensors.append(("token_embd.weight", EMBEDDING_SHAPE, None))
    return gguf_file(tensors)


class ScratchTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.scratch = tempfile.TemporaryDirectory(prefix="offload_engine_ctypes_")
        cls.gguf = os.path.join(cls.scratch.name, "tiny.gguf")
        with open(cls.gguf, "wb") as f:
            f.write(tiny_llama_gguf())
        cls.weights = os.path.join(cls.scratch.name, "weights.gguf")
        with open(cls.weights, "wb") as f:
            f.write(tiny_llama_gguf(with_data=True))

    @classmethod
    def tearDownClass(cls):
        cls.scratch.cleanup()

    def scratch_file(self, name, data):
        path = os.path.join(self.scratch.name, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def assertStatus(self, status, function, *args, **kwargs):
        """function(*args) raises OffloadError with `status` and a message; returns it."""
        with self.assertRaises(OffloadError) as raised:
            function(*args, **kwargs)
        self.assertEqual(raised.exception.status, status, raised.exception.message)
        self.assertTrue(raised.exception.message)
        return raised.exception


class CtypesTest(ScratchTest):
    def test_version(self):
        self.assertRegex(offload_engine.version(), r"^\d+\.\d+\.\d+")
        self.assertEqual(offload_engine.status_str(0), "ok")

    def test_sizes_read_as_the_command_line_reads_them(self):
        self.assertEqual(offload_engine.parse_size("12GB"), 12 * 10**9)
        self.assertEqual(offload_engine.parse_size("12GiB"), 12 << 30)
        self.assertEqual(offload_engine.parse_size("512MiB"), 512 << 20)
        self.assertEqual(offload_engine.parse_size("4096"), 4096)
        self.assertStatus(1, offload_engine.parse_size, "12 parsecs")

    def test_inspect_gguf(self):
        with Registry.from_gguf(self.gguf) as registry:
            self.assertEqual(registry.tensor_count, LAYERS + 1)
            self.assertEqual(registry.layer_count, LAYERS)
            self.assertEqual(registry.architecture, "llama_gguf")
            self.assertEqual(registry.global_bytes, EMBEDDING_BYTES)
            self.assertEqual(registry.total_bytes, EMBEDDING_BYTES + LAYERS * LAYER_BYTES)
            layers = registry.layers
            self.assertEqual([layer.name for layer in layers], [f"blk.{i}" for i in range(LAYERS)])
            self.assertEqual([layer.bytes for layer in layers], [LAYER_BYTES] * LAYERS)
            for layer in layers:
                self.assertEqual(layer.location, "file")
                self.assertEqual(len(layer.tensor_ids), 1)
                tensor = registry.tensor(layer.tensor_ids[0])
                self.assertEqual(tensor.name, f"{layer.name}.attn_q.weight")
                self.assertEqual(tensor.shape, LAYER_SHAPE)
                self.assertEqual(tensor.layer, layer.index)
            embedding = registry.tensor(registry.find("token_embd.weight"))
            self.assertIsNone(embedding.layer)
            self.assertEqual(embedding.bytes, EMBEDDING_BYTES)

    def test_python_and_the_command_line_give_the_same_plan(self):
        cli = os.environ.get("OFFLOAD_ENGINE_CLI")
        if not cli:
            self.skipTest("OFFLOAD_ENGINE_CLI (the offload-engine program) is not set")
        keys = ["mode", "resident_layers", "streamed_layers", "slot_count", "slot_bytes",
                "arena_bytes", "device_bytes", "placement_bytes", "bytes_per_pass",
                "bytes_per_step", "bytes_per_run", "predicted_step_seconds"]
        with Registry.from_gguf(self.gguf) as registry:
            for budget in [STREAMING_BUDGET, 8 << 30]:
                ours = offload_engine.plan(registry, budget_bytes=budget, steps=4,
                                           passes_per_step=2, link="pcie4-x16")
                out = subprocess.run(
                    [cli, "plan", self.gguf, "--budget", str(budget), "--steps", "4",
                     "--passes-per-step", "2", "--json"],
                    check=True, capture_output=True, text=True)
                theirs = json.loads(out.stdout)
                theirs["mode"] = theirs["mode"].lower()
                self.assertEqual({k: ours[k] for k in keys}, {k: theirs[k] for k in keys})

    def run_example(self, *args):
        """An example script's standard output (it must succeed)."""
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run([sys.executable, str(root / "examples" / args[0]), *args[1:]],
                             check=True, capture_output=True, text=True)
        return out.stdout

    def test_the_sweep_follows_the_models_size(self):
        # A model of a few hundred KiB: the sweep still spans insufficient, streaming and full
        # plans (a fixed 0.5 GiB step once drew a single point).
        table = self.run_example("plan_sweep.py", self.gguf, "--min-free", "0", "--points", "16")
        modes = [line.split()[1] for line in table.splitlines()[2:] if line.strip()]
        self.assertEqual(len(modes), 16, table)
        for mode in ("insufficient", "streaming", "full"):
            self.assertIn(mode, modes, table)

    def test_streaming_example_marks_where_nothing_fits_and_where_all_does(self):
        table = self.run_example("stream_gguf.py", "--layers", "4", "--layer-mib", "1",
                                 "--budgets", "10%,60%,150%", "--passes", "1")
        self.assertIn("insufficient", table)
        self.assertIn("streaming", table)
        self.assertIn("full", table)

    def test_plans_at_three_budgets(self):
        with Registry.from_gguf(self.gguf) as registry:
            roomy = offload_engine.plan(registry, 8 << 30)
            self.assertEqual(roomy["mode"], "full")
            self.assertEqual(roomy["resident_layers"], list(range(LAYERS)))
            self.assertEqual(roomy["streamed_layers"], [])
            self.assertEqual(roomy["bytes_per_pass"], 0)
            self.assertTrue(roomy["message"])

            # Exactly the global group and two slots: every layer streams.
            small = offload_engine.plan(
                registry,
                STREAMING_BUDGET,
                steps=4,
                passes_per_step=2,
                prefetch=1,
                link="pcie4-x16",
                min_free_bytes=0,
                safety_fraction=1.0,
            )
            self.assertEqual(small["mode"], "streaming")
            streamed = len(small["streamed_layers"])
            self.assertGreaterEqual(streamed, 1)
            self.assertEqual(small["streamed_layer_count"], streamed)
            self.assertEqual(small["bytes_per_pass"], streamed * LAYER_BYTES)
            self.assertEqual(small["bytes_per_step"], 2 * small["bytes_per_pass"])
            self.assertLessEqual(small["device_bytes"], STREAMING_BUDGET)
            self.assertGreater(small["predicted_step_seconds"], 0.0)
            self.assertTrue(small["message"])

            refused = self.assertStatus(
                STATUS_INSUFFICIENT_MEMORY,
                offload_engine.plan,
                registry,
                IMPOSSIBLE_BUDGET,
                min_free_bytes=0,
                safety_fraction=1.0,
            )
            # The explanation gives the sizes involved.
            self.assertRegex(refused.message, r"\d+(\.\d+)? ?(B|KiB|MiB|GiB|bytes)\b")

    def test_descriptors(self):
        with Registry("llama_gguf") as registry:
            first = registry.add_descriptor("blk.0.ffn_up.weight", GGML_F32, (128, 32))
            registry.add_descriptor("blk.1.ffn_up.weight", GGML_F32, (128, 32))
            registry.add_descriptor("output.weight", GGML_F32, (128,))
            self.assertEqual(registry.find("blk.0.ffn_up.weight"), first)
            self.assertEqual(registry.layer_count, 2)
            self.assertEqual(registry.global_bytes, 128 * 4)
            self.assertStatus(STATUS_ALREADY_EXISTS, registry.add_descriptor, "output.weight", GGML_F32, (128,))

    def test_file_errors(self):
        missing = os.path.join(self.scratch.name, "missing.gguf")
        error = self.assertStatus(STATUS_IO, Registry.from_gguf, missing)
        self.assertIn("missing.gguf", error.message)

        whole = tiny_llama_gguf()
        for name, data in [
            ("truncated.gguf", whole[:100]),
            ("bad_magic.gguf", b"GGUX" + whole[4:]),
            ("version_99.gguf", whole[:4] + struct.pack("<I", 99) + whole[8:]),
        ]:
            with self.subTest(name):
                error = self.assertStatus(STATUS_CORRUPT_FILE, Registry.from_gguf, self.scratch_file(name, data))
                self.assertIn(name, error.message)

        # All or nothing: a registry that refused a file still holds only what it had.
        with Registry.from_gguf(self.gguf) as registry:
            with self.assertRaises(OffloadError):
                registry.add_gguf(self.scratch_file("cut.gguf", whole[:200]))
            self.assertEqual(registry.tensor_count, LAYERS + 1)

    def test_closed_registry(self):
        registry = Registry()
        registry.close()
        registry.close()  # idempotent
        self.assertTrue(registry.closed)
        with self.assertRaises(ValueError):
            registry.tensor_count
        with self.assertRaises(ValueError):
            registry.load_gguf(self.gguf)
        with self.assertRaises(ValueError):
            Engine(registry, device="CPU", budget_bytes=ROOMY_BUDGET)


class StructLayoutTest(unittest.TestCase):
    """The ctypes structs against the header, as a C compiler lays them out."""

    def test_init_functions_report_the_same_sizes(self):
        lib = offload_engine._library()
        for init, struct_type in [
            ("offload_engine_registry_params_init", offload_engine._RegistryParams),
            ("offload_engine_plan_params_init", offload_engine._PlanParams),
            ("offload_engine_engine_params_init", offload_engine._EngineParams),
            ("offload_engine_pipeline_params_init", offload_engine._PipelineParams),
        ]:
            with self.subTest(init):
                if not lib.has(init):
                    self.skipTest(f"{init} is not exported by this build")
                params = struct_type()
                getattr(lib, init)(ctypes.byref(params))
                self.assertEqual(params.size, ctypes.sizeof(struct_type))

    def test_sizes_and_offsets_match_the_c_compiler(self):
        compiler = shutil.which("cc")
        if compiler is None:
            self.skipTest("no C compiler (cc)")
        lines = ["#include <stddef.h>", "#include <stdio.h>", '#include "offload_engine.h"', "int main(void) {"]
        for c_name, struct_type in offload_engine.C_STRUCTS.items():
            lines.append(f'    printf("{c_name} sizeof %zu\\n", sizeof(struct {c_name}));')
            for field, _ in struct_type._fields_:
                lines.append(f'    printf("{c_name} {field} %zu\\n", offsetof(struct {c_name}, {field}));')
        lines += ["    return 0;", "}"]
        with tempfile.TemporaryDirectory(prefix="offload_engine_layout_") as scratch:
            source = os.path.join(scratch, "layout.c")
            program = os.path.join(scratch, "layout")
            with open(source, "w") as f:
                f.write("\n".join(lines) + "\n")
            built = subprocess.run(
                [compiler, "-std=c99", "-I", str(HEADER.parent), source, "-o", program],
                capture_output=True,
                text=True,
            )
            self.assertEqual(built.returncode, 0, built.stderr)
            output = subprocess.run([program], check=True, capture_output=True, text=True).stdout
        layout = {}
        for line in output.splitlines():
            c_name, member, value = line.split()
            layout[c_name, member] = int(value)
        for c_name, struct_type in offload_engine.C_STRUCTS.items():
            with self.subTest(c_name):
                self.assertEqual(layout[c_name, "sizeof"], ctypes.sizeof(struct_type))
                for field, _ in struct_type._fields_:
                    self.assertEqual(layout[c_name, field], getattr(struct_type, field).offset, field)
        # Every struct of the header with a `size` member is wrapped.
        declared = set(
            name for name in _typedef_structs(HEADER.read_text()) if name != "offload_engine_staged_model"
        )
        self.assertEqual(declared, set(offload_engine.C_STRUCTS))


def _typedef_structs(header):
    return re.findall(r"typedef struct (offload_engine_\w+) \{", header)


class LoadedModelTest(ScratchTest):
    """Models the library reads itself, streamed by engines on the CPU device."""

    def load(self, file_backed, path=None):
        registry = Registry()
        self.addCleanup(registry.close)
        count = registry.load_gguf(path or self.weights, file_backed=file_backed)
        self.assertEqual(count, LAYERS + 1)
        return registry

    def engine(self, registry, budget, **kwargs):
        engine = Engine(registry, device="CPU", budget_bytes=budget, **kwargs)
        self.addCleanup(engine.close)
        return engine

    def test_load_gguf_in_both_modes(self):
        for file_backed, location in [(False, "host"), (True, "file")]:
            with self.subTest(file_backed=file_backed):
                registry = self.load(file_backed)
                self.assertEqual(registry.tensor_count, LAYERS + 1)
                self.assertEqual(registry.layer_count, LAYERS)
                self.assertEqual(registry.architecture, "llama_gguf")
                self.assertEqual(registry.total_bytes, MODEL_BYTES)
                self.assertEqual(registry.global_bytes, EMBEDDING_BYTES)
                for layer in registry.layers:
                    self.assertEqual(layer.location, location)
                    self.assertEqual(registry.tensor(layer.tensor_ids[0]).shape, LAYER_SHAPE)

        # The same names twice: refused whole.
        registry = self.load(False)
        self.assertStatus(STATUS_ALREADY_EXISTS, registry.load_gguf, self.weights)
        self.assertEqual(registry.tensor_count, LAYERS + 1)

    def check_streaming_stats(self, engine, plan, passes):
        streamed = plan["streamed_layers"]
        stats = engine.stats()
        self.assertEqual(stats.passes, passes)
        self.assertEqual(stats.layer_loads, len(streamed) * passes)
        self.assertEqual(stats.prefetch_hits + stats.prefetch_misses, stats.layer_loads)
        self.assertGreaterEqual(stats.bytes_copied, stats.layer_loads * LAYER_BYTES)
        self.assertGreater(stats.bytes_copied, 0)
        # One accounting: what the plan predicted is what the engine moved.
        self.assertEqual(stats.placement_bytes, plan["placement_bytes"])
        self.assertEqual(stats.streamed_bytes, passes * plan["bytes_per_pass"])
        self.assertEqual(
            stats.bytes_copied,
            stats.placement_bytes + stats.streamed_bytes + stats.prefetch_unused_bytes,
        )
        self.assertGreater(stats.arena_bytes, 0)
        self.assertLessEqual(stats.arena_bytes, STREAMING_BUDGET)
        self.assertLessEqual(stats.arena_peak_bytes, stats.arena_bytes)
        for layer in range(LAYERS):
            layer_stats = engine.layer_stats(layer)
            self.assertEqual(layer_stats.resident, layer not in streamed)
            self.assertEqual(layer_stats.loads, passes if layer in streamed else 0)
            # A load moves the layer's data, or the stretch of the file it is read as (from
            # the direct-I/O alignment below its first tensor).
            self.assertGreaterEqual(layer_stats.bytes, layer_stats.loads * LAYER_BYTES)
            self.assertLess(layer_stats.bytes, layer_stats.loads * (LAYER_BYTES + 4096))
        return stats

    def test_streaming_under_a_tight_budget(self):
        for file_backed in (False, True):
            with self.subTest(file_backed=file_backed):
                engine = self.engine(self.load(file_backed), STREAMING_BUDGET)
                plan = engine.prepare()
                self.assertEqual(plan["mode"], "streaming")
                self.assertGreaterEqual(plan["streamed_layer_count"], 1)
                self.assertLessEqual(plan["arena_bytes"], STREAMING_BUDGET)
                self.assertEqual(engine.plan, plan)
                engine.run_pass()
                engine.run_pass()
                self.check_streaming_stats(engine, plan, passes=2)
                self.assertStatus(STATUS_NOT_FOUND, engine.layer_stats, LAYERS)

                stats = engine.stats().asdict()
                self.assertEqual(set(stats), {f.name for f in offload_engine.Stats.__dataclass_fields__.values()})

                engine.reset_stats()
                after_reset = engine.stats()
                self.assertEqual((after_reset.passes, after_reset.layer_loads), (0, 0))
                engine.run_passes(3, compute=lambda layer: None)
                self.assertEqual(engine.stats().layer_loads, 3 * plan["streamed_layer_count"])

    def test_everything_resident_under_a_roomy_budget(self):
        for file_backed in (False, True):
            with self.subTest(file_backed=file_backed):
                engine = self.engine(self.load(file_backed), ROOMY_BUDGET)
                plan = engine.prepare()
                self.assertEqual(plan["mode"], "full")
                self.assertEqual(plan["resident_layers"], list(range(LAYERS)))
                engine.run_pass()
                engine.run_pass()
                stats = engine.stats()
                self.assertEqual(stats.passes, 2)
                self.assertEqual(stats.layer_loads, 0)
                # Placing the model copied all of it once; the passes copied nothing.
                self.assertGreaterEqual(stats.bytes_copied, MODEL_BYTES)
                engine.reset_stats()
                engine.run_pass()
                self.assertEqual(engine.stats().bytes_copied, 0)
                self.assertLessEqual(stats.arena_bytes, ROOMY_BUDGET)
                self.assertGreaterEqual(stats.arena_bytes, MODEL_BYTES)
                for layer in range(LAYERS):
                    layer_stats = engine.layer_stats(layer)
                    self.assertTrue(layer_stats.resident)
                    self.assertEqual(layer_stats.loads, 0)

    def test_the_engine_outlives_its_registry(self):
        registry = self.load(False)
        engine = self.engine(registry, STREAMING_BUDGET)
        registry.close()
        plan = engine.prepare()
        engine.run_pass()
        engine.run_pass()
        self.check_streaming_stats(engine, plan, passes=2)

    def test_compute_callback_sees_every_layer_open(self):
        engine = self.engine(self.load(False), STREAMING_BUDGET)
        engine.prepare()
        seen = []

        def compute(layer):
            seen.append(layer)
            # A second begin of the open layer, or a pass inside the pass, is out of sequence.
            self.assertStatus(STATUS_INVALID_STATE, engine.pass_begin)

        engine.run_pass(compute)
        self.assertEqual(seen, list(range(LAYERS)))

        # A failing compute abandons the pass; the engine stays usable.
        def fail(layer):
            if layer == 2:
                raise RuntimeError("compute failed")

        with self.assertRaises(RuntimeError):
            engine.run_pass(fail)
        engine.run_pass()

    def test_prefetch_depth_sizes_the_ring(self):
        # The global group and three layers: one resident and two slots, or three slots.
        budget = EMBEDDING_BYTES + 3 * LAYER_BYTES
        shallow = self.engine(self.load(False), budget, prefetch=1).prepare()
        deep = self.engine(self.load(False), budget, prefetch=3).prepare()
        self.assertLess(shallow["slot_count"], deep["slot_count"])

    def test_trace(self):
        engine = self.engine(self.load(False), STREAMING_BUDGET, trace=True)
        engine.prepare()
        engine.run_pass()
        path = os.path.join(self.scratch.name, "trace.json")
        engine.write_trace(path)
        with open(path) as f:
            trace = json.load(f)
        events = trace["traceEvents"] if isinstance(trace, dict) else trace
        self.assertTrue(events)

        untraced = self.engine(self.load(False), STREAMING_BUDGET)
        untraced.prepare()
        self.assertStatus(STATUS_INVALID_STATE, untraced.write_trace, os.path.join(self.scratch.name, "none.json"))

    def test_measure_link(self):
        engine = self.engine(self.load(False), STREAMING_BUDGET)
        pageable, pinned = engine.measure_link(1 << 20)
        self.assertGreater(pageable, 0.0)
        self.assertGreaterEqual(pinned, 0.0)

    def test_set_tensor(self):
        for budget in (STREAMING_BUDGET, ROOMY_BUDGET):
            with self.subTest(budget=budget):
                engine = self.engine(self.load(False), budget)
                engine.prepare()
                name = "blk.1.attn_q.weight"
                floats = array.array("f", [1.5] * 16)
                engine.set_tensor(name, floats)
                engine.set_tensor(name, floats.tobytes(), offset=LAYER_BYTES - 64)
                engine.set_tensor(name, bytearray(8), offset=128)
                engine.set_tensor(name, memoryview(floats.tobytes())[4:12], offset=4)
                engine.set_tensor(name, b"", offset=LAYER_BYTES)
                engine.set_tensor("token_embd.weight", b"\1\2\3\4")
                engine.run_pass()

                self.assertStatus(STATUS_NOT_FOUND, engine.set_tensor, "blk.9.attn_q.weight", b"\0" * 4)
                self.assertStatus(STATUS_INVALID_ARGUMENT, engine.set_tensor, name, b"\0" * 8, LAYER_BYTES - 4)
                self.assertStatus(STATUS_INVALID_ARGUMENT, engine.set_tensor, name, b"\0" * 4, 1 << 62)
                with self.assertRaises(ValueError):
                    engine.set_tensor(name, memoryview(bytes(64))[::2])

                engine.pass_begin()
                self.assertStatus(STATUS_INVALID_STATE, engine.set_tensor, name, b"\0" * 4)
                engine.pass_end()
                self.check_set_tensor_streams(engine, budget)

        file_backed = self.engine(self.load(True), STREAMING_BUDGET)
        file_backed.prepare()
        self.assertStatus(STATUS_UNSUPPORTED, file_backed.set_tensor, "blk.0.attn_q.weight", b"\0" * 4)

    def check_set_tensor_streams(self, engine, budget):
        # Changing weights changes nothing about what moves.
        engine.reset_stats()
        engine.run_pass()
        plan = engine.plan
        self.assertEqual(engine.stats().layer_loads, plan["streamed_layer_count"])
        if budget == ROOMY_BUDGET:
            self.assertEqual(plan["streamed_layer_count"], 0)

    def test_impossible_budget(self):
        for file_backed in (False, True):
            with self.subTest(file_backed=file_backed):
                engine = self.engine(self.load(file_backed), IMPOSSIBLE_BUDGET)
                error = self.assertStatus(STATUS_INSUFFICIENT_MEMORY, engine.prepare)
                self.assertRegex(error.message, r"\d+(\.\d+)? ?(B|KiB|MiB|GiB|bytes)\b")
                # Unprepared, the engine refuses passes with an error rather than crashing.
                with self.assertRaises(OffloadError):
                    engine.run_pass()

    def test_corrupt_files(self):
        whole = tiny_llama_gguf(with_data=True)
        header_end = len(tiny_llama_gguf()) - MODEL_BYTES
        for name, data in [
            ("truncated_head.gguf", whole[:100]),
            ("truncated_data.gguf", whole[: header_end + LAYER_BYTES]),
            ("bad_magic.gguf", b"GGUX" + whole[4:]),
            ("version_99.gguf", whole[:4] + struct.pack("<I", 99) + whole[8:]),
        ]:
            path = self.scratch_file(name, data)
            for file_backed in (False, True):
                with self.subTest(name, file_backed=file_backed):
                    registry = Registry()
                    self.addCleanup(registry.close)
                    error = self.assertStatus(STATUS_CORRUPT_FILE, registry.load_gguf, path, file_backed)
                    self.assertIn(name, error.message)
                    self.assertEqual(registry.tensor_count, 0)

        missing = os.path.join(self.scratch.name, "missing.gguf")
        for file_backed in (False, True):
            with self.subTest("missing", file_backed=file_backed):
                registry = Registry()
                self.addCleanup(registry.close)
                self.assertStatus(STATUS_IO, registry.load_gguf, missing, file_backed)

    def test_descriptor_registry_cannot_stream(self):
        with Registry.from_gguf(self.weights) as registry:
            engine = self.engine(registry, STREAMING_BUDGET)
            self.assertStatus(STATUS_UNSUPPORTED, engine.prepare)

    def test_closed_and_null_handles(self):
        lib = offload_engine._library()
        engine = self.engine(self.load(False), STREAMING_BUDGET)
        engine.prepare()
        stale = engine._handle.value
        engine.close()
        engine.close()
        self.assertTrue(engine.closed)
        for method, args in [
            (engine.prepare, ()),
            (engine.run_pass, ()),
            (engine.stats, ()),
            (engine.layer_stats, (0,)),
            (engine.reset_stats, ()),
            (engine.set_tensor, ("blk.0.attn_q.weight", b"\0" * 4)),
            (engine.write_trace, ("x.json",)),
            (engine.measure_link, ()),
        ]:
            with self.subTest(method.__name__):
                with self.assertRaises(ValueError):
                    method(*args)

        # The library itself refuses NULL and freed handles with a status, no crash.
        stats = offload_engine._Stats(size=ctypes.sizeof(offload_engine._Stats))
        for handle, statuses in [(None, {STATUS_NULL_POINTER}), (stale, {STATUS_INVALID_HANDLE, STATUS_NULL_POINTER})]:
            with self.subTest(handle=handle):
                self.assertIn(lib.offload_engine_engine_stats(handle, ctypes.byref(stats)), statuses)
                self.assertIn(lib.offload_engine_engine_pass_begin(handle), statuses)
                self.assertIn(lib.offload_engine_engine_tensor_set(handle, b"x", b"\0", 0, 1), statuses)
                with self.assertRaises(OffloadError) as raised:
                    offload_engine._check(lib.offload_engine_engine_prepare(handle, None, None))
                self.assertIn(raised.exception.status, statuses | {STATUS_INVALID_ARGUMENT})
        lib.offload_engine_engine_free(None)

        registry = self.load(False)
        params = offload_engine._EngineParams()
        lib.offload_engine_engine_params_init(ctypes.byref(params))
        out = ctypes.c_void_p()
        self.assertEqual(lib.offload_engine_engine_new(None, registry.handle, ctypes.byref(out)), STATUS_NULL_POINTER)
        self.assertEqual(lib.offload_engine_engine_new(ctypes.byref(params), None, ctypes.byref(out)), STATUS_NULL_POINTER)
        self.assertEqual(lib.offload_engine_registry_load_gguf(None, self.weights.encode(), 0, None), STATUS_NULL_POINTER)
        self.assertEqual(lib.offload_engine_registry_load_gguf(registry.handle, None, 0, None), STATUS_NULL_POINTER)

    def test_unknown_device(self):
        registry = self.load(False)
        with self.assertRaises(OffloadError):
            Engine(registry, device="NoSuchDevice0", budget_bytes=ROOMY_BUDGET)


class PipelineTest(ScratchTest):
    """Two components on the CPU device: a conditioner and a diffusion model."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.small = os.path.join(cls.scratch.name, "conditioner.gguf")
        with open(cls.small, "wb") as f:
            f.write(gguf_file([(f"blk.{i}.attn_q.weight", LAYER_SHAPE, layer_data(i)) for i in range(2)]))

    def setUp(self):
        if not offload_engine.has_function("offload_engine_pipeline_new"):
            self.skipTest("this build has no pipelines")

    def component(self, path=None):
        registry = Registry()
        self.addCleanup(registry.close)
        registry.load_gguf(path or self.weights)
        engine = Engine(registry, device="CPU", budget_bytes=ROOMY_BUDGET)
        self.addCleanup(engine.close)
        return engine

    def pipeline(self, mode, budget, conditioner_path=None):
        pipeline = Pipeline(mode, budget_bytes=budget, min_free_bytes=0, margin_bytes=0)
        self.addCleanup(pipeline.close)
        conditioner, diffusion = self.component(conditioner_path), self.component()
        pipeline.add("te", "conditioner", conditioner)
        pipeline.add("dit", "diffusion", diffusion)
        return pipeline, conditioner, diffusion

    def job(self, pipeline, conditioner, diffusion, passes=2, during_diffusion=None):
        with pipeline.run():
            with pipeline.stage("te") as engine:
                self.assertIs(engine, conditioner)
                engine.run_pass()
            with pipeline.stage("dit") as engine:
                self.assertIs(engine, diffusion)
                engine.run_passes(passes)
                if during_diffusion is not None:
                    during_diffusion()

    def test_roomy_device_keeps_everything(self):
        pipeline, conditioner, diffusion = self.pipeline("aggressive", ROOMY_BUDGET)
        pipeline.set_override("te", "keep")
        pipeline.set_override("dit", "keep")
        self.job(pipeline, conditioner, diffusion)
        self.job(pipeline, conditioner, diffusion)
        for name in ("te", "dit"):
            info = pipeline.component_info(name)
            self.assertEqual(info.name, name)
            self.assertEqual(info.placement, "resident")
            self.assertEqual((info.loads, info.unloads, info.streamed_layers), (1, 0, 0))
            self.assertGreaterEqual(info.device_bytes, MODEL_BYTES)
            self.assertGreaterEqual(info.resident_bytes, MODEL_BYTES)
        self.assertEqual(pipeline.component_info("te").role, "conditioner")
        self.assertEqual(pipeline.component_info("dit").role, "diffusion")
        stats = pipeline.stats()
        self.assertEqual((stats.loads, stats.unloads), (2, 0))
        self.assertEqual(stats.bytes_loaded, 2 * MODEL_BYTES)
        self.assertLessEqual(stats.peak_device_bytes, ROOMY_BUDGET)
        # Kept on the device, the diffusion model's engine keeps its plan and counters.
        self.assertEqual(diffusion.stats().passes, 4)
        self.assertEqual(diffusion.stats().layer_loads, 0)

    def test_components_take_turns_on_a_small_device(self):
        # Room for one model at a time.
        budget = MODEL_BYTES + MODEL_BYTES // 2
        pipeline, conditioner, diffusion = self.pipeline("aggressive", budget)
        self.job(pipeline, conditioner, diffusion)
        self.job(pipeline, conditioner, diffusion)
        stats = pipeline.stats()
        self.assertGreaterEqual(stats.loads, 4)
        self.assertGreaterEqual(stats.unloads, 3)
        self.assertGreaterEqual(stats.bytes_loaded, 4 * MODEL_BYTES)
        self.assertLessEqual(stats.peak_device_bytes, budget)
        self.assertEqual(stats.budget_bytes, budget)
        self.assertEqual(pipeline.component_info("te").placement, "off")
        self.assertGreaterEqual(pipeline.component_info("te").unloads, 2)

    def test_the_diffusion_model_streams_when_it_does_not_fit(self):
        # The conditioner (two layers) fits alone; the diffusion model only streams.
        budget = EMBEDDING_BYTES + 2 * LAYER_BYTES
        pipeline, conditioner, diffusion = self.pipeline("layer_streaming", budget, self.small)
        seen = []

        def during_diffusion():
            info = pipeline.component_info("dit")
            self.assertEqual(info.placement, "streaming")
            self.assertGreaterEqual(info.streamed_layers, 1)
            self.assertLessEqual(info.device_bytes, budget)
            stats = diffusion.stats()
            self.assertEqual(stats.passes, 3)
            self.assertEqual(stats.layer_loads, 3 * info.streamed_layers)
            seen.append(info)

        self.job(pipeline, conditioner, diffusion, passes=3, during_diffusion=during_diffusion)
        self.job(pipeline, conditioner, diffusion, passes=3, during_diffusion=during_diffusion)
        self.assertEqual(len(seen), 2)
        self.assertLessEqual(pipeline.stats().peak_device_bytes, budget)

    def test_errors(self):
        pipeline, conditioner, diffusion = self.pipeline("none", MODEL_BYTES + MODEL_BYTES // 2)
        self.assertStatus(STATUS_ALREADY_EXISTS, pipeline.add, "te", "conditioner", conditioner)
        self.assertStatus(STATUS_NOT_FOUND, pipeline.component_info, "vae")
        self.assertStatus(STATUS_NOT_FOUND, pipeline.set_stage_need, "vae", 1)
        with self.assertRaises(ValueError):
            pipeline.set_override("te", "sometimes")
        with self.assertRaises(ValueError):
            pipeline.add("vae", "painter", conditioner)
        with self.assertRaises(OffloadError):
            pipeline.stage_begin("te")  # no run open
        with self.assertRaises(ValueError):
            diffusion.prepare()  # the pipeline plans its components

        # "none" keeps the conditioner, so the diffusion model cannot follow it.
        error = self.assertStatus(STATUS_INSUFFICIENT_MEMORY, self.job, pipeline, conditioner, diffusion)
        self.assertIn("dit", error.message)
        # The run was closed on the way out: the pipeline takes the next one.
        pipeline.run_begin()
        pipeline.run_end()

        pipeline.close()
        with self.assertRaises(ValueError):
            pipeline.stats()
        # Back in the host's hands, the engine plans for itself again.
        self.assertEqual(diffusion.prepare()["mode"], "full")


class LlamaHookTest(ScratchTest):
    """The llama.cpp drop-in's hook from Python: planning and its refusals (Python runs no
    llama.cpp; tests/llama.rs runs the real thing)."""

    def hook(self, path=None, **kwargs):
        kwargs.setdefault("device", "CPU")
        kwargs.setdefault("budget_bytes", 64 << 20)
        kwargs.setdefault("compute_reserve_bytes", 0)
        kwargs.setdefault("kv_cache_bytes", 0)
        return offload_engine.LlamaHook(path or self.gguf, **kwargs)

    def test_the_hooks_plan_is_the_command_lines(self):
        budget = EMBEDDING_BYTES + 2 * LAYER_BYTES + 4096
        with self.hook(budget_bytes=budget, prefetch=1) as hook:
            from_hook = hook.plan()
            self.assertEqual(from_hook["mode"], "streaming")
            self.assertTrue(hook.buffer_type())
        cli = os.environ.get("OFFLOAD_ENGINE_CLI")
        if not cli:
            self.skipTest("OFFLOAD_ENGINE_CLI (the offload-engine program) is not set")
        out = subprocess.run(
            [cli, "plan", self.gguf, "--budget", f"{budget}", "--prefetch", "1", "--json"],
            check=True, capture_output=True, text=True,
        )
        from_cli = json.loads(out.stdout)
        for key in ("slot_count", "slot_bytes", "arena_bytes", "bytes_per_pass", "placement_bytes",
                    "resident_layers", "streamed_layers"):
            self.assertEqual(from_hook[key], from_cli[key], key)

    def test_estimated_reserves_shrink_what_the_weights_get(self):
        with self.hook(budget_bytes=1 << 30) as exact:
            usable = exact.plan()["usable_bytes"]
        with offload_engine.LlamaHook(self.gguf, device="CPU", budget_bytes=1 << 30, n_ctx=64, n_ubatch=16) as estimated:
            self.assertLessEqual(estimated.plan()["usable_bytes"], usable)

    def test_refusals(self):
        self.assertStatus(STATUS_INSUFFICIENT_MEMORY, self.hook, budget_bytes=IMPOSSIBLE_BUDGET)
        bert = self.scratch_file("bert.gguf", gguf_file(
            [(f"blk.{i}.attn_q.weight", LAYER_SHAPE, None) for i in range(2)], architecture="bert"))
        error = self.assertStatus(STATUS_UNSUPPORTED, self.hook, bert)
        self.assertIn("l_out", error.message)
        # With a pattern naming bert's layer outputs, the hook is made.
        with self.hook(bert, layer_output_pattern=r"^layer_out-(\d+)$") as hook:
            self.assertEqual(hook.plan()["mode"], "full")
        self.assertStatus(STATUS_INVALID_ARGUMENT, self.hook, layer_output_pattern="l_out-\\d+")
        self.assertStatus(STATUS_INVALID_ARGUMENT, self.hook, layer_output_pattern="(unclosed")
        self.assertStatus(STATUS_IO, self.hook, os.path.join(self.scratch.name, "missing.gguf"))
        self.assertStatus(STATUS_CORRUPT_FILE, self.hook, self.scratch_file("junk.gguf", b"GGUF" + b"\xff" * 60))

    def test_sequence_errors_before_llama_loads_anything(self):
        with self.hook() as hook:
            # llama.cpp created nothing in the buffer type: nothing to adopt.
            error = self.assertStatus(STATUS_INVALID_STATE, hook.adopt)
            self.assertIn("tensor_buft_overrides", error.message)
            self.assertStatus(STATUS_INVALID_STATE, hook.detach)
            self.assertStatus(STATUS_INVALID_STATE, hook.stats)
            with hook.context() as context:
                context.status()  # no graph ran yet
                lib = offload_engine._library()
                # A NULL node changes nothing; the answers are the neutral ones.
                self.assertFalse(lib.offload_engine_llama_eval(None, True, context.handle))
                self.assertTrue(lib.offload_engine_llama_eval(None, False, context.handle))
                # Detach is refused while a context object lives (and the model is not adopted).
                self.assertStatus(STATUS_INVALID_STATE, hook.detach)
            lib = offload_engine._library()
            # User data that is no context: neutral answers, no crash.
            self.assertFalse(lib.offload_engine_llama_eval(None, True, None))
            self.assertTrue(lib.offload_engine_llama_eval(None, False, ctypes.c_void_p(16)))
        with self.assertRaises(ValueError):
            hook.plan()

    def test_null_and_stale_handles(self):
        lib = offload_engine._library()
        self.assertEqual(lib.offload_engine_llama_detach(None), STATUS_NULL_POINTER)
        self.assertEqual(lib.offload_engine_llama_context_status(None), STATUS_NULL_POINTER)
        hook = self.hook()
        stale = hook.handle
        hook.close()
        self.assertEqual(lib.offload_engine_llama_adopt(stale, None), STATUS_INVALID_HANDLE)
        self.assertEqual(lib.offload_engine_llama_new(None, self.gguf.encode(), ctypes.byref(ctypes.c_void_p())),
                         STATUS_NULL_POINTER)


class AdviceTest(unittest.TestCase):
    def test_decode_prefers_the_cpu_and_prefill_streaming_over_pcie4(self):
        decode = offload_engine.advise(4_000_000_000, bits_per_weight=4.5, tokens_per_pass=1)
        self.assertEqual(decode["prefer"], "cpu")
        self.assertAlmostEqual(decode["cpu_seconds"], 4.0 / 60.0, places=3)
        prefill = offload_engine.advise(4_000_000_000, bits_per_weight=4.5, tokens_per_pass=512)
        self.assertEqual(prefill["prefer"], "stream")
        self.assertRaises(OffloadError, offload_engine.advise, 1, bits_per_weight=0.0)
        self.assertRaises(OffloadError, offload_engine.advise, 1, tokens_per_pass=0)

    def test_python_and_the_command_line_give_the_same_advice(self):
        cli = os.environ.get("OFFLOAD_ENGINE_CLI")
        if not cli:
            self.skipTest("OFFLOAD_ENGINE_CLI (the offload-engine program) is not set")
        out = subprocess.run(
            [cli, "plan", "--hparams", "hidden=2048,layers=24,heads=16,kv_heads=4,vocab=32000,ffn=5632,context=2048,type=q4_k",
             "--budget", "600MiB", "--json"],
            check=True, capture_output=True, text=True,
        )
        advice = json.loads(out.stdout)["advice"]
        for kind, tokens in (("decode", 1), ("prefill", advice["prefill_tokens"])):
            mine = offload_engine.advise(advice["overflow_bytes"], bits_per_weight=advice["bits_per_weight"],
                                         tokens_per_pass=tokens)
            self.assertEqual(mine["prefer"], advice[kind]["prefer"], kind)
            self.assertEqual(mine["stream_seconds"], advice[kind]["stream_seconds"], kind)
            self.assertEqual(mine["cpu_seconds"], advice[kind]["cpu_seconds"], kind)


if __name__ == "__main__":
    unittest.main()
