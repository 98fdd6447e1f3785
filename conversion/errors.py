"""The errors of the weights layer: one family, every one a `UserError` whose message names the file, part or key."""

from maskgit_common.errors import UserError

# What every message that needs a config asks for: the CLI flag first, the Python argument second.
PASS_CONFIG = "pass --config PRESET_OR_JSON (config= in Python)"


class CheckpointError(UserError, ValueError):
  """A checkpoint is missing, unreadable, ambiguous, lacks a model or does not fit its config."""


class ConversionError(CheckpointError):
  """Weights do not fit the config, or a source cannot be read as a checkpoint; lists every problem found."""


class CheckpointFormatError(ConversionError):
  """A file is missing, truncated, or not in the format expected; the message names the file and what it is."""


def raise_all(errors: list) -> None:
  """Raises one error holding every problem in `errors` (exceptions or messages), if any; a lone exception keeps its
  own type, and only format errors together stay a CheckpointFormatError."""
  if len(errors) == 1 and isinstance(errors[0], Exception):
    raise errors[0]
  if errors:
    formats_only = all(isinstance(e, CheckpointFormatError) for e in errors)
    raise (CheckpointFormatError if formats_only else ConversionError)("\n".join(str(e) for e in errors))
