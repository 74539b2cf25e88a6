"""Command line: `python -m slimgpt_core prune|eval|export|compare|runs|shear|recover|pretrain|cache ...`.

The options (parser.py) load no heavy library, so `--help` and argument errors answer at once; the commands
(commands.py, which load torch and the services) are imported only once the arguments are read."""
from __future__ import annotations

import sys

from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.cli.parser import build_parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from slimgpt_core.cli.commands import COMMANDS  # after parsing: --help and bad arguments never load torch
    try:
        return COMMANDS[args.command](args)
    except SlimGPTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory: lower --nsamples, --seqlen or --batch-size", file=sys.stderr)
        return 1
