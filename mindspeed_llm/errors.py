"""The one error type for bad input, and the argparse that reports usage errors the same way."""
import argparse

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
            flags = message.split(":", 1)[1].strip()
            message = f"unrecognized argument(s): {flags}; this flag is not implemented"
        error = UserError(f"{message} (see {self.prog} --help)")
        error.shared = True          # every rank parses the same command line
        raise error
