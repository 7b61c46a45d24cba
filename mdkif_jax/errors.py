"""The error a user fixes by changing the config. main.py prints it, and the other input
errors each module raises (DataError, CheckpointMismatchError, TaskError, ...), as one line
and exits with status 2; `--verbose` shows the traceback instead."""


class ConfigError(ValueError):
  """A config value that cannot work; the message names the flag to change."""


class CheckpointMismatchError(ValueError):
  """The checkpoint in the workdir belongs to another model, skill set or adapter shape."""


class SkillsMismatchError(CheckpointMismatchError):
  """A skills checkpoint (or adapter) that belongs to another base model, or is missing."""
