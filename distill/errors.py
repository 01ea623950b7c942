"""The one exception type for problems a user can fix; the CLI prints it as one line, exit 2."""


class DistillError(Exception):
    """Bad input or state. The message names the problem and the fix."""
