"""Fault injection: a second writer on a live shard, a writer killed mid-line, committed checkpoints that no
longer restore (missing manifest, truncated data, missing metadata)."""
import glob
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from fiat_jax.beta import store
from fiat_jax.training import optim
from fiat_jax.training import train
import test_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A writer process: N records, then (MODE=hold) half a line, waits for stdin and finishes it, or (MODE=kill) half a
# line and SIGKILL, or (MODE=stream) nothing more.
WRITER = textwrap.dedent(f"""
    import os, signal, sys, time
    sys.path.insert(0, {ROOT!r})
    from fiat_jax.beta import store
    store_dir, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    record = lambda i: {{"key": f"k{{i}}", "example_id": f"e{{i}}", "rationale": "r" * 200, "error": None}}
    w = store.ShardWriter(store_dir, 0)
    print("locked", flush=True)
    for i in range(n):
      w.append(record(i))
      if mode == "stream":
        time.sleep(0.0002)  # others try to open the shard meanwhile
    if mode in ("hold", "kill"):
      line = (__import__("json").dumps(record(n)) + "\\n").encode()
      os.write(w._fd, line[:50])  # a line in progress
      print("mid-line", flush=True)
      if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
      sys.stdin.readline()
      os.write(w._fd, line[50:])
    w.close()
    print("done", flush=True)
""")


def _writer(tmp_path, n, mode):
  script = tmp_path / "writer.py"
  script.write_text(WRITER)
  return subprocess.Popen([sys.executable, str(script), str(tmp_path / "store"), str(n), mode], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)


def _expect(proc, line):
  got = proc.stdout.readline().strip()
  assert got == line, f"writer printed {got!r}, expected {line!r}"


def test_a_second_writer_is_refused_and_leaves_the_live_line_alone(tmp_path):
  proc = _writer(tmp_path, 3, "hold")
  _expect(proc, "locked")
  _expect(proc, "mid-line")
  path = store.shard_path(str(tmp_path / "store"), 0)
  before = open(path, "rb").read()
  assert not before.endswith(b"\n")  # the writer is in the middle of its fourth line
  with pytest.raises(store.StoreBusy, match=r"shard-00000.jsonl: another process is writing this shard"):
    store.ShardWriter(str(tmp_path / "store"), 0)
  assert open(path, "rb").read() == before  # not "repaired" under the live writer
  proc.stdin.write("go\n")
  proc.stdin.flush()
  _expect(proc, "done")
  assert proc.wait(timeout=30) == 0
  assert [r["key"] for r in store.read_records(str(tmp_path / "store"))] == ["k0", "k1", "k2", "k3"]


def test_1500_records_survive_writers_that_try_to_open_the_shard_meanwhile(tmp_path):
  proc = _writer(tmp_path, 1500, "stream")
  _expect(proc, "locked")
  refused = 0
  while proc.poll() is None:
    try:
      store.ShardWriter(str(tmp_path / "store"), 0).close()
    except store.StoreBusy:
      refused += 1
  assert proc.returncode == 0 and refused > 0
  records = store.read_records(str(tmp_path / "store"))
  assert len(records) == 1500 and [r["key"] for r in records] == [f"k{i}" for i in range(1500)]


def test_a_killed_writer_releases_the_lock_and_its_torn_line_is_repaired(tmp_path, caplog):
  proc = _writer(tmp_path, 2, "kill")
  _expect(proc, "locked")
  _expect(proc, "mid-line")
  assert proc.wait(timeout=30) == -signal.SIGKILL
  with store.ShardWriter(str(tmp_path / "store"), 0) as w:  # the OS dropped the dead writer's lock
    w.append({"key": "k2", "example_id": "e2", "rationale": "again", "error": None})
  assert "torn last line (50 bytes, a crash mid-write) removed" in caplog.text
  assert [r["key"] for r in store.read_records(str(tmp_path / "store"))] == ["k0", "k1", "k2"]


# ---- Committed checkpoints that no longer restore ---------------------------------------------------------------

def _train(run_dir, num_steps):
  cfg = test_train.tiny()
  tcfg = train.TrainConfig(num_steps=num_steps, batch_size=8, log_every=1, save_every=2, keep=5, tensorboard=False,
                           optim=optim.OptimConfig(learning_rate=1e-2))
  return train.train(tcfg, cfg, test_train.params_of(cfg), test_train.step_batches(), "random", str(run_dir),
                     mesh=test_train.one_device())


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


# Checkpoint step -> how it was damaged after its commit.
CORRUPTIONS = {
    10: ("array metadata truncated", lambda d: _truncate(f"{d}/state/_METADATA")),
    8: ("manifest missing", lambda d: [os.remove(p) for p in glob.glob(f"{d}/state/**/manifest.ocdbt", recursive=True)]),
    6: ("data truncated", lambda d: [_truncate(p) for p in glob.glob(f"{d}/state/d/*")]),
    4: ("metadata missing", lambda d: os.remove(f"{d}/meta/metadata")),
}


def test_corrupted_checkpoints_are_moved_aside_and_resume_falls_back_to_one_that_restores(tmp_path, capsys):
  run_dir = tmp_path / "run"
  finished = jax.device_get(_train(run_dir, 10).trainable)  # checkpoints 2, 4, 6, 8, 10
  for step, (_, damage) in CORRUPTIONS.items():
    damage(str(run_dir / "checkpoints" / str(step)))
  capsys.readouterr()
  res = _train(run_dir, 10)
  out = capsys.readouterr().out
  moved = sorted(os.listdir(run_dir / "corrupt_checkpoints"), key=lambda n: int(n.split(".")[0]))
  assert [n.split(".corrupt-")[0] for n in moved] == ["4", "6", "8", "10"]
  for name in moved:
    step = name.split(".")[0]
    assert (f"warning: checkpoint {run_dir}/checkpoints/{step} is committed but does not restore" in out and
            f"moved it to {run_dir}/corrupt_checkpoints/{name}" in out), (CORRUPTIONS[int(step)][0], out)
  assert "resumed from" in out and "step 2, data position 2 batches" in out and res.step == 10
  for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(res.trainable)), jax.tree_util.tree_leaves(finished)):
    np.testing.assert_array_equal(a, b)  # steps 3-10 trained again from checkpoint 2: the same as before
  assert sorted(os.listdir(run_dir / "checkpoints"), key=int) == ["2", "4", "6", "8", "10"]
