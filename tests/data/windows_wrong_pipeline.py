"""A deliberately wrong windows pipeline for the tests: it ignores the watermark, so every late reading is counted
in (the window values of the windows it falls in come out different from the oracle's).

Same contract as ``python -m pipeline.windows``: readings as JSON lines on stdin, window values as JSON lines to
``--out``; it emits everything at end of input.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.windows import WindowConfig, make_engine, parse_reading, value_json

S = 1_000_000_000


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", default="10,60", help="seconds, comma-separated")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    windows = tuple(int(w) * S for w in args.windows.split(","))
    # The bug under test: an allowed lateness so large that no reading is ever late.
    engine = make_engine("improved", WindowConfig(windows, S, 10**18))
    for line in sys.stdin.buffer:
        if line.strip():
            engine.add(*parse_reading(line, "load_rate"))
    with open(args.out, "w", encoding="utf-8") as out:
        for v in engine.finish():
            out.write(value_json(v) + "\n")
        out.write('{"late": 0}\n')
    return 0


if __name__ == "__main__":
    sys.exit(main())
