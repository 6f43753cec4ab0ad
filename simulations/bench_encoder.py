"""Encoder throughput: fedrec's TextEncoder vs sentence-transformers, same texts, same model.

    python simulations/bench_encoder.py [--repeats 3] [--threads N] [--out results/bench_encoder.json]

Encodes the ml-100k item texts with both, interleaved (the order flips every repeat, so
drift on a shared machine hits both alike), and reports medians: wall-clock texts/s, the
ratio fedrec / sentence-transformers, process CPU seconds (steadier than wall time when
other jobs compete for the cores), and the largest difference between the two outputs.
Then checks that a second `embed_texts` call on a warm disk cache runs no forward pass.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any Hugging Face import

TEMPLATE = "{title} ({year}). Genres: {genres}"


def _commit() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fedrec.results import git_commit

    return git_commit()


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def cache_check(texts, model_dir):
    """Cold then warm embed_texts in a fresh cache dir: forward passes and seconds of each."""
    from fedrec.data import encoder

    encoder._encoder.cache_clear()
    with tempfile.TemporaryDirectory() as root:
        cold, cold_s, _ = timed(lambda: encoder.embed_texts(texts, Path(root), model_dir))
        enc = encoder._encoder(model_dir, 64, 128)  # the one embed_texts loaded
        passes = enc.forward_passes
        warm, warm_s, _ = timed(lambda: encoder.embed_texts(texts, Path(root), model_dir))
    return {"cold_forward_passes": passes, "cold_s": round(cold_s, 3),
            "warm_forward_passes": enc.forward_passes - passes, "warm_s": round(warm_s, 3),
            "warm_equals_cold": bool((warm == cold).all())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each (median)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch default")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--model-dir", default="", help="default: the bundled MiniLM-L6")
    ap.add_argument("--out", default="results/bench_encoder.json")
    args = ap.parse_args()
    try:
        import sentence_transformers
        from sentence_transformers import SentenceTransformer
    except ImportError:
        print("bench_encoder: sentence-transformers is not installed; "
              "run `pip install -e '.[bench]'` (or `make bench`)", file=sys.stderr)
        return 2
    import numpy as np
    import torch
    import transformers

    from fedrec.data.datasets import load_dataset
    from fedrec.data.encoder import TextEncoder, default_model_dir

    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model_dir or default_model_dir()
    texts = load_dataset(args.dataset).item_texts(TEMPLATE)
    load_start = os.getloadavg()[0]

    fedrec_enc = TextEncoder(model_dir, batch_size=args.batch_size)
    st = SentenceTransformer(model_dir, device="cpu")
    runs = {
        "fedrec": lambda: fedrec_enc.encode(texts),
        "sentence-transformers": lambda: st.encode(texts, batch_size=args.batch_size),
    }
    warm = {name: run() for name, run in runs.items()}  # first calls pay one-off set-up
    max_diff = float(np.abs(warm["fedrec"] - warm["sentence-transformers"]).max())
    wall = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    for r in range(args.repeats):
        for name in list(runs)[:: 1 if r % 2 == 0 else -1]:
            _, w, c = timed(runs[name])
            wall[name].append(round(w, 3))
            cpu[name].append(round(c, 3))
            print(f"  repeat {r + 1}/{args.repeats} {name:21s} {w:6.2f} s", flush=True)

    rate = {name: len(texts) / statistics.median(wall[name]) for name in runs}
    ratio = rate["fedrec"] / rate["sentence-transformers"]
    paired = statistics.median(s / f for f, s in zip(wall["fedrec"], wall["sentence-transformers"]))
    cpu_ratio = statistics.median(cpu["sentence-transformers"]) / statistics.median(cpu["fedrec"])
    cache = cache_check(texts, model_dir)

    print(f"\n{len(texts)} texts, {torch.get_num_threads()} torch threads, "
          f"{args.repeats} repeats, load average {load_start:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"{'encoder':21s} {'texts/s':>8s} {'wall s':>7s} {'cpu s':>7s}")
    for name in runs:
        print(f"{name:21s} {rate[name]:8.1f} {statistics.median(wall[name]):7.2f} "
              f"{statistics.median(cpu[name]):7.2f}")
    print(f"ratio fedrec / sentence-transformers: {ratio:.2f} (median of paired runs "
          f"{paired:.2f}, cpu time {cpu_ratio:.2f})")
    print(f"max abs difference of the embeddings: {max_diff:.2e}")
    print(f"embed_texts: cold {cache['cold_forward_passes']} forward passes in "
          f"{cache['cold_s']:.2f} s; warm cache {cache['warm_forward_passes']} forward passes in "
          f"{cache['warm_s']:.3f} s, identical: {cache['warm_equals_cold']}")

    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "cpu": _cpu_model(), "python": platform.python_version(),
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "sentence_transformers": sentence_transformers.__version__,
                    "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)],
                    "commit": _commit()},
        "texts": len(texts), "batch_size": args.batch_size, "repeats": args.repeats,
        "model_dir": model_dir,
        "wall_s": wall, "cpu_s": cpu,
        "texts_per_s": {name: round(v, 1) for name, v in rate.items()},
        "ratio": round(ratio, 3), "paired_ratio": round(paired, 3),
        "cpu_ratio": round(cpu_ratio, 3),
        "max_abs_diff": max_diff, "cache": cache,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")
    if max_diff >= 1e-5 or cache["warm_forward_passes"]:
        print("bench_encoder: fedrec's embeddings differ from sentence-transformers' or the "
              "warm cache ran the PLM", file=sys.stderr)
        return 1
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
