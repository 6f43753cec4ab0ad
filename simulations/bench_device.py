"""Device-path benchmark: one client round in a fresh process, and `fedrec recommend`.

On a real SuperNode every message runs in a fresh ClientApp process, so a round costs
interpreter start + imports + reading the device's files + the embedding cache + the
local update. This script reproduces that on ml-100k with the bundled MiniLM:

- a device directory per benchmarked user (history.csv + items.csv, as `fedrec device
  prepare` writes it);
- each message (train, then evaluate) in a fresh `python` child that calls the real
  ClientApp handler with a node_config "data-dir"; wall time from spawn to exit and the
  child's peak RSS (os.wait4 -> ru_maxrss); the first train message runs with an empty
  embedding cache (the PLM encodes the catalog once), the others with a warm one;
- `fedrec recommend` latency (top-k with leave-one-out reasons, and again re-ranked by MMR
  at --diversity): the median of repeated calls to fedrec.ranking.recommend once the cache
  exists (the parameters are the ones the benchmarked round returned).

    python simulations/bench_device.py [--users median,max] [--repeats 30] [--out results/bench_device.json]
    python simulations/bench_device.py --run-config "model.item-features='text,graph'" --out results/bench_device-graph.json

Targets (issues 5, 15): a client round under 15 s, peak RSS under 1 GB, top-10 with
reasons under 100 ms. With graph features each device directory also holds the catalog's
graph.csv (as `fedrec device prepare` writes it), and the reasons name shared facts.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGETS = {"round_s": 15.0, "peak_rss_mb": 1024.0, "recommend_ms": 100.0}


def child(kind: str, device: str, arrays_path: str, config_path: str, out_path: str) -> None:
    """One message in this fresh process, as a SuperNode's flwr-clientapp would run it."""
    t0 = time.perf_counter()
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    from safetensors.numpy import load_file, save_file

    import clients.app

    t_import = time.perf_counter() - t0
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    arrays = ArrayRecord({k: Array(v) for k, v in load_file(arrays_path).items()})
    run_config = json.loads(Path(config_path).read_text())
    ctx = Context(run_id=1, node_id=1, node_config={"data-dir": device}, state=RecordDict(),
                  run_config=run_config)
    msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=1, message_type=kind)
    t1 = time.perf_counter()
    handler = clients.app.train if kind == "train" else clients.app.evaluate
    reply = handler(msg, ctx)
    t_handler = time.perf_counter() - t1
    metrics = {k: v for k, v in reply.content["metrics"].items()}
    if kind == "train":
        save_file({k: a.numpy() for k, a in reply.content["arrays"].items()}, out_path)
    Path(out_path + ".json").write_text(json.dumps(
        {"import_s": t_import, "handler_s": t_handler, "metrics": metrics}))


def run_child(kind: str, device: Path, arrays: Path, config: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", kind, str(device), str(arrays),
                             str(config), str(out)], cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{kind} child failed with exit code {proc.returncode}")
    inner = json.loads(Path(str(out) + ".json").read_text())
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, **inner}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", default="median,max",
                    help="ml-100k user ids, or median/max (by history length)")
    ap.add_argument("--repeats", type=int, default=30, help="recommend calls to time")
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--diversity", type=float, default=0.08, help="MMR weight also timed")
    ap.add_argument("--work", default="", help="scratch directory (default: a temp dir)")
    ap.add_argument("--run-config", default="", help="config overrides, e.g. "
                    "\"model.item-features='text,graph'\"")
    ap.add_argument("--out", default=str(REPO / "results" / "bench_device.json"))
    args = ap.parse_args()

    import numpy as np
    import torch
    from safetensors.numpy import save_file

    from fedrec.config import load_config, parse_overrides
    from fedrec.data.datasets import load_dataset
    from fedrec.data.device import CACHE_DIR, Catalog, copy_graph, text_dim, write_device_dir
    from fedrec.data.encoder import resolve_model_dir
    from fedrec.models.build import build_model
    from fedrec.ranking.recommend import recommend
    from fedrec.results import command_line, machine, write_json

    cfg = load_config().override(**parse_overrides(args.run_config))
    ds = load_dataset(cfg.data.dataset, cfg.data.cache_dir)
    lengths = np.bincount(ds.users, minlength=ds.n_users)
    order = np.argsort(lengths, kind="stable")
    named = {"median": ds.user_ids[order[len(order) // 2]], "max": ds.user_ids[order[-1]]}
    users = [named.get(u.strip(), u.strip()) for u in args.users.split(",") if u.strip()]
    work = Path(args.work or tempfile.mkdtemp(prefix="fedrec-bench-device-"))
    work.mkdir(parents=True, exist_ok=True)
    cat = Catalog(ds.item_ids, ds.item_fields, np.zeros(ds.n_items, bool), ds.source)

    config = work / "run_config.json"
    config.write_text(json.dumps(cfg.to_flat()))
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, text_dim(cfg), ds.n_items)
    init = work / "init.safetensors"
    save_file({k: v.numpy().copy() for k, v in model.state_dict().items()}, str(init))
    plm = cfg.encoder.model_dir or "all-MiniLM-L6-v2 (bundled)"
    print(f"ml-100k, PLM {plm}, model {cfg.model.kind} ({cfg.model.item_features}) "
          f"(dim {cfg.model.dim}, hidden {cfg.model.hidden}), load {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores; scratch {work}")

    rows, warm_cache, trained = [], None, None
    for n, user in enumerate(users):
        uidx = ds.user_ids.index(user)
        mask = ds.users == uidx
        dev = write_device_dir(work / f"device-{user}", cat,
                               [ds.item_ids[i] for i in ds.items[mask]], ds.times[mask].tolist())
        shutil.rmtree(dev / CACHE_DIR, ignore_errors=True)
        copy_graph(cfg, ds, dev)
        row = {"user": user, "history": int(mask.sum())}
        out = work / f"reply-{user}.safetensors"
        if warm_cache is None:  # first device: the PLM encodes the catalog in this round
            row["train_cold_cache"] = run_child("train", dev, init, config, out)
            warm_cache = dev / CACHE_DIR
        else:
            shutil.copytree(warm_cache, dev / CACHE_DIR)
        row["train"] = run_child("train", dev, init, config, out)
        row["evaluate"] = run_child("evaluate", dev, out, config, work / f"eval-{user}")
        trained = trained or (out, dev)
        rows.append(row)
        for key in ("train_cold_cache", "train", "evaluate"):
            if key in row:
                r = row[key]
                print(f"user {user:>4} ({row['history']:3d} interactions) {key:16s} "
                      f"wall {r['wall_s']:6.2f}s (imports {r['import_s']:.2f}s, handler "
                      f"{r['handler_s']:.2f}s)  peak RSS {r['peak_rss_mb']:6.0f} MB")

    run = work / "run"  # the parameters of the first device's round, as a finished run
    run.mkdir(exist_ok=True)
    shutil.copy(trained[0], run / "final.safetensors")
    shutil.copy(config, run / "run_config.json")
    for row in rows:  # every benchmarked user's history, cache warm
        history = work / f"device-{row['user']}" / "history.csv"
        recommend(history, run, args.k)  # warm-up: page cache, lazy imports
        for key, lam in (("recommend", 0.0), ("recommend_diverse", args.diversity)):
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                recs = recommend(history, run, args.k, diversity=lam)
                times.append((time.perf_counter() - t0) * 1000)
            row[key] = {"k": args.k, "diversity": lam, "repeats": args.repeats,
                        "median_ms": statistics.median(times),
                        "p90_ms": float(np.percentile(times, 90)), "min_ms": min(times),
                        "top": [r.item for r in recs],
                        "reasons": [[iid for iid, _, _ in r.because] for r in recs],
                        "reasons_text": [r.reasons_text for r in recs]}
            print(f"user {row['user']:>4} fedrec recommend top-{args.k} with reasons, "
                  f"diversity {lam:g}: median {row[key]['median_ms']:.1f} ms, p90 "
                  f"{row[key]['p90_ms']:.1f} ms over {args.repeats} calls (cache warm)")

    rounds = [r[k] for r in rows for k in ("train", "evaluate")]
    worst = {"round_s": max(r["wall_s"] for r in rounds),
             "peak_rss_mb": max(r[k]["peak_rss_mb"] for r in rows for k in r
                                if isinstance(r[k], dict) and "peak_rss_mb" in r[k]),
             "recommend_ms": max(r[k]["median_ms"] for r in rows
                                 for k in ("recommend", "recommend_diverse"))}
    met = {k: worst[k] < TARGETS[k] for k in TARGETS}
    print("targets: " + ", ".join(f"{k} {worst[k]:.1f} < {TARGETS[k]:g}: "
                                  f"{'met' if ok else 'MISSED'}" for k, ok in met.items()))
    write_json(args.out, {"benchmark": "device", "command": command_line(), "dataset": ds.name,
                          "plm": plm, "plm_dir": str(resolve_model_dir(cfg.encoder.model_dir)),
                          "config": cfg.to_flat(), "load_avg_1m": os.getloadavg()[0],
                          "users": rows, "worst": worst, "targets": TARGETS,
                          "targets_met": met, "machine": machine()})
    print(f"wrote {args.out}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:7])
    else:
        main()
