"""Multi-process runs on this machine: two CPU processes joined by JAX's distributed runtime
(gloo collectives, coordinator on 127.0.0.1) train exactly what one process trains."""

import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from rcnas_jax.runtime import parallel

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "check_distributed.py"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(num_processes: int, steps: int, tmp_path, *extra: str) -> list[str]:
  """Runs the check script as `num_processes` processes of 2 CPU devices; returns their logs."""
  port = _free_port()
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
         # The tests' persistent compilation cache (see conftest) makes reruns faster.
         "JAX_COMPILATION_CACHE_DIR": str(ROOT / ".cache" / "jax"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen(
      [sys.executable, str(SCRIPT), f"--coordinator_address=127.0.0.1:{port}",
       f"--num_processes={num_processes}", f"--process_id={i}", "--cpu_devices=2",
       f"--steps={steps}", f"--out={tmp_path / 'params.npz'}", *extra],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(num_processes)]
  try:
    logs = [p.communicate(timeout=300)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return logs


def _reference(steps: int) -> dict:
  """The same training in this process, on one device."""
  spec = importlib.util.spec_from_file_location("check_distributed", SCRIPT)
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  config = script.tiny_config(script.parse_args([]))
  params = script.train_tiny(config, parallel.data_mesh(jax.devices()[:1]), steps)
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}


@pytest.mark.slow
def test_two_processes_train_and_resume_as_one_device(tmp_path):
  workdir = tmp_path / "run"
  # Two steps on a (1, 4) mesh, then a restart that resumes to step 3 on a (2, 2) mesh, whose
  # candidate slices each live in one process.
  _launch(2, 2, tmp_path, f"--workdir={workdir}")
  logs = _launch(2, 3, tmp_path, f"--workdir={workdir}", "--candidates=2")
  assert "process 0/2 (distributed: True), 2 of 4 devices" in logs[0]
  assert "process 1/2 (distributed: True), 2 of 4 devices" in logs[1]
  assert "mesh {'candidate': 2, 'data': 2}, replicated key [0, 7]" in logs[0]
  checksums = [log.strip().splitlines()[-1].split("checksum ")[1] for log in logs]
  assert checksums[0] == checksums[1]
  # Only process 0 logs metrics: one line per step across the two runs.
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2, 3]
  assert sorted(os.listdir(workdir / "checkpoints"))[-1] == "3"
  trained = np.load(tmp_path / "params.npz")
  reference = _reference(3)
  assert set(trained.files) == set(reference)
  for name, value in reference.items():
    np.testing.assert_allclose(trained[name], value, rtol=2e-4, atol=2e-5, err_msg=name)
