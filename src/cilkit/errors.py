"""User-caused errors: one clear line, exit status 2, no traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad config, missing or corrupt file, bad label).

    The CLI prints ``error: <message>`` and exits with status 2. The message must name the
    config key, file or line at fault.
    """


def reason(e: BaseException, limit: int = 200) -> str:
    """An exception's message on one line (its type name when it has none), at most ``limit``
    characters: the cause part of a ``UserError``."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def described(e: BaseException, limit: int = 200) -> str:
    """``Type: message`` on one line, for causes whose type tells the user something."""
    return f"{type(e).__name__}: {reason(e, limit)}"
