"""The exceptions a user is meant to read: each message says what happened and what to do.

The CLI prints any ``MieError`` as one line on stderr and exits with code 2.
"""


class MieError(Exception):
    """Base of the errors ``mie`` reports to its user in one line."""


class MieInputError(MieError, ValueError):
    """Bad input from the user: the message says what was wrong and what was expected."""


class TrainingDivergedError(MieError, RuntimeError):
    """Training produced NaN or inf predictions; the message names the outputs that broke."""
