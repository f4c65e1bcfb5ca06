"""One error type for bad site data: the message names the problem and the fix."""


class DataError(ValueError):
    """`public` is what may leave the site in an error reply; it defaults to the message.
    A message that quotes the data (a label value, a cell) passes one without the values,
    and the site's own log keeps the whole message."""

    def __init__(self, message: str, public: str | None = None):
        super().__init__(message)
        self.public = message if public is None else public
