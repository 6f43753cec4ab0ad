"""A trained model on disk: the files a federated run directory and `fedrec train-central
--save-dir` both write, and what recommend, explain-eval, diversity-curve and audit read.

  run_config.json     the flat config of the run (every key)
  final.safetensors   the final federated parameters (float32)
  catalog.json        the catalog's item ids in the order of the ID tables' rows, and which
                      of them were released (trained on); public catalog facts
  prior.json          model.kind = "profile": the DP release it was built on (public once
                      released), so the directory ranks wherever it is copied

User-local vectors are not among them: on devices they never leave, and a model whose
user state is one (FedMF) cannot rank from a run directory. A catalog that differs from
the training one (items added since, or fewer) is mapped by item id: a known item keeps
its ID rows, any other is scored through its text alone, as an unreleased item is
(fedrec.models.seqrec).
"""

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from fedrec.config import Config, stored_config
from fedrec.data.pipeline import Prepared, prepare
from fedrec.errors import FedrecError
from fedrec.files import atomic_path
from fedrec.models.build import id_tables, model_from_arrays
from fedrec.models.protocol import Recommender
from fedrec.results import write_json

FINAL, RUN_CONFIG, CATALOG = "final.safetensors", "run_config.json", "catalog.json"
PRIOR = "prior.json"


def save_params(path: str | Path, arrays: dict, dtype=np.float32) -> None:
    """Named arrays (numpy, or anything with .numpy()) to a safetensors file; dtype None
    keeps each array's own."""
    with atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(a.numpy() if hasattr(a, "numpy") else a, dtype=dtype)
                   for k, a in arrays.items()}, str(tmp))


def save_catalog(run_dir: str | Path, item_ids: list[str], released: np.ndarray) -> None:
    write_json(Path(run_dir) / CATALOG, {"items": list(item_ids),
                                         "released": [bool(x) for x in released]})


def save_config(run_dir: str | Path, cfg: Config) -> None:
    """run_config.json, and the profile model's release beside it (prior.json)."""
    run_dir = Path(run_dir).expanduser()
    write_json(run_dir / RUN_CONFIG, cfg.to_flat())
    if cfg.model.kind == "profile" and Path(cfg.model.prior).expanduser().resolve() != (
            run_dir / PRIOR).resolve():
        with atomic_path(run_dir / PRIOR) as tmp:
            shutil.copyfile(Path(cfg.model.prior).expanduser(), tmp)


def save_model(run_dir: str | Path, cfg: Config, model: Recommender,
               item_ids: list[str] | None = None, released: np.ndarray | None = None) -> Path:
    """A run directory holding `model` (its config, final parameters and, given item_ids
    and released, its catalog)."""
    run_dir = Path(run_dir).expanduser()
    save_config(run_dir, cfg)
    if item_ids is not None:
        save_catalog(run_dir, item_ids, released)
    save_params(run_dir / FINAL, {k: v.detach() for k, v in model.state_dict().items()})
    return run_dir


def load_run(run_dir: str | Path) -> tuple[Config, dict[str, np.ndarray], dict | None]:
    """(config, federated parameters, catalog record or None) of a finished run."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise FedrecError(f"--model: '{run_dir}' is not a run directory")
    if not (run_dir / FINAL).is_file():
        status = ""
        try:
            status = json.loads((run_dir / "results.json").read_text()).get("status", "")
        except (OSError, ValueError, AttributeError):
            pass
        why = f" (results.json says status '{status}')" if status else ""
        raise FedrecError(f"--model: '{run_dir}' has no {FINAL}{why}; pass the directory of a "
                          "completed run (fedrec simulate's run directory or fedrec "
                          "train-central --save-dir)")
    try:
        saved = json.loads((run_dir / RUN_CONFIG).read_text())
        params = load_file(str(run_dir / FINAL))
        catalog = (json.loads((run_dir / CATALOG).read_text())
                   if (run_dir / CATALOG).is_file() else None)
    except (OSError, ValueError, SafetensorError) as exc:
        raise FedrecError(f"--model: cannot read '{run_dir}' ({str(exc).splitlines()[0]}); "
                          f"it needs {RUN_CONFIG} and {FINAL} from one run") from None
    cfg = Config.from_flat(stored_config(saved))
    if cfg.model.kind == "profile" and (run_dir / PRIOR).is_file():  # its own copy
        cfg = cfg.override(**{"model.prior": str(run_dir / PRIOR)})
    return cfg, params, catalog


def for_catalog(cfg: Config, params: dict, trained: dict | None, item_ids: list[str]
                ) -> tuple[dict, np.ndarray]:
    """(params with the ID tables' rows in the order of item_ids, known [len(item_ids)]:
    the items with trained rows). Without a catalog record the rows are taken as given."""
    if trained is None:
        rows = next((a.shape[0] for k, a in params.items() if k.startswith(id_tables(cfg))),
                    len(item_ids))
        return params, np.ones(rows, bool)
    at = {iid: k for k, iid in enumerate(trained["items"])}
    pos = np.array([at.get(iid, -1) for iid in item_ids], np.int64)
    released = np.asarray(trained["released"], bool)
    known = (pos >= 0) & released[np.maximum(pos, 0)]
    out = {}
    for k, a in params.items():
        if k.startswith(id_tables(cfg)):
            a = np.where((pos >= 0)[:, None], a[np.maximum(pos, 0)], 0).astype(a.dtype)
        out[k] = a
    return out, known


def load_model(run_dir: str | Path, text_dim: int, item_ids: list[str],
               unreleased: np.ndarray | None = None) -> tuple[Config, Recommender]:
    """(config, the run's model) for a catalog of item_ids (and text_dim-wide text);
    unreleased: items the catalog marks as new. Refused for a model whose user vectors
    stay on the devices."""
    cfg, params, trained = load_run(run_dir)
    return cfg, _model(run_dir, cfg, params, trained, text_dim, item_ids, unreleased)


def _model(run_dir, cfg: Config, params: dict, trained: dict | None, text_dim: int,
           item_ids: list[str], unreleased: np.ndarray | None) -> Recommender:
    params, known = for_catalog(cfg, params, trained, item_ids)
    if unreleased is not None and len(known) == len(unreleased):
        known = known & ~np.asarray(unreleased, bool)
    try:
        model = model_from_arrays(cfg, text_dim, len(item_ids), params, known)
    except RuntimeError as exc:
        raise FedrecError(f"--model: its parameters do not fit this catalog and PLM "
                          f"({len(item_ids)} items, {text_dim}-d text): "
                          f"{str(exc).splitlines()[-1].strip()}; use the catalog and "
                          "encoder the run trained with") from None
    if model.user_dim:
        raise FedrecError(f"--model: '{run_dir}' trained model.kind '{cfg.model.kind}', whose "
                          "user vectors stay on the devices; this needs a model that reads "
                          "the user from the history (model.kind = 'seq')")
    return model


def load_for_dataset(run_dir: str | Path) -> tuple[Config, Recommender, Prepared]:
    """(config, model, Prepared) of a finished run on its own dataset and split, for
    evaluations of the trained model (explain-eval, diversity-curve, audit)."""
    cfg, params, trained = load_run(run_dir)
    p = prepare(cfg)
    model = _model(run_dir, cfg, params, trained, p.item_emb.shape[1], p.dataset.item_ids,
                   p.split.cold)
    return cfg, model, p
