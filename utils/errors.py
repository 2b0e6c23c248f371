"""The one exception type the command-line tools turn into a clear message instead of a traceback."""


class UserError(Exception):
    """Bad input or settings: the message names the file, folder or option and says how to fix it."""
