"""The code's layout rules, checked on every `make test`: the layers of pyproject's
[tool.importlinter] contracts (no upward import, no import cycle, the library never
imports the Flower apps), imports inside functions only where marked and justified, a
thin CLI, long modules that say why, and no block of six lines written twice in fedrec/,
clients/ or server/."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import grimp
import pytest
from importlinter import configuration
from importlinter.application import use_cases

ROOT = Path(__file__).resolve().parents[1]
CODE = sorted(p for d in ("fedrec", "clients", "server") for p in (ROOT / d).rglob("*.py"))
WINDOW = 6


def test_the_import_contracts_hold():
    """`lint-imports` (import-linter, run from the repository root) shows each contract."""
    out = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "3 kept, 0 broken" in out.stdout


LAYERS, CYCLE, APPS = ("fedrec's layers point one way", "no import cycle among fedrec's modules",
                       "the library never imports the Flower apps")


@pytest.mark.parametrize("importer, imported, contracts", [
    # upward: data below federation, which imports data (so a cycle of subpackages too)
    ("fedrec.data.protocol", "fedrec.federation.strategy", {LAYERS, CYCLE}),
    ("fedrec.privacy.dpsgd", "fedrec.ranking.explain", {LAYERS}),  # independent siblings
    ("fedrec.models.train", "fedrec.models.central", {CYCLE}),  # central imports train
    ("fedrec.federation.local", "clients.app", {APPS}),
])
def test_an_upward_import_or_a_cycle_breaks_a_contract(monkeypatch, capsys, importer, imported,
                                                        contracts):
    """The contracts are not vacuous: the real import graph plus one import that goes the
    wrong way (a lower layer importing a higher one; a module importing one that imports
    it) breaks exactly the contracts it should."""
    build = grimp.build_graph

    def with_one_more_import(*args, **kwargs):
        graph = build(*args, **kwargs)
        graph.add_import(importer=importer, imported=imported)
        return graph

    monkeypatch.setattr(grimp, "build_graph", with_one_more_import)
    monkeypatch.chdir(ROOT)
    configuration.configure()
    assert not use_cases.lint_imports(cache_dir=None)  # what `lint-imports` runs
    out = capsys.readouterr().out
    assert set(re.findall(r"^(.+) BROKEN$", out, re.MULTILINE)) == contracts, out[-2000:]


def test_imports_inside_functions_are_marked_lazy():
    """An import inside a function hides a dependency from the layer check's reader and
    from the top of the module: allowed only where a measured start-up cost or an
    optional dependency justifies it, marked `# lazy` on its line (the reason beside it
    or in the module docstring)."""
    unmarked = []
    for path in CODE:
        src = path.read_text()
        lines = src.splitlines()
        for fn in ast.walk(ast.parse(src)):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)) and \
                            "# lazy" not in lines[node.lineno - 1]:
                        unmarked.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not unmarked, unmarked


def test_cli_is_thin_and_long_modules_say_why():
    assert len((ROOT / "fedrec" / "cli.py").read_text().splitlines()) <= 250
    long = [p for p in CODE if len(p.read_text().splitlines()) > 310]
    unexplained = [str(p.relative_to(ROOT)) for p in long
                   if "Size:" not in (ast.get_docstring(ast.parse(p.read_text())) or "")]
    assert not unexplained, "say in the module docstring (Size: ...) why it is this long"


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of the lines that carry code: no blank lines, comments
    or lone closing brackets."""
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        text = re.sub(r"\s+#.*$", "", line.strip())
        if text and not text.startswith("#") and not re.fullmatch(r"[)\]}]+[,:]?", text):
            out.append((i, text))
    return out


def test_no_six_line_block_is_written_twice():
    first: dict[tuple[str, ...], tuple[Path, int]] = {}
    repeats = []
    for path in CODE:
        lines = _code_lines(path)
        for k in range(len(lines) - WINDOW + 1):
            block = tuple(t for _, t in lines[k:k + WINDOW])
            at = (path, lines[k][0])
            if block not in first:
                first[block] = at
            elif first[block][0] != path or first[block][1] + WINDOW <= at[1]:  # not overlapping
                (p0, l0) = first[block]
                repeats.append(f"{p0.relative_to(ROOT)}:{l0} and {path.relative_to(ROOT)}:{at[1]}")
    assert not repeats, "\n".join(repeats[:10])


def test_nothing_cites_a_file_outside_the_repository():
    """The design notes beside the checkout are not the project's: nothing shipped names
    them (the pattern is assembled so that this file does not name them either)."""
    names = ["DES" + "IGN", "NOT" + "ES", "STY" + "LE"]
    pattern = re.compile("|".join(rf"\b{n}(\.md)?\b" for n in names) + r"|\.\./shared")
    files = [*CODE, *(ROOT / "tests").glob("*.py"), *(ROOT / "docs").glob("*.md"),
             *(ROOT / "simulations").rglob("*.*"), ROOT / "README.md", ROOT / "pyproject.toml",
             ROOT / "Makefile"]
    bad = [str(p.relative_to(ROOT)) for p in files if p.is_file() and pattern.search(p.read_text())]
    assert not bad
