"""``python -m benchmarks.run [options]``: the side-by-side runner (same as ``fusedres bench``)."""

import argparse
import sys

from fusedres import bench


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=bench.__doc__.splitlines()[0])
    bench.add_arguments(p)
    return bench.main(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
