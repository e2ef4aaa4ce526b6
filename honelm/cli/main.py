"""The ``honelm`` command.

Each subcommand lives in its own module and is imported only when it runs, so
``honelm --help`` answers without importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module, one-line help). The module defines `add_arguments(parser)` and `run(args)`.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("honelm.cli.demo", "Train a tiny model offline on a built-in task and show what it learned."),
    "env": ("honelm.cli.env", "Print versions and hardware, for bug reports."),
    "doctor": ("honelm.cli.doctor", "Replay the diagnostics over a training run and report its problems."),
    "dpo": ("honelm.cli.dpo", "Direct Preference Optimization: train a model on preference pairs (chosen vs rejected)."),
    "grpo": ("honelm.cli.grpo", "Group Relative Policy Optimization: train a model with rewards on the completions it samples."),
    "kto": ("honelm.cli.kto", "Kahneman-Tversky Optimization: align a model with unpaired desirable/undesirable feedback."),
    "plot": ("honelm.cli.plot", "Plot a run's main curves with its diagnostics marked (needs matplotlib)."),
    "reward": ("honelm.cli.reward", "Reward modeling: train a reward model on preference pairs."),
    "rloo": ("honelm.cli.rloo", "REINFORCE Leave-One-Out: online RL with reward functions and a leave-one-out baseline."),
    "sft": ("honelm.cli.sft", "Supervised fine-tuning: train a model on text or prompt-completion data."),
}


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser; only the options of the command named in ``argv`` are registered."""
    from honelm.version import __version__

    parser = argparse.ArgumentParser(
        prog="honelm",
        description="honelm: post-training for language models.",
        epilog="Run `honelm COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"honelm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        # Options are registered lazily: only the chosen command's module is imported.
        if name == _first_positional(argv):
            importlib.import_module(module_name).add_arguments(p)
    return parser


def _first_positional(argv: Sequence[str]) -> str | None:
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(args._module)
    result = module.run(args)
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
