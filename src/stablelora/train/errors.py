"""The errors a run raises on purpose; the command line prints their message and exits 2."""


class RunError(RuntimeError):
    """A run that cannot start or go on as configured; the message says how to fix it."""


class RunDiverged(RunError):
    """The run's weights stopped being finite; RUN/diverged.json says when and what, for compare."""
