"""User-facing errors.

An `EdgestillError` is a mistake the user can fix (wrong path, bad config, corpus too small).
The CLI prints its message on one line and exits non-zero without a traceback; anything else
is a bug and keeps its traceback.
"""


class EdgestillError(Exception):
    """A problem with the user's input; the message names the problem and the fix."""
