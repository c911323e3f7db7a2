"""Command line: `python -m rcnas_jax.main --config=configs/quickstart.py --workdir=DIR`.

Fields are overridden with `--config.training.epochs=5`. A bad value stops at once with one
`error:` line naming the field; SIGTERM saves and exits 0; a killed run resumes from its
workdir. `--config.mode=evaluate --config.checkpoint=DIR/export` runs the evaluation suite.
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

from rcnas_jax import config as config_lib, data, pipeline  # noqa: E402
from rcnas_jax.nets import export  # noqa: E402
from rcnas_jax.robust import training  # noqa: E402
from rcnas_jax.runtime import checkpoint, parallel, preemption, store  # noqa: E402

# What a user can fix: each is reported as one line, without a traceback.
USER_ERRORS = (config_lib.ConfigError, data.DatasetNotFoundError, store.StoreError,
               checkpoint.CheckpointError, export.ExportError, training.TrainingDiverged)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, argv=None) -> None:
  """--config (a configs/<name>.py file, fields overridable) and --workdir."""
  config_flags.DEFINE_config_file("config", None, "Path to a configs/<name>.py file.",
                                  flag_values=flag_values, lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", "workdir", "Where checkpoints, metrics and reports go.",
                      flag_values=flag_values)
  flags.mark_flags_as_required(["config"], flag_values=flag_values)


def parse(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """Parses the command line; a bad flag or field stops with one `error:` line."""
  try:
    return flag_values(argv)
  except flags.Error as error:
    sys.exit(f"error: {str(error).splitlines()[0]}")
  except (AttributeError, KeyError) as error:  # An override of a field that does not exist.
    name = str(error.args[0] if error.args else error).strip("'\"")
    sys.exit(f"error: no such config field '{name}' (rcnas_jax/config.py lists them)")
  except (TypeError, ValueError) as error:
    sys.exit(f"error: {str(error).splitlines()[0]}")


def job(config, workdir: str) -> None:
  """Runs the configured job; what a user can fix ends it with one `error:` line."""
  try:
    pipeline.run(config, workdir)
  except USER_ERRORS as error:
    sys.exit(f"error: {error}")
  except preemption.Stopped as stopped:
    print(f"stopped by SIGTERM during {stopped}; everything finished is saved in {workdir}: "
          "run the same command again to resume")


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  logging.get_absl_handler().addFilter(checkpoint.orbax_errors_in_one_line)
  preemption.install()
  # Multi-host runs join JAX's distributed runtime before any computation (see launch/).
  parallel.maybe_initialize_distributed(flags.FLAGS.config)
  job(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse)
