"""beta's backends: LocalBeta (our JAX model, batched KV-cache decoding) and HttpBeta (OpenAI-compatible APIs)."""
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import email.utils
import logging
import os
import random
import threading
import time
from typing import Callable, Iterable, Iterator

import gin
import openai

from fiat_jax.beta import prompts


@gin.configurable("beta_sampling")
@dataclasses.dataclass(frozen=True)
class Sampling:
  """How beta decodes: greedy by default; num_samples > 1 is self-consistency (needs temperature > 0)."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  max_new_tokens: int = 256
  num_samples: int = 1
  seed: int = 0
  stop: tuple[str, ...] = ("\n\n",)  # a blank line ends an answer in I_beta's format

  def __post_init__(self):
    if self.num_samples < 1:
      raise ValueError(f"beta_sampling.num_samples must be >= 1, got {self.num_samples}")
    if self.num_samples > 1 and self.temperature <= 0:
      raise ValueError("beta_sampling: self-consistency (num_samples > 1) needs temperature > 0")
    object.__setattr__(self, "stop", tuple(self.stop))

  def to_dict(self) -> dict:
    return dataclasses.asdict(self) | {"stop": list(self.stop)}


@dataclasses.dataclass
class Completion:
  """beta's answer to one prompt: one text per sample, or an error (kept in the store, retried next run)."""
  texts: list[str]
  tokens_in: int | None
  tokens_out: int | None
  latency_s: float
  error: str | None = None
  finish_reasons: list[str] | None = None  # "stop" (EOS or a stop string) or "length", per sample


class BudgetExceeded(RuntimeError):
  """The next request could exceed the configured budget: the run stops before it is sent."""


class FatalBetaError(RuntimeError):
  """An answer no retry can fix (bad key, no permission, quota exhausted, unknown model): the run stops."""


def truncate_at_stop(text: str, stop: Iterable[str]) -> tuple[str, bool]:
  """The text up to the first stop string, and whether one was found."""
  cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
  return (text[:cut], True) if cut >= 0 else (text, False)


# --- LocalBeta ---------------------------------------------------------------------------------------------------

class LocalBeta:
  """Our JAX model as beta: frozen variables (sharded as given), batched KV-cache decoding via decoding.generate."""

  def __init__(self, model, variables, vocab, identity: str,
               render: Callable[[list[dict]], str] = prompts.render_plain, batch_size: int = 8,
               max_len: int | None = None, bos_id: int | None = None, context=contextlib.nullcontext):
    """Args: identity names the checkpoint in the store ("local:/path/ckpt"); render turns chat messages into
    the prompt text (plain text, or a chat template); context() wraps each decode (the mesh and its rules)."""
    self.model, self.variables, self.vocab = model, variables, vocab
    self.identity, self.render, self.batch_size = identity, render, batch_size
    self.max_len, self.bos_id, self.context = max_len, bos_id, context
    self.lock = threading.Lock()  # one decode at a time: the server's batcher and direct callers share it

  def _encode(self, text: str) -> list[int]:
    ids = list(self.vocab.encode(text))
    return [self.bos_id] + ids if self.bos_id is not None else ids

  def complete_texts(self, texts: list[str], sampling: Sampling, seeds: list[int],
                     steps: int | None = None) -> list[Completion]:
    """Completions of plain-text prompts: greedy rows batched together; sampled prompts one key each.

    Args: steps (>= sampling.max_new_tokens) is how many tokens to decode before keeping the first max_new_tokens:
    a server passes a bucket so that nearby max_tokens values share one compiled program.
    """
    from fiat_jax.model import decoding  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    start = time.monotonic()
    tokens = [self._encode(t) for t in texts]
    out: list[Completion | None] = [None] * len(texts)
    ok = []
    for i, t in enumerate(tokens):
      if self.max_len is not None and len(t) >= self.max_len:
        out[i] = Completion([], len(t), 0, 0.0, f"prompt has {len(t)} tokens, max_len is {self.max_len}")
      else:
        ok.append(i)
    if steps is not None and steps < sampling.max_new_tokens:
      raise ValueError(f"steps ({steps}) must be >= max_new_tokens ({sampling.max_new_tokens})")
    kw = dict(max_new_tokens=steps or sampling.max_new_tokens, eos_id=self.vocab.eos_id,
              temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
              pad_id=self.vocab.pad_id, max_len=self.max_len)
    with self.lock, self.context():
      if sampling.temperature == 0 and sampling.num_samples == 1:
        res = decoding.generate(self.model, self.variables, [tokens[i] for i in ok], batch_size=self.batch_size, **kw)
        generated = {i: [res.tokens[j]] for j, i in enumerate(ok)}
      else:  # each prompt its own key, so its samples do not depend on which prompts share the batch
        generated = {}
        for i in ok:
          res = decoding.generate(self.model, self.variables, [tokens[i]] * sampling.num_samples,
                                  key=jax.random.PRNGKey(seeds[i]), batch_size=sampling.num_samples, **kw)
          generated[i] = res.tokens
    latency = time.monotonic() - start
    for i, rows in generated.items():
      texts_i, reasons = [], []
      rows = [r[:sampling.max_new_tokens] for r in rows]  # decoded past it only when a bucket asked for more
      for r in rows:
        text, stopped = truncate_at_stop(self.vocab.decode(r), sampling.stop)
        texts_i.append(text)
        reasons.append("stop" if stopped or len(r) < sampling.max_new_tokens else "length")
      out[i] = Completion(texts_i, len(tokens[i]), sum(len(r) for r in rows), latency, finish_reasons=reasons)
    return out

  def map(self, requests: list[tuple[list[dict], int]], sampling: Sampling) -> Iterator[tuple[int, Completion]]:
    """Completions of (messages, seed) requests, yielded batch by batch so the caller stores them at once."""
    for start in range(0, len(requests), self.batch_size):
      chunk = requests[start:start + self.batch_size]
      comps = self.complete_texts([self.render(m) for m, _ in chunk], sampling, [s for _, s in chunk])
      for j, c in enumerate(comps):
        yield start + j, c


@gin.configurable
def local_beta(checkpoint_dir: str = gin.REQUIRED, vocabulary=gin.REQUIRED,
               render: Callable[[list[dict]], str] | None = None, batch_size: int = 8, max_len: int = 4096,
               bos_id: int | None = None, dtype: str | None = None, expected=None) -> LocalBeta:
  """A frozen Hugging Face checkpoint as beta, loaded straight into its shards on the (gin-configured) mesh;
  `expected` (a models/*.gin file's BETA_CONFIG) is the architecture the checkpoint must have."""
  import jax  # pylint: disable=g-import-not-at-top
  from fiat_jax.model import hf  # pylint: disable=g-import-not-at-top
  from fiat_jax.model import transformer as model_lib  # pylint: disable=g-import-not-at-top
  from fiat_jax.model import sharding  # pylint: disable=g-import-not-at-top
  if not checkpoint_dir:
    raise ValueError("local_beta.checkpoint_dir is not set: bind BETA_CHECKPOINT (a gin_configs/models/ β file)")
  if jax.process_count() > 1:
    raise ValueError("local_beta: LocalBeta decodes in one process; on a multi-host slice run `fiat serve` on one "
                     "host and HttpBeta on the workers")
  mesh = sharding.make_mesh()
  cfg, params = hf.load(checkpoint_dir, mesh=mesh, dtype=dtype, expected=expected)
  return LocalBeta(model_lib.Transformer(cfg), {"params": params}, vocabulary,
                   identity=f"local:{os.path.abspath(checkpoint_dir)}", render=render or prompts.render_plain,
                   batch_size=batch_size, max_len=max_len, bos_id=bos_id,
                   context=lambda: sharding.activation_rules(mesh))


@gin.configurable
def tiny_local_beta(seed: int = 0, batch_size: int = 8, max_len: int | None = 2048) -> LocalBeta:
  """A randomly initialised tiny model with a byte vocabulary: for tests and the demo, not for results."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  from fiat_jax.model import transformer as model_lib  # pylint: disable=g-import-not-at-top
  vocab = seqio.ByteVocabulary()
  cfg = model_lib.tiny_config(vocab_size=vocab.vocab_size)
  params = nn.meta.unbox(model_lib.init_params(cfg, jax.random.PRNGKey(seed)))
  return LocalBeta(model_lib.Transformer(cfg), {"params": params}, vocab, identity=f"local:tiny-random-{seed}",
                   batch_size=batch_size, max_len=max_len)


# --- HttpBeta ----------------------------------------------------------------------------------------------------

@gin.configurable
class Budget:
  """Caps on requests, tokens and cost (retries counted); a request is refused if its worst case could pass a cap.

  Usage is counted as the server reports it. A report above a request's worst case (more tokens than the prompt
  has bytes, or than max_tokens) means the bound behind "refuse before going over" does not hold for this
  server: with a token or cost cap set, no further request is sent (BudgetExceeded), and the report is kept in
  summary()["overrun"].
  """

  def __init__(self, max_requests: int | None = None, max_tokens: int | None = None, max_cost: float | None = None,
               price_in_per_mtok: float = 0.0, price_out_per_mtok: float = 0.0):
    self.max_requests, self.max_tokens, self.max_cost = max_requests, max_tokens, max_cost
    self.price_in, self.price_out = price_in_per_mtok, price_out_per_mtok
    self.requests = self.tokens_in = self.tokens_out = 0  # settled
    self.overrun: str | None = None  # why no further request may be sent, once the server's usage broke a bound
    self._held = [0, 0, 0]  # reserved by requests in flight: requests, tokens in, tokens out
    self._lock = threading.Lock()

  def cost(self, tokens_in: int, tokens_out: int) -> float:
    return (tokens_in * self.price_in + tokens_out * self.price_out) / 1e6

  def _caps(self, requests: int, tokens_in: int, tokens_out: int):
    return (("requests", requests, self.max_requests), ("tokens", tokens_in + tokens_out, self.max_tokens),
            ("cost", self.cost(tokens_in, tokens_out), self.max_cost))

  def reserve(self, tokens_in: int, tokens_out: int) -> tuple[int, int]:
    """Holds an upper bound of one request's usage; raises BudgetExceeded if it could pass a cap."""
    with self._lock:
      if self.overrun:
        raise BudgetExceeded(self.overrun)
      req = self.requests + self._held[0] + 1
      tin = self.tokens_in + self._held[1] + tokens_in
      tout = self.tokens_out + self._held[2] + tokens_out
      for name, value, cap in self._caps(req, tin, tout):
        if cap is not None and value > cap:
          raise BudgetExceeded(f"budget: the next request could bring {name} to {value:g}, over the cap of {cap:g} "
                               f"(used: {self.summary()}); stopping before sending it")
      self._held = [self._held[0] + 1, self._held[1] + tokens_in, self._held[2] + tokens_out]
      return tokens_in, tokens_out

  def settle(self, held: tuple[int, int], tokens_in: int, tokens_out: int) -> None:
    """Replaces a reservation by what the request actually used (the server's count)."""
    with self._lock:
      self._held = [self._held[0] - 1, self._held[1] - held[0], self._held[2] - held[1]]
      self.requests += 1
      self.tokens_in += tokens_in
      self.tokens_out += tokens_out
      if (tokens_in > held[0] or tokens_out > held[1]) and (self.max_tokens is not None
                                                             or self.max_cost is not None):
        over = [f"{name} {value:g} > cap {cap:g}" for name, value, cap in
                self._caps(self.requests, self.tokens_in, self.tokens_out) if cap is not None and value > cap]
        self.overrun = self.overrun or (
            f"budget: the server reported {tokens_in} prompt + {tokens_out} completion tokens for a request whose "
            f"worst case was {held[0]} + {held[1]}" + (f", which brought {', '.join(over)}" if over else "")
            + f" (used: {self.summary()}); no further request is sent, since the cap can no longer be kept")
        logging.error("%s", self.overrun)

  def summary(self) -> dict:
    out = {"requests": self.requests, "tokens_in": self.tokens_in, "tokens_out": self.tokens_out,
           "cost": round(self.cost(self.tokens_in, self.tokens_out), 6)}
    return out | ({"overrun": self.overrun} if self.overrun else {})


class _Retryable(Exception):
  def __init__(self, message: str, retry_after: float | None = None, billed: bool = False):
    super().__init__(message)
    self.retry_after, self.billed = retry_after, billed


class _Permanent(Exception):
  """This example's request cannot succeed as sent (e.g. 400): recorded as its error, not retried now."""


def retry_after_seconds(headers) -> float | None:
  """Seconds to wait from retry-after-ms / Retry-After (seconds or an HTTP date), None if absent or unreadable."""
  if headers is None:
    return None
  ms = headers.get("retry-after-ms")
  if ms is not None:
    try:
      return max(0.0, float(ms) / 1000)
    except ValueError:
      pass
  value = headers.get("retry-after")
  if value is None:
    return None
  try:
    return max(0.0, float(value))
  except ValueError:
    pass
  try:
    return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
  except (TypeError, ValueError):
    return None


_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


def _event_loop() -> asyncio.AbstractEventLoop:
  """The event loop (one daemon thread) that sends every HttpBeta request, so that a request can be cancelled."""
  global _LOOP
  with _LOOP_LOCK:
    if _LOOP is None:
      _LOOP = asyncio.new_event_loop()
      threading.Thread(target=_LOOP.run_forever, name="http-beta-loop", daemon=True).start()
    return _LOOP


@gin.configurable
class HttpBeta:
  """An OpenAI-compatible server as beta (vLLM, TGI, Ollama, hosted APIs, `fiat serve`), with our retry layer."""

  def __init__(self, base_url: str = gin.REQUIRED, model: str = gin.REQUIRED, api_key_env: str | None = "OPENAI_API_KEY",
               endpoint: str = "chat", concurrency: int = 8, timeout_s: float = 120.0, deadline_s: float = 900.0,
               max_retries: int = 8, backoff_base_s: float = 1.0, backoff_max_s: float = 60.0,
               budget: Budget | None = None, render: Callable[[list[dict]], str] = prompts.render_plain,
               retry_seed: int = 0):
    """Args: api_key_env names the environment variable holding the key (None: the server needs no key);
    endpoint is "chat" (/v1/chat/completions) or "completions" (/v1/completions, the prompt rendered as text);
    timeout_s bounds one attempt and deadline_s one call with all its retries, both in wall-clock time (a server
    that sends a byte at a time is cut off like a silent one)."""
    if endpoint not in ("chat", "completions"):
      raise ValueError(f"HttpBeta.endpoint must be 'chat' or 'completions', got {endpoint!r}")
    self.api_key_env = api_key_env
    self._key: str | None = None  # read when the first request is sent: --status needs no key
    self._client_lock = threading.Lock()
    self.base_url, self.model, self.endpoint = base_url, model, endpoint
    self.identity = f"http:{model}"
    self.concurrency, self.timeout_s, self.deadline_s = concurrency, timeout_s, deadline_s
    self.max_retries, self.backoff_base_s, self.backoff_max_s = max_retries, backoff_base_s, backoff_max_s
    self.budget = budget or Budget()
    self.render = render
    self._rng = random.Random(retry_seed)
    self._rng_lock = threading.Lock()
    self.retries = 0  # attempts after the first, over the whole run
    self._openai: openai.AsyncOpenAI | None = None

  @property
  def _client(self) -> openai.AsyncOpenAI:
    with self._client_lock:
      if self._openai is None:
        self._key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        if not self._key:  # a keyless server (`fiat serve` without --api_key_env); one that wants a key answers 401
          if self.api_key_env:
            logging.warning("HttpBeta: %s is not set; sending no API key to %s", self.api_key_env, self.base_url)
          self._key = "none"
        # Our retry layer is the only one: the client library's own retries are off. The client is asynchronous
        # because httpx's timeouts restart with every byte read; only cancelling the request bounds its time.
        self._openai = openai.AsyncOpenAI(base_url=self.base_url, api_key=self._key, max_retries=0,
                                          timeout=self.timeout_s)
      return self._openai

  def __repr__(self):
    return f"HttpBeta(base_url={self.base_url!r}, model={self.model!r}, endpoint={self.endpoint!r})"

  def redact(self, text: str) -> str:
    """The text with the API key blanked out: no log, record or exception may carry it."""
    return text.replace(self._key, "[REDACTED]") if self._key and self._key != "none" else text

  def check_credentials(self) -> None:
    """Builds the client before the first request (a keyless one, with a warning, when the key variable is unset)."""
    self._client  # pylint: disable=pointless-statement

  def _send(self, messages: list[dict], sampling: Sampling, seed: int, timeout: float) -> tuple[list[str], int, int]:
    kw = dict(model=self.model, max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
              top_p=sampling.top_p, timeout=timeout)
    if sampling.num_samples > 1:
      kw["n"] = sampling.num_samples
    if sampling.temperature > 0:
      kw["seed"] = seed
    if sampling.stop:
      kw["stop"] = list(sampling.stop)
    if sampling.top_k:
      kw["extra_body"] = {"top_k": sampling.top_k}  # not in OpenAI's API; vLLM and `fiat serve` accept it
    client = self._client
    request = (client.chat.completions.create(messages=messages, **kw) if self.endpoint == "chat"
               else client.completions.create(prompt=self.render(messages), **kw))
    future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(request, timeout), _event_loop())
    try:
      resp = future.result()  # wait_for cancels the request (and closes its connection) at `timeout`
    except TimeoutError:
      raise _Retryable(f"timeout after {timeout:.1f}s (no complete answer)", billed=True) from None
    except openai.RateLimitError as e:
      if _is_quota(e):
        raise FatalBetaError(f"beta quota exhausted (HTTP 429 insufficient_quota): {self.redact(str(e))}") from None
      raise _Retryable(f"HTTP 429: {e}", retry_after_seconds(e.response.headers)) from None
    except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
      hint = (f" (no API key was sent: set {self.api_key_env or 'HttpBeta.api_key_env'})"
              if e.status_code == 401 and self._key == "none" else "")
      raise FatalBetaError(f"beta refused the request (HTTP {e.status_code}) at {self.base_url}{hint}: "
                           f"{self.redact(str(e))}") from None
    except openai.APITimeoutError:
      raise _Retryable(f"timeout after {timeout:.1f}s", billed=True) from None
    except openai.APIConnectionError as e:
      raise _Retryable(f"connection error: {e}") from None
    except openai.APIStatusError as e:
      if e.status_code >= 500 or e.status_code in (408, 409):
        raise _Retryable(f"HTTP {e.status_code}: {e}", retry_after_seconds(e.response.headers)) from None
      raise _Permanent(f"HTTP {e.status_code}: {e}") from None
    except (openai.APIResponseValidationError, ValueError) as e:  # a body that is not the JSON promised
      raise _Retryable(f"malformed response: {type(e).__name__}: {e}", billed=True) from None
    except BaseException:
      future.cancel()  # e.g. KeyboardInterrupt in this thread: the request must not outlive the call
      raise
    try:
      choices = sorted(resp.choices, key=lambda c: c.index)
      texts = [c.message.content if self.endpoint == "chat" else c.text for c in choices]
      if len(texts) != sampling.num_samples or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"expected {sampling.num_samples} text choices, got {texts!r:.200}")
      return (texts, *_usage(resp.usage))
    except (AttributeError, TypeError, ValueError) as e:
      raise _Retryable(f"malformed response: {e}", billed=True) from None

  def _backoff(self, attempt: int) -> float:
    with self._rng_lock:  # exponential backoff with full jitter
      return self._rng.uniform(0, min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1)))

  def call(self, messages: list[dict], sampling: Sampling, seed: int) -> Completion:
    """One example: retries 429 / 5xx / connection errors / timeouts / malformed bodies within the deadline."""
    start = time.monotonic()
    deadline = start + self.deadline_s
    # Upper bound of the prompt's tokens (no tokenizer makes more tokens than UTF-8 bytes, plus template overhead).
    if self.endpoint == "chat":
      est_in = sum(len(m["content"].encode("utf-8")) + 16 for m in messages)
    else:  # the text sent is the rendered prompt, longer than the messages' contents
      est_in = len(self.render(messages).encode("utf-8")) + 16
    est_out = sampling.max_new_tokens * sampling.num_samples
    attempt, last_error = 0, ""
    while True:
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        return Completion([], None, None, time.monotonic() - start,
                          self.redact(f"deadline of {self.deadline_s:g}s passed after {attempt} attempts; "
                                      f"last error: {last_error}"))
      held = self.budget.reserve(est_in, est_out)
      try:
        texts, tin, tout = self._send(messages, sampling, seed, min(self.timeout_s, remaining))
      except _Retryable as e:
        self.budget.settle(held, *(held if e.billed else (0, 0)))
        last_error, attempt = self.redact(str(e)), attempt + 1
        if attempt > self.max_retries:
          return Completion([], None, None, time.monotonic() - start,
                            f"gave up after {attempt} attempts; last error: {last_error}")
        wait = e.retry_after if e.retry_after is not None else self._backoff(attempt)
        if time.monotonic() + wait > deadline:
          return Completion([], None, None, time.monotonic() - start,
                            f"deadline of {self.deadline_s:g}s leaves no time for the {wait:.2f}s wait; "
                            f"last error: {last_error}")
        logging.info("beta retry %d in %.2fs: %s", attempt, wait, last_error)
        with self._rng_lock:
          self.retries += 1
        time.sleep(wait)
        continue
      except _Permanent as e:
        self.budget.settle(held, 0, 0)
        return Completion([], None, None, time.monotonic() - start, self.redact(str(e)))
      except BaseException:
        self.budget.settle(held, *held)
        raise
      self.budget.settle(held, held[0] if tin is None else tin, held[1] if tout is None else tout)
      return Completion(texts, tin, tout, time.monotonic() - start)

  def map(self, requests: list[tuple[list[dict], int]], sampling: Sampling) -> Iterator[tuple[int, Completion]]:
    """Completions of (messages, seed) requests as they finish, at most `concurrency` in flight.

    On BudgetExceeded or FatalBetaError no new request starts; the ones in flight finish and are yielded, then the
    error is raised. A budget overrun reported by the server on the last requests is raised after them.
    """
    pool = concurrent.futures.ThreadPoolExecutor(self.concurrency, thread_name_prefix="http-beta")
    todo = iter(enumerate(requests))
    pending: dict[concurrent.futures.Future, int] = {}
    stop: BaseException | None = None

    def fill():
      while stop is None and len(pending) < self.concurrency:
        nxt = next(todo, None)
        if nxt is None:
          return
        pending[pool.submit(self.call, nxt[1][0], sampling, nxt[1][1])] = nxt[0]

    try:
      fill()
      while pending:
        done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
        for f in done:
          i = pending.pop(f)
          try:
            comp = f.result()
          except (BudgetExceeded, FatalBetaError) as e:
            stop = stop or e
            continue
          yield i, comp
        fill()
      if stop is None and self.budget.overrun:
        stop = BudgetExceeded(self.budget.overrun)
      if stop is not None:
        raise stop
    finally:
      pool.shutdown(wait=False, cancel_futures=True)


def _usage(usage) -> tuple[int | None, int | None]:
  """(prompt, completion) tokens as reported; a total above their sum counts as completion tokens (billed)."""
  tin, tout = getattr(usage, "prompt_tokens", None), getattr(usage, "completion_tokens", None)
  total = getattr(usage, "total_tokens", None)
  if isinstance(total, int) and tin is not None and tout is not None and total > tin + tout:
    tout = total - tin
  return tin, tout


def _is_quota(e: openai.APIStatusError) -> bool:
  body = e.body if isinstance(e.body, dict) else {}
  err = body.get("error", body) if isinstance(body.get("error", body), dict) else {}
  return "insufficient_quota" in (str(getattr(e, "code", "")), str(err.get("code")), str(err.get("type")))
