"""The one base class of every error whose message is meant for the user.

A bad flag, file, key, shape or config value raises a subclass of `UserError` with a message that names it; `run.py`
prints any `UserError` as one line, without a traceback, and exits with status 2. Anything else is a bug and keeps
its traceback. Subclasses also derive from the builtin they refine (ValueError, OSError, ...), so library callers can
keep catching those.
"""


class UserError(Exception):
  """An error caused by the user's input; the message says which flag, file, key, shape or field, and why."""
