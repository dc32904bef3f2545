"""The one exception type for mistakes a user can fix.

Entry points catch it and print its message on one line, without a traceback.
"""


class UserError(Exception):
    """Bad input, missing files, incompatible checkpoints: the message says what to do."""
