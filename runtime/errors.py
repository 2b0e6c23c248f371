"""The one exception type the command-line tools turn into a clear message instead of a traceback."""


class UserError(Exception):
    """Bad input or settings: the message names the file, folder or option and says how to fix it."""


def run_cli(body) -> int:
    """Run a command's body; a UserError becomes one 'error: ...' paragraph on stderr and exit status 2."""
    import sys
    try:
        body()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
