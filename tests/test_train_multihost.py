"""Multi-host JAX training as the README starts it: `run.py train --backend jax --multihost` with the coordinator
address, the number of processes and each process's id (issue 19).

The slow tests run the README command in 2 processes on 127.0.0.1 (one CPU device each, gloo collectives) and
compare with one process holding 2 fake CPU devices (XLA_FLAGS): the same global batch over the same 2-device mesh,
so losses, exported weights and checkpoints must be equal bit for bit; a 2-process run killed with SIGKILL resumes
to the single-process losses.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from maskgit_common import fileio, training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("flax")

# The tiny preset shrunk as tests/conftest.py's small_train_config, as `--set` flags of the README command.
SETS = {"transformer.num_layers": 1, "transformer.num_embeds": 32, "transformer.num_heads": 2,
        "transformer.intermediate_size": 64, "train.batch_size": 16, "train.warmup_steps": 5,
        "train.checkpoint_every_steps": 4, "train.log_every_steps": 1, "data.dataset": "tokens"}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def command(workdir, cache, steps, *extra):
  sets = [f"--set={k}={v}" for k, v in {**SETS, "train.num_train_steps": steps, "data.token_cache": cache}.items()]
  return [sys.executable, os.path.join(REPO, "run.py"), "train", "--backend", "jax", "--config", "tiny",
          "--workdir", str(workdir), *sets, *extra]


def environment(**extra):
  # The session's compilation cache (conftest.py) comes with os.environ: the 2-process runs share their programs.
  return {**os.environ, "PYTHONPATH": REPO, **extra}


def start_two(workdir, cache, steps):
  port = free_port()
  return [subprocess.Popen(command(workdir, cache, steps, "--multihost", "--coordinator_address",
                                   f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i)),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment())
          for i in range(2)]


def finish(procs):
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  return outputs


def run_one(workdir, cache, steps):
  proc = subprocess.run(command(workdir, cache, steps), capture_output=True, text=True, timeout=600, check=False,
                        env=environment(XLA_FLAGS="--xla_force_host_platform_device_count=2"))
  assert proc.returncode == 0, proc.stderr[-3000:]


def losses(workdir):
  return [(r["step"], r["loss"]) for r in training.read_jsonl(os.path.join(workdir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def cache(train_token_cache):
  return train_token_cache


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
  """One process, 2 fake devices, 12 steps."""
  workdir = tmp_path_factory.mktemp("one") / "run"
  run_one(workdir, cache, 12)
  return workdir


@pytest.mark.slow
def test_two_processes_equal_one_process_with_two_devices(cache, reference, tmp_path):
  workdir = tmp_path / "two"
  outputs = finish(start_two(workdir, cache, 12))
  assert all("transformer: 12 steps" in out for out in outputs)
  assert losses(workdir) == losses(reference) and len(losses(workdir)) == 12  # bit for bit
  for name in ("transformer.msgpack", "tokenizer.msgpack"):
    have, want = os.path.join(workdir, "export", name), os.path.join(reference, "export", name)
    if os.path.exists(want):
      assert fileio.sha256_file(have) == fileio.sha256_file(want), name
  ckpts, ref = (training.CheckpointDir(os.path.join(d, "checkpoints")) for d in (workdir, reference))
  assert ckpts.steps() == ref.steps() == [4, 8, 12]
  _, _, manifest = ckpts.latest()
  assert manifest["meta"]["step"] == 12 and manifest["meta"]["position"] == 12 * 16
  assert manifest["meta"]["world_size"] == 2
  chex = pytest.importorskip("chex")
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  have, want = (ocp.PyTreeCheckpointer().restore(os.path.join(d.path(12), "state")) for d in (ckpts, ref))
  assert len(training.flatten(want)) > 10
  chex.assert_trees_all_equal(have, want)  # params, optimizer state and EMA: the same arrays, bit for bit


@pytest.mark.slow
def test_killed_two_process_run_resumes_to_the_same_losses(cache, reference, tmp_path):
  workdir = tmp_path / "killed"
  procs = start_two(workdir, cache, 12)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 600
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if os.path.exists(metrics) and any(r["step"] >= 6 for r in training.read_jsonl(metrics)):
      break  # the last checkpoint is step 4
    time.sleep(0.05)
  for p in procs:
    os.kill(p.pid, signal.SIGKILL)
  for p in procs:
    p.communicate()
  assert all(p.returncode == -signal.SIGKILL for p in procs), "training finished before it could be killed"
  outputs = finish(start_two(workdir, cache, 12))  # the same command again, in both processes
  assert "resumed from step" in outputs[0]
  assert losses(workdir) == losses(reference)


def test_incomplete_or_inconsistent_settings_are_one_line_errors(tmp_path):
  """Validated before jax.distributed starts: no traceback, the flag named."""
  from maskgit_jax import train as jax_train  # pylint: disable=import-outside-toplevel
  with pytest.raises(jax_train.DistributedSetupError, match=r"--coordinator_address, --process_id missing"):
    jax_train.initialize_distributed(num_processes=2)
  with pytest.raises(jax_train.DistributedSetupError, match=r"--process_id 2 must lie in \[0, --num_processes=2\)"):
    jax_train.initialize_distributed("127.0.0.1:1234", 2, 2)
  with pytest.raises(jax_train.DistributedSetupError, match=r"must be HOST:PORT"):
    jax_train.initialize_distributed("localhost", 2, 0)
  proc = subprocess.run(command(tmp_path / "w", "unused", 2, "--multihost", "--process_id", "-1"),
                        capture_output=True, text=True, timeout=300, check=False,
                        env=environment(JAX_NUM_PROCESSES="2", JAX_COORDINATOR_ADDRESS="127.0.0.1:1"))
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
  assert lines[0] == "error: --process_id -1 must lie in [0, --num_processes=2)"
