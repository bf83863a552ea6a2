"""Failures a job reports to its user: a stable code and a readable message."""


class JobError(Exception):
    """Ends a job as ``failed`` with ``{"code", "message"}``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class JobCanceled(Exception):
    """Raised at a progress report once the job's cancel was requested; ends it ``canceled``."""
