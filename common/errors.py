"""Errors a user can act on. Commands print their message (no stack trace) and exit with status 2."""


class UserError(Exception):
    """Bad input, a missing or stale file, a run folder in the wrong state: the message says the fix."""


class DatasetError(UserError):
    """The dataset cannot be read as configured."""


class RunFolderError(UserError):
    """A run folder is missing a component or mixes components of different runs."""
