"""HttpBeta against `fiat serve` (a tiny random model on 127.0.0.1): faults, retries, budgets, key secrecy, kill -9."""
import collections
import json
import logging
import os
import signal
import subprocess
import sys
import time

import gin
import openai
import pytest

from fiat_jax.beta import backends
from fiat_jax.beta import prompts
from fiat_jax.beta import rationales
from fiat_jax.beta import serve
from fiat_jax.beta import store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY_ENV = "FIAT_TEST_BETA_KEY"
SECRET = "sk-fiat-test-9f8e7d6c5b4a"
SAMPLING = backends.Sampling(max_new_tokens=8)


def write_xqa_data(root, sizes=None, languages=("bn", "hi")) -> str:
  """A tiny XTREME-UP release (real layout) whose prompts all have the same length: one compilation serves all."""
  sizes = sizes or {"train": 2, "validation": 3, "test": 4}
  for split, n in sizes.items():
    folder = os.path.join(root, "xtreme_up_v1.1", "qa_cross_lang", split)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{languages[0]}.jsonl"), "w") as f0, \
         open(os.path.join(folder, f"{languages[1]}.jsonl"), "w") as f1:
      for i in range(n):
        for lang, f in ((languages[0], f0), (languages[1], f1)):
          f.write(json.dumps({"question": f"Q {split[:2]} {lang} {i:03d}?", "title": "T",
                              "context": f"C {i:03d}.", "target": "No Answer" if i % 2 else f"C {i:03d}"}) + "\n")
  return root


def write_prompt_files(root) -> tuple[str, str]:
  """A short I_beta (instruction + one exemplar) keeps the tiny model's prompts short."""
  instruction, exemplars = os.path.join(root, "i_beta.txt"), os.path.join(root, "exemplars.jsonl")
  with open(instruction, "w") as f:
    f.write("Answer from the passage.\n")
  with open(exemplars, "w") as f:
    f.write(json.dumps({"id": "ex-1", "language": "bn", "question": "Q ex?", "title": "T", "context": "C 9.",
                        "target": "C 9", "rationale": "It says C 9."}) + "\n")
  return instruction, exemplars


@pytest.fixture(scope="module")
def tiny_beta():
  return backends.tiny_local_beta(seed=0, batch_size=8)


@pytest.fixture
def task_dirs(tmp_path):
  data = write_xqa_data(str(tmp_path / "data"))
  instruction, exemplars = write_prompt_files(str(tmp_path))
  return dict(task="xtreme_up_xqa", data_dir=data, instruction_file=instruction, exemplars_file=exemplars)


def read_log(path) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f]


def prompt_shas(task_dirs, beta_identity) -> dict[str, str]:
  """prompt sha -> example id, rebuilt the way the run renders prompts."""
  examples = rationales.read_examples(task_dirs["task"], task_dirs["data_dir"], rationales.SPLITS, None)
  i_beta, texts = rationales.build_i_beta(task_dirs["task"], examples, task_dirs["instruction_file"],
                                   task_dirs["exemplars_file"])
  items = rationales.plan(task_dirs["task"], examples, rationales.SPLITS, i_beta, texts, beta_identity, SAMPLING)
  return {serve.prompt_sha(prompts.render_plain(it.messages)): it.example["id"] for it in items}


def test_faults_retries_and_every_example_stored_once(tmp_path, tiny_beta, task_dirs, monkeypatch):
  monkeypatch.setenv(KEY_ENV, SECRET)
  log = str(tmp_path / "requests.jsonl")
  faults = serve.Faults({"429": 0.15, "500": 0.15, "malformed": 0.1, "stall": 0.08}, seed=3, retry_after_s=0.2,
                        stall_s=1.0)
  srv = serve.start(tiny_beta, request_log=log, faults=faults, max_batch=8, api_key=SECRET)
  try:
    beta = backends.HttpBeta(base_url=srv.url, model=tiny_beta.identity, api_key_env=KEY_ENV, concurrency=4,
                             timeout_s=0.5, deadline_s=60, max_retries=30, backoff_base_s=0.01, backoff_max_s=0.05)
    result = rationales.rationales(store_dir=str(tmp_path / "store"), beta=beta, sampling=SAMPLING, progress=False,
                            **task_dirs)
  finally:
    srv.shutdown()
  n_examples = 2 * (2 + 3 + 4)
  assert (result["done"], result["failed"], result["pending"], result["stopped"]) == (n_examples, 0, 0, None)
  records = store.read_records(str(tmp_path / "store"))
  assert len(records) == n_examples and len({r["key"] for r in records}) == n_examples
  assert all(r["error"] is None and r["backend"] == "HttpBeta" and r["tokens_in"] > 0 for r in records)
  time.sleep(faults.stall_s + 0.3)  # a stalled request is logged when its stall ends
  entries = read_log(log)
  faults_seen = collections.Counter(e["fault"] for e in entries)
  assert all(faults_seen[k] >= 1 for k in serve.FAULT_KINDS), faults_seen
  assert result["retries"] == len(entries) - n_examples  # every failed attempt was retried once more
  assert result["budget"]["requests"] == len(entries)  # retries counted in the budget
  # Retry-After is honoured: the retry of a 429 comes no sooner than the 0.2 s it asked for.
  by_prompt = collections.defaultdict(list)
  for e in sorted(entries, key=lambda e: e["time"]):  # logged when answered; ordered here by arrival
    by_prompt[tuple(e["prompts"])].append(e)
  gaps = [b["time"] - a["time"] for reqs in by_prompt.values() for a, b in zip(reqs, reqs[1:])
          if a["status"] == 429]
  assert gaps and min(gaps) >= 0.2
  answered = {tuple(e["prompts"]) for e in entries if e["status"] == 200 and e["fault"] is None}
  assert len(answered) == len(by_prompt) == n_examples


def test_budget_stops_before_the_cap_and_resume_asks_only_the_rest(tmp_path, tiny_beta, task_dirs):
  log = str(tmp_path / "requests.jsonl")
  srv = serve.start(tiny_beta, request_log=log, max_batch=8)
  store_dir = str(tmp_path / "store")
  try:
    capped = backends.HttpBeta(base_url=srv.url, model=tiny_beta.identity, api_key_env=None, concurrency=2,
                               budget=backends.Budget(max_requests=5))
    first = rationales.rationales(store_dir=store_dir, beta=capped, sampling=SAMPLING, progress=False, **task_dirs)
    assert first["stopped"].startswith("BudgetExceeded: budget: the next request could bring requests to 6")
    assert (first["done"], len(read_log(log))) == (5, 5)
    per_token = backends.Budget(max_tokens=10_000, price_in_per_mtok=2.0, price_out_per_mtok=8.0)
    rest = backends.HttpBeta(base_url=srv.url, model=tiny_beta.identity, api_key_env=None, concurrency=2,
                             budget=per_token)
    second = rationales.rationales(store_dir=store_dir, beta=rest, sampling=SAMPLING, progress=False, **task_dirs)
  finally:
    srv.shutdown()
  assert (second["asked"], second["done"], second["stopped"]) == (13, 13, None)
  assert per_token.tokens_in + per_token.tokens_out <= 10_000
  assert per_token.summary()["cost"] == pytest.approx((per_token.tokens_in * 2 + per_token.tokens_out * 8) / 1e6)
  prompts_asked = collections.Counter(tuple(e["prompts"]) for e in read_log(log))
  assert len(prompts_asked) == 18 and set(prompts_asked.values()) == {1}  # nobody asked twice


def test_token_budget_refuses_a_request_that_could_pass_it(tmp_path, tiny_beta, task_dirs):
  srv = serve.start(tiny_beta, request_log=str(tmp_path / "log.jsonl"))
  try:
    beta = backends.HttpBeta(base_url=srv.url, model=tiny_beta.identity, api_key_env=None, concurrency=1,
                             budget=backends.Budget(max_tokens=100))
    result = rationales.rationales(store_dir=str(tmp_path / "s"), beta=beta, sampling=SAMPLING, progress=False,
                            **task_dirs)
  finally:
    srv.shutdown()
  assert result["done"] == 0 and "bring tokens to" in result["stopped"]
  assert not os.path.exists(tmp_path / "log.jsonl")  # refused before anything was sent


def test_an_unset_key_variable_sends_no_key(tmp_path, tiny_beta, monkeypatch):
  """A keyless server (`fiat serve` without --api_key_env) answers; a keyed one refuses once, saying why."""
  monkeypatch.delenv(KEY_ENV, raising=False)
  open_srv = serve.start(tiny_beta, request_log=str(tmp_path / "open.jsonl"))
  keyed_srv = serve.start(tiny_beta, request_log=str(tmp_path / "keyed.jsonl"), api_key=SECRET)
  try:
    answer = backends.HttpBeta(base_url=open_srv.url, model=tiny_beta.identity, api_key_env=KEY_ENV).call(
        [{"role": "user", "content": "hi"}], SAMPLING, 0)
    keyed = backends.HttpBeta(base_url=keyed_srv.url, model=tiny_beta.identity, api_key_env=KEY_ENV)
    with pytest.raises(backends.FatalBetaError, match=f"HTTP 401.*no API key was sent: set {KEY_ENV}"):
      keyed.call([{"role": "user", "content": "hi"}], SAMPLING, 0)
  finally:
    open_srv.shutdown()
    keyed_srv.shutdown()
  assert answer.error is None and answer.texts


def test_api_key_never_leaks(tmp_path, tiny_beta, task_dirs, monkeypatch, caplog, capsys):
  caplog.set_level(logging.DEBUG)
  for name in ("openai", "httpx2", "httpcore", "fiat_jax"):
    logging.getLogger(name).setLevel(logging.DEBUG)
  monkeypatch.setenv(KEY_ENV, SECRET)
  log = str(tmp_path / "requests.jsonl")
  srv = serve.start(tiny_beta, request_log=log, api_key=SECRET)
  try:
    good = backends.HttpBeta(base_url=srv.url, model=tiny_beta.identity, api_key_env=KEY_ENV)
    ok = rationales.rationales(store_dir=str(tmp_path / "store"), beta=good, sampling=SAMPLING, **task_dirs)
    monkeypatch.setenv(KEY_ENV, SECRET + "-wrong")
    bad = backends.HttpBeta(base_url=srv.url, model=tiny_beta.identity, api_key_env=KEY_ENV, concurrency=1)
    refused = rationales.rationales(store_dir=str(tmp_path / "store2"), beta=bad, sampling=SAMPLING, **task_dirs)
    with pytest.raises(backends.FatalBetaError) as err:
      bad.call([{"role": "user", "content": "hi"}], SAMPLING, 0)
  finally:
    srv.shutdown()
  assert ok["done"] == 18
  assert refused["stopped"].startswith("FatalBetaError: beta refused the request (HTTP 401)")
  assert sum(e["status"] == 401 for e in read_log(log)) == 2  # refused at once: no retry
  texts = [caplog.text, str(err.value), repr(bad), json.dumps(refused), json.dumps(ok)] + list(capsys.readouterr())
  for dirpath, _, files in os.walk(tmp_path):
    texts += [open(os.path.join(dirpath, f), errors="replace").read() for f in files]
  assert len(texts) > 8 and "HTTP Request: POST" in caplog.text  # the logs were captured at debug level
  assert not [t for t in texts if SECRET in t]


def test_deadline_bounds_a_call_that_keeps_stalling(tmp_path, tiny_beta):
  faults = serve.Faults({"stall": 1.0}, stall_s=3.0)
  srv = serve.start(tiny_beta, request_log=str(tmp_path / "log.jsonl"), faults=faults)
  try:
    beta = backends.HttpBeta(base_url=srv.url, model=tiny_beta.identity, api_key_env=None, timeout_s=0.3,
                             deadline_s=1.0, backoff_base_s=0.01)
    start = time.monotonic()
    comp = beta.call([{"role": "user", "content": "hi"}], SAMPLING, 0)
    elapsed = time.monotonic() - start
  finally:
    srv.shutdown()
  assert comp.texts == [] and comp.error.startswith("deadline of 1s")
  assert "timeout after" in comp.error and 0.9 <= elapsed < 1.6


def test_bad_request_is_recorded_not_retried(tmp_path, tiny_beta):
  log = str(tmp_path / "log.jsonl")
  srv = serve.start(tiny_beta, request_log=log)
  try:
    beta = backends.HttpBeta(base_url=srv.url, model=tiny_beta.identity, api_key_env=None, endpoint="completions")
    comp = beta.call([{"role": "user", "content": "x" * 3000}], SAMPLING, 0)  # longer than the model's max_len
  finally:
    srv.shutdown()
  assert comp.error.startswith("HTTP 400") and "max_len is 2048" in comp.error
  assert [e["status"] for e in read_log(log)] == [400]


def test_kill_9_mid_run_then_resume(tmp_path, tiny_beta, task_dirs, capsys, monkeypatch):
  monkeypatch.setenv(KEY_ENV, SECRET)
  class SlowBeta(backends.LocalBeta):
    def complete_texts(self, texts, sampling, seeds, steps=None):
      time.sleep(0.15)  # so the kill lands mid-run
      return super().complete_texts(texts, sampling, seeds, steps)

  slow = SlowBeta(tiny_beta.model, tiny_beta.variables, tiny_beta.vocab, tiny_beta.identity, batch_size=8,
                  max_len=2048)
  log, store_dir = str(tmp_path / "requests.jsonl"), str(tmp_path / "store")
  srv = serve.start(slow, request_log=log, max_batch=2, api_key=SECRET)
  argv = [sys.executable, "-m", "fiat_jax.main", "rationales", f"--gin.Experiment.dataset='{task_dirs['task']}'",
          f"--gin.Experiment.data_dir='{task_dirs['data_dir']}'", f"--gin.Experiment.store_dir='{store_dir}'",
          f"--gin.Beta.instruction_file='{task_dirs['instruction_file']}'",
          f"--gin.Beta.exemplars_file='{task_dirs['exemplars_file']}'",
          "--gin.Beta.backend=@HttpBeta()", f"--gin.HttpBeta.base_url='{srv.url}'",
          f"--gin.HttpBeta.model='{tiny_beta.identity}'", f"--gin.HttpBeta.api_key_env='{KEY_ENV}'",
          "--gin.HttpBeta.concurrency=2", "--gin.rationales.sampling=@beta_sampling()",
          "--gin.beta_sampling.max_new_tokens=8", "--gin.rationales.progress=False"]
  env = dict(os.environ, PYTHONPATH=REPO, **{KEY_ENV: SECRET})
  shard = store.shard_path(store_dir, 0)
  try:
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
      if os.path.exists(shard) and open(shard, "rb").read().count(b"\n") >= 4:
        break
      time.sleep(0.01)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stored_at_kill = len(store.read_records(store_dir))
    assert 4 <= stored_at_kill < 18
    try:
      assert rationales.main(argv[4:] + ["--status"]) == 0
    finally:
      gin.clear_config()
    assert capsys.readouterr().out.splitlines()[-1].split() == ["all", "all", str(stored_at_kill), "0",
                                                                str(18 - stored_at_kill)]
    resumed = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
  finally:
    srv.shutdown()
  records = store.read_records(store_dir)
  assert len(records) == 18 and len({r["key"] for r in records}) == 18
  first_stored = {}
  for r in records:
    first_stored.setdefault(r["example_id"], r["time"])
  sha_to_id = prompt_shas(task_dirs, "http:" + tiny_beta.identity)
  asked = collections.defaultdict(list)
  for e in read_log(log):
    if e["prompts"]:  # a request cut off by the kill (its body never arrived) asked for nothing
      asked[sha_to_id[e["prompts"][0]]].append(e["time"])
  assert set(asked) == set(first_stored)  # none missing
  assert not [i for i, times in asked.items() if max(times) > first_stored[i]]  # none asked after it was stored


def test_batcher_waits_for_clients_that_come_back(tiny_beta):
  """Clients that resubmit 30 ms after their answer land in one full batch, not a batch of one plus the rest."""
  import threading  # pylint: disable=g-import-not-at-top

  class SlowBeta(backends.LocalBeta):
    def complete_texts(self, texts, sampling, seeds, steps=None):
      time.sleep(1.5)  # a batch's decoding time; the window becomes at least 0.1 x 1.5 s = 150 ms
      return super().complete_texts(texts, sampling, seeds, steps)

  slow = SlowBeta(tiny_beta.model, tiny_beta.variables, tiny_beta.vocab, tiny_beta.identity, batch_size=4,
                  max_len=2048)
  batcher = serve.Batcher(slow, max_batch=4, wait_s=0.005, wait_fraction=0.1)

  def client(c):
    for r in range(3):
      if r:
        time.sleep(0.01 * (c + 1))  # 10-40 ms before the next request, staggered
      [comp] = batcher.submit([f"client {c} request {r}"], SAMPLING, 0)
      assert comp.error is None

  threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  # The first batch opens with a 5 ms window (nothing decoded yet), so a slow thread start can split the first
  # round; every later batch waits up to 150 ms and gathers the clients that came back (two full batches). With a
  # fixed 5 ms window (wait_fraction=0) every later round splits into one plus the rest: [4, 1, 3, 1, 3].
  assert sum(batcher.batch_sizes) == 12
  assert list(batcher.batch_sizes).count(4) >= 2, batcher.batch_sizes


def test_retry_after_header_forms():
  assert backends.retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
  assert backends.retry_after_seconds({"retry-after": "2"}) == 2.0
  future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
  assert 28 <= backends.retry_after_seconds({"retry-after": future}) <= 30
  assert backends.retry_after_seconds({"retry-after": "soon"}) is None
  assert backends.retry_after_seconds({}) is None


def test_fiat_serve_command(tmp_path):
  port_file, log = str(tmp_path / "port"), str(tmp_path / "requests.jsonl")
  env = dict(os.environ, PYTHONPATH=REPO, SERVE_KEY=SECRET)
  proc = subprocess.Popen([sys.executable, "-m", "fiat_jax.main", "serve", "--tiny", "--port=0",
                           f"--port_file={port_file}", f"--request_log={log}", "--api_key_env=SERVE_KEY"],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 120
    while not os.path.exists(port_file) and proc.poll() is None and time.monotonic() < deadline:
      time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    url = f"http://127.0.0.1:{open(port_file).read()}/v1"
    os.environ["SERVE_KEY_CLIENT"] = SECRET
    beta = backends.HttpBeta(base_url=url, model="local:tiny-random-0", api_key_env="SERVE_KEY_CLIENT",
                             endpoint="completions")
    comp = beta.call([{"role": "user", "content": "Question: Q?"}], SAMPLING, 0)
    models = openai.OpenAI(base_url=url, api_key=SECRET, max_retries=0).models.list()
    with pytest.raises(openai.AuthenticationError):  # the model list needs the key too
      openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
  finally:
    os.environ.pop("SERVE_KEY_CLIENT", None)
    proc.kill()
    out = proc.communicate()[0].decode()
  assert comp.error is None and comp.tokens_in == len("Question: Q?\nReasoning:".encode())
  assert [m.id for m in models.data] == ["local:tiny-random-0"]
  assert "at http://127.0.0.1:" in out and SECRET not in out
  entry = read_log(log)[0]
  assert entry["status"] == 200 and entry["prompts"] == [serve.prompt_sha("Question: Q?\nReasoning:")]
