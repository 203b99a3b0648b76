"""Every exception the package raises derives from :class:`ThrottleError`."""

from __future__ import annotations

__all__ = ["ConfigurationError", "KeyFunctionError", "ThrottleError"]


class ThrottleError(Exception):
    """Base class for every error raised by celery-throttled."""


class ConfigurationError(ThrottleError, ValueError):
    """A decorator argument or a ``throttle_*`` setting has a bad value.

    The message always names the task (or the setting) and the offending value.
    """


class KeyFunctionError(ThrottleError):
    """A task's key function raised, or returned something other than a non-empty string.

    The task does not run; it is recorded as failed with this error and the worker carries on.
    """
