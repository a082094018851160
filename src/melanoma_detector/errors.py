"""Errors meant for the user: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (a path, a flag, a data folder). Message says what is accepted."""

    exit_code = 2


class DataError(UserError):
    """A data folder, manifest or image that cannot be used."""


class ImageDecodeError(DataError):
    """A file that is not a decodable image."""
