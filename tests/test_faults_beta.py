"""Fault injection for HTTP beta and `fiat serve`: slow drips, floods, oversized and unauthenticated bodies, bad
sampling values, compilations per max_tokens, and servers that report more usage than asked for."""
import http.client
import http.server
import json
import re
import socket
import threading
import time

import pytest

from fiat_jax.beta import backends
from fiat_jax.beta import serve
from fiat_jax.model import decoding

KEY = "sk-fiat-faults-5e4d3c"
HI = [{"role": "user", "content": "hi"}]
SAMPLING = backends.Sampling(max_new_tokens=8)


@pytest.fixture(scope="module")
def tiny_beta():
  return backends.tiny_local_beta(seed=0, batch_size=8)


@pytest.fixture
def server(tiny_beta, tmp_path):
  """`fiat serve` over the tiny model with small limits, stopped after the test."""
  servers = []

  def start(**kw):
    srv = serve.start(tiny_beta, request_log=str(tmp_path / "requests.jsonl"), api_key=KEY, **kw)
    servers.append(srv)
    return srv

  yield start
  for srv in servers:
    srv.shutdown()
    srv.server_close()


def post(srv, body, path="/v1/completions", key=KEY, raw: bytes | None = None) -> tuple[int, dict]:
  conn = http.client.HTTPConnection(*srv.server_address, timeout=30)
  headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
  conn.request("POST", path, body=raw if raw is not None else json.dumps(body), headers=headers)
  resp = conn.getresponse()
  out = resp.status, json.loads(resp.read())
  conn.close()
  return out


def exchange(srv, data: bytes, timeout: float = 5.0) -> tuple[bytes, float]:
  """Sends raw bytes on a new connection; what came back until the server closed it, and after how long."""
  with socket.create_connection(srv.server_address, timeout=timeout) as sock:
    start = time.monotonic()
    try:
      sock.sendall(data)
    except OSError:  # the server answered and closed while we were still sending
      pass
    got = b""
    try:
      while chunk := sock.recv(65536):
        got += chunk
    except (ConnectionResetError, TimeoutError):
      pass
    return got, time.monotonic() - start


def headers(path="/v1/completions", length=None, key=KEY) -> bytes:
  lines = [f"POST {path} HTTP/1.1", "Host: x", "Content-Type: application/json"]
  lines += [f"Authorization: Bearer {key}"] if key else []
  lines += [f"Content-Length: {length}"] if length is not None else []
  return ("\r\n".join(lines) + "\r\n\r\n").encode()


# --- HttpBeta: wall-clock deadline against a slow drip ------------------------------------------------------------

def drip_server(phase: str, interval: float):
  """A server answering a valid completion one byte every `interval` s, in its headers or its body."""
  body = json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": "ok"}}],
                     "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
  body += b" " * (60 if phase == "body" else 0)
  head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
  fast, slow = (b"", head + body) if phase == "headers" else (head + body[:-60], body[-60:])
  listener = socket.create_server(("127.0.0.1", 0))
  gone: list[float] = []

  def handle(conn):
    with conn:
      conn.recv(65536)
      try:
        conn.sendall(fast)
        for b in slow:
          conn.sendall(bytes([b]))
          time.sleep(interval)
      except OSError:
        gone.append(time.monotonic())

  def accept():
    while True:
      try:
        conn, _ = listener.accept()
      except OSError:
        return
      threading.Thread(target=handle, args=(conn,), daemon=True).start()

  threading.Thread(target=accept, daemon=True).start()
  return f"http://127.0.0.1:{listener.getsockname()[1]}/v1", gone, listener


@pytest.mark.parametrize("phase", ["headers", "body"])
def test_deadline_is_wall_clock_against_a_slow_drip(phase):
  url, gone, listener = drip_server(phase, interval=0.1)  # the whole answer takes 6-7 s to drip
  beta = backends.HttpBeta(base_url=url, model="m", api_key_env=None, timeout_s=30, deadline_s=1.5,
                           max_retries=3, backoff_base_s=0.01)
  start = time.monotonic()
  comp = beta.call(HI, SAMPLING, 0)
  returned = time.monotonic()
  time.sleep(0.5)
  listener.close()
  assert returned - start < 2.0, (returned - start, comp)
  assert comp.texts == [] and comp.error.startswith("deadline of 1.5s")
  assert comp.error.endswith("last error: timeout after 1.5s (no complete answer)")
  assert gone and gone[0] - returned < 0.5  # the request was cancelled, its connection closed, not left dripping
  assert beta.budget.requests == 1


def test_attempt_timeout_is_wall_clock_and_retried_within_the_deadline():
  url, gone, listener = drip_server("body", interval=0.1)
  beta = backends.HttpBeta(base_url=url, model="m", api_key_env=None, timeout_s=0.5, deadline_s=1.75,
                           max_retries=10, backoff_base_s=0.01, backoff_max_s=0.01)
  start = time.monotonic()
  comp = beta.call(HI, SAMPLING, 0)
  elapsed = time.monotonic() - start
  time.sleep(0.5)
  listener.close()
  assert 1.75 <= elapsed < 2.3
  assert comp.error.startswith("deadline of 1.75s") and re.search(r"last error: timeout after 0\.[0-5]s", comp.error)
  # Attempts of 0.5 s each against a 6 s drip, then what the deadline leaves: each one cut, its connection closed.
  assert beta.retries in (2, 3) and len(gone) == beta.retries + 1


# --- HttpBeta: the budget counts the server's usage ---------------------------------------------------------------

def usage_server(usage: dict):
  """An OpenAI-style server whose every answer reports `usage`; returns its URL, request count and listener."""
  seen = []

  class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
      pass

    def do_POST(self):  # pylint: disable=invalid-name
      self.rfile.read(int(self.headers["Content-Length"]))
      seen.append(self.path)
      data = json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "m", "usage": usage,
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": "ok"}}]}).encode()
      self.send_response(200)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)

  srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  threading.Thread(target=srv.serve_forever, daemon=True).start()
  return f"http://127.0.0.1:{srv.server_address[1]}/v1", seen, srv


@pytest.mark.parametrize("usage", [{"prompt_tokens": 10, "completion_tokens": 100, "total_tokens": 110},
                                   {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 110}])
def test_a_server_reporting_more_than_the_worst_case_stops_the_run(usage):
  url, seen, srv = usage_server(usage)
  budget = backends.Budget(max_tokens=50)
  beta = backends.HttpBeta(base_url=url, model="m", api_key_env=None, concurrency=1, budget=budget)
  got = []
  try:
    with pytest.raises(backends.BudgetExceeded) as err:
      for i, comp in beta.map([(HI, 0), (HI, 1), (HI, 2)], SAMPLING):
        got.append((i, comp.texts))
  finally:
    srv.shutdown()
  assert got == [(0, ["ok"])] and len(seen) == 1  # the answer paid for is kept; nothing more is sent
  # "hi" is 2 bytes + 16 of template: worst case 18 prompt + 8 completion tokens.
  assert str(err.value).startswith(f"budget: the server reported {usage['prompt_tokens']} prompt + "
                                   f"{110 - usage['prompt_tokens']} completion tokens for a request whose worst "
                                   "case was 18 + 8, which brought tokens 110 > cap 50")
  assert budget.summary()["overrun"] == str(err.value)
  assert budget.tokens_in + budget.tokens_out == 110


def test_an_overrun_on_the_last_request_is_still_raised():
  url, seen, srv = usage_server({"prompt_tokens": 10, "completion_tokens": 100, "total_tokens": 110})
  beta = backends.HttpBeta(base_url=url, model="m", api_key_env=None, budget=backends.Budget(max_tokens=50))
  try:
    results = []
    with pytest.raises(backends.BudgetExceeded, match="which brought tokens 110 > cap 50"):
      results.extend(beta.map([(HI, 0)], SAMPLING))
  finally:
    srv.shutdown()
  assert [c.texts for _, c in results] == [["ok"]] and len(seen) == 1


# --- fiat serve: auth first, size and count caps, bounded reads and connections ---------------------------------

def test_unauthenticated_huge_body_is_refused_unread(server):
  srv = server()
  got, elapsed = exchange(srv, headers(length=300_000_000, key=None) + b"x" * (256 << 10))
  assert got.startswith(b"HTTP/1.1 401") and b"invalid_api_key" in got and elapsed < 2
  got, elapsed = exchange(srv, headers(length=10**10) + b"{")  # with the key: 413, still unread
  assert got.startswith(b"HTTP/1.1 413") and b"over the limit of 4194304 (--max_body_bytes)" in got
  statuses = [json.loads(line)["status"] for line in open(srv.request_log)]
  assert statuses == [401, 413]


def test_fifty_connections_announcing_huge_bodies_hold_no_thread(server):
  srv = server()
  before = threading.active_count()
  socks = [socket.create_connection(srv.server_address, timeout=5) for _ in range(50)]
  for s in socks:
    s.sendall(headers(length=10**10))
  answers = [s.recv(4096) for s in socks]
  for s in socks:
    s.close()
  assert all(a.startswith(b"HTTP/1.1 413") for a in answers)
  deadline = time.monotonic() + 2
  while threading.active_count() > before and time.monotonic() < deadline:
    time.sleep(0.05)
  assert threading.active_count() <= before


def test_unauthenticated_small_body_is_drained_and_the_connection_reused(server):
  srv = server()
  conn = http.client.HTTPConnection(*srv.server_address, timeout=10)
  body = json.dumps({"model": srv.model_name, "prompt": "x" * 5000, "max_tokens": 4})
  conn.request("POST", "/v1/completions", body=body, headers={"Authorization": "Bearer wrong"})
  resp = conn.getresponse()
  assert (resp.status, json.loads(resp.read())["error"]["code"]) == (401, "invalid_api_key")
  conn.request("POST", "/v1/completions", body=json.dumps({"model": srv.model_name, "prompt": "Q", "max_tokens": 4}),
               headers={"Authorization": f"Bearer {KEY}"})
  resp = conn.getresponse()
  assert resp.status == 200 and json.loads(resp.read())["usage"]["completion_tokens"] <= 4
  conn.close()


def test_model_list_needs_the_key_health_does_not(server):
  srv = server()
  def get(path, key):
    conn = http.client.HTTPConnection(*srv.server_address, timeout=10)
    conn.request("GET", path, headers={"Authorization": f"Bearer {key}"} if key else {})
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read())
    conn.close()
    return out
  assert get("/v1/models", None)[0] == 401 and get("/v1/models", "wrong")[0] == 401
  assert get("/v1/models", KEY) == (200, {"object": "list", "data": [{"id": srv.model_name, "object": "model",
                                                                       "owned_by": "fiat-jax"}]})
  assert get("/health", None) == (200, {"status": "ok"})


@pytest.mark.parametrize("phase", ["headers", "body", "idle"])
def test_a_request_trickling_in_is_cut_at_the_read_timeout(server, phase):
  srv = server(read_timeout_s=1.0)
  with socket.create_connection(srv.server_address, timeout=10) as sock:
    start = time.monotonic()
    data = headers(length=100) + b" " * 100
    sent, drip = {"headers": (b"", data), "body": (data[:-100], data[-100:]), "idle": (b"", b"")}[phase]
    sock.sendall(sent)
    got = b""
    try:
      for b in drip:  # one byte every 0.1 s: 10-30 s for the whole request
        sock.sendall(bytes([b]))
        time.sleep(0.1)
      got = sock.recv(4096)
    except (BrokenPipeError, ConnectionResetError):
      pass
    while chunk := sock.recv(4096):
      got += chunk
    elapsed = time.monotonic() - start
  assert 1.0 <= elapsed < 1.8, elapsed
  if phase == "idle":
    assert got == b""  # an idle keep-alive connection is closed quietly
  else:
    assert got.startswith(b"HTTP/1.1 408") and b"not received within 1s (--read_timeout_s)" in got


def test_connections_past_the_limit_get_503_and_threads_stay_bounded(server):
  srv = server(max_connections=4, read_timeout_s=1.0)
  before = threading.active_count()
  idle = [socket.create_connection(srv.server_address, timeout=5) for _ in range(4)]
  time.sleep(0.2)
  extra = [exchange(srv, headers(length=2) + b"{}")[0] for _ in range(20)]
  assert all(e.startswith(b"HTTP/1.1 503") and b"server busy: 4 connections open" in e for e in extra)
  assert threading.active_count() <= before + 4
  time.sleep(1.2)  # the idle connections are closed at the read timeout, freeing their slots
  assert [s.recv(10) for s in idle] == [b""] * 4
  for s in idle:
    s.close()
  status, out = post(srv, {"model": srv.model_name, "prompt": "Q", "max_tokens": 4})
  assert status == 200 and out["choices"][0]["finish_reason"] in ("stop", "length")


def test_prompt_count_is_capped(server):
  srv = server(max_prompts=3)
  status, out = post(srv, {"model": srv.model_name, "prompt": ["a", "b", "c", "d"], "max_tokens": 2})
  assert status == 400 and out["error"]["param"] == "prompt"
  assert out["error"]["message"] == "'prompt' has 4 prompts, over the limit of 3 (--max_prompts)"
  status, out = post(srv, {"model": srv.model_name, "prompt": ["a", "b", "c"], "max_tokens": 2})
  assert status == 200 and len(out["choices"]) == 3


# --- fiat serve: sampling values in OpenAI's ranges ------------------------------------------------------------

BAD = [("temperature", -1), ("temperature", "nan"), ("temperature", 2.5), ("temperature", True),
       ("temperature", float("nan")), ("top_p", -3), ("top_p", 0), ("top_p", 1.5), ("top_p", float("inf")),
       ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", 1.5), ("max_tokens", "8"), ("max_tokens", 4097),
       ("n", 0), ("n", 17), ("n", 2), ("stop", 123), ("stop", ["a", "b", "c", "d", "e"]), ("stop", [1]),
       ("seed", "x"), ("top_k", -1), ("stream", True)]


@pytest.mark.parametrize("field,value", BAD, ids=[f"{f}={v!r}" for f, v in BAD])
def test_out_of_range_sampling_values_are_400_naming_the_field(server, field, value):
  srv = server()
  body = {"model": srv.model_name, "prompt": "Q", "temperature": 0, "max_tokens": 4, field: value}
  status, out = post(srv, None, raw=json.dumps(body).encode())  # NaN / Infinity as JSON's literals
  assert status == 400, out
  assert out["error"]["type"] == "invalid_request_error" and out["error"]["param"] == field
  assert f"'{field}'" in out["error"]["message"]


def test_max_tokens_absent_or_null_is_the_server_default(server):
  srv = server(default_max_tokens=5)
  for extra in ({}, {"max_tokens": None}):
    status, out = post(srv, {"model": srv.model_name, "prompt": "Q", "temperature": 0} | extra)
    assert status == 200 and out["usage"]["completion_tokens"] <= 5


def test_max_tokens_values_share_one_compilation(server):
  srv = server()
  prompt = "Question: why?"

  def ask(max_tokens):
    status, out = post(srv, {"model": srv.model_name, "prompt": prompt, "temperature": 0, "max_tokens": max_tokens})
    assert status == 200
    return out["choices"][0]["text"], out["usage"]["completion_tokens"], out["choices"][0]["finish_reason"]

  full, n_full, _ = ask(16)  # compiles the 16-step program
  compiled = decoding._generate._cache_size()  # pylint: disable=protected-access
  answers = {m: ask(m) for m in (1, 3, 7, 9, 13, 15)}
  assert decoding._generate._cache_size() == compiled  # pylint: disable=protected-access
  for m, (text, n, reason) in answers.items():  # each is the 16-step answer cut at max_tokens
    assert full.startswith(text) and n == min(m, n_full)
    assert reason == ("length" if n == m else "stop")
  ask(17)  # the next bucket (32 steps): one more program
  assert decoding._generate._cache_size() == compiled + 1  # pylint: disable=protected-access
