"""The one exception type users see: a mistake in their input, printed by the CLI as one line (exit code 2)."""


class UserError(Exception):
    """A mistake in the user's input; the CLI prints it as one line and exits with code 2."""


class Interrupted(Exception):
    """The sweep stopped before it finished (Ctrl-C); its state is kept for --resume. The CLI exits with code 130."""


class SweepFailed(Exception):
    """Every trial failed: the tables say why, and nothing can be scored or exported. The CLI exits with code 1."""
