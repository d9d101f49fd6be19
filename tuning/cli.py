"""Command-line flags generated from a script's block of constants, so each setting is written once.

A constant becomes a flag when it is an upper-case assignment with a comment on the same line:

    BATCH_SIZE = 8  # examples per device per step; >= 1

gives `--batch-size` (type from the default, help from the comment). A `a|b|c` word in the comment
lists the allowed values. Booleans get `--name/--no-name`. Float constants accept integers too,
so `--val-size 100` is a count and `--val-size 0.05` a fraction.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys

_CONSTANT_LINE = re.compile(r"^([A-Z][A-Z0-9_]*)\s*=\s*.*?\s+#\s*(.+)$")
_CHOICES = re.compile(r"(?<![\w/.-])([a-z0-9][\w.-]*(?:\|[a-z0-9][\w.-]*)+)(?![\w/.-])")


def constant_specs(module) -> list[tuple[str, object, str]]:
    """(NAME, default, help) for each commented setting of `module`, in file order: a str, int, float or bool
    constant (a table such as a dict of metric labels is not a setting, and never a flag)."""
    specs = []
    for line in inspect.getsource(module).splitlines():
        match = _CONSTANT_LINE.match(line)
        if match and isinstance(getattr(module, match.group(1), None), (str, int, float, bool)):
            specs.append((match.group(1), getattr(module, match.group(1)), match.group(2).strip()))
    return specs


def flag_name(constant: str) -> str:
    return "--" + constant.lower().replace("_", "-")


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)  # ValueError here makes argparse name the flag


_number.__name__ = "number"


def build_parser(module, description: str | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser with one flag per commented constant of `module`."""
    parser = argparse.ArgumentParser(
        description=description or (module.__doc__ or "").strip().splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    for name, default, help_text in constant_specs(module):
        kwargs: dict = {"default": default, "help": help_text.replace("%", "%%"), "dest": name.lower()}
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _number if isinstance(default, float) else type(default)
            choices = _CHOICES.search(help_text)
            if choices and isinstance(default, str):
                kwargs["choices"] = choices.group(1).split("|")
            kwargs["metavar"] = name
        parser.add_argument(flag_name(name), **kwargs)
    return parser


class UserError(ValueError):
    """A mistake in the user's settings, files or data: reported in one line, without a traceback."""


def explicit_dests(parser: argparse.ArgumentParser, argv) -> set[str]:
    """The settings given on the command line (as opposed to left at their defaults)."""
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            probe.add_argument(*action.option_strings, dest=action.dest, default=argparse.SUPPRESS,
                               **({"action": action.__class__} if isinstance(action, argparse.BooleanOptionalAction)
                                  else {"nargs": action.nargs}))
    return set(vars(probe.parse_known_args(argv)[0]))


def parse_or_exit(parser: argparse.ArgumentParser, validate, argv=None) -> argparse.Namespace:
    """Parse argv, then run `validate(args)`; a ValueError from it becomes a clean exit 2."""
    args = parser.parse_args(argv)
    try:
        validate(args)
    except ValueError as err:
        parser.error(str(err))
    return args


def fail(message: str, code: int = 2) -> None:
    """Print a user-facing error (or, with code 0, a note) without a traceback and exit.

    Under torchrun every process ends the same way, so only the first one prints."""
    import os

    if os.environ.get("RANK", "0") == "0":
        if code == 0:
            print(message)
        else:
            print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def check_all(problems: list[str]) -> None:
    """Raise one ValueError listing every problem, so the user fixes them in one go."""
    if problems:
        raise ValueError("\n  ".join(["invalid settings:"] + problems) if len(problems) > 1 else problems[0])


def run(module, main, validate) -> None:
    """Parse the module's flags, validate them, and call main(args, explicitly given settings);
    a UserError from main ends the run with its message and exit code 2, Ctrl-C with one line and 130."""
    parser = build_parser(module)
    args = parse_or_exit(parser, validate)
    try:
        main(args, explicit_dests(parser, sys.argv[1:]))
    except UserError as error:
        fail(str(error), getattr(error, "code", 2))
    except KeyboardInterrupt:
        fail("interrupted", 130)
