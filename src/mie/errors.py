"""The one exception type that means "the user's input is wrong"."""


class MieInputError(ValueError):
    """Bad input from the user: the message says what was wrong and what was expected.

    The CLI prints it as one line on stderr and exits with code 2.
    """
