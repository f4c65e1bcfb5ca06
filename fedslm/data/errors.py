"""One error type for bad site data: the message names the problem and the fix."""


class DataError(ValueError):
    pass
