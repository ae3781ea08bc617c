"""`dtr-bench NAME [options]`: run one of the project's benchmarks.

Exit status as for every dtr-scale command (command_line): 0 done, 1 a failure while measuring,
2 a usage or config error; either is one line on stderr, the traceback only with --verbose."""

from __future__ import annotations

import importlib
import pkgutil
import sys

from dtr_scale import benchmarks


def available() -> list[str]:
    return sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_"))


def report(name: str, err: Exception) -> int:
    """The one line for `err` on stderr; the exit status it means."""
    from dtr_scale.command_line import VERBOSE_FLAG, one_line
    from dtr_scale.config import ConfigError

    if isinstance(err, ConfigError):
        print(f"dtr-bench {name}: config error: {one_line(err)}", file=sys.stderr)
        return 2
    print(f"dtr-bench {name}: error: {type(err).__name__}: {one_line(err)} (rerun with {VERBOSE_FLAG} to print "
          "the traceback)", file=sys.stderr)
    return 1


def main() -> None:
    from dtr_scale.command_line import take_verbose

    verbose, args = take_verbose(sys.argv[1:])
    names = available()
    if not args or args[0] in ("-h", "--help"):
        print(f"usage: dtr-bench {{{','.join(names)}}} [options] [--verbose]   (dtr-bench NAME --help for each)")
        return
    if args[0] not in names:
        print(f"dtr-bench: unknown benchmark {args[0]!r}; the benchmarks are {', '.join(names)} "
              "(`dtr-bench NAME --help` for each)", file=sys.stderr)
        sys.exit(2)
    try:
        importlib.import_module(f"dtr_scale.benchmarks.bench_{args[0]}").main(args[1:])
    except Exception as err:
        if verbose:
            raise
        sys.exit(report(args[0], err))


if __name__ == "__main__":
    main()
