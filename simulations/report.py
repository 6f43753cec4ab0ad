"""Regenerate README result tables from the JSON files the project's commands write.

    python simulations/report.py            # rewrites the marked blocks in README.md

A block is delimited by `<!-- table:NAME -->` and `<!-- /table:NAME -->`; NAME picks the
files listed in TABLES. No number in those blocks is ever typed by hand.
"""

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedrec.results import HEADLINE, fmt

TABLES = {
    "foundation": ["results/popularity.json", "results/popularity-nocold.json",
                   "results/central-text.json", "results/central-text-id.json",
                   "results/central-fedmf.json"],
    "federated": ["results/popularity.json", "results/central-text.json",
                  "results/fed-text.json", "results/fed-fedmf.json"],
}
LABELS = {"sampled/hr@10": "sampled HR@10", "sampled/ndcg@10": "sampled NDCG@10",
          "full/hr@10": "full HR@10", "full/ndcg@10": "full NDCG@10",
          "cold/hr@10": "cold-start HR@10"}


def table(files: list[str]) -> str:
    head = "| method | " + " | ".join(LABELS[k] for k in HEADLINE) + " | seeds | command |"
    rows = [head, "|" + "---|" * (len(HEADLINE) + 3)]
    for name in files:
        path = ROOT / name
        if not path.is_file():
            continue
        res = json.loads(path.read_text())
        best = res["summary"]["best"]
        seeds = ",".join(str(r["seed"]) for r in res["runs"])
        rows.append(f"| {res['method']} | " + " | ".join(fmt(best.get(k)) for k in HEADLINE)
                    + f" | {res.get('seed_kind', 'seed')} {seeds} | `{res['command']}` |")
    return "\n".join(rows)


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


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name, files in TABLES.items():
        text = replace_block(text, name, table(files))
    text = replace_block(text, "config", config_table())
    readme.write_text(text)


if __name__ == "__main__":
    main()
