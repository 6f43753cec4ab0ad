"""A federated run's directory: config, per-round metrics, checkpoints, final parameters.

Layout (every file written to a temp name, then renamed):
  run_config.json          the flat config of the run
  results.json             per-round records + summary (status "running" -> "completed");
                           rewritten at the end of every round. A round's "train" record
                           holds the aggregated client metrics and "clients" (replies
                           aggregated), "failures" and "failures/<reason>" (dropped,
                           by fedrec/federation/replies.py's reasons), "kept-previous"
                           (1: too few valid replies, the global model stayed),
                           "update-norm-median"/"-max" (of the valid updates, before
                           bounding) and "clipped" (updates bounded by
                           fed.max-update-norm); its "evaluate" record counts the same way
  metrics.csv              one row per round
  checkpoints/round-NNNN.safetensors   the global federated parameters after round NNNN
                           (as aggregated, or kept), exact dtype: what a resumed run sends
  checkpoints/round-NNNN.server.safetensors   server optimizer state (FedAdam), if any
  final.safetensors        the final federated parameters (float32)
  devices/<partition-id>/  simulated devices' own disks (fedrec.federation.local_store)

A killed run resumes (fed.resume = true, `fedrec simulate --resume RUN_DIR`) from the
last round results.json holds: its checkpoint, server state and records; the rounds
after it are run again, numbered on. A non-private run, killed or completed, can also be
extended to more rounds (`--resume RUN_DIR --rounds N`): nothing but DP noise depends on
the planned number of rounds, so it ends exactly where a fresh N-round run would. The
server state (fedrec/federation/server_state.py: FedAdam's moments, the per-device ε table) comes
back with the checkpoint; every device, simulated or real, restores its user-local state
and DP-SGD accountant history from its own disk (fedrec/federation/local_store.py), so each
device's ε continues. A deployment survives a SuperLink restart the same way: restart
the SuperLink on its --database, the SuperNodes reconnect, and `flwr run` the same run
config with fed.resume = true (tests/test_deploy.py kills and restarts one).
"""

import csv
import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord
from safetensors.numpy import load_file

from fedrec.config import Config, run_identity
from fedrec.data.device import read_catalog, text_dim
from fedrec.data.evaluate import evaluate
from fedrec.data.pipeline import list_spaces, prepare
from fedrec.errors import FedrecError
from fedrec.files import data_home, write_text_atomic
from fedrec.models.build import build_model, model_from_arrays
from fedrec.models.saved import FINAL, save_catalog, save_config, save_params
from fedrec.models.train import scorer
from fedrec.models.warm_start import warm_start
from fedrec.privacy.accounting import describe
from fedrec.privacy.accounting import label as privacy_label
from fedrec.results import SELECT as SELECT_KEY
from fedrec.results import write_json

SELECT = f"val/{SELECT_KEY}"  # model selection: validation only


def run_dir_for(cfg: Config) -> Path:
    """A federated run's directory: fed.run-dir, else <cache>/runs/<time>-<model kind>."""
    if cfg.fed.run_dir:
        return Path(cfg.fed.run_dir).expanduser()
    return data_home(cfg.data.cache_dir) / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.model.kind}"


class FederatedRun:
    def __init__(self, cfg: Config, log=print):
        self.cfg, self.log = cfg, log
        self.dir = run_dir_for(cfg)
        (self.dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_config(self.dir, cfg)
        if not cfg.fed.resume:  # a fresh run: no earlier run's device state may leak in
            shutil.rmtree(self.dir / "devices", ignore_errors=True)
        # A deployment's server knows the public catalog only (the histories stay on the
        # devices): it needs the item count and the PLM width, and evaluates nothing itself.
        self.deployed = cfg.fed.min_nodes > 0
        if self.deployed:
            self.prepared = None
            catalog = read_catalog(cfg.data.dataset, cfg.data.cache_dir)
            save_catalog(self.dir, catalog.item_ids, ~catalog.cold)
            self.n_items = catalog.n_items
            self.text_dim = text_dim(cfg)
        else:  # simulation: encode the catalog once here, before any client asks for it
            self.prepared = prepare(cfg)
            save_catalog(self.dir, self.prepared.dataset.item_ids, self.prepared.split.released)
            self.n_items = self.prepared.split.n_items
            self.text_dim = self.prepared.item_emb.shape[1]
        self.rounds: dict[int, dict] = {}
        self.t0 = time.time()

    @property
    def population(self) -> int:
        """Devices every round waits for: fed.min-nodes, or one virtual node per user."""
        return self.cfg.fed.min_nodes if self.deployed else self.prepared.split.n_users

    def initial_arrays(self) -> ArrayRecord:
        torch.manual_seed(self.cfg.train.seed)
        model = build_model(self.cfg, self.text_dim, self.n_items)
        if self.cfg.model.public_warm_start:  # simulation only (config): public data, no budget
            p = self.prepared
            warm_start(model, self.cfg, p.item_emb, p.dataset.item_fields, p.split.released,
                       self.log)
        return _to_record({k: v.numpy() for k, v in model.state_dict().items()})

    def is_eval_round(self, rnd: int) -> bool:
        return rnd == self.cfg.fed.num_rounds or rnd % self.cfg.fed.eval_every == 0

    def record(self, rnd: int, key: str, metrics: dict) -> None:
        row = self.rounds.setdefault(rnd, {"round": rnd})
        row[key] = {k: float(v) for k, v in metrics.items()}
        row.setdefault("t", time.time() - self.t0)  # seconds since start when the round trained

    def on_train(self, rnd: int, arrays: ArrayRecord | dict, metrics: dict,
                 server_state: dict | None = None) -> None:
        """Record round `rnd`'s training (metrics include "clients" and "failures") and
        checkpoint the global arrays after it, aggregated or kept."""
        self.record(rnd, "train", metrics)
        ckpt = self.dir / "checkpoints"
        save_params(ckpt / f"round-{rnd:04d}.safetensors", arrays, dtype=None)
        if server_state:
            save_params(ckpt / f"round-{rnd:04d}.server.safetensors", server_state, dtype=None)

    def resume(self) -> tuple[int, ArrayRecord, dict]:
        """(last completed round, the global arrays after it, server state) of this run
        directory's killed run; its records up to that round become this run's."""
        path = self.dir / "results.json"
        if not path.is_file():
            raise FedrecError(f"{self.dir}: no results.json, so no round to resume from")
        res = load_json(path)
        then, now = run_identity(res.get("config", {})), run_identity(self.cfg.to_flat())
        rounds = "fed.num-rounds"
        if then.get(rounds, 0) < now[rounds]:  # extended: the same run, more rounds ahead
            if self.cfg.privacy.mode != "none":
                raise FedrecError(f"{self.dir}: a private run cannot be extended past its "
                                  f"planned {then[rounds]} rounds (its noise was set for them); "
                                  "start a new run with more fed.num-rounds")
            if self.cfg.fed.server_lr_decay != "none":
                raise FedrecError(f"{self.dir}: its server lr decays to 0 at round "
                                  f"{then[rounds]}, so it cannot be extended; start a new "
                                  "run with more fed.num-rounds")
            then[rounds] = now[rounds]
        if then != now:
            diff = sorted(k for k in then.keys() | now.keys() if then.get(k) != now.get(k))
            raise FedrecError(f"{self.dir}: cannot resume with a different config "
                              f"({', '.join(diff[:5])}); resume with the run's own config")
        rows = {int(r["round"]): r for r in res.get("rounds", [])}
        done = max((r for r in rows if r >= 1 and "train" in rows[r]), default=0)
        if done > self.cfg.fed.num_rounds:
            raise FedrecError(f"{self.dir}: has {done} rounds, more than fed.num-rounds")
        if done == 0:
            arrays, state = self.initial_arrays(), {}
        else:
            ckpt = self.dir / "checkpoints" / f"round-{done:04d}.safetensors"
            if not ckpt.is_file():
                raise FedrecError(f"{ckpt} is missing; cannot resume after round {done}")
            arrays = _to_record(load_file(str(ckpt)))
            server = ckpt.with_name(f"round-{done:04d}.server.safetensors")
            state = load_file(str(server)) if server.is_file() else {}
        self.rounds = {r: row for r, row in rows.items() if r <= done}
        self.t0 = time.time() - float(res.get("seconds", 0.0))
        self.log(f"resuming {self.dir} after round {done} of {self.cfg.fed.num_rounds}")
        return done, arrays, state

    def evaluate_fn(self, done_rounds: int = 0):
        """Flower's evaluate_fn for a run continuing after `done_rounds` (0: a fresh run):
        rounds are numbered on, and the initial model is evaluated only by a fresh run."""
        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if done_rounds and server_round == 0:
                return None
            return self.server_evaluate(server_round + done_rounds, arrays)
        return evaluate

    def server_evaluate(self, rnd: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Global-model metrics on all users (simulation only: the server holds the split;
        in a deployment only the devices evaluate).

        User vectors come from each history through the federated encoder; a model whose
        user state is a user-local vector (FedMF) has none here: only the devices
        evaluate it.
        """
        out, model = None, None
        if not self.deployed and (rnd == 0 or self.is_eval_round(rnd)):
            split = self.prepared.split
            model = model_from_arrays(self.cfg, self.prepared.item_emb.shape[1],
                                      split.n_items, arrays, split.released)
        if model is not None and not model.user_dim:
            split, E = self.prepared.split, torch.from_numpy(self.prepared.item_emb)
            m = evaluate(scorer(model, E), split, "test",
                         spaces=list_spaces(self.cfg, self.prepared))
            self.record(rnd, "server", m)
            out = MetricRecord({k: float(v) for k, v in m.items()})
        self._log_round(rnd)
        self.flush("running")
        return out

    def _log_round(self, rnd: int) -> None:
        r = self.rounds.get(rnd, {})
        elapsed, total = time.time() - self.t0, self.cfg.fed.num_rounds
        parts = [f"round {rnd:4d}/{total}", f"{elapsed:7.1f}s"]
        if 0 < rnd < total:  # rounds so far include their evaluations: a fair average
            parts.append(f"~{elapsed / rnd * (total - rnd) / 60:.1f} min left")
        if "train" in r:
            t = r["train"]
            parts.append(f"clients {int(t['clients'])} (failed {int(t['failures'])}) "
                         f"loss {t.get('train-loss', float('nan')):.4f}")
            if "epsilon-max" in t:
                parts.append(f"{privacy_label(self.cfg)} max {t['epsilon-max']:.3f} "
                             f"mean {t['epsilon-mean']:.3f}")
        for key, label in (("federated", "fed"), ("server", "server")):
            if key in r:
                parts.append(f"{label} HR@10 {r[key]['sampled/hr@10']:.4f} "
                             f"NDCG@10 {r[key]['sampled/ndcg@10']:.4f}")
        self.log("  ".join(parts))

    def summary(self) -> dict:
        evals = [r for r in self.rounds.values() if "federated" in r]
        if not evals:
            return {}
        final = max(evals, key=lambda r: r["round"])
        best = final if self.cfg.fed.select == "last" else max(
            evals, key=lambda r: (r["federated"].get(SELECT, -1.0), -r["round"]))
        def pick(r: dict) -> dict:  # the devices' metrics; list diversity from the server's
            div = {k: v for k, v in r.get("server", {}).items() if k.startswith("div/")}
            return {**div, **{k: v for k, v in r["federated"].items() if not k.startswith("val/")}}
        return {"best_round": best["round"], "best": pick(best), "final_round": final["round"],
                "final": pick(final)}

    def flush(self, status: str) -> None:
        rows = [self.rounds[k] for k in sorted(self.rounds)]
        write_json(self.dir / "results.json", {"status": status, "config": self.cfg.to_flat(),
                                               "privacy": describe(self.cfg),
                                               **({"stopped": self.stopped}
                                                  if getattr(self, "stopped", "") else {}),
                                               "seconds": time.time() - self.t0,
                                               "rounds": rows, "summary": self.summary()})
        flat = [{"round": r["round"], **{f"{sec}/{k}": v
                                          for sec in ("train", "evaluate", "federated", "server")
                                          for k, v in r.get(sec, {}).items()}} for r in rows]
        cols = sorted({c for row in flat for c in row}, key=lambda c: (c != "round", c))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        w.writerows(flat)
        write_text_atomic(self.dir / "metrics.csv", buf.getvalue())

    def finish(self, arrays: ArrayRecord, stopped: str = "") -> None:
        """stopped: why training ended early (status "stopped", the reason in results.json)."""
        if len(arrays):
            save_params(self.dir / FINAL, arrays)
        self.stopped = stopped
        self.flush("stopped" if stopped else "completed")
        self.log(f"run directory: {self.dir}")


def _to_record(params: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in params.items()})


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
