"""The one exception type that entry scripts turn into a one-line error and a non-zero exit."""


class UserError(Exception):
    """Bad input or flags: the message names the file, row or flag and what was expected."""
