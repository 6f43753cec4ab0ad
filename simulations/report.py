"""Regenerate README result tables from the JSON files the project's commands write.

    python simulations/report.py            # rewrites the marked blocks in README.md

A block is delimited by `<!-- table:NAME -->` and `<!-- /table:NAME -->`; NAME picks the
files listed in TABLES. No number in those blocks is ever typed by hand.
"""

import json
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report_multimodal import BLOCKS as MULTIMODAL_BLOCKS

from fedrec.config import stored_config
from fedrec.data.evaluate import ILD_KEYS
from fedrec.privacy import population
from fedrec.results import fmt

TABLES = {
    "central": ["results/popularity.json", "results/text-similarity.json",
                "results/central-seq+id.json", "results/central-seq.json",
                "results/central-seq-id.json", "results/recbole-sasrec.json",
                "results/central-fedmf.json"],
    "federated": ["results/fed-seq+id-sched.json", "results/fed-seq.json", "results/fed-seq-id.json",
                  "results/fed-fedmf.json", "results/fed-seq+id-e2.json", "results/fed-seq+id.json"],
}
# Full ranking first: the headline (docs/protocol.md).
COLUMNS = ("full/hr@10", "full/ndcg@10", "full/cold/hr@10", "full/cold/ndcg@10",
           "full/warm/hr@10", "new-items/hr@10", "top10/unreleased-share", "sampled/hr@10",
           "sampled/cold/hr@10", "div/genre-ild@10", "div/ild-centred@10", "div/coverage@10",
           "div/novelty@10")
LABELS = {"sampled/hr@10": "sampled HR@10", "sampled/ndcg@10": "sampled NDCG@10",
          "full/hr@10": "full HR@10", "full/ndcg@10": "full NDCG@10",
          "full/cold/hr@10": "cold-target full HR@10", "full/cold/ndcg@10": "cold-target full NDCG@10",
          "full/warm/hr@10": "warm-target full HR@10", "new-items/hr@10": "new-item HR@10",
          "top10/unreleased-share": "unreleased share of top-10",
          "sampled/cold/hr@10": "cold-target sampled HR@10 (secondary)",
          "div/ild@10": "ILD@10 (raw PLM)", "div/genre-ild@10": "genre ILD@10",
          "div/ild-centred@10": "ILD@10 (centred PLM)", "div/coverage@10": "coverage@10",
          "div/novelty@10": "novelty@10"}


def fed_settings(flat: dict) -> str:
    """What a federated row ran with, in words: local epochs, the server lr schedule and
    the ID tables' multiplier of it (a stored config predating those keys ran with one
    constant lr)."""
    c = stored_config(flat)
    sched = (f", warmup {c['fed.server-lr-warmup']} rounds + {c['fed.server-lr-decay']} decay"
             if c["fed.server-lr-warmup"] or c["fed.server-lr-decay"] != "none" else " constant")
    ids = f", ID tables x{c['fed.server-lr-ids']:g}" if c["fed.server-lr-ids"] != 1 else ""
    return f"{c['train.local-epochs']} local epochs, server lr {c['fed.server-lr']:g}{sched}{ids}"


def earlier(res: dict) -> str:
    """A label for a row measured before the neutral tie order (its stored config orders
    equal timestamps by item id): what it lacks, so it is never read as a current peer."""
    if stored_config(res.get("config", {}))["data.tie-order"] == "item-id":
        return " *(earlier protocol)*"
    return ""


def table(files: list[str]) -> str:
    """Markdown rows of result files (paths relative to the repository, or absolute)."""
    head = ("| method | " + " | ".join(LABELS[k] for k in COLUMNS)
            + " | seeds | commit | command |")
    rows = [head, "|" + "---|" * (len(COLUMNS) + 4)]
    for name in files:
        path = ROOT / name
        if not path.is_file():
            continue
        res = json.loads(path.read_text())
        best = res["summary"]["best"]
        seeds = ",".join(str(r["seed"]) for r in res["runs"])
        commit = res.get("machine", {}).get("commit", "unknown")
        commit = commit[:7] + ("+dirty" if commit.endswith("+dirty") else "")
        label = res["method"]
        if label.startswith("fed-"):  # federated rows differ in local epochs and server lr
            label += f", {fed_settings(res['config'])}"
        label += earlier(res)
        rows.append(f"| {label} | " + " | ".join(fmt(best.get(k)) for k in COLUMNS)
                    + f" | {res.get('seed_kind', 'seed')} {seeds} | {commit} | `{res['command']}` |")
    return "\n".join(rows)


def _load(name: str, v1: bool = False) -> dict | None:
    """results/NAME; v1: else results/v1/NAME (measured on the v1 model and protocol, for
    the sections not yet regenerated on v2)."""
    for path in (ROOT / "results" / name, *([ROOT / "results" / "v1" / name] if v1 else [])):
        if path.is_file():
            return json.loads(path.read_text())
    return None


def bench_tables() -> dict[str, str]:
    out = {}
    enc = _load("bench_encoder.json")
    if enc:
        out["bench-encoder"] = "\n".join([
            "| encoder | texts/s | fedrec / sentence-transformers | max abs diff | warm-cache forward passes |",
            "|---|---|---|---|---|",
            (f"| fedrec `TextEncoder` | {enc['texts_per_s']['fedrec']:.1f} | {enc['ratio']:.3f} | "
            f"{enc['max_abs_diff']:.1e} | {enc['cache']['warm_forward_passes']} |"),
            (f"| sentence-transformers `encode` | {enc['texts_per_s']['sentence-transformers']:.1f} | "
            "1 | | |"),
            (f"\n`{enc['command']}` — {enc['texts']} ml-100k item texts, batch {enc['batch_size']}, "
            f"{enc['repeats']} interleaved repeats, {enc['machine']['cores']} cores, "
            f"load average {enc['machine']['load_average'][0]:.1f} during the run.")])
    dev = _load("bench_device.json")
    if dev:
        rows = ["| user (history) | message | wall s | peak RSS MB |", "|---|---|---|---|"]
        for u in dev["users"]:
            for kind in ("train_cold_cache", "train", "evaluate"):
                if kind in u:
                    rows.append(f"| {u['user']} ({u['history']}) | {kind.replace('_', ' ')} | "
                                f"{u[kind]['wall_s']:.1f} | {u[kind]['peak_rss_mb']:.0f} |")
        w, t = dev["worst"], dev["targets"]
        rows.append(f"\nWorst warm-cache round {w['round_s']:.1f} s (target < {t['round_s']:.0f}), "
                    f"peak RSS {w['peak_rss_mb']:.0f} MB (target < {t['peak_rss_mb']:.0f}), "
                    f"`fedrec recommend` top-10 with reasons (plain or MMR re-ranked) "
                    f"{w['recommend_ms']:.1f} ms median, worst user (target < "
                    f"{t['recommend_ms']:.0f}); `{dev['command']}`, model {dev['config']['model.kind']}, "
                    f"commit {dev['machine']['commit'][:7]}, 1-min load average {dev['load_avg_1m']:.1f}.")
        out["bench-device"] = "\n".join(rows)
    fed = _load("bench_federated.json", v1=True)
    if fed:
        rows = [("| clients/round | s/round | client update s | peak RSS GiB | upload KiB/client | "
                "full PLM MiB | upload / PLM |"), "|---|---|---|---|---|---|---|"]
        for r in fed["rows"]:
            rows.append(f"| {r['clients_per_round']} | {r['round_seconds_mean']:.2f} | "
                        f"{r['client_update_seconds_mean']:.4f} | {r['peak_rss_bytes'] / 2**30:.2f} | "
                        f"{r['upload_bytes_per_client'] / 1024:.1f} | {r['plm_bytes'] / 2**20:.1f} | "
                        f"{r['upload_over_plm']:.2%} |")
        load = [r["load_average_after"] for r in fed["rows"] if "load_average_after" in r]
        rows.append(f"\n`{fed['command']}`" + ("; 1-min load average after each size: "
                                                 + ", ".join(f"{x:.1f}" for x in load) if load else ""))
        out["bench-federated"] = "\n".join(rows)
    rec = ROOT / "results" / "recommend_example.txt"  # v2 (v1's lies in results/v1)
    if rec.is_file():
        out["recommend"] = "```\n" + rec.read_text().rstrip() + "\n```"
    return out


HEADLINE = "fed-seq+id-sched"  # the default federated model (text + ID items, 2 local epochs, lr schedule)
PAIRS = ((HEADLINE, "central-seq+id", "text + ID items"), ("fed-seq", "central-seq", "text items only"),
         ("fed-seq-id", "central-seq-id", "SASRec over item IDs"), ("fed-fedmf", "central-fedmf", "MF"))


def rounds_to_95(res: dict, key: str = "server/full/hr@10") -> list[int]:
    """Per seed: the first evaluated round whose `key` reaches 95% of the last round's."""
    out = []
    for run in res["runs"]:
        pts = [(r["round"], r[key]) for r in run.get("curve", []) if key in r]
        if pts:
            final = pts[-1][1]
            out.append(next(rnd for rnd, v in pts if v >= 0.95 * final))
    return out


def interpretation() -> str:
    """The paragraph under the tables, its numbers read from the same files."""
    r = {n: _load(f"{n}.json") for n in ("popularity", "text-similarity", "fed-seq+id",
                                          "fed-seq+id-e2", *(x for p in PAIRS for x in p[:2]))}
    r = {n: (res if res and not earlier(res) else None) for n, res in r.items()}  # current only

    def settings(name):
        return fed_settings(r[name]["config"])

    def m(name, key="full/hr@10"):
        stat = r[name]["summary"]["best"].get(key)
        return stat["mean"] if stat else float("nan")

    parts = []
    if r["popularity"] and r["central-seq+id"]:
        parts.append(
            f"Centrally the text + ID model reaches full HR@10 {m('central-seq+id'):.3f} "
            f"against popularity's {m('popularity'):.3f} and sampled HR@10 "
            f"{m('central-seq+id', 'sampled/hr@10'):.3f} against {m('popularity', 'sampled/hr@10'):.3f}.")
    for fed, central, what in PAIRS:
        if r[fed] and r[central]:
            full, samp = m(fed) / m(central), m(fed, "sampled/hr@10") / m(central, "sampled/hr@10")
            last = r[fed]["summary"]["final"]["full/hr@10"]["mean"]
            last = ("" if stored_config(r[fed]["config"])["fed.select"] == "last"
                    else f"; {last:.3f} at the last round")
            parts.append(f"Federated, {what}: full HR@10 {m(fed):.3f} ({full:.0%} of centralized"
                         f"{last}), sampled {m(fed, 'sampled/hr@10'):.3f} "
                         f"({samp:.0%}), cold-target full HR@10 {m(fed, 'full/cold/hr@10'):.3f}.")
    if r["central-seq-id"] and r["central-seq+id"]:
        parts.append(
            f"Centrally SASRec over item IDs reaches full HR@10 {m('central-seq-id'):.3f} but "
            f"cannot rank unreleased items (cold-target full HR@10 "
            f"{m('central-seq-id', 'full/cold/hr@10'):.3f}, new-item HR@10 "
            f"{m('central-seq-id', 'new-items/hr@10'):.3f}; the text + ID model: "
            f"{m('central-seq+id', 'full/cold/hr@10'):.3f} and "
            f"{m('central-seq+id', 'new-items/hr@10'):.3f}).")
    if r[HEADLINE]:
        head = m(HEADLINE)
        peers = [(n, label) for n, label in (("fed-fedmf", "FedMF"), ("fed-seq-id", "federated SASRec over IDs")) if r[n]]
        for n, label in peers:
            parts.append(f"The text + ID model ({settings(HEADLINE)}) is "
                         f"{'ahead of' if head > m(n) else 'behind'} {label} ({settings(n)}) "
                         f"on full HR@10 ({head:.3f} vs {m(n):.3f}; full NDCG@10 "
                         f"{m(HEADLINE, 'full/ndcg@10'):.4f} vs {m(n, 'full/ndcg@10'):.4f}).")
        for n in ("fed-seq+id-e2", "fed-seq+id"):  # the same model under earlier defaults
            if r[n]:
                parts.append(f"With {settings(n)} it reaches full HR@10 {m(n):.3f}, sampled "
                             f"{m(n, 'sampled/hr@10'):.3f}.")
        reach = rounds_to_95(r[HEADLINE])
        if reach:
            parts.append(f"It reaches 95% of its last full HR@10 (server-side evaluation) after "
                         f"{', '.join(map(str, reach))} rounds (seeds "
                         f"{', '.join(str(x['seed']) for x in r[HEADLINE]['runs'])}).")
    return " ".join(parts)


RELIABILITY = (("clean", "no failures (reference)"), ("failures-30", "30% of clients fail (mixed)"),
               ("poison-undefended", "5% poisoned, no defence"),
               ("poison-bounded", "5% poisoned, update-norm bounding"),
               ("resumed", "killed (SIGKILL) half-way, resumed"))


def reliability_table() -> str:
    """README "Failure behaviour": final test HR@10 of each run next to the clean one."""
    runs = {name: _load(f"reliability-{name}.json", v1=True) for name, _ in RELIABILITY}
    if not runs["clean"]:
        return ""
    clean_mean = runs["clean"]["summary"]["final"]["sampled/hr@10"]["mean"]
    clean_by_seed = {r["seed"]: r["final"]["sampled/hr@10"] for r in runs["clean"]["runs"]}
    rows = [("| run | final sampled HR@10 | vs clean (same seeds) | final NDCG@10 | seeds | rounds | dropped "
            "replies (seed 0) | command |"), "|---|---|---|---|---|---|---|---|"]
    for name, label in RELIABILITY:
        res = runs[name]
        if not res:
            continue
        run = res["runs"][0]
        dropped = run["dropped-replies"]
        hr = res["summary"]["final"]["sampled/hr@10"]["mean"]
        # the clean run(s) of the same seed(s): one seed's noise is larger than the targets
        same = [clean_by_seed.get(r["seed"]) for r in res["runs"]]
        clean = (sum(same) / len(same)) if None not in same else clean_mean
        seeds = ",".join(str(r["seed"]) for r in res["runs"])
        rows.append(f"| {label} | {fmt(res['summary']['final']['sampled/hr@10'])} | "
                    f"{hr / clean - 1:+.1%} | {fmt(res['summary']['final']['sampled/ndcg@10'])} | "
                    f"{seeds} | {res['config']['fed.num-rounds']} | {dropped} | `{res['command']}` |")
    if runs["resumed"]:
        same = (runs["resumed"]["runs"][0]["final-sha256"]
                == next(r["final-sha256"] for r in runs["clean"]["runs"]
                        if r["seed"] == runs["resumed"]["runs"][0]["seed"]))
        rows.append("\nKilled and resumed vs uninterrupted (same seed): final parameters "
                    + ("bit for bit identical" if same else "DIFFERENT")
                    + " (SHA-256 of final.safetensors in both result files).")
    cfg = runs["clean"]["config"]
    rows.append(f"\nml-100k, {cfg['fed.strategy']}, "
                f"{cfg['fed.clients-per-round']} clients per round, test metrics at the final "
                "round (federated evaluation); the runs of `simulations/reliability.sh` (its 3-seed "
                "rows ran seed 0 first, then seeds 1,2 with `--seeds`, combined by "
                "`fedrec simulate --resume` over the three run directories: the command shown).")
    return "\n".join(rows)


def sweep_table() -> str:
    res = _load("privacy_sweep.json", v1=True)
    if not res:
        return ""
    rows = [("| unit of privacy | target ε | ε spent (max) | δ | accountant | σ | C | batch x "
            "local epochs | rounds | clients/round | sampled HR@10 | sampled NDCG@10 | "
            "HR@10 / no DP |"), "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = next((r["sampled/hr@10"]["mean"] for r in res["rows"] if r["unit"] == "none"), None)
    for r in res["rows"]:
        unit = {"none": "none (no DP)", "interaction": "one interaction"
                + (" (history pool public)" if r.get("assumes") else ""),
                "user": "one user (whole history)"}[r["unit"]]
        opt = lambda v, f: "-" if v is None else format(v, f)
        eps = "∞" if r["epsilon"] == float("inf") else f"{r['epsilon']:g}"
        hr = r["sampled/hr@10"]["mean"]
        rows.append(f"| {unit} | {eps} | {opt(r['epsilon-spent-max'], '.2f')} | "
                    f"{opt(r['delta'], 'g')} | {r['accountant'] or '-'} | {opt(r['sigma'], '.3f')} | "
                    f"{'-' if r['max-grad-norm'] is None else _clip(r)} | {_batch(r)} | {r['rounds']} | "
                    f"{r['clients-per-round']} | "
                    f"{fmt(r['sampled/hr@10'])} | {fmt(r['sampled/ndcg@10'])} | "
                    f"{'-' if not base else format(hr / base, '.2f')} |")
    seeds = ",".join(str(s) for s in res["rows"][0]["seeds"])
    rows.append(f"\nSeeds {seeds} (train.seed); `{res['command']}`")
    for unit in ("interaction", "user"):
        at8 = [r for r in res["rows"] if r["unit"] == unit and r["epsilon"] == 8]
        if base and at8:
            ratio = at8[0]["sampled/hr@10"]["mean"] / base
            rows.append(f"At ε = 8, unit one {unit}: {ratio:.2f} x the non-private HR@10 ("
                        + ("meets" if ratio >= 0.9 else "misses") + " the 0.9 x target).")
    rows.append("\n![privacy-utility](results/v1/privacy_sweep.png)")
    return "\n".join(rows)


V2 = "privacy-v2"  # results/privacy-v2: the sweep, levers and population study on v2


def _ratio(row: dict, base: dict | None, key: str) -> str:
    return "-" if not base or key not in row else format(row[key]["mean"] / base[key]["mean"], ".2f")


def _unit(r: dict) -> str:
    """The unit a row's ε protects (the sweep stores what fedrec.privacy.accounting names)."""
    return {"none": "none (no DP)", "user": "one user (whole history)"}.get(
        r["unit"], f"one {r.get('unit-detail', r['unit'])}")


def sweep_v2_table() -> str:
    """The v2 sweep: full and sampled HR@10 per (unit, ε), each against the no-DP run."""
    res = _load(f"{V2}/sweep.json")
    if not res:
        return ""
    rows = [("| unit of privacy | target ε | ε spent (max) | δ | accountant | σ | C | batch x local "
            "epochs | rounds | clients/round | full HR@10 | full NDCG@10 | sampled HR@10 | "
            "full HR@10 / no DP | sampled / no DP |"), "|" + "---|" * 15]
    base = next((r for r in res["rows"] if r["unit"] == "none"), None)
    opt = lambda v, f: "-" if v is None else format(v, f)
    for r in res["rows"]:
        eps = "∞" if r["epsilon"] == float("inf") else f"{r['epsilon']:g}"
        rows.append(f"| {_unit(r)} | {eps} | {opt(r['epsilon-spent-max'], '.2f')} | "
                    f"{opt(r['delta'], 'g')} | {r['accountant'] or '-'} | {opt(r['sigma'], '.3f')} | "
                    f"{'-' if r['max-grad-norm'] is None else _clip(r)} | {_batch(r)} | "
                    f"{r['rounds']} | {r['clients-per-round']} | {fmt(r['full/hr@10'])} | "
                    f"{fmt(r['full/ndcg@10'])} | {fmt(r['sampled/hr@10'])} | "
                    f"{_ratio(r, base, 'full/hr@10')} | {_ratio(r, base, 'sampled/hr@10')} |")
    seeds = ",".join(str(s) for s in res["rows"][0]["seeds"])
    rows.append(f"\nSeeds {seeds} (train.seed), {res['rows'][0]['population']} users, commit "
                f"{res['machine']['commit'][:7]}; `{res['command']}`")
    for unit, need in (("user", 0.9), ("interaction", 0.7), ("block", 0.7)):
        at8 = next((r for r in res["rows"] if r["unit"] == unit and r["epsilon"] == 8), None)
        if base and at8:
            full, samp = (at8[k]["mean"] / base[k]["mean"] for k in ("full/hr@10", "sampled/hr@10"))
            rows.append(f"At ε = 8, unit {_unit(at8)}: {full:.2f} x the non-private full HR@10, "
                        f"{samp:.2f} x its sampled HR@10 (target {need:g} x: "
                        + ("met" if min(full, samp) >= need else "not met") + ").")
    rows.append(f"\n![privacy-utility](results/{V2}/sweep.png)")
    return "\n".join(rows)


LEVERS = {  # result file name: what the lever changes against the sweep's settings of its unit
    "lever-server-lr-0.03": "server lr 0.03 (sweep: 0.01), private run only",
    "lever-clip-0.5": "C = 0.5 (sweep: 0.25)",
    "lever-adaptive-clipping": "adaptive clipping (median quantile), C from 0.5",
    "lever-local-epochs-4": "4 local epochs per round (sweep: 2), C = 0.5 (0.6 x its median norm)",
    "lever-text-only": "text-only items (no ID vectors: 112,129 federated parameters, not 221,459), "
                       "both runs",
    "lever-full-participation": "q = 1: every user in each of 2 rounds (the same 1,880 device "
                                "updates as 20 rounds of 94), both runs",
    "lever-public-warm-start": "public warm start: 5 epochs on catalog genre sessions before "
                               "round 1 (no user data), both runs",
    "lever-interaction-text-only": "text-only items (112,129 federated parameters), both runs",
    "lever-interaction-clip-0.3": "C = 0.3 on each block's gradient (sweep: 1)",
}


def levers_table() -> str:
    """Each lever: its own non-private run and ε = 8 run (the seeds both ran: seed 0, or
    0-2 for a lever rerun with three), the unit named."""
    sweep = _load(f"{V2}/sweep.json")
    found = [(name, what, res) for name, what in LEVERS.items()
             if (res := _load(f"{V2}/{name}.json"))]
    if not found:
        return ""
    rows = [("| unit | lever | seeds | no DP full HR@10 | ε = 8 full HR@10 | full ratio | "
             "sampled ratio | σ | C | rounds x clients | result file |"), "|" + "---|" * 11]

    def add(unit, label, res_rows, file, seeds=None):
        base = next(r for r in res_rows if r["unit"] == "none")
        priv = next(r for r in res_rows if r["unit"] == unit and r["epsilon"] == 8)
        seeds = seeds or [s for s in priv["seeds"] if s in base["seeds"]]
        mean = lambda r, k: sum(r["per-seed"][k][r["seeds"].index(s)] for s in seeds) / len(seeds)
        full, sampled = (mean(priv, k) / mean(base, k) for k in ("full/hr@10", "sampled/hr@10"))
        rows.append(f"| {_unit(priv)} | {label} | {','.join(map(str, seeds))} | "
                    f"{mean(base, 'full/hr@10'):.4f} | {mean(priv, 'full/hr@10'):.4f} | {full:.2f} | "
                    f"{sampled:.2f} | {priv['sigma']:.3f} | {_clip(priv)} | {priv['rounds']} x "
                    f"{priv['clients-per-round'] or priv['population']} | `{file}` |")

    for unit in ("user", "interaction", "block"):
        if sweep and any(r["unit"] == unit for r in sweep["rows"]):
            add(unit, "the sweep's settings (seed 0 of its cells)", sweep["rows"],
                f"results/{V2}/sweep.json", [0])
        for name, what, res in found:
            if any(r["unit"] == unit for r in res["rows"]):
                add(unit, what, res["rows"], f"results/{V2}/{name}.json")
    cmd = found[0][2]["command"].split(" --units")[0]
    rows.append(f"\nε = 8, 943 users, each row against its own non-private run (ratios of the "
                f"means over the seeds named); `simulations/privacy_v2.sh levers inter_levers` "
                f"(e.g. `{cmd} ...`).")
    return "\n".join(rows)


def population_table() -> str:
    res = _load(f"{V2}/population.json")
    if not res:
        return ""
    runs = {str(r["population"]): r for r in res["runs"]}
    rows = [("| users | clients/round | σ | full HR@10 ratio (ε = 8 / no DP), per seed | mean ± std "
            "| sampled ratio mean |"), "|---|---|---|---|---|---|"]
    for p, v in sorted(res["points"].items(), key=lambda kv: int(kv[0])):
        r, samp = runs.get(p, {}), res["sampled"]["points"][p]
        rows.append(f"| {p} | {r.get('clients-per-round', '-')} | {r.get('sigma', float('nan')):.3f} | "
                    + ", ".join(f"{x:.2f}" for x in v["ratios"])
                    + f" | {v['mean']:.3f} ± {v['std']:.3f} | {samp['mean']:.3f} |")
    star, b = res["population-at-target"], res["bootstrap"]
    say = lambda x: f"{x:,.0f}" if math.isfinite(x) else "never"
    rows.append(f"\nFit on full HR@10: 1 - ratio = {math.exp(res['log-a']):.3g} x N^-{res['b']:.2f}; "
                f"it reaches {res['target']:g} x at **N ≈ {say(star)} users** (90% bootstrap interval "
                f"over seeds {population.interval(res)}; {b['share-never'] * 100:.0f}% of "
                f"replicates never reach it). On sampled HR@10: N ≈ "
                f"{say(res['sampled']['population-at-target'])} "
                f"({population.interval(res['sampled'])}). Commit "
                f"{res['machine']['commit'][:7]}; `{res['command']}`")
    rows.append(f"\n![population study](results/{V2}/population.png)")
    return "\n".join(rows)


def _batch(row: dict) -> str:
    return f"{row['batch-size']} x {row['local-epochs']}" if "batch-size" in row else "-"


def _clip(row: dict) -> str:
    c = f"{row['max-grad-norm']:g}"
    return f"adaptive from {c}" if row.get("clipping") == "adaptive" else c


AUDITS = (("audit.json", "text, history-pooled (default), fresh model"),
          ("audit-nopool.json", ("text, `model.pooling = \"none\"`, `model.dim = 32` as in "
                                  "the sweep, its trained model")))


AUDITS_V2 = (("audit-seq.json", "seq+id, fresh model"),
             ("audit-seq-trained.json", "seq+id, trained federated model"))


def audit_table(audits=AUDITS, v1: bool = True) -> str:
    found = [(res, what if v1 else f"{what}, {res['config']['train.local-epochs']} local epochs")
             for name, what in audits if (res := _load(name, v1=v1))]
    if not found:
        return ""
    stats = list(found[0][0]["rows"][0]["auc"])
    rows = ["| model | privacy | ε (target) | σ | ε spent by the update (max) | " + " | ".join(
        f"AUC {s}" for s in stats) + " | best |", "|---" * (len(stats) + 6) + "|"]
    notes = []
    for res, what in found:
        for r in res["rows"]:
            unit = r["privacy"]["unit"]
            spent = r.get("epsilon_spent") or {}
            sigma = r.get("noise_multiplier_mean")
            rows.append(f"| {what} | {'no DP' if unit == 'none' else 'DP-SGD, unit: ' + _one(unit)} | "
                        f"{'∞' if r['epsilon'] is None else format(r['epsilon'], 'g')} | "
                        f"{'-' if not sigma else format(sigma, '.3f')} | "
                        f"{format(spent['max'], '.2f') if spent else '-'} | "
                        + " | ".join(f"{r['auc'][s]:.3f}" for s in stats)
                        + f" | {r['best']['statistic']} {r['best']['auc']:.3f} |")
        r0 = res["rows"][0]
        notes.append(f"{what}: {r0['users']} users, {r0['members']} member and "
                     f"{r0['nonmembers']} non-member items, `{res['command']}`; the best "
                     "statistic's distance from 0.5 (either side, what the attacker gets): "
                     + "; ".join(f"{'no DP' if r['epsilon'] is None else 'ε = ' + format(r['epsilon'], 'g')}"
                                 f" {max(abs(v - 0.5) for v in r['auc'].values()):.3f}"
                                 for r in res["rows"]) + ".")
    return "\n".join(rows) + "\n\n" + "\n\n".join(notes)


def _one(unit: str) -> str:
    return unit if unit.startswith("block") else "one " + unit


BENCH_DP = (("bench_dp.json", "seq (default), DP-SGD over disjoint blocks"),)
BENCH_DP_V1 = (("bench_dp_pooled.json", ("v1 text, history-pooled user tower, exact gradient "
                                         "through the pool (`privacy.pool-gradient = \"full\"`)")),
               ("bench_dp_poolinput.json", ("v1 text, history-pooled user tower, pool as each "
                                            "row's input (`privacy.pool-gradient = \"none\"`)")),
               ("bench_dp_nopool.json", "v1 text, `model.pooling = \"none\"`"))


def bench_dp_table(files=BENCH_DP, v1: bool = False) -> str:
    rows = [("| model | plain local SGD s/update | DP-SGD s/update | DP / plain | per-row gradients "
            "of one batch | users (mean history) | command |"), "|---|---|---|---|---|---|---|"]
    for name, label in files:
        res = _load(name, v1=v1)
        if not res:
            continue
        per_row = ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in
                            res.get("per_row_grads_batch_seconds", {}).items()) or res.get("per_row_path", "")
        rows.append(f"| {label} | {res['plain_seconds_mean']:.4f} | {res['dp_seconds_mean']:.4f} | "
                    f"{res['ratio_dp_over_plain']:.2f} | {per_row} | {len(res['users'])} "
                    f"({res['history_length_mean']:.0f}) | `{res['command']}` |")
    return "\n".join(rows) if len(rows) > 2 else ""


def make_run_block() -> str:
    """README "Two commands": what `make run` cost on a fresh clone (results/make_run.json)."""
    res = _load("make_run.json")
    if not res:
        return ""
    names = {"pip install": "install", "data fetch": "data", "baseline popularity": "popularity",
             "train-central": "centralized reference", "simulate": "federated simulation",
             "report.py": "table"}
    parts = {}
    for step in res["steps"]:
        label = next((v for k, v in names.items() if k in step["command"]), None)
        if label:
            parts[label] = parts.get(label, 0.0) + step["seconds"]
    return (f"`make run` on a fresh clone (`{res['command']}`, commit {res['commit'][:7]}, "
            f"{res['machine']['cpus']} cores): **{res['seconds'] / 60:.1f} min** in all ("
            + ", ".join(f"{k} {v / 60:.1f} min" for k, v in parts.items())
            + f"), a peak of {res['peak_rss_bytes'] / 2**30:.1f} GiB of memory (the whole "
            "process tree, Ray included). It ends with one table of its three rows beside the "
            "committed ones; a short excerpt (full HR@10 and cold-target full HR@10 columns):\n\n```\n"
            + "\n".join(_excerpt(res["tail"])) + "\n```")


def _excerpt(tail: list[str]) -> list[str]:
    """The markdown rows of make run's closing table, cut to method | full | cold-target full."""
    out = []
    for line in tail:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) > 4 and not cells[0].startswith("---"):
            out.append(f"{cells[0][:44]:<44} {cells[1]:>17} {cells[3]:>17}")
    return out[:4]


def make_test_block() -> str:
    """README: what `make test` cost on a fresh clone (results/make_test.json)."""
    res = _load("make_test.json")
    if not res:
        return ""
    install = sum(s["seconds"] for s in res["steps"] if "pip install" in s["command"])
    summary = next((line for line in reversed(res["tail"]) if " passed" in line), "")
    return (f"`make test` on a fresh clone (`{res['command']}`, commit {res['commit'][:7]}, "
            f"{res['machine']['cpus']} cores): **{res['seconds'] / 60:.1f} min** in all, "
            f"{install / 60:.1f} min of it installing; pytest: `{summary.strip('= ')}`.")


HEADLINE_ROWS = (("popularity.json", "popularity (all training interactions)", None),
                 ("central-seq+id.json", "centralized, text + ID items (the accuracy ceiling)", None),
                 ("central-seq-id.json", "centralized SASRec over item IDs", None),
                 ("recbole-sasrec.json", "centralized RecBole 1.2.1 SASRec (independent)", None),
                 ("fed-seq+id-sched.json", "**federated, text + ID items (default)**", None),
                 ("fed-seq-id.json", "federated SASRec over item IDs", None),
                 ("fed-fedmf.json", "federated FedMF", None))


def headline_table() -> str:
    """README's one compact table: the default model centrally and federated, its peers, and
    the best private point per unit at ε = 8; every row from its result file."""
    rows = [("| model | full HR@10 | full NDCG@10 | cold-target full HR@10 | new-item HR@10 | "
            "ε (unit) | seeds |"), "|---|---|---|---|---|---|---|"]
    for name, label, _ in HEADLINE_ROWS:
        res = _load(name)
        if res:
            b = res["summary"]["best"]
            rows.append(f"| {label}{earlier(res)} | {fmt(b['full/hr@10'])} | {fmt(b['full/ndcg@10'])} | "
                        f"{fmt(b.get('full/cold/hr@10'))} | {fmt(b.get('new-items/hr@10'))} | "
                        f"∞ | {len(res['runs'])} |")
    front = _load("privacy-frontier.json")
    at8 = [r for r in (front or {}).get("rows", []) if r["epsilon"] == 8]
    for unit, method, label in (
            ("user", "dp-prior+device-text", ("**private: DP popularity prior + the device's PLM "
                                             "profile (one release, no training)**")),
            ("user", "dp-fedavg", ("private: the federated model trained with DP-FedAvg "
                                  "(20 rounds)")),
            ("user", "dp-popularity", "private baseline: DP popularity (one release)"),
            ("block", "dp-prior+device-text", ("private, block unit: DP popularity prior + "
                                              "device PLM profile")),
            ("block", "dp-sgd", ("private, block unit: the federated model trained with "
                                "DP-SGD (20 rounds)")),
            ("block", "dp-popularity", "private baseline, block unit: DP popularity")):
        r = next((r for r in at8 if (r["unit"], r["method"]) == (unit, method)), None)
        if r:
            n = f"{len(r['seeds'])}" + (" draws" if r["seed_kind"] == "noise draw" else "")
            rows.append(f"| {label} | {fmt(r['full/hr@10'])} | {fmt(r['full/ndcg@10'])} | - | - | "
                        f"8 ({'one user' if unit == 'user' else 'one block'}, δ {r['delta']:g}) "
                        f"| {n} |")
    return "\n".join(rows)


TIE_ROWS = (("central-seq+id.json", "centralized, text + ID items (default)"),
            ("central-seq-id.json", "centralized SASRec over item IDs"))


def tie_order_table() -> str:
    """How the centralized rows move between the tie rules (docs/protocol.md): each row's
    file under the default rule (random) beside its rerun with data.tie-order=item-id."""
    rows = [("| model | full HR@10, ties random (default) | full HR@10, ties by item id | "
            "change | full NDCG@10, random | full NDCG@10, by item id | seeds |"),
            "|---|---|---|---|---|---|---|"]
    cmds = []
    for name, label in TIE_ROWS:
        a, b = _load(name), _load(f"tie-item-id/{name}")
        if not (a and b):
            continue
        ha, hb = (r["summary"]["best"]["full/hr@10"] for r in (a, b))
        rows.append(f"| {label} | {fmt(ha)} | {fmt(hb)} | {ha['mean'] - hb['mean']:+.4f} | "
                    f"{fmt(a['summary']['best']['full/ndcg@10'])} | "
                    f"{fmt(b['summary']['best']['full/ndcg@10'])} | {len(b['runs'])} |")
        cmds.append(f"`{b['command']}` (commit {b['machine']['commit'][:7]})")
    if len(rows) == 2:
        return ""
    return "\n".join(rows) + "\n\nItem-id rows: " + "; ".join(cmds) + "."


NEW_ITEM_FILES = (("new-items.json", "federated, text + ID items (default)"),
                  ("new-items-central.json", "centralized, text + ID items"))
NEW_ITEM_RULES = {"offset": "text alone + new-item offset (the model's rule)",
                  "calibrated": "text alone + an offset calibrated for this model on validation",
                  "text": "text alone (offset 0)",
                  "mean": "text + the released items' mean ID part"}
NEW_ITEM_KEYS = ("full/hr@10", "full/cold/hr@10", "full/warm/hr@10", "new-items/hr@10",
                 "top10/unreleased-share", "sampled/cold/hr@10")


def new_items_table() -> str:
    """How an item without a trained ID row is scored (simulations/new_items.py): the same
    trained models under each rule, and the offset curve."""
    parts = []
    for name, label in NEW_ITEM_FILES:
        res = _load(name)
        if not res:
            continue
        head = ["| " + " | ".join(LABELS[k] for k in NEW_ITEM_KEYS) + " |",
                "|---|" + "---|" * len(NEW_ITEM_KEYS)]
        rows = [f"**{label}**\n", "| rule " + head[0], head[1]]
        for rule, words in NEW_ITEM_RULES.items():
            if rule in res["summary"]:
                rows.append(f"| {words} | " + " | ".join(fmt(res["summary"][rule].get(k))
                                                        for k in NEW_ITEM_KEYS) + " |")
        cal = ", ".join(f"{r['calibrated-offset']:.2f}" for r in res["runs"])
        rows.append(f"\nCalibrated offsets: {cal}; the model's own: "
                    f"{res['config']['model.new-item-bias']:g}.\n")
        rows += ["| offset | validation full HR@10 | validation cold-target full HR@10 "
                 "| validation unreleased share " + head[0],
                 "|---|---|---" + head[1]]
        for pt in res.get("curve", []):
            rows.append(f"| {pt['offset']:g} | " + " | ".join(
                fmt(pt.get(f"val/{k}")) for k in ("full/hr@10", "full/cold/hr@10",
                                                   "top10/unreleased-share"))
                + " | " + " | ".join(fmt(pt.get(k)) for k in NEW_ITEM_KEYS) + " |")
        rows.append(f"\n{len(res['runs'])} models, commit {res['machine']['commit'][:7]}: "
                    f"`{res['command']}`.")
        parts.append("\n".join(rows))
    return "\n\n".join(parts)


def config_table() -> str:
    """Every default of [tool.flwr.app.config] with its comment, straight from pyproject."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    section = ROOT.joinpath("pyproject.toml").read_text().split("[tool.flwr.app.config]")[1]
    for line in section.splitlines():
        m = re.match(r'^"([\w.-]+)"\s*=\s*(.+?)\s*#\s*(.*)$', line)
        if m:
            rows.append(f"| `{m.group(1)}` | `{m.group(2)}` | {m.group(3).replace('|', '/')} |")
    return "\n".join(rows)


def replace_block(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- table:{name} -->\n).*?(<!-- /table:{name} -->)", re.DOTALL)
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)


def compare(out_dir: str) -> None:
    """Print the result files of one `make run` beside the committed rows of the same
    methods (results/), full ranking first."""
    mine = sorted(Path(out_dir).glob("*.json"), key=lambda p: p.stat().st_mtime)
    def same(res: dict) -> tuple:  # a method and, federated, what it ran with
        fed = res["method"].startswith("fed-")
        return res["method"], fed_settings(res["config"]) if fed else None

    committed = {}
    for p in sorted((ROOT / "results").glob("*.json")):
        res = json.loads(p.read_text())
        if "summary" in res:
            committed[same(res)] = p
    rows = [str(p) for p in mine]
    for p in mine:
        key = same(json.loads(p.read_text()))
        if key in committed:
            rows.append(str(committed[key]))
    print(table(rows))
    print(f"\nFirst rows: this run ({out_dir}); then the committed results of the same methods "
          "(README, results/).")


def explain_table() -> str:
    res = _load("explain.json")
    if not res:
        return ""
    s = res["summary"]
    f = lambda key, spec=".3f": f"{s[key]['mean']:{spec}} ± {s[key]['std']:{spec}}"
    head = ("| (user, item) pairs | reasons beat random deletion | win rate per random draw | "
            "rank drop, reasons (mean / median) | rank drop, random (mean / median) | distinct "
            "reason sets in a top-10 (median) | reasons per item |")
    row = (f"| {int(s['pairs']['mean'])} per run ({int(s['users']['mean'])} users) | "
           f"{f('share-reasons-beat-random')} | {f('win-rate-per-draw')} | "
           f"{f('rank-drop-reasons-mean', '.1f')} / {f('rank-drop-reasons-median', '.1f')} | "
           f"{f('rank-drop-random-mean', '.1f')} / {f('rank-drop-random-median', '.1f')} | "
           f"{f('distinct-reason-sets-median', '.1f')} | {f('reasons-per-item-mean', '.2f')} |")
    note = (f"\n{len(res['runs'])} runs (train.seed "
            f"{', '.join(str(r['seed']) for r in res['runs'])}), {s['random-draws']['mean']:.0f} "
            f"random deletions per item, commit {res['machine']['commit'][:7]}: "
            f"`{res['command']}`")
    return f"{head}\n|---|---|---|---|---|---|---|\n{row}\n{note}"


def diversity_table() -> str:
    """One table per re-ranker's curve file (MMR, DPP), judged in the space it re-ranked with
    (genres: 1 - Jaccard of genre sets), with each space's random-list reference, the plot."""
    found = [res for res in map(_load, ("diversity.json", "diversity-dpp.json")) if res]
    if not found:
        return ""
    parts = [_curve_table(res) for res in found]
    rand = found[0].get("random-list-ild@10")
    if isinstance(rand, dict):
        base = found[0]["summary"][0]
        refs = [f"{ILD_NAMES[name]} {value:.3f} (the model's lists: "
                f"{base[ILD_KEYS[name].format(k=10)]['mean']:.3f})"
                for name, value in rand.items() if ILD_KEYS[name].format(k=10) in base]
        judged = found[0].get("similarity", "plm")
        own = base[ILD_KEYS[judged].format(k=10)]["mean"]
        verdict = ("asks for lists more varied than a random one's" if 1.2 * own > rand[judged]
                   else "stays below a random list's")
        parts.append("The scales' reference, a list drawn at random from the catalog: "
                     + "; ".join(refs) + f". +20% over the model's own {ILD_NAMES[judged]} "
                     f"({1.2 * own:.3f}) {verdict} ({rand[judged]:.3f}): the curves trade "
                     "hits for variety beyond chance.")
    return "\n\n".join(parts + ["![HR@10 against diversity](results/diversity.png)"])


ILD_NAMES = {"plm": "ILD (raw PLM)", "plm-centred": "ILD (centred PLM)", "genres": "genre ILD"}


def _curve_table(res: dict) -> str:
    rows = res["summary"]
    base = rows[0]
    judged = ILD_KEYS[res.get("similarity", "plm")].format(k=10)
    others = [ILD_KEYS[n].format(k=10) for n in ILD_KEYS if ILD_KEYS[n].format(k=10) in base
              and ILD_KEYS[n].format(k=10) != judged]
    hr0, ild0 = base["full/hr@10"]["mean"], base[judged]["mean"]
    names = {ILD_KEYS[n].format(k=10): ILD_NAMES[n] for n in ILD_KEYS}
    out = [f"**{res['method']}**\n",
           f"| λ | full HR@10 | vs λ = 0 | full NDCG@10 | {names[judged]}@10 | vs λ = 0 | "
           + " | ".join(f"{names[k]}@10" for k in others) + " | coverage@10 | novelty@10 |",
           "|---|---|---|---|---|---|" + "---|" * len(others) + "---|---|"]
    for r in rows:
        hr, ild = r["full/hr@10"]["mean"], r[judged]["mean"]
        out.append(f"| {r['lambda']:g} | {fmt(r['full/hr@10'])} | {hr / hr0 - 1:+.1%} | "
                   f"{fmt(r['full/ndcg@10'])} | {fmt(r[judged])} | {ild / ild0 - 1:+.1%} | "
                   + "".join(f"{fmt(r[k])} | " for k in others)
                   + f"{fmt(r['div/coverage@10'])} | {fmt(r['div/novelty@10'])} |")
    ok = [r for r in rows if r["full/hr@10"]["mean"] >= 0.95 * hr0]
    best = max(ok, key=lambda r: r[judged]["mean"])
    gain = best[judged]["mean"] / ild0 - 1
    out.append(f"\nWithin a 5% loss of full HR@10 the largest {names[judged]} gain is at λ = "
               f"{best['lambda']:g}: {gain:+.1%} ("
               + ("meets" if gain >= 0.2 else "misses") + " the +20% target). "
               f"{len(res['runs'])} runs ({', '.join(r['model'] for r in res['runs'])}), commit "
               f"{res['machine']['commit'][:7]}: `{res['command']}`")
    return "\n".join(out)


def frontier_table() -> str:
    """README's three curves: per ε, the best private recommender, DP popularity and the
    DP-trained federated model (both units), against the non-private federated model."""
    front = _load("privacy-frontier.json")
    if not front:
        return ""
    rows = front["rows"]
    ref = next(r for r in rows if r["unit"] == "none")

    def cell(unit, method, eps):
        r = next((r for r in rows if (r["unit"], r["method"], r["epsilon"]) ==
                  (unit, method, eps)), None)
        return r, (fmt(r["full/hr@10"]) if r else "-")
    out = [("| unit | ε | best private recommender | full HR@10 | x DP popularity | "
            "DP popularity | DP-trained federated model | x no DP |"),
           "|---|---|---|---|---|---|---|---|"]
    for b in front["best"]:
        unit, eps = b["unit"], b["epsilon"]
        _, pop = cell(unit, "dp-popularity", eps)
        _, trained = cell(unit, "dp-fedavg" if unit == "user" else "dp-sgd", eps)
        out.append(f"| {'one user' if unit == 'user' else 'one block (51 interactions)'} | "
                   f"{eps:g} | {b['method']} | {fmt(b['full/hr@10'])} | {b['ratio']:.2f} | {pop} | "
                   f"{trained} | {b['full/hr@10']['mean'] / ref['full/hr@10']['mean']:.2f} |")
    out.append(f"| none | ∞ | {ref['method']} | {fmt(ref['full/hr@10'])} | - | - | - | 1.00 |")
    commits = sorted({r["commit"][:7] for r in rows})
    return ("\n".join(out) + f"\n\nδ = 1e-4 everywhere. Rows from "
            f"[results/privacy-frontier.json](results/privacy-frontier.json) (`{front['command']}`, "
            f"commit {front['machine']['commit'][:7]}), built from the files "
            f"`simulations/privacy_frontier.sh` writes (commits {', '.join(commits)}); "
            "one-release rows: 5 noise draws, trained rows: seeds 0, 1, 2.\n\n"
            "![privacy frontier](results/privacy-frontier.png)")


def frontier_methods_table() -> str:
    """Every method of the frontier file per unit and ε (full HR@10), with its settings."""
    front = _load("privacy-frontier.json")
    if not front:
        return ""
    rows = [r for r in front["rows"] if r["unit"] != "none"]
    cols = sorted({(r["unit"], r["epsilon"]) for r in rows}, key=lambda c: (c[0] != "user", -c[1]))
    out = ["| method | " + " | ".join(f"{u} ε {e:g}" for u, e in cols) + " |",
           "|---|" + "---|" * len(cols)]
    for method in sorted({r["method"] for r in rows}):
        cells = []
        for u, e in cols:
            r = next((r for r in rows if (r["method"], r["unit"], r["epsilon"]) == (method, u, e)),
                     None)
            cells.append(fmt(r["full/hr@10"]) if r else "-")
        out.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n\nFull HR@10, mean ± std over seeds (trained) or noise draws (one release)."


def profile_table() -> str:
    """The trained profile model with and without DP, and centralized without DP."""
    sweep, central = _load("privacy-frontier/profile-eps8.json"), _load(
        "privacy-frontier/central-profile.json")
    longer = _load("privacy-frontier/profile-r100.json")
    if not sweep:
        return ""
    out = ["| model.kind = profile | ε (user) | full HR@10 | full NDCG@10 | sampled HR@10 | seeds |",
           "|---|---|---|---|---|---|"]
    prior = ROOT / "results" / "privacy-frontier" / Path(sweep["config"].get("model.prior", "")).name
    start = json.loads(prior.read_text()) if prior.is_file() else None
    if start:  # round 0: the release's own recommender, the noise draw the model holds
        t = start["runs"][start["release"]["draw"]]["test"]
        out.append(f"| round 0 = the release's recommender (`{prior.name}`, its draw "
                   f"{start['release']['draw']}) | {start['privacy']['epsilon-spent']:g} | "
                   f"{t['full/hr@10']:.4f} | {t['full/ndcg@10']:.4f} | {t['sampled/hr@10']:.4f} | - |")
    for res in (sweep, longer or {"rows": []}):
        for r in res["rows"]:
            eps = "release only" if r["unit"] == "none" else f"{r['epsilon']:g} in all"
            out.append(f"| federated, {r['planned-rounds']} rounds"
                       f"{' (no DP in training)' if r['unit'] == 'none' else ''} | {eps} | "
                       f"{fmt(r['full/hr@10'])} | {fmt(r['full/ndcg@10'])} | "
                       f"{fmt(r['sampled/hr@10'])} | {len(r['seeds'])} |")
    if central:
        b = central["summary"]["best"]
        out.append(f"| centralized, no DP in training (best validation epoch) | release only | "
                   f"{fmt(b['full/hr@10'])} | {fmt(b['full/ndcg@10'])} | "
                   f"{fmt(b['sampled/hr@10'])} | {len(central['runs'])} |")
    cmds = [f"`{r['command']}`" for r in (sweep, longer, central) if r]
    return "\n".join(out) + "\n\n" + "; ".join(cmds) + "."


def ftrl_table() -> str:
    """Independent noise against the tree's correlated noise, same recipe and ε."""
    front = _load("privacy-frontier.json")
    if not front:
        return ""
    rows = [r for r in front["rows"] if r["unit"] == "user" and r["epsilon"] == 8
            and r["method"].startswith(("dp-fedavg", "dp-ftrl"))]
    if not rows:
        return ""
    out = ["| noise across rounds | σ | accountant | full HR@10 | full NDCG@10 | sampled HR@10 | seeds |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['method']} | {r['settings']['sigma']:.3f} | {r['accountant']} | "
                   f"{fmt(r['full/hr@10'])} | {fmt(r['full/ndcg@10'])} | "
                   f"{fmt(r['sampled/hr@10'])} | {len(r['seeds'])} |")
    same = _load("privacy-frontier/trained-user-a.json")  # the recipe without DP
    for r in (same or {}).get("rows", []):
        if r["unit"] == "none":
            out.append(f"| no DP (the same 20-round recipe) | - | - | {fmt(r['full/hr@10'])} | "
                       f"{fmt(r['full/ndcg@10'])} | {fmt(r['sampled/hr@10'])} | {len(r['seeds'])} |")
    cmds = sorted({f"`{r['command']}`" for r in rows})
    return "\n".join(out) + "\n\n" + "; ".join(cmds) + "."


def release_audit_table() -> str:
    """Membership inference on the release each one-release row's file carries."""
    front = _load("privacy-frontier.json")
    rows = [r for r in (front or {}).get("rows", []) if r.get("audit")]
    if not rows:
        return ""
    out = [("| release | ε (budget / spent) | informed attacker AUC | reference attacker AUC | "
           "best | non-private: informed / reference | users |"), "|---|---|---|---|---|---|---|"]
    for r in rows:
        a = r["audit"]
        out.append(f"| {r['method']} | {r['epsilon']:g} / {r['settings']['epsilon-spent']:g} | "
                   f"{a['auc']['informed']:.3f} | {a['auc']['reference']:.3f} | {a['best']:.3f} | "
                   f"{a['auc-non-private']['informed']:.3f} / "
                   f"{a['auc-non-private']['reference']:.3f} | {a['users']} |")
    return "\n".join(out)


def dp_popularity_table() -> str:
    """User-level DP popularity per ε (fedrec baseline popularity --epsilon), alone and
    re-ranked on each device by text (--device-text): the lists a private model has to
    beat, with their bound, noise and the plain popularity row."""
    found = sorted((json.loads(p.read_text()) for p in
                    (ROOT / "results" / "privacy-frontier").glob("dp-*-eps*.json")),
                   key=lambda r: (r["privacy"]["unit"] != "user", r["method"],
                                  -r["privacy"]["epsilon"]))
    if not found:
        return ""
    rows = [("| list | unit | ε budget | ε spent | δ | bound (items) | σ (x sqrt(bound)) "
             "| device text (weight, last items) | full HR@10 | full NDCG@10 | sampled HR@10 "
             "| draws |"), "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in found:
        p, s = r["privacy"], r["summary"]["best"]
        dev = p.get("device-text")
        dev = f"{dev['weight']:g}, {dev['last']}" if dev else "-"
        unit = "user" if p["unit"] == "user" else "block"
        rows.append(f"| {r['method']} | {unit} | {p['epsilon']:g} | {p['epsilon-spent']:g} | "
                    f"{p['delta']:g} | {p['bound']} | "
                    f"{p['noise-multiplier']:.3f} | {dev} | {fmt(s['full/hr@10'])} | "
                    f"{fmt(s['full/ndcg@10'])} | {fmt(s['sampled/hr@10'])} | {len(r['runs'])} |")
    pop = _load("popularity.json")
    if pop:
        rows.append(f"| popularity (all training interactions) | - | ∞ | - | - | - | - | - | "
                    f"{fmt(pop['summary']['best']['full/hr@10'])} | "
                    f"{fmt(pop['summary']['best']['full/ndcg@10'])} | "
                    f"{fmt(pop['summary']['best']['sampled/hr@10'])} | - |")
    commits = sorted({r["machine"]["commit"][:7] for r in found})
    return "\n".join(rows) + (f"\n\nCommit {', '.join(commits)}: "
                               "`simulations/privacy_frontier.sh dp_popularity` (one "
                               "`fedrec baseline popularity --unit U --epsilon E [--device-text]` "
                               "per row; each file holds its command).")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--compare":
        return compare(sys.argv[2])
    blocks = {name: table(files) for name, files in TABLES.items()}
    blocks.update({"config": config_table(), "interpretation": interpretation(),
                   "make-run": make_run_block()})
    for name, make in (("reliability", reliability_table), ("privacy-sweep", sweep_table),
                       ("audit", audit_table), ("bench-dp", bench_dp_table),
                       ("bench-dp-v1", lambda: bench_dp_table(BENCH_DP_V1, v1=True)),
                       ("headline", headline_table), ("make-test", make_test_block),
                       ("tie-order", tie_order_table), ("new-items", new_items_table),
                       ("audit-v2", lambda: audit_table(AUDITS_V2, v1=False)),
                       ("explain", explain_table), ("diversity", diversity_table),
                       ("privacy-sweep-v2", sweep_v2_table), ("privacy-levers", levers_table),
                       ("population", population_table),
                       ("dp-popularity", dp_popularity_table),
                       ("privacy-frontier", frontier_table), ("privacy-ftrl", ftrl_table),
                       ("privacy-methods", frontier_methods_table),
                       ("privacy-profile", profile_table),
                       ("release-audit", release_audit_table)):
        blocks[name] = make()
    blocks.update(bench_tables())
    blocks.update({name: make() for name, make in MULTIMODAL_BLOCKS.items()})
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text()
        for name, body in blocks.items():
            if page.parent.name == "docs":  # pages one level down link ../results/
                body = body.replace("](results/", "](../results/")
            text = replace_block(text, name, body)
        # Commands stored with the home directory they ran in: shown as ~, runnable anywhere.
        page.write_text(text.replace(str(Path.home()) + "/", "~/"))


if __name__ == "__main__":
    main()
