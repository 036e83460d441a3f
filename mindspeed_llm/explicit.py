"""Which flags the user typed: the parse again with every default suppressed, so only typed flags land."""
from __future__ import annotations

import argparse
import copy
from typing import Optional, Sequence


def explicit_dests(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> tuple[str, ...]:
    """Destinations set on the command line `argv` (sorted; a tuple so it can be saved with the args)."""
    quiet = copy.deepcopy(parser)
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    return tuple(sorted(vars(quiet.parse_known_args(argv)[0])))


def explicit_of(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[str, ...]:
    """`args.explicit` when the args came from a parse that recorded it, else the destinations whose value
    differs from the parser's default (args built in code)."""
    recorded = getattr(args, "explicit", None)
    if recorded is not None:
        return tuple(recorded)
    return tuple(sorted(a.dest for a in parser._actions
                        if hasattr(args, a.dest) and getattr(args, a.dest) != parser.get_default(a.dest)))
