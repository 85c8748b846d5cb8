"""launch/tpu.sh (--dry-run output, and a whole launch against a fake gcloud that runs the workers' commands
here) and launch/local.sh (the environment of each process, exit codes)."""
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(ROOT, "launch", "tpu.sh")
LOCAL = os.path.join(ROOT, "launch", "local.sh")
FIAT = ["train", "--gin_file=setup.py", "--gin.TrainConfig.num_steps=20", "--gin.TrainConfig.best_metric='eval/f1'"]


def _bash(script, args, env=None, timeout=60):
  return subprocess.run(["bash", script, *args], capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, **(env or {})}, cwd=ROOT)


def test_tpu_dry_run_prints_the_exact_commands(tmp_path):
  r = _bash(TPU, ["--dry-run", "--name=fiat-v5e", "--zone=us-west4-a", "--accelerator=v5litepod-16",
                  "--project=my-proj", "--spot", "--run=r1", "--env=TFDS_DATA_DIR=gs://bucket/tfds", "--", "fiat",
                  *FIAT], env={"TMPDIR": str(tmp_path)})
  assert r.returncode == 0, r.stderr
  where = "--zone=us-west4-a --project=my-proj"
  tgz = f"{tmp_path}/fiat-jax-fiat-v5e.tgz"
  vm = "gcloud compute tpus tpu-vm"
  lines = r.stdout.splitlines()
  assert lines[:3] == [
      f"{vm} describe fiat-v5e {where} > /dev/null 2>&1 || {vm} create fiat-v5e {where} "
      f"--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite --spot",
      f"tar -czf {tgz} --exclude=./.git --exclude=./.venv --exclude=__pycache__ '--exclude=*.egg-info' -C {ROOT} .",
      f"{vm} scp {tgz} fiat-v5e:fiat-jax.tgz {where} --worker=all"]
  assert lines[3] == f"{vm} ssh fiat-v5e {where} --worker=all '--command=mkdir -p ~/fiat-jax && tar -xzf " \
                     f"~/fiat-jax.tgz -C ~/fiat-jax'"
  assert lines[4] == f"{vm} ssh fiat-v5e {where} --worker=all '--command=cd ~/fiat-jax && bash launch/tpu.sh " \
                     f"--worker-install'"
  assert lines[6] == f"{vm} ssh fiat-v5e {where} --worker=0 '--command=cd ~/fiat-jax && bash launch/tpu.sh " \
                     f"--worker-stream=r1'"
  assert len(lines) == 7
  # The run line, parsed as the local shell and then the worker's shell would: the fiat arguments arrive intact.
  local = shlex.split(lines[5])
  assert local[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "fiat-v5e"] and local[8] == "--worker=all"
  remote = shlex.split(local[9][len("--command="):])
  assert remote == ["cd", "~/fiat-jax", "&&", "env", "TFDS_DATA_DIR=gs://bucket/tfds", "bash", "launch/tpu.sh",
                    "--worker-run=r1", "--", *FIAT]


def test_tpu_runtime_versions_and_argument_errors():
  versions = {"v4-32": "tpu-ubuntu2204-base", "v5p-8": "v2-alpha-tpuv5", "v6e-8": "v2-alpha-tpuv6e"}
  for accel, version in versions.items():
    r = _bash(TPU, ["--dry-run", "--name=t", "--zone=z", f"--accelerator={accel}", "--skip_install", "--run=r", "--",
                    "train"])
    assert r.returncode == 0 and f"--version={version}" in r.stdout.splitlines()[0]
    assert "--worker-install" not in r.stdout and len(r.stdout.splitlines()) == 6
  bad = {("--zone=z", "--accelerator=v5p-8"): "--name=TPU_NAME is required",
         ("--name=t", "--zone=z", "--accelerator=v9-8", "--", "train"): "unknown generation",
         ("--name=t", "--zone=z", "--accelerator=v5p-8", "--", "train", "--gin_file=/abs/x.gin"):
             "give a path relative to the checkout",
         ("--name=t", "--zone=z", "--accelerator=v5p-8", "--", "train", "--gin_file=gin_configs/missing.gin"):
             "not found in",
         ("--name=t", "--zone=z", "--accelerator=v5p-8"): "no fiat command"}
  for args, message in bad.items():
    r = _bash(TPU, ["--dry-run", *args])
    assert r.returncode == 2 and message in r.stderr, (args, r.stderr)


FAKE_GCLOUD = r"""#!/usr/bin/env bash
# A fake `gcloud compute tpus tpu-vm`: one worker whose home is $FAKE_HOME.
echo "$4 $5" >> "$FAKE_CALLS"
case "$4" in
  describe) [ -e "$FAKE_EXISTS" ] ;;
  create) touch "$FAKE_EXISTS" ;;
  scp) cp "$5" "$FAKE_HOME/${6#*:}" ;;
  ssh) for a in "$@"; do case "$a" in --command=*) cmd="${a#--command=}" ;; esac; done
       cd "$FAKE_HOME" && HOME="$FAKE_HOME" bash -c "$cmd" ;;
esac
"""

FAKE_FIAT = """#!/usr/bin/env bash
echo "fiat on the worker: $* (TFDS_DATA_DIR=$TFDS_DATA_DIR)"
echo "step 20 done"
exit 3
"""


def test_tpu_launch_against_a_fake_gcloud_creates_copies_runs_and_streams(tmp_path):
  bin_dir, home = tmp_path / "bin", tmp_path / "home"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
  (bin_dir / "gcloud").chmod(0o755)
  venv_bin = home / "fiat-jax" / ".venv" / "bin"  # what --worker-install would have made
  venv_bin.mkdir(parents=True)
  (venv_bin / "fiat").write_text(FAKE_FIAT)
  (venv_bin / "fiat").chmod(0o755)
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_HOME": str(home), "FAKE_CALLS": str(tmp_path / "calls"),
         "FAKE_EXISTS": str(tmp_path / "exists"), "TMPDIR": str(tmp_path)}
  args = ["--name=t1", "--zone=z", "--accelerator=v5p-8", "--skip_install", "--run=r1", "--env=TFDS_DATA_DIR=/d",
          "--", "fiat", *FIAT]
  r = _bash(TPU, args, env=env)
  assert r.returncode == 3, r.stderr  # the run's own exit code
  assert "fiat on the worker: " + " ".join(FIAT) + " (TFDS_DATA_DIR=/d)" in r.stdout and "step 20 done" in r.stdout
  assert (home / "fiat-jax" / "fiat_jax" / "training" / "distributed.py").exists()  # the checkout was copied and unpacked
  assert (home / "fiat-logs" / "r1.rc").read_text().strip() == "3"
  calls = (tmp_path / "calls").read_text().splitlines()
  assert [c.split()[0] for c in calls] == ["describe", "create", "scp", "ssh", "ssh", "ssh"]
  r = _bash(TPU, args[:4] + ["--run=r2"] + args[5:], env=env)  # the TPU exists now: reused, not created
  assert r.returncode == 3
  assert [c.split()[0] for c in (tmp_path / "calls").read_text().splitlines()[6:]] == [
      "describe", "scp", "ssh", "ssh", "ssh"]


def test_local_dry_run_and_exit_codes(tmp_path):
  r = _bash(LOCAL, ["--dry-run", "--processes=2", "--devices=4", "--port=4321", f"--log_dir={tmp_path}", "--",
                    "fiat", "train", "--gin_file=a b.gin"])
  assert r.returncode == 0
  env = "FIAT_COORDINATOR_ADDRESS=127.0.0.1:4321 FIAT_NUM_PROCESSES=2 FIAT_PROCESS_ID={} JAX_PLATFORMS=cpu " \
        "XLA_FLAGS=--xla_force_host_platform_device_count=4"
  assert r.stdout.splitlines() == [
      f"env {env.format(0)} fiat train --gin_file=a\\ b.gin > (this terminal)",
      f"env {env.format(1)} fiat train --gin_file=a\\ b.gin > {tmp_path}/process-1.log"]

  show = ("import os; print(' '.join(os.environ[k] for k in ('FIAT_PROCESS_ID', 'FIAT_NUM_PROCESSES', "
          "'FIAT_COORDINATOR_ADDRESS', 'XLA_FLAGS')))")
  r = _bash(LOCAL, ["--processes=3", "--devices=2", "--port=5555", f"--log_dir={tmp_path}", "--", sys.executable,
                    "-c", show])
  assert r.returncode == 0
  assert r.stdout.strip() == "0 3 127.0.0.1:5555 --xla_force_host_platform_device_count=2"
  for i in (1, 2):
    assert (tmp_path / f"process-{i}.log").read_text().split()[:3] == [str(i), "3", "127.0.0.1:5555"]

  # Process 2 fails at once: the run exits with its code and stops process 0, which would otherwise wait 60 s.
  r = _bash(LOCAL, ["--processes=3", f"--log_dir={tmp_path}", "--", "bash", "-c",
                    'if [ "$FIAT_PROCESS_ID" = 2 ]; then exit 7; fi; sleep 60'], timeout=30)
  assert r.returncode == 7 and "process 2 exited 7" in r.stderr
