"""Command line: `python -m rcnas_jax.main --config=configs/quickstart.py --workdir=DIR`.

Fields are overridden with `--config.training.epochs=5`. A bad value stops at once with one
line naming the field; a killed run resumes from its workdir. `--config.mode=evaluate
--config.checkpoint=DIR/export` runs the evaluation suite on an exported student.
"""

import os
import sys

# One CPU device uses ~1.2 cores; a virtual device per core and a sharded batch give ~1.7x on
# two cores. This must be set before jax is imported, and only affects the host platform.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={os.cpu_count()}").strip()

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from rcnas_jax import config as config_lib, data, parallel, pipeline  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Path to a configs/<name>.py file.",
                                lock_config=True)
flags.DEFINE_string("workdir", "workdir", "Where checkpoints, metrics and reports go.")
flags.mark_flags_as_required(["config"])


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  # Multi-host runs join JAX's distributed runtime before any computation (see launch/).
  parallel.maybe_initialize_distributed(flags.FLAGS.config)
  try:
    pipeline.run(flags.FLAGS.config, flags.FLAGS.workdir)
  except (config_lib.ConfigError, data.DatasetNotFoundError) as error:
    sys.exit(f"error: {error}")


if __name__ == "__main__":
  app.run(main)
