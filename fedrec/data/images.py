"""Bring-your-own item images: a frozen Hugging Face vision encoder, cached per image file.

The mapping is a CSV ``item,image`` (``data.images``; paths relative to the CSV's
directory). Any vision encoder saved with save_pretrained works (``encoder.vision-dir``:
a CLIP vision tower, a ViT, ...): its pooled output (``pooler_output``, else the mean of
the last hidden states), L2-normalised. Embeddings are cached on disk keyed by (encoder
fingerprint, sha256 of the image file's bytes), exactly as item texts are
(fedrec.data.encoder): a changed file or encoder is re-encoded, anything else is read
back with no forward pass. Items without an image get a zero row (scored from their other
features); a missing or unreadable image named in the mapping is an error naming the
mapping file and line.
"""

import csv
import hashlib
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from fedrec.data.encoder import EmbeddingCache, StatMemo, _progress, cached_fingerprint
from fedrec.errors import FedrecError


def vision_dir(path: str) -> Path:
    p = Path(path).expanduser()
    if not path or not (p / "config.json").is_file():
        raise FedrecError(f"encoder.vision-dir: '{path}' is not a Hugging Face model directory "
                          "(no config.json); pass a vision encoder saved with save_pretrained "
                          "(e.g. a CLIP vision tower) to use model.item-features image")
    return p


def vision_width(path: str) -> int:
    """The width of the encoder's pooled output, read from its config.json."""
    return _width(str(vision_dir(path)))


@lru_cache(maxsize=8)
def _width(path: str) -> int:
    conf = json.loads((Path(path) / "config.json").read_text())
    conf = conf.get("vision_config", conf)
    for key in ("hidden_size", "hidden_sizes", "embed_dim"):
        v = conf.get(key)
        if isinstance(v, list) and v:
            v = v[-1]
        if isinstance(v, int):
            return v
    raise FedrecError(f"{path}/config.json: no hidden_size; cannot tell the image embedding "
                      "width")


def read_image_map(path: str | Path, item_ids: list[str]) -> dict[str, tuple[Path, int]]:
    """item id -> (image file, its line) from the CSV `item,image`. Errors name the file
    and line."""
    f = Path(path).expanduser()
    if not f.is_file():
        raise FedrecError(f"data.images: '{f}' is not a file; give a CSV with columns "
                          "item,image")
    try:
        return _read_image_rows(f, set(item_ids))
    except UnicodeDecodeError as exc:
        raise FedrecError(f"{f}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except csv.Error as exc:
        raise FedrecError(f"{f}: unreadable as CSV ({exc}); fix the file") from None


def _read_image_rows(f: Path, known: set[str]) -> dict[str, tuple[Path, int]]:
    out = {}
    with open(f, newline="", encoding="utf-8") as fh:
        rows = csv.reader(fh)
        header = [h.strip() for h in next(rows, [])]
        if header[:2] != ["item", "image"]:
            raise FedrecError(f"{f}:1: header is {','.join(header) or 'empty'}; expected "
                              "item,image")
        for n, row in enumerate(rows, start=2):
            if not row:
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise FedrecError(f"{f}:{n}: expected item,image, got {','.join(row)[:60]}")
            item, image = row[0].strip(), (f.parent / row[1].strip()).resolve()
            if item not in known:
                raise FedrecError(f"{f}:{n}: item '{item}' is not in the catalog; fix the id "
                                  "or drop the line")
            if not image.is_file():
                raise FedrecError(f"{f}:{n}: image '{row[1].strip()}' does not exist "
                                  f"(looked for {image}); fix the path or drop the line")
            out[item] = (image, n)
    return out


class ImageEncoder:
    """A frozen vision encoder with its image processor; pooled, L2-normalised output."""

    def __init__(self, path: str, batch_size: int = 32):
        from transformers import AutoImageProcessor, AutoModel  # lazy: a cache miss only

        self.path = vision_dir(path)
        try:
            self.processor = AutoImageProcessor.from_pretrained(self.path)
            self.model = AutoModel.from_pretrained(self.path).eval()
        except (OSError, ValueError) as exc:
            raise FedrecError(f"encoder.vision-dir: cannot load '{self.path}' "
                              f"({str(exc).splitlines()[0]})") from None
        self.model.requires_grad_(False)
        self.batch_size, self.forward_passes = batch_size, 0

    @torch.inference_mode()
    def encode(self, images: list, progress: bool = False) -> np.ndarray:
        """PIL images [N] -> float32 [N, width], unit L2 norm, in the input order."""
        out = []
        for i in _progress(list(range(0, len(images), self.batch_size)), "encoding images",
                           progress):
            batch = self.processor(images=images[i:i + self.batch_size], return_tensors="pt")
            res = self.model(pixel_values=batch["pixel_values"])
            pooled = getattr(res, "pooler_output", None)
            if pooled is None or pooled.dim() != 2:
                hidden = res.last_hidden_state
                pooled = hidden.mean(1) if hidden.dim() == 3 else hidden.flatten(2).mean(-1)
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).numpy())
            self.forward_passes += 1
        return np.concatenate(out) if out else np.zeros((0, vision_width(str(self.path))),
                                                         np.float32)


def _digest(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _load_image(path: Path, where: str):
    from PIL import Image, UnidentifiedImageError  # lazy: only a cache miss reads images

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise FedrecError(f"{where}: cannot read image '{path}' ({str(exc).splitlines()[0]}); "
                          "replace the file or drop the line") from None


def image_table(mapping_file: str, item_ids: list[str], vision: str, cache_root: Path,
                batch_size: int = 32, progress: bool = False) -> np.ndarray:
    """float32 [len(item_ids), width]: each item's image embedding (zero: no image),
    encoding only the image files not already in the on-disk cache."""
    mapping = read_image_map(mapping_file, item_ids)
    path = vision_dir(vision)
    cache = EmbeddingCache(Path(cache_root) / "images", cached_fingerprint(path, 0, cache_root))
    table = cache.load()
    # Each file's digest, remembered per (path, size, mtime): a device's fresh process
    # re-reads no image it has read before.
    digests = StatMemo(Path(cache_root) / "images" / "digests.json")
    keys = {item: digests.get([image], "sha256", lambda image=image: _digest(image))
            for item, (image, _) in mapping.items()}
    digests.save()
    missing = sorted({k: item for item, k in keys.items() if k not in table}.items())
    if missing:
        encoder = ImageEncoder(str(path), batch_size)
        src = Path(mapping_file).expanduser()
        images = [_load_image(mapping[item][0], f"{src}:{mapping[item][1]}")
                  for _, item in missing]
        table.update(zip([k for k, _ in missing], encoder.encode(images, progress)))
        cache.save(table)
    out = np.zeros((len(item_ids), vision_width(str(path))), np.float32)
    for r, item in enumerate(item_ids):
        if item in keys:
            out[r] = table[keys[item]]
    return out
