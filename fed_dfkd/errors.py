"""Exceptions shared across fed_dfkd.

Only errors the user can fix live here. The CLI catches :class:`UserError`, prints its message and
exits with code 2 without a traceback; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (config, CLI argument, file).

    The CLI prints the message and exits with code 2, with no traceback, so the message must say
    what is wrong and how to fix it.
    """


class DatasetNotFoundError(UserError):
    """A dataset's files are not where they were looked for.

    The message names the dataset and shows the expected layout.
    """
