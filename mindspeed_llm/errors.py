"""The one error type for bad input, and the argparse that reports usage errors the same way."""
import argparse
import difflib

# Exit status of every entry script for a UserError or a usage error (argparse's own convention).
USER_ERROR_EXIT = 2


class UserError(Exception):
    """Bad input or flags: the message names the file, row or flag and what was expected.

    `shared = True` marks an error every rank raised together (only rank 0 prints it)."""

    shared: bool = False


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are a `UserError` (printed by `logs.exit_status` as one
    `error: argument --x: ... (see PROG --help)` line, exit status 2) instead of a usage dump."""

    def error(self, message: str):  # type: ignore[override]
        if message.startswith("unrecognized arguments:"):
            message = self._unknown(message.split(":", 1)[1].split())
        error = UserError(f"{message} (see {self.prog} --help)")
        error.shared = True          # every rank parses the same command line
        raise error

    def _unknown(self, extras: list[str]) -> str:
        """`unknown flag --micro-batch-sze (did you mean --micro-batch-size?)`; a value after an unknown flag is
        its value, other stray words are values without a flag."""
        known = [o for o in self._option_string_actions if o.startswith("--")]
        parts, stray = [], []
        for i, word in enumerate(extras):
            if word.startswith("-") and len(word) > 1 and not _is_number(word):
                flag = word.split("=", 1)[0]
                close = difflib.get_close_matches(flag, known, n=1, cutoff=0.75)
                parts.append(f"unknown flag {flag}" + (f" (did you mean {close[0]}?)" if close else ""))
            elif i == 0 or not extras[i - 1].startswith("-"):
                stray.append(word)
        if stray:
            parts.append(f"unexpected argument(s) {' '.join(stray)} (a value without a flag; quote paths that hold "
                         f"spaces)")
        return "; ".join(parts)


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True
