"""The one exception type for problems a user can fix."""


class UserError(Exception):
    """Bad input: a config, a tree, a path, a flag. The CLI prints it as one line and exits 2.

    The message names the problem and, where there is one, the way out.
    """
