"""The one exception type that the command line turns into a one-line message."""


class CapsNetError(Exception):
    """A problem the user can fix: bad input, missing data, a foreign checkpoint."""
