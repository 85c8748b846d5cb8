"""`fiat serve`: an OpenAI-compatible server (/v1/chat/completions, /v1/completions) for a LocalBeta."""
import collections
import concurrent.futures
import dataclasses
import hashlib
import http.server
import json
import logging
import os
import queue
import random
import threading
import time
import uuid

import gin

from fiat_jax import cli
from fiat_jax.beta import backends
from fiat_jax.beta import prompts

FAULT_KINDS = ("429", "500", "malformed", "stall")


def prompt_sha(text: str) -> str:
  """sha256 (first 16 hex) of a rendered prompt: how the request log names what was asked."""
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclasses.dataclass
class Faults:
  """Test-only fault injection: each request draws (seeded by its number) one of FAULT_KINDS or none."""
  rates: dict[str, float]
  seed: int = 0
  retry_after_s: float = 1.0
  stall_s: float = 30.0

  def draw(self, request_number: int) -> str | None:
    u = random.Random(f"{self.seed}:{request_number}").random()
    for kind in FAULT_KINDS:
      u -= self.rates.get(kind, 0.0)
      if u < 0:
        return kind
    return None


def parse_faults(spec: str) -> dict[str, float]:
  """'429=0.1,500=0.1,malformed=0.05,stall=0.05' -> rates (they must sum to at most 1)."""
  rates = {}
  for part in filter(None, spec.split(",")):
    kind, _, value = part.partition("=")
    if kind not in FAULT_KINDS:
      raise ValueError(f"--inject_faults: unknown fault {kind!r}; known: {FAULT_KINDS}")
    rates[kind] = float(value)
  if sum(rates.values()) > 1 or any(v < 0 for v in rates.values()):
    raise ValueError(f"--inject_faults: rates must be >= 0 and sum to at most 1, got {rates}")
  return rates


class Batcher:
  """Collects prompts from concurrent requests and decodes them in one batch.

  A batch decodes in the same time whether it holds one prompt or `max_batch` (rows are padded to the model's
  batch size), so after the first prompt arrives the batcher waits for more: at least `wait_s`, and up to
  `wait_fraction` of the last batch's decoding time. Clients whose answers just came back need a few tens of
  milliseconds to send their next request; a fixed 5 ms window split their requests into a batch of one and a
  batch of the rest, doubling the work.
  """

  def __init__(self, beta: backends.LocalBeta, max_batch: int = 16, wait_s: float = 0.005,
               wait_fraction: float = 0.1):
    self.beta, self.max_batch, self.wait_s, self.wait_fraction = beta, max_batch, wait_s, wait_fraction
    self.last_decode_s = 0.0
    self.batch_sizes = collections.deque(maxlen=10_000)  # the latest batches' sizes, for monitoring and tests
    self._queue: queue.Queue = queue.Queue()
    threading.Thread(target=self._loop, name="beta-batcher", daemon=True).start()

  def submit(self, texts: list[str], sampling: backends.Sampling, seed: int) -> list[backends.Completion]:
    futures = []
    for t in texts:
      f = concurrent.futures.Future()
      self._queue.put((t, sampling, seed, f))
      futures.append(f)
    return [f.result() for f in futures]

  def _loop(self):
    while True:
      items = [self._queue.get()]
      deadline = time.monotonic() + max(self.wait_s, self.wait_fraction * self.last_decode_s)
      while len(items) < self.max_batch:
        try:
          items.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
        except queue.Empty:
          break
      start = time.monotonic()
      groups: dict[backends.Sampling, list] = {}
      for item in items:
        groups.setdefault(item[1], []).append(item)
      for sampling, group in groups.items():
        try:
          comps = self.beta.complete_texts([g[0] for g in group], sampling, [g[2] for g in group])
          for g, c in zip(group, comps):
            g[3].set_result(c)
        except Exception as e:  # pylint: disable=broad-except
          logging.exception("beta decoding failed")
          for g in group:
            g[3].set_exception(e)
      self.batch_sizes.append(len(items))
      self.last_decode_s = time.monotonic() - start


class _BadRequest(Exception):
  pass


def _sampling(body: dict, default_max_tokens: int) -> tuple[backends.Sampling, int]:
  stop = body.get("stop") or ()
  stop = (stop,) if isinstance(stop, str) else tuple(stop)
  try:
    sampling = backends.Sampling(temperature=float(body.get("temperature", 1.0)), top_k=int(body.get("top_k", 0)),
                                 top_p=float(body.get("top_p", 1.0)),
                                 max_new_tokens=int(body.get("max_tokens") or default_max_tokens),
                                 num_samples=int(body.get("n", 1)), stop=stop)
  except (TypeError, ValueError) as e:
    raise _BadRequest(str(e)) from None
  if sampling.max_new_tokens < 1:
    raise _BadRequest("max_tokens must be >= 1")
  return sampling, int(body.get("seed") or 0)


class Server(http.server.ThreadingHTTPServer):
  """Holds the model's batcher, the request log and the fault settings for the handler threads."""
  daemon_threads = True

  def __init__(self, address, beta, model_name, request_log, faults=None, render=prompts.render_plain,
               max_batch=16, batch_wait_s=0.005, batch_wait_fraction=0.1, default_max_tokens=256, api_key=None):
    super().__init__(address, _Handler)
    self.api_key = api_key  # when set, requests must carry "Authorization: Bearer <key>"
    self.beta, self.model_name, self.faults, self.render = beta, model_name, faults, render
    self.default_max_tokens = default_max_tokens
    self.batcher = Batcher(beta, max_batch, batch_wait_s, batch_wait_fraction)
    self.request_log = request_log
    self._log_lock = threading.Lock()
    self._count = 0

  @property
  def url(self) -> str:
    return f"http://{self.server_address[0]}:{self.server_address[1]}/v1"

  def next_number(self) -> int:
    with self._log_lock:
      self._count += 1
      return self._count

  def log(self, entry: dict) -> None:
    if self.request_log:
      with self._log_lock, open(self.request_log, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"
  server: Server

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    logging.debug("fiat serve: " + format, *args)  # the request log is ours; headers are never logged

  def _send(self, status: int, payload, headers: dict | None = None):
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode("utf-8")
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    for k, v in (headers or {}).items():
      self.send_header(k, v)
    self.end_headers()
    self.wfile.write(data)

  def _error(self, status: int, message: str, kind: str, code: str | None = None, headers=None):
    self._send(status, {"error": {"message": message, "type": kind, "code": code}}, headers)

  def do_GET(self):  # pylint: disable=invalid-name
    if self.path.rstrip("/") in ("/v1/models", "/models"):
      self._send(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                                   "owned_by": "fiat-jax"}]})
    elif self.path == "/health":
      self._send(200, {"status": "ok"})
    else:
      self._error(404, f"no route {self.path}", "not_found_error")

  def do_POST(self):  # pylint: disable=invalid-name
    srv, received, number = self.server, time.time(), self.server.next_number()
    entry = {"n": number, "time": received, "path": self.path, "status": None, "fault": None, "prompts": []}
    try:
      body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
      if srv.api_key is not None and self.headers.get("Authorization") != f"Bearer {srv.api_key}":
        entry["status"] = 401
        return self._error(401, "invalid API key", "authentication_error", "invalid_api_key")
      chat = self.path.rstrip("/") in ("/v1/chat/completions", "/chat/completions")
      if not chat and self.path.rstrip("/") not in ("/v1/completions", "/completions"):
        entry["status"] = 404
        return self._error(404, f"no route {self.path}", "not_found_error")
      if not isinstance(body, dict):
        raise _BadRequest("the body must be a JSON object")
      if body.get("model") != srv.model_name:
        entry["status"] = 404
        return self._error(404, f"model {body.get('model')!r} not found; this server serves "
                                f"{srv.model_name!r}", "invalid_request_error", "model_not_found")
      texts = self._prompts(body, chat)
      entry["prompts"] = [prompt_sha(t) for t in texts]
      sampling, seed = _sampling(body, srv.default_max_tokens)
      fault = srv.faults.draw(number) if srv.faults else None
      entry["fault"] = fault
      if fault == "429":
        entry["status"] = 429
        return self._error(429, "rate limited (injected fault)", "rate_limit_error", "rate_limit_exceeded",
                           {"Retry-After": f"{srv.faults.retry_after_s:g}"})
      if fault == "500":
        entry["status"] = 500
        return self._error(500, "internal error (injected fault)", "server_error")
      if fault == "stall":
        time.sleep(srv.faults.stall_s)
        entry["status"] = 0  # nothing sent: the client gave up long ago
        self.close_connection = True
        return None
      if fault == "malformed":
        entry["status"] = 200
        return self._send(200, b'{"id": "cmpl-broken", "object": "chat.completion", "choices": [{"ind')
      comps = srv.batcher.submit(texts, sampling, seed)
      bad = next((c.error for c in comps if c.error), None)
      if bad:
        raise _BadRequest(bad)
      entry.update(status=200, tokens_in=sum(c.tokens_in for c in comps),
                   tokens_out=sum(c.tokens_out for c in comps))
      return self._send(200, self._response(comps, chat))
    except (_BadRequest, json.JSONDecodeError, ValueError) as e:
      entry["status"] = 400
      return self._error(400, str(e), "invalid_request_error")
    except (BrokenPipeError, ConnectionResetError):
      entry["client_gone"] = True  # the client timed out and closed the connection before the answer
      self.close_connection = True
      return None
    except Exception as e:  # pylint: disable=broad-except
      logging.exception("fiat serve: request %d failed", number)
      entry["status"] = 500
      return self._error(500, f"{type(e).__name__}: {e}", "server_error")
    finally:
      entry["latency_s"] = round(time.time() - received, 4)
      srv.log(entry)

  def _prompts(self, body: dict, chat: bool) -> list[str]:
    if chat:
      messages = body.get("messages")
      if (not isinstance(messages, list) or not messages
          or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)):
        raise _BadRequest("'messages' must be a non-empty list of {role, content} objects with text content")
      return [self.server.render(messages)]
    p = body.get("prompt")
    texts = [p] if isinstance(p, str) else p
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
      raise _BadRequest("'prompt' must be a string or a list of strings")
    return texts

  def _response(self, comps: list[backends.Completion], chat: bool) -> dict:
    choices = []
    for c in comps:
      for text, reason in zip(c.texts, c.finish_reasons or ["stop"] * len(c.texts)):
        i = len(choices)
        choices.append({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
                       if chat else {"index": i, "text": text, "finish_reason": reason, "logprobs": None})
    tin, tout = sum(c.tokens_in for c in comps), sum(c.tokens_out for c in comps)
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": self.server.model_name, "choices": choices,
            "usage": {"prompt_tokens": tin, "completion_tokens": tout, "total_tokens": tin + tout}}


def start(beta: backends.LocalBeta, host: str = "127.0.0.1", port: int = 0, model_name: str | None = None,
          request_log: str | None = None, faults: Faults | None = None, **kw) -> Server:
  """Starts serving in a background thread; returns the server (`.url`, `.shutdown()`)."""
  if host not in ("127.0.0.1", "localhost", "::1"):
    logging.warning("fiat serve: listening on %s; anyone who can reach this port can use beta", host)
  srv = Server((host, port), beta, model_name or beta.identity, request_log, faults, **kw)
  threading.Thread(target=srv.serve_forever, name="fiat-serve", daemon=True).start()
  return srv


@gin.configurable("serve")
def serving_beta(beta=gin.REQUIRED):
  """The LocalBeta to serve, bound in a gin file: `serve.beta = @local_beta()` (or `@tiny_local_beta()`)."""
  return beta


def main(argv: list[str]) -> int:
  """`fiat serve [--gin_file=F] [--gin.NAME=VALUE] [--tiny] [--host] [--port] ...`."""
  def flags(ap):
    ap.add_argument("--tiny", action="store_true", help="serve a random tiny model (tests, demo)")
    ap.add_argument("--tiny_seed", type=int, default=0)
    ap.add_argument("--host", default="127.0.0.1", help="bind address; 127.0.0.1 unless told otherwise")
    ap.add_argument("--port", type=int, default=8000, help="0 picks a free port (see --port_file)")
    ap.add_argument("--port_file", help="write the bound port here once listening")
    ap.add_argument("--model_name", help="the name clients must ask for (default: beta's identity)")
    ap.add_argument("--request_log", default="fiat_serve_requests.jsonl")
    ap.add_argument("--api_key_env", help="name of an environment variable holding the key clients must send")
    ap.add_argument("--max_batch", type=int, default=16)
    ap.add_argument("--batch_wait_ms", type=float, default=5.0, help="least time a batch waits for more prompts")
    ap.add_argument("--batch_wait_fraction", type=float, default=0.1,
                    help="a batch waits up to this fraction of the last batch's decoding time for more prompts")
    ap.add_argument("--max_new_tokens", type=int, default=256, help="when a request gives no max_tokens")
    ap.add_argument("--inject_faults", default="",
                    help="TEST ONLY: e.g. 429=0.1,500=0.1,malformed=0.05,stall=0.05")
    ap.add_argument("--fault_seed", type=int, default=0)
    ap.add_argument("--fault_retry_after_s", type=float, default=1.0)
    ap.add_argument("--fault_stall_s", type=float, default=30.0)

  args = cli.parse_gin(argv, "fiat serve", flags, description=__doc__)
  beta = backends.tiny_local_beta(seed=args.tiny_seed) if args.tiny else serving_beta()
  faults = None
  if args.inject_faults:
    faults = Faults(parse_faults(args.inject_faults), args.fault_seed, args.fault_retry_after_s, args.fault_stall_s)
    logging.warning("fiat serve: injecting faults %s (a test setting)", faults.rates)
  api_key = None
  if args.api_key_env:
    api_key = os.environ.get(args.api_key_env)
    if not api_key:
      raise SystemExit(f"fiat serve: --api_key_env: {args.api_key_env} is not set")
  srv = start(beta, args.host, args.port, args.model_name, args.request_log, faults, max_batch=args.max_batch,
              batch_wait_s=args.batch_wait_ms / 1000, batch_wait_fraction=args.batch_wait_fraction,
              default_max_tokens=args.max_new_tokens, api_key=api_key)
  if args.port_file:
    with open(args.port_file + ".tmp", "w") as f:
      f.write(str(srv.server_address[1]))
    os.replace(args.port_file + ".tmp", args.port_file)
  logging.info("fiat serve: %s at %s (request log %s)", srv.model_name, srv.url, args.request_log)
  try:
    threading.Event().wait()
  except KeyboardInterrupt:
    srv.shutdown()
  return 0
