"""Errors meant for the person at the keyboard.

A UserError carries one line that names the file, key or value at fault and what to do; the CLI
prints it without a traceback and the window shows it in a dialog. Anything else that escapes is a
bug and is logged with its traceback to the user's log folder.
"""


class UserError(Exception):
    """A problem with the user's input or environment, stated in one actionable line."""


class FollowedError(UserError):
    """Raised on a process other than the main one of a multi-process run when it stops because the
    main process failed (a backup it could not write): the main process tells the user why, this one
    stays quiet rather than print the same line again."""


class ConfigError(UserError):
    """A setting, preset or config file that cannot be used as it is."""

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None, also: tuple[str, ...] = ()):
        self.source = source
        self.key = key
        # Every setting involved: a rule across settings names them all, so each can be marked.
        self.keys: tuple[str, ...] = ((key,) if key else ()) + also
        prefix = f"{source}: " if source else ""
        super().__init__(prefix + message)
