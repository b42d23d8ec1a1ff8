"""Domain errors of the server: a stable ``code``, a message, details. No HTTP here.

``server/errors.py`` is the one place that maps them to HTTP statuses. Every error pickles as
itself (``__reduce__``), so it crosses process boundaries intact (Ray replicas, worker pools).
"""

from __future__ import annotations

from typing import Any, ClassVar


class SidecarError(Exception):
    """Base of the server's domain errors.

    Args:
        message: one sentence a user can act on.
        details: every individual problem, when there are several.
        retry_after: seconds after which the same call may succeed (overload, warm-up).
    """

    code: ClassVar[str] = "error"

    def __init__(self, message: str, details: list[Any] | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message, self.details, self.retry_after = message, list(details or []), retry_after

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.details, self.retry_after))


class InvalidRequest(SidecarError):
    code = "invalid_request"


class UnsupportedMediaType(SidecarError):
    code = "unsupported_media_type"


class InvalidTaskId(SidecarError):
    code = "invalid_task_id"


class UnknownTask(SidecarError):
    code = "unknown_task"

    @classmethod
    def of(cls, task_id: str) -> UnknownTask:
        return cls(f"no task {task_id!r}; GET /v1/tasks lists them")


class UnknownVersion(SidecarError):
    code = "unknown_version"


class TaskQuarantined(SidecarError):
    """The task's current version cannot be served; an operator must roll back or upload."""

    code = "task_quarantined"


class TaskFailed(SidecarError):
    """A task's model raised or produced NaN/Inf at inference."""

    code = "task_failed"


class InsufficientStorage(SidecarError):
    code = "insufficient_storage"


class TooManyTasks(SidecarError):
    code = "too_many_tasks"


class TooLarge(SidecarError):
    code = "too_large"


class RequestTimeout(SidecarError):
    """The request's body did not arrive in time."""

    code = "request_timeout"


class NotAnImage(SidecarError):
    code = "not_an_image"


class UnreadableImage(SidecarError):
    code = "unreadable_image"


class Overloaded(SidecarError):
    """The server cannot take this work now; ``retry_after`` says when to try again."""

    code = "overloaded"

    def __init__(self, message: str, details: list[Any] | None = None, retry_after: int | None = 1) -> None:
        super().__init__(message, details, retry_after)


class BodiesOverBudget(Overloaded):
    """The request bodies in memory would pass the server's budget; this one is refused unread."""


class CacheBudget(SidecarError):
    """A task model is larger than a whole tier's byte budget."""

    code = "cache_budget"


class NotReady(SidecarError):
    code = "not_ready"

    def __init__(self, message: str, details: list[Any] | None = None, retry_after: int | None = 5) -> None:
        super().__init__(message, details, retry_after)


class MissingKey(SidecarError):
    code = "missing_key"


class WrongKey(SidecarError):
    code = "wrong_key"


class ManagementDisabled(SidecarError):
    """Management is refused: the server is reachable off loopback and has no admin key."""

    code = "management_disabled"
