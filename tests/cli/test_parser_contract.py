"""The command line's flags are a contract (scripts and the studio's shown commands call them): every subcommand's
options, as argparse holds them, must equal the recorded `parser_contract.json`. A deliberate change rewrites the
record (`python -m tests.cli.test_parser_contract`) and shows up in its diff."""
import json
import sys
from pathlib import Path

from slimgpt_core.cli.parser import build_parser

RECORD = Path(__file__).with_name("parser_contract.json")


def option_table() -> dict[str, list[dict]]:
    """Per subcommand, each option: flags, dest, default, converter's name, choices, nargs, help, whether required,
    and argparse's action class (a switch or a value). Sorted by dest: the order of `--help` is not the contract."""
    subcommands = build_parser()._subparsers._group_actions[0].choices
    table = {}
    for name, sub in subcommands.items():
        rows = []
        for action in sub._actions:
            if action.dest == "help":
                continue
            rows.append({"flags": list(action.option_strings), "dest": action.dest, "default": action.default,
                         "type": getattr(action.type, "__name__", None), "action": type(action).__name__,
                         "choices": None if action.choices is None else list(action.choices),
                         "nargs": action.nargs, "required": action.required, "metavar": action.metavar,
                         "help": action.help})
        table[name] = sorted(rows, key=lambda row: (row["dest"], row["flags"]))
    return table


def test_every_subcommand_s_options_are_the_recorded_ones():
    recorded = json.loads(RECORD.read_text())
    now = json.loads(json.dumps(option_table()))  # tuples as lists, as the record holds them
    assert sorted(now) == sorted(recorded)
    for command in recorded:
        assert now[command] == recorded[command], command


if __name__ == "__main__":
    RECORD.write_text(json.dumps(option_table(), indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {RECORD}", file=sys.stderr)
