"""`fiat serve`: an OpenAI-compatible server (/v1/chat/completions, /v1/completions) for a LocalBeta."""
import collections
import concurrent.futures
import dataclasses
import hashlib
import hmac
import http
import http.server
import json
import logging
import os
import queue
import random
import re
import socket
import threading
import time
import uuid

import gin

from fiat_jax.beta import api_checks
from fiat_jax.beta import backends
from fiat_jax.beta import prompts
from fiat_jax import cli

FAULT_KINDS = ("429", "500", "malformed", "stall")
MIN_DECODE_STEPS = 16


def decode_steps(max_tokens: int) -> int:
  """Tokens to decode for a request's max_tokens: the next power of two (>= 16), so values share compilations."""
  return max(MIN_DECODE_STEPS, 1 << (max_tokens - 1).bit_length())


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
        try:  # max_tokens 5 and 9 both decode 16 steps: one compiled program, no compiling under the lock
          comps = self.beta.complete_texts([g[0] for g in group], sampling, [g[2] for g in group],
                                           steps=decode_steps(sampling.max_new_tokens))
          for g, c in zip(group, comps):
            g[3].set_result(c)
        except Exception as e:  # pylint: disable=broad-except
          logging.exception("beta decoding failed")
          for g in group:
            g[3].set_exception(e)
      self.batch_sizes.append(len(items))
      self.last_decode_s = time.monotonic() - start


class _Watchdog:
  """Ends the reading of requests not fully received in time: socket timeouts restart with every byte."""

  def __init__(self):
    self._due: dict[socket.socket, float] = {}
    self._expired: set[socket.socket] = set()
    self._cv = threading.Condition()
    threading.Thread(target=self._loop, name="serve-watchdog", daemon=True).start()

  def arm(self, sock: socket.socket, seconds: float) -> None:
    with self._cv:
      self._due[sock] = time.monotonic() + seconds
      self._cv.notify()

  def disarm(self, sock: socket.socket) -> bool:
    """Stops the clock; True if it had already run out."""
    with self._cv:
      self._due.pop(sock, None)
      return sock in self._expired

  def expired(self, sock: socket.socket) -> bool:
    with self._cv:
      return sock in self._expired

  def forget(self, sock: socket.socket) -> None:
    with self._cv:
      self._due.pop(sock, None)
      self._expired.discard(sock)

  def _loop(self):
    with self._cv:
      while True:
        now = time.monotonic()
        for sock in [s for s, due in self._due.items() if due <= now]:
          del self._due[sock]
          self._expired.add(sock)
          try:  # a blocked read returns end-of-file; the answer (408) can still be written
            sock.shutdown(socket.SHUT_RD)
          except OSError:
            pass
        self._cv.wait(min(self._due.values(), default=now + 3600) - now)


class Server(http.server.ThreadingHTTPServer):
  """Holds the model's batcher, the request log, the limits and the fault settings for the handler threads."""
  daemon_threads = True
  request_queue_size = 128  # connections waiting to be accepted; past max_connections they are answered 503

  def __init__(self, address, beta, model_name, request_log, faults=None, render=prompts.render_plain,
               max_batch=16, batch_wait_s=0.005, batch_wait_fraction=0.1, default_max_tokens=256, api_key=None,
               max_body_bytes=4 << 20, max_prompts=64, max_n=16, max_tokens_limit=4096, read_timeout_s=30.0,
               max_connections=64):
    super().__init__(address, _Handler)
    self.api_key = api_key  # when set, requests must carry "Authorization: Bearer <key>"
    self.beta, self.model_name, self.faults, self.render = beta, model_name, faults, render
    self.default_max_tokens = default_max_tokens
    self.max_body_bytes, self.max_prompts, self.max_n = max_body_bytes, max_prompts, max_n
    self.max_tokens_limit, self.read_timeout_s = max_tokens_limit, read_timeout_s
    self.max_connections = max_connections
    self.batcher = Batcher(beta, max_batch, batch_wait_s, batch_wait_fraction)
    self.watchdog = _Watchdog()
    self.request_log = request_log
    self._slots = threading.BoundedSemaphore(max_connections)
    self._log_lock = threading.Lock()
    self._count = 0

  @property
  def url(self) -> str:
    return f"http://{self.server_address[0]}:{self.server_address[1]}/v1"

  def process_request(self, request, client_address):
    """Serves the connection in a thread of its own, or answers 503 at once when max_connections are open."""
    if not self._slots.acquire(blocking=False):
      self.log({"n": self.next_number(), "time": time.time(), "path": None, "status": 503, "fault": None,
                "prompts": [], "refused": f"{self.max_connections} connections open (--max_connections)"})
      body = json.dumps({"error": {"message": f"server busy: {self.max_connections} connections open",
                                   "type": "server_error", "param": None, "code": "server_busy"}}).encode()
      try:
        request.settimeout(1.0)
        request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1"
                        b"\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
      except OSError:
        pass
      self.shutdown_request(request)
      return
    try:
      super().process_request(request, client_address)
    except BaseException:
      self._slots.release()
      raise

  def process_request_thread(self, request, client_address):
    try:
      super().process_request_thread(request, client_address)
    finally:
      self.watchdog.forget(request)
      self._slots.release()

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

  def setup(self):
    self.timeout = self.server.read_timeout_s  # per socket operation; the watchdog bounds a whole request
    super().setup()

  def handle_one_request(self):
    # The clock runs from the wait for the request line to the body's last byte (idle keep-alive included).
    self.server.watchdog.arm(self.connection, self.server.read_timeout_s)
    super().handle_one_request()

  def send_error(self, code, message=None, explain=None):
    """The standard library's protocol errors (bad request line, headers too long) as JSON; 408 when cut off."""
    if self.server.watchdog.expired(self.connection):  # the request line itself may be cut short
      code, message, self.request_version = 408, self._late_message(), self.protocol_version
    self._error(api_checks.Reject(code, message or http.HTTPStatus(code).phrase, close=True))

  def _late_message(self) -> str:
    return f"the request was not received within {self.server.read_timeout_s:g}s (--read_timeout_s)"

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    logging.debug("fiat serve: " + format, *args)  # the request log is ours; headers are never logged

  def _send(self, status: int, payload, headers: dict | None = None) -> bool:
    """Writes one response; False when the client is gone (or stopped reading)."""
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode("utf-8")
    try:
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      for k, v in (headers or {}).items():
        self.send_header(k, v)
      if self.close_connection:
        self.send_header("Connection", "close")
      self.end_headers()
      self.wfile.write(data)
      return True
    except OSError:
      self.close_connection = True
      return False

  def _error(self, e: api_checks.Reject):
    self.close_connection = self.close_connection or e.close
    self._send(e.status, {"error": {"message": str(e), "type": e.kind, "param": e.param, "code": e.code}},
               e.headers)

  def _check_read_in_time(self, disarm: bool = True):
    watchdog = self.server.watchdog
    if watchdog.disarm(self.connection) if disarm else watchdog.expired(self.connection):
      raise api_checks.Reject(408, self._late_message(), close=True)

  def _authorize(self):
    key = self.server.api_key
    if key is not None and not hmac.compare_digest(self.headers.get("Authorization", "").encode("utf-8", "replace"),
                                                   f"Bearer {key}".encode()):
      raise api_checks.Reject(401, "invalid API key", "authentication_error", code="invalid_api_key")

  def _body_length(self) -> int:
    """The announced body size, refused (413) past --max_body_bytes before a byte of it is read."""
    if self.headers.get("Transfer-Encoding"):
      raise api_checks.Reject(411, "send the body with a Content-Length (Transfer-Encoding is not accepted)",
                              close=True)
    length = self.headers.get("Content-Length")
    if length is None or not re.fullmatch(r"[0-9]{1,20}", length.strip()):
      raise api_checks.Reject(411 if length is None else 400, f"a Content-Length is required, got {length!r:.40}",
                              close=True)
    if int(length) > self.server.max_body_bytes:
      raise api_checks.Reject(413, f"the body has {int(length)} bytes, over the limit of "
                                   f"{self.server.max_body_bytes} (--max_body_bytes)", close=True)
    return int(length)

  def _read_body(self, length: int, keep: bool) -> bytes:
    """Reads the body (or, keep=False, drains it 64 KiB at a time) within the request's read time."""
    parts, got = [], 0
    while got < length:
      chunk = self.rfile.read(min(length - got, 1 << 16))
      if not chunk:
        break
      got += len(chunk)
      if keep:
        parts.append(chunk)
    self._check_read_in_time()
    if got < length:
      raise api_checks.Reject(400, f"the body ended after {got} of {length} bytes", close=True)
    return b"".join(parts)

  def _reject_unread(self, e: api_checks.Reject):
    """Answers before the body is read: a body within the size limit is drained, so the connection stays usable."""
    try:
      self._read_body(self._body_length(), keep=False)
    except api_checks.Reject:
      e.close = True
    raise e

  def do_GET(self):  # pylint: disable=invalid-name
    try:
      self._check_read_in_time()
      if self.path == "/health":
        return self._send(200, {"status": "ok"})
      self._authorize()
      if self.path.rstrip("/") in ("/v1/models", "/models"):
        return self._send(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                                            "owned_by": "fiat-jax"}]})
      raise api_checks.Reject(404, f"no route {self.path}", "not_found_error")
    except api_checks.Reject as e:
      return self._error(e)

  def do_POST(self):  # pylint: disable=invalid-name
    srv, received, number = self.server, time.time(), self.server.next_number()
    entry = {"n": number, "time": received, "path": self.path, "status": None, "fault": None, "prompts": []}
    try:
      self._check_read_in_time(disarm=False)  # headers cut short by the watchdog: 408, not a missing key
      chat = self.path.rstrip("/") in ("/v1/chat/completions", "/chat/completions")
      try:  # the key and the route are checked before the body is read: an unknown caller costs no memory
        self._authorize()
        if not chat and self.path.rstrip("/") not in ("/v1/completions", "/completions"):
          raise api_checks.Reject(404, f"no route {self.path}", "not_found_error")
      except api_checks.Reject as e:
        self._reject_unread(e)
      try:
        body = json.loads(self._read_body(self._body_length(), keep=True) or b"{}")
      except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise api_checks.bad(f"the body is not JSON: {type(e).__name__}: {e}"[:300]) from None
      if not isinstance(body, dict):
        raise api_checks.bad("the body must be a JSON object")
      if body.get("model") != srv.model_name:
        raise api_checks.Reject(404, f"model {body.get('model')!r:.80} not found; this server serves "
                                     f"{srv.model_name!r}", param="model", code="model_not_found")
      texts = self._prompts(body, chat)
      entry["prompts"] = [prompt_sha(t) for t in texts]
      sampling, seed = api_checks.sampling(body, srv.default_max_tokens, srv.max_tokens_limit, srv.max_n,
                                           srv.beta.vocab.vocab_size)
      fault = srv.faults.draw(number) if srv.faults else None
      entry["fault"] = fault
      if fault == "429":
        raise api_checks.Reject(429, "rate limited (injected fault)", "rate_limit_error", code="rate_limit_exceeded",
                                headers={"Retry-After": f"{srv.faults.retry_after_s:g}"})
      if fault == "500":
        raise api_checks.Reject(500, "internal error (injected fault)", "server_error")
      if fault == "stall":
        time.sleep(srv.faults.stall_s)
        entry["status"] = 0  # nothing sent: the client gave up long ago
        self.close_connection = True
        return None
      if fault == "malformed":
        entry["status"] = 200
        return self._send(200, b'{"id": "cmpl-broken", "object": "chat.completion", "choices": [{"ind')
      comps = srv.batcher.submit(texts, sampling, seed)
      error = next((c.error for c in comps if c.error), None)
      if error:
        raise api_checks.bad(error, "messages" if chat else "prompt")
      entry.update(status=200, tokens_in=sum(c.tokens_in for c in comps),
                   tokens_out=sum(c.tokens_out for c in comps))
      if not self._send(200, self._response(comps, chat)):
        entry["client_gone"] = True  # the client timed out and closed the connection before the answer
      return None
    except api_checks.Reject as e:
      entry["status"] = e.status
      return self._error(e)
    except Exception as e:  # pylint: disable=broad-except
      logging.exception("fiat serve: request %d failed", number)
      entry["status"] = 500
      return self._error(api_checks.Reject(500, f"{type(e).__name__}: {e}", "server_error"))
    finally:
      entry["latency_s"] = round(time.time() - received, 4)
      srv.log(entry)

  def _prompts(self, body: dict, chat: bool) -> list[str]:
    if chat:
      messages = body.get("messages")
      if (not isinstance(messages, list) or not messages
          or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                     and m.get("role") in ("system", "user", "assistant") for m in messages)):
        raise api_checks.bad("'messages' must be a non-empty list of {role: system|user|assistant, content: text} "
                             "objects", "messages")
      try:
        return [self.server.render(messages)]
      except ValueError as e:  # a chat template refusing the conversation
        raise api_checks.bad(f"'messages': {e}", "messages") from None
    p = body.get("prompt")
    texts = [p] if isinstance(p, str) else p
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
      raise api_checks.bad("'prompt' must be a string or a list of strings", "prompt")
    if len(texts) > self.server.max_prompts:
      raise api_checks.bad(f"'prompt' has {len(texts)} prompts, over the limit of {self.server.max_prompts} "
                           "(--max_prompts)", "prompt")
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
  args = cli.parse_gin(argv, "serve")
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
  if not 1 <= args.max_new_tokens <= args.max_tokens_limit:
    raise SystemExit(f"fiat serve: --max_new_tokens={args.max_new_tokens} must be in [1, --max_tokens_limit="
                     f"{args.max_tokens_limit}]")
  srv = start(beta, args.host, args.port, args.model_name, args.request_log, faults, max_batch=args.max_batch,
              batch_wait_s=args.batch_wait_ms / 1000, batch_wait_fraction=args.batch_wait_fraction,
              default_max_tokens=args.max_new_tokens, api_key=api_key, max_body_bytes=args.max_body_bytes,
              max_prompts=args.max_prompts, max_n=args.max_n, max_tokens_limit=args.max_tokens_limit,
              read_timeout_s=args.read_timeout_s, max_connections=args.max_connections)
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
