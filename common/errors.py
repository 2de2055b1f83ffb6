"""Errors a user can fix, and how each becomes an exit code.

Every ``run_*`` entry point turns these into one sentence on stderr and an exit
code, never a traceback: 2 for bad input (data, arguments, weights files),
3 for a non-finite loss, 128 + signal number for an interruption.
"""


class UserError(Exception):
    """Bad input the user can fix; the message names the problem and the fix."""

    exit_code = 2


class DataError(UserError):
    """A dataset is missing, corrupt, unsafe or malformed."""


class WeightsError(UserError):
    """A weights or checkpoint file does not fit the model or is corrupt."""


class NonFiniteLossError(Exception):
    """Training produced a NaN or infinite loss."""

    exit_code = 3


class Interrupted(BaseException):
    """SIGINT/SIGTERM arrived: training stops where it is (the epoch is abandoned).

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` in a
    library on the way up swallows it.
    """

    def __init__(self, signum, message=""):
        super().__init__(message or f"signal {signum}")
        self.signum = signum
        self.exit_code = 128 + signum
