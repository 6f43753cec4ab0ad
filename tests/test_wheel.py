"""`make wheel` builds what a device installs (docs/deployment.md): the library and both
Flower apps, the `fedrec` command, the dependencies, and nothing else of the repository."""

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_holds_the_library_and_the_apps_and_they_import_from_it(tmp_path):
    out = tmp_path / "dist"
    # the Makefile's `wheel` recipe, into a temporary directory
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--wheel-dir", str(out), str(ROOT)],
                   check=True, timeout=600, cwd=tmp_path)
    (wheel,) = out.glob("fedrec-*-py3-none-any.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    library = {str(p.relative_to(ROOT)) for d in ("fedrec", "clients", "server")
               for p in (ROOT / d).rglob("*.py")}
    assert library <= names, sorted(library - names)[:5]
    assert not [n for n in names if n.startswith(("tests/", "results/", "simulations/", "docs/"))]
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    assert "Requires-Dist: flwr[simulation]" in text and "Requires-Dist: torch" in text
    entry = zipfile.ZipFile(wheel).read(meta.replace("METADATA", "entry_points.txt")).decode()
    assert "fedrec = fedrec.cli:main" in entry
    # installed on its own, its packages import (this checkout's editable install is not on
    # the path: -S skips the .pth files that put it there; the dependencies come from the
    # environment's site-packages)
    target = tmp_path / "installed"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--target", str(target), str(wheel)], check=True, timeout=300)
    probe = ("import sys; sys.path[:0] = [sys.argv[1]]; sys.path.append(sys.argv[2]); "
             "import fedrec, fedrec.cli, clients.app, server.app; "
             "assert fedrec.__file__.startswith(sys.argv[1]), fedrec.__file__; "
             "assert clients.app.app and server.app.app")
    done = subprocess.run([sys.executable, "-S", "-c", probe, str(target),
                           sysconfig.get_paths()["purelib"]], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
