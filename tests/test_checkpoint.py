"""Checkpoints: exact resume after SIGKILL, SIGTERM saves, NaN stops, half-written saves, retention, 8 <-> 1
devices, and resume errors naming what changed."""
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from fiat_jax.model import sharding
from fiat_jax.training import checkpoint
from fiat_jax.training import optim
from fiat_jax.training import train
import helpers
import test_train

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
NUM_STEPS = 10

# A training run as its own process: the tests kill it. CRASH_IN_SAVE_AT=<step> SIGKILLs it inside Orbax's
# commit of that step's save, after the data is written but before the directory is renamed into place.
SCRIPT = textwrap.dedent(f"""
    import os, signal, sys, time
    sys.path[:0] = [{TESTS_DIR!r}, {os.path.dirname(TESTS_DIR)!r}]
    import jax, numpy as np
    from fiat_jax.training import optim
    from fiat_jax.model import sharding
    from fiat_jax.training import train
    import test_train

    run_dir = sys.argv[1]
    crash_at = os.environ.get("CRASH_IN_SAVE_AT")
    if crash_at:
      from orbax.checkpoint._src.path import atomicity
      commit = atomicity.AtomicRenameTemporaryPath.finalize
      async def finalize(self):
        if self.get_final().name == crash_at:
          os.kill(os.getpid(), signal.SIGKILL)
        return await commit(self)
      atomicity.AtomicRenameTemporaryPath.finalize = finalize
    cfg = test_train.tiny()
    tcfg = train.TrainConfig(num_steps={NUM_STEPS}, batch_size=8, log_every=1, save_every=2, keep=2,
                             tensorboard=False, optim=optim.OptimConfig(learning_rate=1e-2, warmup_steps=3,
                                                                        schedule="cosine"))
    def batches(start):  # slowed down, so that a signal lands while the run is still going
      for batch in test_train.step_batches()(start):
        time.sleep(0.2)
        yield batch
    res = train.train(tcfg, cfg, test_train.params_of(cfg), batches, "random", run_dir,
                      mesh=sharding.make_mesh(devices=jax.devices()[:1]))
    leaves = jax.tree_util.tree_leaves_with_path(res.trainable)
    np.savez(os.path.join(run_dir, "final.npz"), **{{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}})
    print("preempted" if res.preempted else "finished", flush=True)
""")


def _start(tmp_path, run_dir, env=None):
  script = tmp_path / "run_train.py"
  script.write_text(SCRIPT)
  return subprocess.Popen([sys.executable, str(script), str(run_dir)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=dict(os.environ, **(env or {})))


def _run(tmp_path, run_dir, env=None):
  proc = _start(tmp_path, run_dir, env)
  out, _ = proc.communicate(timeout=300)
  return proc.returncode, out


def _wait_for(proc, text):
  """Reads the child's output until a line contains `text`; returns everything read."""
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if text in line:
      return "".join(lines)
  raise AssertionError(f"the run ended without printing {text!r}:\n" + "".join(lines))


def _final(run_dir):
  with np.load(os.path.join(run_dir, "final.npz")) as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The trainable params after an uninterrupted run."""
  tmp = tmp_path_factory.mktemp("reference")
  code, out = _run(tmp, tmp / "run")
  assert code == 0 and "finished" in out, out
  return _final(tmp / "run")


def _assert_bit_identical(got, want):
  assert sorted(got) == sorted(want) and len(want) > 10
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_sigkill_at_a_random_step_then_restart_is_bit_identical(tmp_path, reference):
  # The step is drawn from a seed (FIAT_KILL_SEED, default 0) and printed, so that a failure can be rerun as it was.
  seed = int(os.environ.get("FIAT_KILL_SEED", "0"))
  kill_at = random.Random(seed).randint(3, NUM_STEPS - 1)  # after step 3 is printed, checkpoint 2 is complete
  print(f"SIGKILL after step {kill_at} (FIAT_KILL_SEED={seed})")
  proc = _start(tmp_path, tmp_path / "run")
  _wait_for(proc, f"step {kill_at}/{NUM_STEPS}")
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  code, out = _run(tmp_path, tmp_path / "run")
  assert code == 0, out
  assert "resumed from" in out, f"killed at step {kill_at} (FIAT_KILL_SEED={seed}):\n{out}"
  _assert_bit_identical(_final(tmp_path / "run"), reference)


def test_sigterm_saves_a_checkpoint_before_exiting(tmp_path, reference):
  proc = _start(tmp_path, tmp_path / "run")
  _wait_for(proc, f"step 3/{NUM_STEPS}")
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 0 and "preempted" in out, out
  stopped = int(re.search(r"SIGTERM: saved \S+/(\d+);", out).group(1))
  assert 3 <= stopped < NUM_STEPS
  assert checkpoint.is_complete(str(tmp_path / "run" / "checkpoints" / str(stopped)))
  code, out = _run(tmp_path, tmp_path / "run")
  assert code == 0 and f"step {stopped}, data position {stopped} batches" in out, out
  _assert_bit_identical(_final(tmp_path / "run"), reference)


def test_crash_inside_a_save_resumes_from_the_previous_complete_one(tmp_path, reference):
  code, out = _run(tmp_path, tmp_path / "run", env={"CRASH_IN_SAVE_AT": "6"})
  assert code == -signal.SIGKILL, out
  ckpt_dir = tmp_path / "run" / "checkpoints"
  partial = [n for n in os.listdir(ckpt_dir) if n.startswith("6.")]
  assert len(partial) == 1 and os.listdir(ckpt_dir / partial[0])  # half-written: data, no commit
  code, out = _run(tmp_path, tmp_path / "run")
  assert code == 0, out
  assert f"{partial[0]} is an incomplete save" in out and "will not use it" in out
  assert "resumed from" in out and "step 4, data position 4 batches" in out
  assert os.listdir(tmp_path / "run" / "partial_checkpoints")[0].startswith(partial[0])
  assert sorted(os.listdir(ckpt_dir), key=int) == ["8", "10"]
  _assert_bit_identical(_final(tmp_path / "run"), reference)


def _train(run_dir, num_steps, batches=None, **kw):
  cfg = test_train.tiny()
  tcfg = train.TrainConfig(num_steps=num_steps, batch_size=kw.pop("batch_size", 8), log_every=1, save_every=2,
                           tensorboard=False, optim=optim.OptimConfig(learning_rate=1e-2), **kw.pop("tcfg", {}))
  return train.train(tcfg, cfg, test_train.params_of(cfg), batches or test_train.step_batches(),
                     kw.pop("fingerprint", "random"), str(run_dir), mesh=test_train.one_device(), **kw)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  def batches(start):
    for step, batch in enumerate(test_train.step_batches()(start), start):
      if step == 4:  # the fifth update
        batch["decoder_loss_weights"] = np.where(batch["decoder_loss_weights"] > 0, np.nan, 0.0)
      yield batch
  with pytest.raises(FloatingPointError, match=r"loss is nan at step 5 \(the update from step 4\).*"
                                               r"last good checkpoint is .*checkpoints/4"):
    _train(tmp_path / "run", 8, batches)
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints"), key=int) == ["2", "4"]
  restored = _train(tmp_path / "run", 4, allow_changed_settings=True)  # num_steps 8 -> 4 (recorded): the step-4 state
  clean = _train(tmp_path / "clean", 4)
  for a, b in zip(jax.tree_util.tree_leaves(restored.trainable), jax.tree_util.tree_leaves(clean.trainable)):
    np.testing.assert_array_equal(a, b)
    assert np.all(np.isfinite(a))


@pytest.mark.parametrize("nan_at", [3, 4, 8])  # before a save step, a save step, the last step
def test_a_nan_loss_at_step_k_stops_before_any_checkpoint_or_evaluation_of_step_k_or_later(tmp_path, nan_at):
  def batches(start):
    for step, batch in enumerate(test_train.step_batches()(start), start):
      if step == nan_at - 1:  # batch i makes update i + 1
        batch["decoder_loss_weights"] = np.where(batch["decoder_loss_weights"] > 0, np.nan, 0.0)
      yield batch
  evaluated = []
  with pytest.raises(FloatingPointError, match=rf"loss is nan at step {nan_at} \(the update from step {nan_at - 1}\)"):
    _train(tmp_path / "run", 8, batches, tcfg=dict(eval_every=2, best_metric="eval/f1"),
           evaluate=lambda step, variables: evaluated.append(step) or {"f1": 0.0})
  saved = [s for s in (2, 4, 6) if s < nan_at]
  assert sorted(map(int, os.listdir(tmp_path / "run" / "checkpoints"))) == saved
  assert evaluated == saved
  assert [r["step"] for r in test_train.read_metrics(tmp_path / "run") if "loss" in r] == list(range(1, nan_at))


def test_a_half_written_step_directory_is_moved_aside_and_never_listed(tmp_path, capsys):
  _train(tmp_path / "run", 4)
  ckpt_dir = tmp_path / "run" / "checkpoints"
  # A save cut off on a file system without atomic rename: the step directory exists but was never committed.
  shutil.copytree(ckpt_dir / "4", ckpt_dir / "6")
  for root, _, files in os.walk(ckpt_dir / "6"):
    for name in files:
      if name == checkpoint.COMMIT_FILE or name.startswith("manifest"):
        os.remove(os.path.join(root, name))
  capsys.readouterr()
  res = _train(tmp_path / "run", 8, allow_changed_settings=True)  # num_steps 4 -> 8
  out = capsys.readouterr().out
  assert "checkpoints/6 is an incomplete save" in out and "step 4, data position 4 batches" in out
  assert res.step == 8
  assert sorted(os.listdir(ckpt_dir), key=int) == ["4", "6", "8"]  # 6 saved afresh by this run; keep=3
  assert checkpoint.is_complete(str(ckpt_dir / "6"))


def test_retention_keeps_the_k_newest_and_the_best(tmp_path):
  scores = {3: 0.9, 6: 0.2, 9: 0.5, 10: 0.4}
  _train(tmp_path / "run", 10, tcfg=dict(keep=2, eval_every=3, best_metric="eval/acc", best_mode="max"),
         evaluate=lambda step, variables: {"acc": scores[step]})
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints"), key=int) == ["3", "9", "10"]
  mgr = checkpoint.manager(str(tmp_path / "run"), keep=2, best_mode="max")
  assert mgr.all_steps() == [3, 9, 10] and mgr.latest_step() == 10
  assert checkpoint.read_meta(mgr, 10)["best"] == {"metric": "eval/acc", "step": 3, "value": 0.9}


def _state(cfg, mesh, seed):
  """A peft train state (LoRA + Adam moments) with random values, laid out on `mesh`."""
  params = test_train.params_of(cfg)
  trainable, frozen = train.split_variables("peft", params, test_train.lora_of(cfg, params, seed))
  tx = optim.make(optim.OptimConfig(), 10, trainable)
  opt_state = tx.update(trainable, tx.init(trainable), trainable)[1]  # non-zero moments
  state = dict(step=np.int32(7), trainable=trainable, opt_state=opt_state, rng=jax.random.PRNGKey(seed))
  state_sh, _ = train._shardings(cfg, "peft", mesh, trainable, frozen, jax.eval_shape(lambda: opt_state))
  return jax.device_put(state, state_sh), state_sh


@pytest.mark.parametrize("save_on,restore_on", [(8, 1), (1, 8)])
def test_a_checkpoint_moves_between_eight_devices_and_one_bit_identically(tmp_path, save_on, restore_on):
  cfg = test_train.tiny()
  meshes = {8: sharding.make_mesh(data=2, model=4), 1: test_train.one_device()}
  state, _ = _state(cfg, meshes[save_on], seed=3)
  if save_on == 8:
    assert len(state["trainable"]["lora"]["layer_0"]["mlp"]["up"]["b"].sharding.device_set) == 8
  mgr = checkpoint.manager(str(tmp_path), keep=2)
  checkpoint.save(mgr, 7, state, {"note": "x"})
  template, target_sh = _state(cfg, meshes[restore_on], seed=4)
  restored, meta = checkpoint.restore(mgr, 7, checkpoint.abstract(template, target_sh))
  assert meta == {"note": "x"}
  got, want = jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)
  assert len(got) == len(want) > 20
  for a, b in zip(got, want):
    assert len(a.sharding.device_set) <= restore_on
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  up_b = restored["trainable"]["lora"]["layer_0"]["mlp"]["up"]["b"]
  assert len(up_b.sharding.device_set) == restore_on


def test_resume_with_a_changed_batch_size_or_data_is_an_error_naming_it(tmp_path):
  _train(tmp_path / "run", 2)
  with pytest.raises(ValueError, match=r"refusing to resume from step 2:\n  train.num_steps: recorded 2, now 4\n"
                                       r"Use a new run directory"):
    _train(tmp_path / "run", 4)  # the recorded settings (run_files)
  with pytest.raises(ValueError, match=r"not even with --allow_changed_settings:\n  data_fingerprint: recorded "
                                       r"\"random\", now \"other\"\nUse a new run directory"):
    _train(tmp_path / "run", 2, fingerprint="other", allow_changed_settings=True)
  # What the checkpoints depend on cannot change even when changes are allowed.
  with pytest.raises(ValueError, match=r"not even with --allow_changed_settings:\n  train.batch_size: recorded 8, "
                                       r"now 4\nUse a new run directory"):
    _train(tmp_path / "run", 4, batch_size=4, batches=test_train.step_batches(rows=4), allow_changed_settings=True)
  cfg = test_train.tiny()
  other = train.TrainConfig(num_steps=4, batch_size=8, tensorboard=False)
  with pytest.raises(ValueError, match=r"not even with --allow_changed_settings:\n  base.config_fingerprint: "
                                       r"recorded \"[0-9a-f]{16}\", now \"[0-9a-f]{16}\"\n"):
    train.train(other, helpers.with_lora(cfg, rank=2), test_train.params_of(cfg), test_train.step_batches(),
                "random", str(tmp_path / "run"), mesh=test_train.one_device(), allow_changed_settings=True)
  # A run directory whose train_config.json is gone still meets the checkpoint's own identity check.
  os.remove(tmp_path / "run" / "train_config.json")
  with pytest.raises(ValueError, match=r"data_fingerprint: checkpoint has 'random', this run has 'other'"):
    _train(tmp_path / "run", 2, fingerprint="other", allow_changed_settings=True)
