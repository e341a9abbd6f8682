"""Every error asyncflow raises for users to catch, in one place.

All are raised with a message that says what to fix. ``run_request`` raises
:class:`SettingsError`, :class:`ModelError`, :class:`LabelError` and
:class:`RequestError` (with ``cluster``, also :class:`ClusterError`); a case's own failure never raises, it is reported.
"""

from __future__ import annotations

__all__ = [
    "ClusterError",
    "Interrupted",
    "LabelError",
    "ModelError",
    "RequestError",
    "SegCheckError",
    "SettingsError",
    "V1RunError",
]


class SettingsError(ValueError):
    """A setting is missing or has an impossible value."""


class ModelError(RuntimeError):
    """The model folder is unusable: missing files, no folds, or it failed to load."""


class ClusterError(RuntimeError):
    """The cluster cannot run the request (unreachable, a node that cannot read the shared folders),
    or lost a step on every try."""


class LabelError(ValueError):
    """A label configuration that cannot be used, with the reason."""


class RequestError(ValueError):
    """The request as a whole cannot be processed (bad entry type, no usable case...)."""


class SegCheckError(ValueError):
    """A written SEG does not decode to the prediction on its sources (a case's failure)."""


class V1RunError(RuntimeError):
    """``nnUNet_predict`` failed as a whole: non-zero exit, timeout, or no start (a case's failure)."""


class Interrupted(KeyboardInterrupt):
    """A request stopped by a signal (SIGINT, SIGTERM, SIGHUP): what finished is kept, the rest is
    ``pending``. A KeyboardInterrupt, so that code which handles Ctrl-C handles every stop."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process ended by it."""
        return 128 + self.signum
