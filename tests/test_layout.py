"""The code's layout rules, checked on every `make test`: the library never imports the
Flower apps, the CLI stays thin, long modules say why, and no block of six lines is
written twice in fedrec/, clients/ or server/."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = sorted(p for d in ("fedrec", "clients", "server") for p in (ROOT / d).rglob("*.py"))
WINDOW = 6


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module.split(".")[0])
    return out


def test_the_library_never_imports_the_apps():
    library = [p for p in CODE if p.is_relative_to(ROOT / "fedrec")]
    bad = {str(p.relative_to(ROOT)): sorted(_imports(p) & {"clients", "server"}) for p in library}
    assert len(library) > 30 and not {k: v for k, v in bad.items() if v}


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
