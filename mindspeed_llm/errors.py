"""What entry scripts turn into a one-line error and a non-zero exit."""
import argparse



class UserError(Exception):
    """Bad input or flags: the message names the file, row or flag and what was expected."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (`error: argument --x: ...`) with exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")
