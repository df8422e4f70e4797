"""The C ABI from Python through ctypes (python/offload_engine.py): GGUF inspection, planning
and error reporting. Run with plain `python3 tests/python/test_ctypes.py` (unittest, no other
dependency); OFFLOAD_ENGINE_LIB picks the library, else the repository's target/ build."""

import os
import re
import struct
import sys
import tempfile
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))

import offload_engine  # noqa: E402  (needs the path above)
from offload_engine import OffloadError, Registry  # noqa: E402

GGUF_ALIGNMENT = 32  # ggml's default; the file sets no general.alignment
GGUF_TYPE_STRING = 8
GGML_F32 = 0

LAYERS = 4
LAYER_SHAPE = (64, 64)  # ne[0], ne[1]
EMBEDDING_SHAPE = (64, 128)
LAYER_BYTES = LAYER_SHAPE[0] * LAYER_SHAPE[1] * 4
EMBEDDING_BYTES = EMBEDDING_SHAPE[0] * EMBEDDING_SHAPE[1] * 4

STATUS_IO = 6
STATUS_CORRUPT_FILE = 7
STATUS_INSUFFICIENT_MEMORY = 8
STATUS_ALREADY_EXISTS = 5


def gguf_string(text):
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def tiny_llama_gguf():
    """A GGUF v3 file: general.architecture = llama, blk.0..3.attn_q.weight and
    token_embd.weight, all f32, data zero-filled."""
    tensors = [(f"blk.{i}.attn_q.weight", LAYER_SHAPE) for i in range(LAYERS)]
    tensors.append(("token_embd.weight", EMBEDDING_SHAPE))
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), 1)
    head += gguf_string("general.architecture") + struct.pack("<I", GGUF_TYPE_STRING) + gguf_string("llama")
    offset = 0
    for name, shape in tensors:
        head += gguf_string(name) + struct.pack("<I", len(shape))
        head += struct.pack(f"<{len(shape)}Q", *shape)
        head += struct.pack("<IQ", GGML_F32, offset)
        offset += shape[0] * shape[1] * 4  # f32 sizes here are multiples of the alignment
    head += b"\0" * (-len(head) % GGUF_ALIGNMENT)
    return head + b"\0" * offset


class CtypesTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.scratch = tempfile.TemporaryDirectory(prefix="offload_engine_ctypes_")
        cls.gguf = os.path.join(cls.scratch.name, "tiny.gguf")
        with open(cls.gguf, "wb") as f:
            f.write(tiny_llama_gguf())

    @classmethod
    def tearDownClass(cls):
        cls.scratch.cleanup()

    def scratch_file(self, name, data):
        path = os.path.join(self.scratch.name, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_version(self):
        self.assertRegex(offload_engine.version(), r"^\d+\.\d+\.\d+")
        self.assertEqual(offload_engine.status_str(0), "ok")

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

    def test_plans_at_three_budgets(self):
        with Registry.from_gguf(self.gguf) as registry:
            roomy = offload_engine.plan(registry, 8 << 30)
            self.assertEqual(roomy["mode"], "full")
            self.assertEqual(roomy["resident_layers"], [True] * LAYERS)
            self.assertEqual(roomy["bytes_per_pass"], 0)
            self.assertTrue(roomy["message"])

            # Exactly the global group and two slots: every layer streams.
            small = offload_engine.plan(
                registry,
                EMBEDDING_BYTES + 2 * LAYER_BYTES,
                steps=4,
                passes_per_step=2,
                prefetch=1,
                link="pcie4-x16",
                min_free_bytes=0,
                safety_fraction=1.0,
            )
            self.assertEqual(small["mode"], "streaming")
            streamed = small["resident_layers"].count(False)
            self.assertGreaterEqual(streamed, 1)
            self.assertEqual(small["streamed_layer_count"], streamed)
            self.assertEqual(small["bytes_per_pass"], streamed * LAYER_BYTES)
            self.assertEqual(small["bytes_per_step"], 2 * small["bytes_per_pass"])
            self.assertLessEqual(small["device_bytes"], EMBEDDING_BYTES + 2 * LAYER_BYTES)
            self.assertGreater(small["predicted_step_seconds"], 0.0)
            self.assertTrue(small["message"])

            with self.assertRaises(OffloadError) as refused:
                offload_engine.plan(
                    registry, EMBEDDING_BYTES + LAYER_BYTES // 2, min_free_bytes=0, safety_fraction=1.0
                )
            self.assertEqual(refused.exception.status, STATUS_INSUFFICIENT_MEMORY)
            # The explanation gives the sizes involved.
            self.assertRegex(refused.exception.message, r"\d+(\.\d+)? ?(B|KiB|MiB|GiB|bytes)\b")

    def test_descriptors(self):
        with Registry("llama_gguf") as registry:
            first = registry.add_descriptor("blk.0.ffn_up.weight", GGML_F32, (128, 32))
            registry.add_descriptor("blk.1.ffn_up.weight", GGML_F32, (128, 32))
            registry.add_descriptor("output.weight", GGML_F32, (128,))
            self.assertEqual(registry.find("blk.0.ffn_up.weight"), first)
            self.assertEqual(registry.layer_count, 2)
            self.assertEqual(registry.global_bytes, 128 * 4)
            with self.assertRaises(OffloadError) as duplicate:
                registry.add_descriptor("output.weight", GGML_F32, (128,))
            self.assertEqual(duplicate.exception.status, STATUS_ALREADY_EXISTS)

    def test_file_errors(self):
        missing = os.path.join(self.scratch.name, "missing.gguf")
        with self.assertRaises(OffloadError) as error:
            Registry.from_gguf(missing)
        self.assertEqual(error.exception.status, STATUS_IO)
        self.assertIn("missing.gguf", error.exception.message)

        whole = tiny_llama_gguf()
        for name, data in [
            ("truncated.gguf", whole[:100]),
            ("bad_magic.gguf", b"GGUX" + whole[4:]),
            ("version_99.gguf", whole[:4] + struct.pack("<I", 99) + whole[8:]),
        ]:
            with self.subTest(name):
                with self.assertRaises(OffloadError) as error:
                    Registry.from_gguf(self.scratch_file(name, data))
                self.assertEqual(error.exception.status, STATUS_CORRUPT_FILE)
                self.assertIn(name, error.exception.message)

        # All or nothing: a registry that refused a file still holds only what it had.
        with Registry.from_gguf(self.gguf) as registry:
            with self.assertRaises(OffloadError):
                registry.add_gguf(self.scratch_file("cut.gguf", whole[:200]))
            self.assertEqual(registry.tensor_count, LAYERS + 1)

    def test_closed_registry(self):
        registry = Registry()
        registry.close()
        registry.close()  # idempotent
        with self.assertRaises(ValueError):
            registry.tensor_count


if __name__ == "__main__":
    unittest.main()
