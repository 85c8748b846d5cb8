"""Checks of OpenAI-style requests for `fiat serve`: sampling fields in OpenAI's ranges, errors in its format."""
import math

from fiat_jax.beta import backends

MAX_STOP = 4  # OpenAI's limit on stop strings


class Reject(Exception):
  """An answer other than 200 with OpenAI's error body; close: the connection cannot carry another request."""

  def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None, headers: dict | None = None, close: bool = False):
    super().__init__(message)
    self.status, self.kind, self.param, self.code = status, kind, param, code
    self.headers, self.close = headers or {}, close


def bad(message: str, param: str | None = None) -> Reject:
  return Reject(400, message, param=param)


def _number(body: dict, field: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
  """A finite JSON number in [lo, hi] ((lo, hi] when lo_open); the default when absent or null."""
  v = body.get(field)
  if v is None:
    return default
  if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v > hi
      or (v <= lo if lo_open else v < lo)):
    raise bad(f"'{field}' must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v!r:.40}", field)
  return float(v)


def _integer(body: dict, field: str, default: int, lo: int, hi: int, flag: str = "") -> int:
  """A JSON integer in [lo, hi]; the default when absent or null."""
  v = body.get(field)
  if v is None:
    return default
  if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
    raise bad(f"'{field}' must be an integer in [{lo}, {hi}]{flag}, got {v!r:.40}", field)
  return v


def sampling(body: dict, default_max_tokens: int, max_tokens_limit: int, max_n: int,
             vocab_size: int) -> tuple[backends.Sampling, int]:
  """The request's sampling settings, each checked against OpenAI's range (400 naming the field otherwise)."""
  stop = body.get("stop")
  if stop is None:
    stop = ()
  elif isinstance(stop, str):
    stop = (stop,)
  elif isinstance(stop, list) and len(stop) <= MAX_STOP and all(isinstance(x, str) for x in stop):
    stop = tuple(stop)
  else:
    raise bad(f"'stop' must be a string or a list of at most {MAX_STOP} strings, got {stop!r:.40}", "stop")
  if body.get("stream"):
    raise bad("'stream' is not supported: this server answers in one response", "stream")
  n = _integer(body, "n", 1, 1, max_n, " (--max_n)")
  temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
  if n > 1 and temperature == 0:
    raise bad("'n' > 1 needs 'temperature' > 0 (greedy samples would all be the same)", "n")
  out = backends.Sampling(
      temperature=temperature, top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
      top_k=_integer(body, "top_k", 0, 0, vocab_size),
      max_new_tokens=_integer(body, "max_tokens", default_max_tokens, 1, max_tokens_limit, " (--max_tokens_limit)"),
      num_samples=n, stop=stop)
  return out, _integer(body, "seed", 0, -2**63, 2**63 - 1)
