"""A flag that absl or ml_collections cannot parse (an unknown preset or config field, a value
of the wrong type, a missing config file), reported like every other input error: one line
naming the flag as typed, exit status 2 (`--verbose`: the traceback). Left to themselves they
print a traceback, or a FATAL block with the config file's traceback inside, and exit 1.

  app.run(main, flags_parser=flag_errors.parse_flags)
"""

from __future__ import annotations

import sys

from absl import flags

FLAGS = flags.FLAGS


def flag_error_line(e: BaseException, argv: list[str]) -> str:
  """One line for a flag that could not be parsed, naming the flag as it was typed."""
  if isinstance(e, (KeyError, AttributeError)):
    # ConfigDict's unknown field: KeyError('name'), then KeyError("'name'\nDid you mean ...")
    # and AttributeError(that KeyError) raised while handling it; the middle one reads best
    chain = [e]
    while isinstance(chain[-1].__context__, (KeyError, AttributeError)):
      chain.append(chain[-1].__context__)
    texts = [c.args[0] for c in chain if c.args and isinstance(c.args[0], str)]
    text = next((t for t in texts if "\n" in t), texts[-1] if texts else str(e))
    key, *hint = text.splitlines()
    key = key.strip("'")
    typed = [a for a in argv[1:] if a.startswith("--config.") and key in a.split("=")[0].split(".")]
    where = typed[0] if typed else "--config"
    return f"{where}: no config field {key!r}" + (f" ({' '.join(hint)})" if hint else "")
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  if isinstance(e, OSError):  # the config file itself: its last line says why
    typed = [a for a in argv[1:] if a.startswith("--config=")]
    return f"{typed[0] if typed else '--config'}: {lines[-1] if lines else e}"
  # flags.Error: "flag --x=v: why", or a header and the config file's own traceback below it
  return lines[0] if len(lines) < 2 else f"{lines[0].rstrip(':')}: {lines[-1]}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag reported like every other input error."""
  try:
    rest = FLAGS(argv)
    # a config file that failed to load is reported on first use, not while parsing
    if "config" in FLAGS:
      getattr(FLAGS.config, "stage", None)
  except (flags.Error, KeyError, AttributeError, OSError) as e:
    if any(a in ("--verbose", "--verbose=true", "--verbose=True") for a in argv):
      raise
    print(f"error: FlagError: {flag_error_line(e, argv)}", file=sys.stderr)
    sys.exit(2)
  return rest
