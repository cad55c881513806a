"""The server's answer for a client's mistake: `ApiError`, a status and a message."""


class ApiError(Exception):
    """An answer for the client: a status and a message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
