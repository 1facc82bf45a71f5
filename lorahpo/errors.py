"""The one exception type users see: a mistake in their input, printed by the CLI as one line (exit code 2)."""


class UserError(Exception):
    """A mistake in the user's input; the CLI prints it as one line and exits with code 2."""
