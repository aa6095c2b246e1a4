"""Errors a user can act on.

Anything raised as a GptcoreError reaches the user as one line on stderr (no traceback) and a
non-zero exit: 2 for bad input (fix the command or the file), 1 for failures at run time.
"""


class GptcoreError(Exception):
    exit_code = 1


class UserInputError(GptcoreError):
    """Bad data, config, checkpoint or argument: the message says what to change."""

    exit_code = 2


class TrainingFailure(GptcoreError):
    """Something went wrong while running (e.g. the loss diverged)."""

    exit_code = 1
