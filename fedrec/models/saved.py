"""A trained model on disk: the files a federated run directory and `fedrec train-central
--save-dir` both write, and what recommend, explain-eval, diversity-curve and audit read.

  run_config.json     the flat config of the run (every key)
  final.safetensors   the final federated parameters (float32)

User-local vectors are not among them: on devices they never leave, and a model whose
user state is one (FedMF) cannot rank from a run directory.
"""

import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from fedrec.config import Config, stored_config
from fedrec.data.pipeline import Prepared, prepare
from fedrec.errors import FedrecError
from fedrec.files import atomic_path
from fedrec.models.build import model_from_arrays
from fedrec.models.protocol import Recommender
from fedrec.results import write_json

FINAL, RUN_CONFIG = "final.safetensors", "run_config.json"


def save_params(path: str | Path, arrays: dict, dtype=np.float32) -> None:
    """Named arrays (numpy, or anything with .numpy()) to a safetensors file; dtype None
    keeps each array's own."""
    with atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(a.numpy() if hasattr(a, "numpy") else a, dtype=dtype)
                   for k, a in arrays.items()}, str(tmp))


def save_model(run_dir: str | Path, cfg: Config, model: Recommender) -> Path:
    """A run directory holding `model` (its config and final parameters)."""
    run_dir = Path(run_dir).expanduser()
    write_json(run_dir / RUN_CONFIG, cfg.to_flat())
    save_params(run_dir / FINAL, {k: v.detach() for k, v in model.state_dict().items()})
    return run_dir


def load_run(run_dir: str | Path) -> tuple[Config, dict[str, np.ndarray]]:
    """(config, federated parameters) of a finished run directory."""
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
    except (OSError, ValueError, SafetensorError) as exc:
        raise FedrecError(f"--model: cannot read '{run_dir}' ({str(exc).splitlines()[0]}); "
                          f"it needs {RUN_CONFIG} and {FINAL} from one run") from None
    return Config.from_flat(stored_config(saved)), params


def load_model(run_dir: str | Path, text_dim: int, n_items: int
               ) -> tuple[Config, Recommender]:
    """(config, the run's model) for a catalog of n_items and text_dim-wide text; refused
    for a model whose user vectors stay on the devices."""
    cfg, params = load_run(run_dir)
    return cfg, _model(run_dir, cfg, params, text_dim, n_items)


def _model(run_dir, cfg: Config, params: dict, text_dim: int, n_items: int) -> Recommender:
    try:
        model = model_from_arrays(cfg, text_dim, n_items, params)
    except RuntimeError as exc:
        raise FedrecError(f"--model: its parameters do not fit this catalog and PLM "
                          f"({n_items} items, {text_dim}-d text): "
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
    cfg, params = load_run(run_dir)
    p = prepare(cfg)
    return cfg, _model(run_dir, cfg, params, p.item_emb.shape[1], p.split.n_items), p
