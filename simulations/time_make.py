"""Time `make run` or `make test` on a fresh clone of this checkout's HEAD, as a newcomer
would run it.

    .venv/bin/python simulations/time_make.py run     # -> results/make_run.json
    .venv/bin/python simulations/time_make.py test    # -> results/make_test.json

Clones HEAD into a temporary directory, runs the target there with a fresh FEDREC_HOME
(so the data is fetched and the catalog encoded as on a new machine; pip still finds
torch on this machine's disk), and writes the result file: wall seconds of the whole
command and of its steps, the peak resident memory of the process tree (sampled with
psutil every second), the machine and the commit, plus the tail of what it printed.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedrec.results import git_commit, machine, write_json


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target", choices=("run", "test"))
    ap.add_argument("--json", default=None, help="default results/make_<target>.json")
    args = ap.parse_args()
    args.json = args.json or str(ROOT / "results" / f"make_{args.target}.json")
    commit = git_commit()
    with tempfile.TemporaryDirectory(prefix=f"fedrec-make-{args.target}-") as tmp:
        clone, home = Path(tmp) / "fedrec", Path(tmp) / "home"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        env = {**os.environ, "FEDREC_HOME": str(home)}
        t0 = time.time()
        proc = subprocess.Popen(["make", args.target], cwd=clone, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        ps, peak, steps, lines = psutil.Process(proc.pid), [0], [], []

        def sample():
            while proc.poll() is None:
                peak[0] = max(peak[0], tree_rss(ps))
                time.sleep(1.0)
        threading.Thread(target=sample, daemon=True).start()
        for line in proc.stdout:
            sys.stdout.write(line)
            lines.append(line.rstrip("\n"))
            if line.startswith((".venv/bin/", "test -x")) or " -m pip " in line:
                steps.append({"command": line.strip(), "start_s": time.time() - t0})
        rc = proc.wait()
        seconds = time.time() - t0
    for a, b in zip(steps, steps[1:] + [{"start_s": seconds}]):
        a["seconds"] = b["start_s"] - a["start_s"]
    write_json(args.json, {"command": f"python simulations/time_make.py {args.target}",
                           "commit": commit,
                           "returncode": rc, "seconds": seconds, "peak_rss_bytes": peak[0],
                           "steps": steps, "tail": lines[-40:], "machine": machine()})
    print(f"make {args.target}: exit {rc}, {seconds / 60:.1f} min, peak RSS "
          f"{peak[0] / 2**30:.2f} GiB")
    sys.exit(rc)


if __name__ == "__main__":
    main()
