"""The error conversion raises for bad input: its message is the single line the CLI prints."""
from mindspeed_llm.errors import UserError


class ConversionError(UserError):
    """Bad input to a conversion: the message names the flag, file or value and how to fix it."""
