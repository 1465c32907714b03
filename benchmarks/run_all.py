"""Run every benchmark script in turn (each writes benchmarks/results/<name>.json and .md).

    python -m benchmarks.run_all            # full shapes, on the GPU
    python -m benchmarks.run_all --quick    # tiny shapes, smoke run (CPU: set TRITON_INTERPRET=1)
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=None, help="comma-separated script names, e.g. bench_loss,bench_attention")
    args, rest = ap.parse_known_args()
    here = os.path.dirname(os.path.abspath(__file__))
    scripts = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(here, "bench_*.py")))
    if args.only:
        wanted = set(args.only.split(","))
        scripts = [s for s in scripts if s in wanted]
    failed = []
    for name in scripts:
        cmd = [sys.executable, "-m", f"benchmarks.{name}"] + (["--quick", "--no-save"] if args.quick else []) + rest
        print(f"\n=== {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd, cwd=os.path.dirname(here)).returncode != 0:
            failed.append(name)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
