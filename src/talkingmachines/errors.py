"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class InputError(ValueError):
    """Bad input from the user (missing/unreadable file, wrong format, bad size, ...)."""
