"""`dtr-bench NAME [options]`: run one of the project's benchmarks."""

from __future__ import annotations

import importlib
import pkgutil
import sys

from dtr_scale import benchmarks


def available() -> list[str]:
    return sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_"))


def main() -> None:
    names = available()
    if len(sys.argv) < 2 or sys.argv[1] not in names:
        print(f"usage: dtr-bench {{{','.join(names)}}} [options]   (dtr-bench NAME --help for each)")
        sys.exit(0 if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help") else 2)
    importlib.import_module(f"dtr_scale.benchmarks.bench_{sys.argv[1]}").main(sys.argv[2:])


if __name__ == "__main__":
    main()
