"""The one exception the converter raises for bad input or a refused operation."""


class ConvertError(Exception):
    """A one-line, user-facing message naming the file (and tensor) at fault."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message.replace("\n", " "))
        self.exit_code = exit_code
