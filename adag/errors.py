"""One exception type for problems the user can fix; the CLI prints it as a single line."""


class AdagError(Exception):
    """A problem with the user's input or environment, with what to do about it in the message."""
