"""`JloraError`, the one base of every error jlora raises on purpose.

Each error class subclasses it (and, for compatibility, the builtin it always was: ValueError, OSError),
and its message is one line that names the file, line, key or value at fault. The command-line entry
points catch this base and print the message, so no list of expected errors is kept by hand.
"""


class JloraError(Exception):
    """Bad input or a state jlora refuses; the message is one line meant for the user."""
