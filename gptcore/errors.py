"""Errors a user can act on.

Anything raised as a GptcoreError reaches the user as one line on stderr (no traceback) and a
non-zero exit: 2 for bad input (fix the command or the file), 1 for failures at run time.
"""


class GptcoreError(Exception):
    exit_code = 1
    exit_at_once = False


class UserInputError(GptcoreError):
    """Bad data, config, checkpoint or argument: the message says what to change."""

    exit_code = 2


class TrainingFailure(GptcoreError):
    """Something went wrong while running (e.g. the loss diverged)."""

    exit_code = 1


class LostRanks(TrainingFailure):
    """This rank's peers went away mid-collective. Its process group can no longer be torn down
    safely: freeing gloo's half-closed connections at interpreter exit aborts the process
    (SIGABRT, `terminate called without an active exception`) about one time in ten, so the
    process ends without that teardown once the message is out."""

    exit_at_once = True


def shown(value, limit: int = 60) -> str:
    """A value from a file we do not trust, fit for a one-line message: a number or a string as
    its repr, cut short; anything else by its type alone. A list that nests shared references
    can print as billions of characters, so containers are never printed."""
    if isinstance(value, (bool, int, float, str, type(None))):
        text = repr(value)
        return text if len(text) <= limit else text[:limit] + "..."
    return f"a {type(value).__name__}"
