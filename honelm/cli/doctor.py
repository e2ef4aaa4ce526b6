"""``honelm doctor``: replay the diagnostics over a finished or running run and report.

    honelm doctor RUN_DIR                   # readable report
    honelm doctor RUN_DIR --json            # the events, for programs
    honelm doctor RUN_DIR --fail_on error   # exit status 1 when an error (or worse) is active

``RUN_DIR`` is the ``output_dir`` of any ``transformers.Trainer`` run (honelm, TRL...): its
newest ``trainer_state.json`` is replayed through the same detectors the run used. See
``docs/diagnostics.md``.
"""

from __future__ import annotations

import argparse
import json
import sys

_LEVELS = ("warning", "error", "critical")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="Output directory of a training run (or a checkpoint folder, or a trainer_state.json).")
    parser.add_argument("--json", action="store_true", help="Print the events as JSON.")
    parser.add_argument("--fail_on", "--fail-on", choices=_LEVELS, default=None,
                        help="Exit with status 1 when a problem of this severity or worse is still active.")
    parser.add_argument("--thresholds", metavar="JSON", default=None,
                        help='Per-code thresholds replacing the run\'s, e.g. \'{"GRAD_NORM_SPIKE": 20}\'.')
    parser.add_argument("--silence", metavar="CODE", nargs="+", default=None,
                        help="Codes not to report (replaces the run's silenced codes).")
    parser.add_argument("--no_info", "--no-info", action="store_true",
                        help="Leave info-level problems out of the readable report.")


def run(args: argparse.Namespace) -> int:
    from honelm.diagnostics.doctor import RunDirError, load_run, replay, report_dict, report_text
    from honelm.diagnostics.events import severity_rank

    try:
        loaded = load_run(args.run_dir)
        engine = replay(loaded, thresholds=args.thresholds, silence=args.silence)
    except (RunDirError, ValueError) as e:
        print(f"honelm doctor: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report_dict(loaded, engine), indent=1))
    else:
        print(report_text(loaded, engine, show_info=not args.no_info))
    if args.fail_on is not None:
        level = severity_rank(args.fail_on)
        if any(severity_rank(e.severity) >= level for e in engine.active_events()):
            return 1
    return 0
