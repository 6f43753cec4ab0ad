"""Image features on a device: encoding throughput of a real-size vision encoder, and what
the extra adapters add to a client's upload.

    .venv/bin/python simulations/bench_images.py [--images 96] [--threads 2] [--arch clip-b32,vit-b16]

For each architecture (random weights, real size: CLIP ViT-B/32's vision tower, ViT-B/16)
saved with save_pretrained like any Hugging Face directory, the project's own path
(fedrec.data.images.image_table: read the item,image CSV, decode, preprocess, forward,
write the cache) encodes --images generated poster-size JPEGs (300 x 450) with an empty
cache, then again with the cache warm. Images/s is end to end with an empty cache.

Upload: the parameter bytes a client sends each round (every array of the model, float32,
as strategy.py's upload-bytes counts them) for text alone, text + graph and text + graph +
image (this encoder's width), beside the bytes of the PLM (what full fine-tuning would
send). Target (issue 32): the added upload <= 1.5% of the PLM's bytes. Writes
results/bench_images.json (temp file, then rename).
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "simulations"))

from bench_federated import plm_bytes

from fedrec.config import load_config
from fedrec.data.device import text_dim
from fedrec.data.images import image_table
from fedrec.models.build import build_model
from fedrec.results import command_line, machine, write_json

TARGET_ADDED_UPLOAD = 0.015


def save_encoder(arch: str, path: Path) -> int:
    """A random-initialised real-size vision encoder in path; returns its parameter count."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    torch.manual_seed(0)
    if arch == "clip-b32":
        model = CLIPVisionModel(CLIPVisionConfig(patch_size=32))  # ViT-B/32: 768 wide, 12 layers
        processor = CLIPImageProcessor()
    elif arch == "vit-b16":
        model, processor = ViTModel(ViTConfig()), ViTImageProcessor()  # 768 wide, 12 layers
    else:
        raise SystemExit(f"--arch: '{arch}' is not clip-b32 or vit-b16")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def write_posters(root: Path, n: int) -> Path:
    from PIL import Image

    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(n):
        px = rng.integers(0, 255, (450, 300, 3), dtype=np.uint8)
        Image.fromarray(px).save(root / "img" / f"{k + 1}.jpg", quality=85)
    (root / "images.csv").write_text("item,image\n" + "".join(
        f"{k + 1},img/{k + 1}.jpg\n" for k in range(n)))
    return root / "images.csv"


def upload_bytes(cfg) -> int:
    model = build_model(cfg, text_dim(cfg), 1682)
    return sum(v.numel() * 4 for v in model.state_dict().values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--arch", default="clip-b32,vit-b16")
    ap.add_argument("--json", default=str(ROOT / "results" / "bench_images.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config()
    plm = plm_bytes(cfg.encoder.model_dir)
    ids = [str(k + 1) for k in range(args.images)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedrec-bench-images-") as tmp:
        mapping = write_posters(Path(tmp), args.images)
        for arch in args.arch.split(","):
            enc = Path(tmp) / arch
            n_params = save_encoder(arch, enc)
            cache = Path(tmp) / f"cache-{arch}"
            warmup = mapping.with_name("warmup.csv")  # imports and first-call costs
            warmup.write_text("".join(mapping.read_text().splitlines(True)[:3]))
            image_table(str(warmup), ids, str(enc), cache / "warmup", args.batch_size)
            t0 = time.perf_counter()
            image_table(str(mapping), ids, str(enc), cache, args.batch_size)
            cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            image_table(str(mapping), ids, str(enc), cache, args.batch_size)
            warm = time.perf_counter() - t0
            base = cfg.override(**{"model.item-features": "text"})
            graph = cfg.override(**{"model.item-features": "text,graph"})
            full = cfg.override(**{"model.item-features": "text,graph,image",
                                   "encoder.vision-dir": str(enc)})
            up = {name: upload_bytes(c) for name, c in
                  (("text", base), ("text+graph", graph), ("text+graph+image", full))}
            row = {"arch": arch, "encoder_params": n_params, "images": args.images,
                   "threads": args.threads, "batch_size": args.batch_size,
                   "cold_seconds": cold, "images_per_second": args.images / cold,
                   "warm_seconds": warm, "upload_bytes": up, "plm_bytes": plm,
                   "added_upload_over_plm": {k: (v - up["text"]) / plm for k, v in up.items()},
                   "upload_over_plm": {k: v / plm for k, v in up.items()}}
            row["target_met"] = row["added_upload_over_plm"]["text+graph+image"] \
                <= TARGET_ADDED_UPLOAD
            rows.append(row)
            print(f"{arch}: {n_params / 1e6:.1f}M parameters, {args.images} images in "
                  f"{cold:.1f} s = {row['images_per_second']:.1f} images/s on "
                  f"{args.threads} threads (cache warm: {warm * 1000:.0f} ms); upload "
                  + ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in up.items())
                  + f"; added by graph + image {row['added_upload_over_plm']['text+graph+image']:.2%}"
                  f" of the PLM's {plm / 2**20:.1f} MiB (target <= {TARGET_ADDED_UPLOAD:.1%})")
    write_json(args.json, {"benchmark": "images", "command": command_line(),
                           "load_avg_1m": os.getloadavg()[0], "rows": rows,
                           "machine": machine()})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
