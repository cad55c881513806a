"""The server's answer for a client's mistake: `ApiError`, a status and a message."""


class ApiError(Exception):
    """An answer for the client: a status and a message."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers

    def __reduce__(self):  # whole across processes (Ray Serve replicas answer with it)
        return ApiError, (self.status, str(self), self.headers)
