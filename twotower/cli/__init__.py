"""The ``twotower`` command: ``twotower train | export | serve | bench | prepare | spark ...``.

Each subcommand lives in its own module and is imported only when it runs, so
``--help`` answers without importing torch.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("twotower.cli.train", "train, evaluate and export (Hydra overrides: key=value)"),
    "export": ("twotower.cli.export", "export a bundle from a training run's checkpoint"),
    "serve": ("twotower.cli.serve", "serve a bundle over HTTP (key=value settings)"),
    "bench": ("twotower.cli.bench", "run a benchmark from the checkout (quality, retrieval, ...)"),
    "prepare": (
        "twotower.cli.prepare",
        "split, encoders and training shards on this machine (no Spark)",
    ),
    "spark": ("twotower.cli.spark", "Spark jobs: prepare (split, encoders, shards), score (batch)"),
}


def usage() -> str:
    """The top-level help text."""
    width = max(map(len, COMMANDS))
    lines = [
        "usage: twotower {" + ",".join(COMMANDS) + "} [args ...]",
        "",
        "Two-tower retrieval: train with Lightning + Hydra, export a FAISS + ONNX bundle,",
        "serve it without torch.",
        "",
        "commands:",
        *(f"  {name.ljust(width)}  {text}" for name, (_, text) in COMMANDS.items()),
        "",
        "`twotower COMMAND --help` describes each; `twotower --version` prints the version.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run ``twotower`` with ``argv`` (default: the process's arguments); the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    if args[0] == "--version":
        from twotower import __version__

        print(f"twotower {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"twotower: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.run(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
