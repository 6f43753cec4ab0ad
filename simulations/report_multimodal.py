"""The multimodal blocks of README and docs/multimodal.md (simulations/report.py calls
them): text + graph against text alone, the paragraph on new items, the graph reasons'
faithfulness, the image benchmark and the device benchmark with graph features. Every
number is read from a result file."""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("full/hr@10", "full/ndcg@10", "full/cold/hr@10", "new-items/hr@10",
        "top10/unreleased-share", "sampled/hr@10")
ROWS = (  # (setting, items, file)
    ("centralized", "text + ID (default)", "central-seq+id.json"),
    ("centralized", "text + graph + ID (summed)", "central-seq+id+graph.json"),
    ("centralized", "text + graph + ID (gated)", "multimodal/central-seq+id+graph-gate.json"),
    ("centralized", "text + graph + ID, shared facts only (lever, one seed)",
     "multimodal/central-seq+id+graph-shared.json"),
    ("federated, 100 rounds", "text + ID (default)", "fed-seq+id-sched.json"),
    ("federated, 100 rounds", "text + graph + ID (summed)", "fed-seq+id+graph.json"),
    ("federated, 100 rounds", "text + graph + ID, shared facts only (lever, one seed)",
     "multimodal/fed-seq+id+graph-shared.json"),
)


def _load(name: str) -> dict | None:
    path = ROOT / "results" / name
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(s: dict | None) -> str:
    return "n/a" if not s else f"{s['mean']:.4f} ± {s['std']:.4f}"


def _commit(res: dict) -> str:
    c = res.get("machine", {}).get("commit", "unknown")
    return c[:7] + ("+dirty" if c.endswith("+dirty") else "")


def _file_table(columns: list[str], specs: tuple, cells) -> str:
    """A markdown table with one row per (setting, items, file) of specs that exists:
    setting, items, then cells(result) (a list of strings), then the commands."""
    rows = ["| " + " | ".join(["setting", "item features", *columns]) + " |",
            "|" + "---|" * (len(columns) + 2)]
    notes = []
    for setting, items, name in specs:
        res = _load(name)
        if res:
            rows.append(f"| {setting} | {items} | " + " | ".join(cells(res)) + " |")
            notes.append(f"`{res['command']}` (commit {_commit(res)})")
    return "\n".join(rows) + "\n\nRows: " + "; ".join(notes) + "."


def multimodal_table() -> str:
    labels = ["full HR@10", "full NDCG@10", "cold-target full HR@10", "new-item HR@10",
              "unreleased share of top-10", "sampled HR@10", "seeds"]
    return _file_table(labels, ROWS, lambda res: [
        *(_fmt(res["summary"]["best"].get(k)) for k in KEYS),
        ",".join(str(r["seed"]) for r in res["runs"])])


CALIBRATED = (  # (setting, items, file): new_items.py's "calibrated" rule
    ("centralized", "text + ID (default)", "new-items-central.json"),
    ("centralized", "text + graph + ID", "multimodal/new-items-central-graph.json"),
    ("federated, 100 rounds", "text + ID (default)", "new-items.json"),
    ("federated, 100 rounds", "text + graph + ID", "multimodal/new-items-fed-graph.json"),
)


def calibrated_table() -> str:
    """The same models with new items at their share of validation targets (each model's
    own calibrated offset): equal exposure, so full HR@10 compares like with like."""
    labels = ["calibrated offset", "full HR@10", "full NDCG@10", "cold-target full HR@10",
              "new-item HR@10", "unreleased share of top-10", "seeds"]

    def cells(res: dict) -> list[str]:
        offs = [r["calibrated-offset"] for r in res["runs"]]
        return [f"{min(offs):.2f}-{max(offs):.2f}",
                *(_fmt(res["summary"]["calibrated"][k]) for k in KEYS[:5]), str(len(res["runs"]))]
    return _file_table(labels, CALIBRATED, cells)


def _delta(name_a: str, name_b: str, key: str, part: str = "best") -> tuple | None:
    """(mean a, mean b, b - a, larger std) of `key` in two files' summary[part]."""
    a, b = _load(name_a), _load(name_b)
    if not (a and b):
        return None
    x, y = a["summary"][part][key], b["summary"][part][key]
    return x["mean"], y["mean"], y["mean"] - x["mean"], max(x["std"], y["std"])


def _move(d: tuple, what: str) -> str:
    base, new, diff, std = d
    verb = "raises" if diff > 0 else "lowers" if diff < 0 else "leaves"
    size = ", within one standard deviation" if abs(diff) <= std else ""
    return (f"{verb} {what} from {base:.4f} to {new:.4f} ({diff / base:+.0%}{size})" if base
            else f"moves {what} from {base:.4f} to {new:.4f}")


def multimodal_paragraph() -> str:
    """What the graph adds for new items, numbers from the files."""
    parts = []
    for setting, a, b, ca, cb in (
            ("Centrally", "central-seq+id.json", "central-seq+id+graph.json",
             "new-items-central.json", "multimodal/new-items-central-graph.json"),
            ("Federated", "fed-seq+id-sched.json", "fed-seq+id+graph.json",
             "new-items.json", "multimodal/new-items-fed-graph.json")):
        d = {k: _delta(a, b, k) for k in ("new-items/hr@10", "top10/unreleased-share",
                                          "full/cold/hr@10", "full/hr@10")}
        if not all(d.values()):
            continue
        text = (f"{setting}, the graph {_move(d['new-items/hr@10'], 'new-item HR@10')} "
                "(the unreleased target ranked among the unreleased items only: what an "
                "item's features alone say about a new item). At the same offset it "
                f"{_move(d['top10/unreleased-share'], 'the unreleased share of top-10 lists')}"
                " (the offset is the same; the graph part moves the new items' scores "
                f"against the trained ones), and {_move(d['full/cold/hr@10'], 'cold-target full HR@10')}"
                f" and {_move(d['full/hr@10'], 'full HR@10')}.")
        calib = {k: _delta(ca, cb, k, "calibrated") for k in ("full/hr@10", "full/cold/hr@10")}
        if all(calib.values()):
            text += (" With each model's new items at their share of the targets (its "
                     f"calibrated offset), the graph {_move(calib['full/hr@10'], 'full HR@10')}"
                     f" and {_move(calib['full/cold/hr@10'], 'cold-target full HR@10')}.")
        parts.append(text)
    return "\n\n".join(parts) + ("\n\nMeans over 3 seeds (population std, as in the "
                                   "tables); \"within one standard deviation\": the change is "
                                   "no larger than the larger of the two rows' std." if parts
                                   else "")


def explain_graph_block() -> str:
    """History reasons and graph-fact reasons of the same runs, side by side."""
    res = _load("explain-graph.json")
    if not res:
        return ""
    s = res["summary"]
    rows = [("| reasons | (user, item) pairs per run | beat random deletion | win rate per "
             "draw | rank drop, named (mean / median) | rank drop, random (mean / median) |"),
            "|---|---|---|---|---|---|"]
    for label, p, named in (("history items (leave-one-out)", "", "reasons"),
                            ("shared graph facts, deleted from the item", "graph/", "facts")):
        if f"{p}pairs" not in s:
            continue
        cells = [f"{s[f'{p}pairs']['mean']:.0f}", _fmt(s[f"{p}share-{named}-beat-random"]),
                 _fmt(s[f"{p}win-rate-per-draw"])]
        for what in (named, "random"):
            cells.append(" / ".join(f"{s[f'{p}rank-drop-{what}-{m}']['mean']:.1f}"
                                    for m in ("mean", "median")))
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + (f"\n\nMeans over {len(res['runs'])} runs (rank drops: the mean "
                              f"over runs of each run's mean / median), `{res['command']}` "
                              f"(commit {_commit(res)}).")


def bench_images_block() -> str:
    res = _load("bench_images.json")
    if not res:
        return ""
    rows = [("| vision encoder (random weights) | parameters | images/s (empty cache) | "
             "cache warm | upload: text / + graph / + graph + image | added by graph + image, "
             "of the PLM's bytes |"), "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        up = r["upload_bytes"]
        rows.append(f"| {r['arch']} | {r['encoder_params'] / 1e6:.1f}M | "
                    f"{r['images_per_second']:.1f} | {r['warm_seconds'] * 1000:.0f} ms | "
                    f"{up['text'] / 1024:.0f} / {up['text+graph'] / 1024:.0f} / "
                    f"{up['text+graph+image'] / 1024:.0f} KiB | "
                    f"{r['added_upload_over_plm']['text+graph+image']:.2%} "
                    f"({'met' if r['target_met'] else 'MISSED'}: <= 1.5%) |")
    r0 = res["rows"][0]
    return "\n".join(rows) + (
        f"\n\n`{res['command']}`: {r0['images']} generated 300 x 450 JPEGs, "
        f"{r0['threads']} threads, batch {r0['batch_size']}, the PLM "
        f"{r0['plm_bytes'] / 2**20:.1f} MiB; 1-min load average {res['load_avg_1m']:.1f}, "
        f"commit {_commit(res)}.")


def bench_device_graph_block() -> str:
    res = _load("bench_device-graph.json")
    if not res:
        return ""
    w, t = res["worst"], res["targets"]
    return (f"With `model.item-features = \"text,graph\"`: `fedrec recommend` top-10 with "
            f"reasons (history items, shared genres and shared graph facts; plain or MMR "
            f"re-ranked) {w['recommend_ms']:.1f} ms median for the worst of "
            f"{len(res['users'])} users, cache warm (target < {t['recommend_ms']:.0f} ms: "
            f"{'met' if res['targets_met']['recommend_ms'] else 'MISSED'}); a client round "
            f"{w['round_s']:.1f} s at worst, peak RSS {w['peak_rss_mb']:.0f} MB. "
            f"`{res['command']}`, commit {_commit(res)}, 1-min load average "
            f"{res['load_avg_1m']:.1f}.")


def recommend_graph_block() -> str:
    path = ROOT / "results" / "multimodal" / "recommend_example.txt"
    return "```\n" + path.read_text().rstrip() + "\n```" if path.is_file() else ""


BLOCKS = {"recommend-graph": recommend_graph_block, "multimodal-calibrated": calibrated_table,
          "multimodal": multimodal_table, "multimodal-new-items": multimodal_paragraph,
          "explain-graph": explain_graph_block, "bench-images": bench_images_block,
          "bench-device-graph": bench_device_graph_block}
