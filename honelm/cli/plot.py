"""``honelm plot``: a PNG of a run's main curves, with the diagnostics marked where they fired.

    honelm plot RUN_DIR                  # writes RUN_DIR/diagnostics.png
    honelm plot RUN_DIR -o curves.png

Needs matplotlib (``pip install 'honelm[plot]'``). See ``docs/diagnostics.md``.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="Output directory of a training run (or a checkpoint folder, or a trainer_state.json).")
    parser.add_argument("-o", "--output", metavar="PNG", default=None,
                        help="Where to write the image (default: RUN_DIR/diagnostics.png).")
    parser.add_argument("--dpi", type=int, default=110, help="Resolution of the image (default: 110).")


def run(args: argparse.Namespace) -> int:
    from honelm.diagnostics.doctor import RunDirError, load_run, replay

    try:
        loaded = load_run(args.run_dir)
        engine = replay(loaded)
    except (RunDirError, ValueError) as e:
        print(f"honelm plot: error: {e}", file=sys.stderr)
        return 2
    try:
        from honelm.diagnostics.plotting import plot_run

        output = args.output or os.path.join(loaded.path, "diagnostics.png")
        path = plot_run(loaded, engine.events, output, dpi=args.dpi)
    except ImportError as e:
        print(f"honelm plot: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"honelm plot: error: {e}", file=sys.stderr)
        return 2
    print(f"honelm plot: wrote {os.path.abspath(path)}")
    return 0
