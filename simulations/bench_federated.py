"""Benchmark of the federated simulation (real `flwr run`, one virtual SuperNode per user).

    .venv/bin/python simulations/bench_federated.py [--sizes 94,943] [--rounds 4]

For each clients-per-round size: wall time per round (rounds 2..R; round 1 includes Ray's
start-up), mean client update time, peak resident memory of the whole simulation process
tree (sum of RSS over the SuperLink, Ray and its actors, sampled every 0.5 s), and bytes
one client uploads per round next to the bytes of the full PLM (what full fine-tuning
would upload). Writes results/bench_federated.json (temp file, then rename).
"""

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedrec.config import load_config, parse_overrides
from fedrec.data.encoder import resolve_model_dir
from fedrec.data.pipeline import prepare
from fedrec.federation.simulate import find_processes, run_simulation
from fedrec.results import machine, write_json


def plm_bytes(model_dir: str) -> int:
    from safetensors import safe_open

    total = 0
    for f in resolve_model_dir(model_dir).glob("*.safetensors"):
        with safe_open(str(f), "np") as st:
            total += sum(st.get_tensor(k).nbytes for k in st.keys())  # noqa: SIM118 - safe_open is not iterable
    return total


def rss_bytes(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


class PeakRss(threading.Thread):
    def __init__(self, flwr_home: Path):
        super().__init__(daemon=True)
        self.flwr_home, self.peak, self.stop = flwr_home, 0, threading.Event()

    def run(self):
        """Sum of RSS every 0.5 s over the run's processes, found anew every 5 s: scanning
        every process's environment each sample took ~12% of a core from the run."""
        pids, found_at = [], -1e9
        while not self.stop.is_set():
            if time.monotonic() - found_at > 5.0:
                pids, found_at = find_processes(self.flwr_home), time.monotonic()
            self.peak = max(self.peak, sum(rss_bytes(p) for p in pids))
            self.stop.wait(0.5)


def bench(cfg, k: int, rounds: int, out: Path) -> dict:
    c = cfg.override(**{"fed.clients-per-round": k, "fed.num-rounds": rounds,
                        "fed.eval-every": 10 ** 6, "fed.server-lr-warmup": 0})  # a few rounds
    run_dir = out / f"k{k}"
    sampler = PeakRss(run_dir / ".flwr")
    sampler.start()
    t0 = time.time()
    res = run_simulation(c, run_dir=run_dir, log=lambda line: print(f"  [{k}] {line}"))
    sampler.stop.set()
    sampler.join()
    train = [r for r in res["rounds"] if "train" in r]
    times = np.diff([r["t"] for r in train])
    return {"clients_per_round": k, "rounds": rounds, "total_seconds": time.time() - t0,
            "round_seconds_mean": float(times.mean()), "round_seconds_all": times.tolist(),
            "client_update_seconds_mean": float(np.mean(
                [r["train"]["update-seconds-mean"] for r in train])),
            "peak_rss_bytes": sampler.peak,
            "upload_bytes_per_client": int(train[-1]["train"]["upload-bytes"]),
            "failures": int(sum(r["train"]["failures"] for r in train)),
            "load_average_after": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="94,943")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--run-config", default="", help="config overrides, key=value ...")
    ap.add_argument("--out", default="/tmp/fedrec-bench-federated")
    ap.add_argument("--json", default=str(ROOT / "results" / "bench_federated.json"))
    args = ap.parse_args()
    cfg = load_config(parse_overrides(args.run_config))
    prepare(cfg, progress=True)
    full = plm_bytes(cfg.encoder.model_dir)
    rows = [bench(cfg, int(k), args.rounds, Path(args.out)) for k in args.sizes.split(",")]
    print(f"\n{'clients/round':>13} {'s/round':>8} {'client update s':>16} {'peak RSS GiB':>13} "
          f"{'upload KiB':>11} {'full PLM MiB':>13} {'upload/PLM':>11}")
    for r in rows:
        r["plm_bytes"] = full
        r["upload_over_plm"] = r["upload_bytes_per_client"] / full
        print(f"{r['clients_per_round']:>13} {r['round_seconds_mean']:>8.2f} "
              f"{r['client_update_seconds_mean']:>16.4f} {r['peak_rss_bytes'] / 2**30:>13.2f} "
              f"{r['upload_bytes_per_client'] / 1024:>11.1f} {full / 2**20:>13.1f} "
              f"{r['upload_over_plm']:>11.2%}")
    write_json(args.json, {"command": " ".join(sys.argv), "config": cfg.to_flat(),
                           "rows": rows, "machine": machine()})


if __name__ == "__main__":
    main()
