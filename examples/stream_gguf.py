#!/usr/bin/env python3
"""Streams a GGUF model's layers through an engine at several memory budgets and shows what
streaming costs: bytes copied per pass, layer loads, time spent copying and waiting. Plots
bytes moved against the budget when matplotlib is installed; prints a table either way.

    python3 examples/stream_gguf.py [MODEL.gguf] [--budgets 30%,50%,75%,120%] [--passes 3]
                                    [--file-backed] [--compute-ms 2] [--plot out.png]

Without a model file, a small llama-like model (f32 `blk.N.*` tensors, see --layers and
--layer-mib) is written to a temporary GGUF file first. No compute runs: each pass opens and
closes every layer in order, so the figures are those of pure streaming (--compute-ms puts
a sleep in each layer to stand in for compute, which the copies can then overlap).

The CPU device reports system RAM as its free memory, so the budgets are given explicitly
(a percentage of the model's size, or a size as the command line reads it: 64MiB, 1.5GB).
The plot (`pip install matplotlib`; without it the table alone) marks the budgets where
nothing fits and where the model is fully resident.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import offload_engine as oe  # noqa: E402

MIB = 1 << 20


def synthetic_model(path, layers, layer_mib):
    """A llama-like model: per layer attn_q/attn_k/attn_v/attn_output and ffn_up/ffn_down
    (about `layer_mib` MiB per layer), token_embd and output as the global group."""
    hidden = 256
    # Four hidden x hidden attention matrices plus two hidden x ffn matrices per layer.
    ffn = max(hidden, (layer_mib * MIB // 4 - 4 * hidden * hidden) // (2 * hidden))
    vocab = 1024
    tensors = [("token_embd.weight", (hidden, vocab), 0.01)]
    for i in range(layers):
        fill = 0.001 * (i + 1)
        for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
            tensors.append((f"blk.{i}.{part}.weight", (hidden, hidden), fill))
        tensors.append((f"blk.{i}.ffn_up.weight", (hidden, ffn), fill))
        tensors.append((f"blk.{i}.ffn_down.weight", (ffn, hidden), fill))
    tensors.append(("output.weight", (hidden, vocab), 0.02))
    metadata = {
        "general.architecture": "llama",
        "general.name": "stream_gguf synthetic",
        "llama.block_count": layers,
        "llama.embedding_length": hidden,
        "llama.feed_forward_length": ffn,
    }
    oe.write_gguf(path, tensors, metadata)


# ---------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------


def parse_budget(text, model_bytes):
    text = text.strip()
    if text.endswith("%"):
        return int(model_bytes * float(text[:-1]) / 100)
    return oe.parse_size(text)


def mib(value):
    return value / MIB


def simulated_compute(milliseconds):
    """A stand-in for a layer's compute: a sleep (None for no compute at all)."""
    if milliseconds <= 0:
        return None
    seconds = milliseconds / 1000

    def compute(_layer):
        time.sleep(seconds)

    return compute


def measure(registry, budget, args):
    """Prepares an engine at `budget`, runs a warm-up pass and args.passes measured ones.
    Returns a row dict, or None when the budget cannot hold the model's minimum."""
    with oe.Engine(
        registry,
        device=args.device,
        budget_bytes=budget,
        prefetch=args.prefetch,
        compute_threads=1,
    ) as engine:
        try:
            plan = engine.prepare()
        except oe.OffloadError as error:
            if error.status != oe.ERR_INSUFFICIENT_MEMORY:
                raise
            return {"budget": budget, "mode": "insufficient", "message": error.message}
        compute = simulated_compute(args.compute_ms)
        placement = engine.stats().placement_bytes  # copied once, by prepare
        # The first pass after prepare starts from freshly placed slots; measure the
        # steady state after it.
        engine.run_pass(compute)
        engine.reset_stats()
        started = time.perf_counter()
        engine.run_passes(args.passes, compute)
        elapsed = time.perf_counter() - started
        stats = engine.stats()
        passes = max(stats.passes, 1)
        # The streamed bytes are the loads the passes used; what was copied ahead for a
        # pass that never came is counted apart (prefetch_unused_bytes).
        return {
            "budget": budget,
            "mode": plan["mode"],
            "resident": plan["resident_layer_count"],
            "streamed": plan["streamed_layer_count"],
            "planned_bytes_per_pass": plan["bytes_per_pass"],
            "placement": placement,
            "bytes_per_pass": stats.streamed_bytes / passes,
            "unused": stats.prefetch_unused_bytes,
            "loads_per_pass": stats.layer_loads / passes,
            "copy_us_per_pass": stats.copy_us / passes,
            "wait_us_per_pass": stats.wait_us / passes,
            "ms_per_pass": elapsed * 1000 / passes,
            "arena": stats.arena_bytes,
            "hits": stats.prefetch_hits,
            "misses": stats.prefetch_misses,
        }


def print_table(rows):
    """One row per budget; streamed bytes, loads and times are per pass."""
    print(
        f"{'budget MiB':>10} {'mode':>12} {'res/str':>7} {'arena MiB':>9} {'placed MiB':>10} "
        f"{'streamed':>9} {'planned':>9} {'unused':>7} {'loads':>6} {'copy us':>9} {'wait us':>9} {'ms':>8}"
    )
    for row in rows:
        if row["mode"] == "insufficient":
            reason = row["message"].split(";")[0]
            print(f"{mib(row['budget']):10.1f} {'insufficient':>12}   ({reason})")
            continue
        print(
            f"{mib(row['budget']):10.1f} {row['mode']:>12} {row['resident']:>3}/{row['streamed']:<3} "
            f"{mib(row['arena']):9.1f} {mib(row['placement']):10.2f} {mib(row['bytes_per_pass']):9.2f} "
            f"{mib(row['planned_bytes_per_pass']):9.2f} {mib(row['unused']):7.2f} {row['loads_per_pass']:6.1f} "
            f"{row['copy_us_per_pass']:9.0f} {row['wait_us_per_pass']:9.0f} {row['ms_per_pass']:8.2f}"
        )


def plot(rows, path, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): table only, no plot")
        return
    measured = [row for row in rows if row["mode"] != "insufficient"]
    if not measured:
        print("nothing fits any budget: no plot")
        return
    budgets = [mib(row["budget"]) for row in measured]
    refused = [mib(row["budget"]) for row in rows if row["mode"] == "insufficient"]
    full = [mib(row["budget"]) for row in measured if row["mode"] == "full"]
    fig, (moved, timing) = plt.subplots(1, 2, figsize=(11, 4.2))
    moved.plot(budgets, [mib(row["bytes_per_pass"]) for row in measured], marker="o", label="streamed")
    moved.plot(
        budgets,
        [mib(row["planned_bytes_per_pass"]) for row in measured],
        linestyle="--",
        label="planned",
    )
    for axis in (moved, timing):
        if refused:
            axis.axvspan(min(refused + budgets), (max(refused) + min(budgets)) / 2, color="tab:red",
                         alpha=0.1, label="insufficient: nothing fits")
        if full:
            axis.axvline(min(full), linestyle=":", color="tab:green", label="fully resident")
    moved.set_xlabel("budget (MiB)")
    moved.set_ylabel("streamed per pass (MiB)")
    moved.legend()
    moved.grid(True, alpha=0.3)
    timing.plot(budgets, [row["copy_us_per_pass"] / 1000 for row in measured], marker="o", label="copy")
    timing.plot(budgets, [row["wait_us_per_pass"] / 1000 for row in measured], marker="s", label="wait")
    timing.set_xlabel("budget (MiB)")
    timing.set_ylabel("ms per pass")
    timing.legend()
    timing.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot written to {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="a GGUF model file (default: a synthetic one)")
    parser.add_argument(
        "--budgets",
        default="20%,30%,40%,50%,60%,75%,90%,110%",
        help="comma-separated budgets: N%% of the model, or bytes with K/M/G",
    )
    parser.add_argument("--passes", type=int, default=3, help="measured passes per budget")
    parser.add_argument("--prefetch", type=int, default=1, help="layers copied ahead")
    parser.add_argument("--device", default="CPU", help="ggml device (default CPU)")
    parser.add_argument("--file-backed", action="store_true", help="stream from the file (disk tier)")
    parser.add_argument("--compute-ms", type=float, default=0.0, help="simulated compute per layer")
    parser.add_argument("--layers", type=int, default=12, help="synthetic model: layers")
    parser.add_argument("--layer-mib", type=int, default=8, help="synthetic model: MiB per layer")
    parser.add_argument("--trace", help="write a Chrome trace of the tightest streaming budget")
    parser.add_argument("--plot", help="write the plot to this PNG (needs matplotlib)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="stream_gguf_") as scratch:
        path = args.model
        if path is None:
            path = os.path.join(scratch, "synthetic.gguf")
            synthetic_model(path, args.layers, args.layer_mib)
            print(f"wrote {path} ({mib(os.path.getsize(path)):.1f} MiB)")
        with oe.Registry() as registry:
            started = time.perf_counter()
            count = registry.load_gguf(path, file_backed=args.file_backed)
            loaded = time.perf_counter() - started
            total = registry.total_bytes
            print(
                f"{registry.architecture}: {count} tensors, {registry.layer_count} layers, "
                f"{mib(total):.1f} MiB ({mib(registry.global_bytes):.1f} MiB global), "
                f"{'file-backed' if args.file_backed else 'in memory'}, loaded in {loaded * 1000:.0f} ms"
            )
            budgets = sorted(parse_budget(text, total) for text in args.budgets.split(","))
            rows = [measure(registry, budget, args) for budget in budgets]
            print(f"{args.passes} passes per budget on {args.device}, prefetch {args.prefetch}, "
                  f"compute {args.compute_ms} ms per layer")
            print_table(rows)

            if args.trace:
                streaming = [row for row in rows if row["mode"] == "streaming"]
                if streaming:
                    with oe.Engine(registry, device=args.device, budget_bytes=streaming[0]["budget"],
                                   prefetch=args.prefetch, trace=True) as engine:
                        engine.prepare()
                        engine.run_passes(args.passes)
                        engine.write_trace(args.trace)
                    print(f"trace of the {mib(streaming[0]['budget']):.1f} MiB budget written to {args.trace}")

            if args.plot:
                name = os.path.basename(args.model) if args.model else "synthetic model"
                plot(rows, args.plot, f"{name}: streaming on {args.device} ({mib(total):.0f} MiB model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
