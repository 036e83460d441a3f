"""The one error type for bad input, and the argparse that reports usage errors the same way."""
import argparse

# Exit status of every entry script for a UserError or a usage error (argparse's own convention).
USER_ERROR_EXIT = 2


class UserError(Exception):
    """Bad input or flags: the message names the file, row or flag and what was expected.

    `shared = True` marks an error every rank raised together (only rank 0 prints it)."""

    shared: bool = False


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (`error: argument --x: ...`) with exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(USER_ERROR_EXIT, f"error: {message} (see {self.prog} --help)\n")
