"""run_files: atomic writes, the run lock (released when its holder is killed), writability, recorded settings."""
import json
import os
import signal
import subprocess
import sys

import pytest

from fiat_jax import run_files


def test_write_atomic_replaces_whole_and_leaves_no_temporary(tmp_path):
  path = str(tmp_path / "tau.json")
  run_files.write_atomic(path, "old")
  run_files.write_json(path, {"rank": 8})
  assert open(path).read() == '{\n "rank": 8\n}' and os.listdir(tmp_path) == ["tau.json"]


def test_read_json_names_a_damaged_file(tmp_path):
  path = tmp_path / "tau.json"
  path.write_text('{"rank": 8')
  with pytest.raises(run_files.RunDirError) as e:
    run_files.read_json(str(path))
  assert str(e.value) == (f"{path}: damaged (10 bytes, not valid JSON: Expecting ',' delimiter: line 1 column 11 "
                          f"(char 10)); {run_files.REBUILD}")


def test_the_lock_refuses_a_second_holder_and_dies_with_the_first(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from fiat_jax import run_files\n"
                             f"with run_files.lock({str(tmp_path)!r}):\n  print('held', flush=True); time.sleep(600)"],
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
  assert holder.stdout.readline() == "held\n"
  with pytest.raises(run_files.RunDirError, match=rf"another `fiat train` is using this run directory \(held by "
                                                  rf"host \S+ pid {holder.pid} since "):
    with run_files.lock(str(tmp_path)):
      pass
  holder.send_signal(signal.SIGKILL)
  holder.wait(timeout=30)
  with run_files.lock(str(tmp_path)) as me:  # no stale lock: the OS released it
    assert f"pid {os.getpid()} " in me and open(tmp_path / run_files.LOCK_FILE).read() == me + "\n"


def test_check_writable_names_a_path_that_is_a_file(tmp_path):
  (tmp_path / "run").write_text("")
  with pytest.raises(run_files.RunDirError, match=r"/run: not writable \(File exists\)"):
    run_files.check_writable(str(tmp_path / "run"))


def test_settings_recorded_refused_then_allowed_with_history(tmp_path):
  d = str(tmp_path)
  settings = {"train": {"num_steps": 40, "log_every": 10, "optim": {"learning_rate": 3e-4}},
              "model": {"lora": {"rank": 8, "targets": ("q", "v")}}}
  assert run_files.check_settings(d, settings, resuming_from=None, allow_changed=False) == []
  assert run_files.check_settings(d, settings, resuming_from=10, allow_changed=False) == []
  changed = {"train": {"num_steps": 80, "log_every": 1, "optim": {"learning_rate": 3e-4}},
             "model": {"lora": {"rank": 8, "targets": ("q",)}}}
  with pytest.raises(run_files.RunDirError) as e:
    run_files.check_settings(d, changed, resuming_from=10, allow_changed=False)
  assert str(e.value).splitlines()[1:3] == ['  model.lora.targets: recorded ["q", "v"], now ["q"]',
                                            "  train.num_steps: recorded 40, now 80"]  # log_every: how, not what
  notices = run_files.check_settings(d, changed, resuming_from=10, allow_changed=True)
  assert notices[1:] == ['  model.lora.targets: recorded ["q", "v"], now ["q"]', "  train.num_steps: recorded 40, now 80"]
  history = [json.loads(line) for line in open(tmp_path / run_files.HISTORY_FILE)]
  assert [(h["resumed_from_step"], len(h["changes"])) for h in history] == [(10, 2)]
  assert json.load(open(tmp_path / run_files.SETTINGS_FILE))["train"]["num_steps"] == 80
