"""`make bench`: runs every bench/bench_*.py in turn (or those named in argv).

Each script prints its own table of ratios against a baseline measured in the same run;
results worth keeping go to bench/RESULTS.md with the command and the machine.
"""

from __future__ import annotations

import runpy
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    names = argv or sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    # the CPU benches; bench/gpu/ needs an NVIDIA machine (docs/gpu.md)
    for name in names:
        path = HERE / f"bench_{name}.py"
        if not path.exists():
            print(f"no benchmark named {name!r} ({path})", file=sys.stderr)
            return 2
        print(f"\n##### bench {name}")
        t0 = time.perf_counter()
        sys.argv = [str(path)]
        runpy.run_path(str(path), run_name="__main__")
        print(f"##### bench {name} took {time.perf_counter() - t0:.1f}s")
    # plots from the raw numbers the benches left in bench/out/*.json
    # (a bench that did not run keeps its old PNG)
    runpy.run_path(str(HERE / "plots.py"), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
