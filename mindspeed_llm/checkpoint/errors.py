"""The one error type conversion raises for bad input: its message is the single line the CLI prints."""


class ConversionError(ValueError):
    """Bad input to a conversion: the message names the flag, file or value and how to fix it."""
