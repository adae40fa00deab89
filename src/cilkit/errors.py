"""User-caused errors: one clear line, exit status 2, no traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad config, missing or corrupt file, bad label).

    The CLI prints ``error: <message>`` and exits with status 2. The message must name the
    config key, file or line at fault.
    """
