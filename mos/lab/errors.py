"""`InputError`: what the user gave cannot be used, found while running rather than while reading
the configuration (a log without a needed column, an empty file, a device this machine lacks).

The command line prints it as one line on stderr and exits with code 2, as it does for a
configuration error; a library caller gets a `ValueError` with the same message.
"""


class InputError(ValueError):
    """Bad input: the message names the option or column, what was expected and what came."""


class MissingPackage(InputError, ImportError):
    """An optional package the input needs is not installed (an `ImportError` too)."""
