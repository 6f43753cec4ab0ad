"""One exception type for every mistake a user can fix; the CLI prints it as one line."""


class FedrecError(Exception):
    """A user-fixable problem. The message names the file, field or flag and the fix."""
