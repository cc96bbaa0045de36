"""The one-line error for an unknown name in a registry (combiners, backbones, sharing)."""

import difflib


def unknown(kind: str, name, valid) -> ValueError:
  """``unknown <kind> 'x' (did you mean 'y'?); valid: a, b, c``."""
  valid = sorted(valid)
  close = difflib.get_close_matches(str(name), valid, n=1)
  hint = f" (did you mean {close[0]!r}?)" if close else ""
  return ValueError(f"unknown {kind} {name!r}{hint}; valid: {', '.join(valid) or '(none)'}")
