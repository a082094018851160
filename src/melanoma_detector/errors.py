"""Errors meant for the user: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (a path, a flag, a data folder). Message says what is accepted."""

    exit_code = 2


class DataError(UserError):
    """A data folder, manifest or image that cannot be used."""


class ImageDecodeError(DataError):
    """A file that is not a decodable image. The message is "<name>: <reason>"; `name` and `reason`
    are also kept apart so a caller can name the file its own way (an upload's original name)."""

    def __init__(self, message: str, *, name: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.name = name
        self.reason = reason if reason is not None else message
