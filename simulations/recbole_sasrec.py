"""An independent reference: RecBole's SASRec on the project's own split, scored by the
project's evaluation. Not part of `make test`; RecBole is never a dependency of fedrec.

    .venv/bin/python simulations/recbole_sasrec.py --seeds 0 --json results/recbole-sasrec.json

1. Exports the split of the default config (`fedrec.data.pipeline.prepare`: the same
   users, tie order, cold items) as one RecBole atomic file: each evaluated user's
   training history, then the validation item, then the test item, at increasing
   timestamps. RecBole's leave-one-out split ({'LS': 'valid_and_test'}, time order) then
   holds out exactly the project's validation and test items.
2. Creates a throwaway virtual environment (default runs/recbole/venv) with RecBole 1.2.1
   and the versions of torch, numpy, pandas and scipy it still runs with (PINS), and
   trains RecBole's own
   SASRec there with the settings below, early-stopped on its validation HR@10 (its own
   full ranking, as RecBole selects models), one seed per process.
3. Reads back RecBole's scores for every item at each user's test input (checked to be
   the project's input: training history + validation item) and evaluates them with
   `fedrec.data.evaluate.evaluate`, like every other row: input items excluded, ties
   against the model. RecBole's own test number ranks the history items too and is not
   comparable.

Writes a result file like the other rows (method "recbole-sasrec"; per seed the test
metrics and RecBole's best epoch).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedrec.config import load_config, parse_overrides
from fedrec.data.evaluate import evaluate
from fedrec.data.pipeline import list_spaces, prepare
from fedrec.experiments.runs import seed_results
from fedrec.results import write_result

# torch 2.13 needs a newer setuptools than ray 2.6 (RecBole's) can import: torch 2.12.
PINS = ["recbole==1.2.1", "torch==2.12.1", "numpy<2", "pandas<2.2", "scipy<1.12",
        "setuptools<70"]
DATASET = "fedrec-split"

# RecBole's SASRec as its documentation sets it up for ml-100k-sized data, with full
# softmax cross-entropy (no negative sampling) and the project's max length.
SETTINGS = {
    "n_layers": 2, "n_heads": 1, "hidden_size": 64, "inner_size": 256,
    "hidden_dropout_prob": 0.2, "attn_dropout_prob": 0.2, "hidden_act": "gelu",
    "layer_norm_eps": 1e-12, "initializer_range": 0.02, "loss_type": "CE",
    "train_neg_sample_args": None, "learning_rate": 1e-3, "train_batch_size": 256,
    "MAX_ITEM_LIST_LENGTH": 50, "epochs": 200, "stopping_step": 10,
    "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full",
                  "group_by": "user"},
    "metrics": ["Hit", "NDCG"], "topk": [10], "valid_metric": "hit@10",
    "eval_batch_size": 4096, "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id",
    "TIME_FIELD": "timestamp", "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
    "use_gpu": False, "show_progress": False, "worker": 0, "reproducibility": True,
    "save_dataset": False, "save_dataloaders": False,
}

# Runs inside the RecBole environment: train one seed, dump the test inputs and scores.
TRAIN = r'''
import json, sys, time
import numpy as np, torch
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.model.sequential_recommender import SASRec
from recbole.trainer import Trainer
from recbole.utils import init_logger, init_seed

work, seed, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
settings = json.load(open(f"{work}/settings.json"))
settings.update(seed=seed, data_path=work, checkpoint_dir=f"{work}/seed-{seed}")
config = Config(model="SASRec", dataset="DATASET", config_dict=settings)
init_seed(seed, True)
init_logger(config)  # RecBole's per-epoch log, under <work>/log
ds = create_dataset(config)
train, valid, test = data_preparation(config, ds)
model = SASRec(config, train.dataset).to(config["device"])
trainer = Trainer(config, model)
t0 = time.time()
_, best_valid = trainer.fit(train, valid, saved=True, show_progress=False)
seconds = time.time() - t0
checkpoint = torch.load(trainer.saved_model_file, weights_only=False)
model.load_state_dict(checkpoint["state_dict"])
model.eval()
item_tokens = ds.id2token("item_id", np.arange(ds.item_num))  # column 0: RecBole's padding
users, inputs, scores = [], [], []
with torch.no_grad():
    for inter, _, _, _ in test:
        s = model.full_sort_predict(inter.to(config["device"])).view(len(inter), -1)
        users += ds.id2token("user_id", inter["user_id"].numpy()).tolist()
        for seq, n in zip(inter["item_id_list"].numpy(), inter["item_length"].numpy()):
            inputs.append([int(t) for t in item_tokens[seq[:n]]])
        scores.append(s.numpy())
scores = np.concatenate(scores)
order = np.array([int(t) for t in item_tokens[1:]])  # project index of each RecBole column
# An item RecBole never saw (no interaction in the file) has no row: it ranks last.
n_items = int(sys.argv[4])
out = np.repeat(scores[:, 1:].min(1, keepdims=True) - 1.0, n_items, 1).astype(np.float32)
out[:, order] = scores[:, 1:]
np.save(f"{work}/scores-{seed}.npy", out)
import recbole
json.dump({"users": [int(u) for u in users], "inputs": inputs,
           "versions": {"recbole": recbole.__version__, "torch": torch.__version__},
           "best_epoch": int(checkpoint["epoch"]) + 1,
           "best_valid": {k: float(v) for k, v in best_valid.items()},
           "train_seconds": seconds},
          open(f"{work}/meta-{seed}.json", "w"))
'''


def export(split, work: Path) -> None:
    """The split as RecBole's atomic .inter file (every evaluated user)."""
    data = work / DATASET
    data.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for u in split.eval_users("test"):
        seq = [*split.history(u).tolist(), int(split.val[u]), int(split.test[u])]
        lines += [f"{u}\t{i}\t{t}" for t, i in enumerate(seq, 1)]
    tmp = data / f"{DATASET}.inter.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(data / f"{DATASET}.inter")


def ensure_venv(venv: Path) -> Path:
    py = venv / "bin" / "python"
    stamp = venv / ".installed"
    if not stamp.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "--quiet", *PINS], check=True)
        stamp.write_text(" ".join(PINS) + "\n")
    return py


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0", help="comma-separated RecBole seeds")
    ap.add_argument("--run-config", default="", help="project config overrides (the split)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "recbole"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads for RecBole")
    ap.add_argument("--epochs", type=int, default=SETTINGS["epochs"])
    ap.add_argument("--json", default=str(ROOT / "results" / "recbole-sasrec.json"))
    args = ap.parse_args()
    cfg = load_config(parse_overrides(args.run_config))
    p = prepare(cfg)
    split = p.split
    work = Path(args.work).resolve()
    export(split, work)
    (work / "settings.json").write_text(json.dumps({**SETTINGS, "epochs": args.epochs}))
    (work / "train_recbole.py").write_text(TRAIN.replace("DATASET", DATASET))
    py = ensure_venv(work / "venv")
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1",
           "OMP_NUM_THREADS": str(args.threads)}
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        t0 = time.time()
        with open(work / f"seed-{seed}.log", "w") as log:
            subprocess.run([str(py), str(work / "train_recbole.py"), str(work), str(seed),
                            str(args.threads), str(split.n_items)], check=True, env=env, cwd=work, stdout=log,
                           stderr=subprocess.STDOUT)
        meta = json.loads((work / f"meta-{seed}.json").read_text())
        scores = np.load(work / f"scores-{seed}.npy")
        row = {u: k for k, u in enumerate(meta["users"])}
        users = split.eval_users("test")
        if sorted(row) != sorted(users.tolist()):
            raise SystemExit("RecBole evaluated other users than the project's test users")

        def score(ub, inputs, scores=scores, row=row, meta=meta):
            for u, x in zip(ub, inputs):
                if meta["inputs"][row[int(u)]] != x.tolist()[-SETTINGS["MAX_ITEM_LIST_LENGTH"]:]:
                    raise SystemExit(f"user {u}: RecBole's test input is not the project's")
            return scores[[row[int(u)] for u in ub]].astype(np.float64)

        test = evaluate(score, split, spaces=list_spaces(cfg, p))
        runs.append({"seed": seed, "best": test, "final": test,
                     "recbole-best-epoch": meta["best_epoch"],
                     "recbole-best-valid": meta["best_valid"],
                     "recbole-train-seconds": meta["train_seconds"],
                     "wall-seconds": time.time() - t0})
        print(f"seed {seed}: full HR@10 {test['full/hr@10']:.4f}, NDCG@10 "
              f"{test['full/ndcg@10']:.4f} ({meta['train_seconds'] / 60:.0f} min of training)")
        body = seed_results("recbole-sasrec", cfg, runs)  # rewritten after every seed
        body["seed_kind"] = "RecBole seed"
        body["recbole"] = {"versions": meta["versions"], "pins": PINS, "settings": SETTINGS}
        write_result(args.json, body)


if __name__ == "__main__":
    main()
