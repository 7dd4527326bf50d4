r"""Starts --num_processes local CPU processes of one Python program as a multi-process JAX run.

Each process runs `python TARGET ARGS` (--target: a .py path, or a module run with -m;
--target_args: its arguments, one shell-quoted string) with its place in the run in the
environment (crosspool_jax.distributed.runtime.ProcessConfig: coordinator address, process
count and id, local CPU devices, the timeouts below); the program joins with
`runtime.initialize(ProcessConfig.from_environ())`. Every line a process prints comes out on
stdout prefixed `[pN] `. The launcher exits 0 when all processes exit 0; otherwise, with one
line `launch_local.py: error: ...` (which process and why) after each process's last lines
on stderr, when a process exits non-zero or is killed, when some process has not joined
within --join_timeout_s, or when the run passes --timeout_s. After a failure the other
processes get --grace_s seconds to end by themselves (so a survivor's own error shows), then
they are terminated.

  python scripts/launch_local.py --num_processes=2 --target=scripts/probe_multihost.py \
      --target_args="--out=workdir/probe/multihost.json"
"""

from __future__ import annotations

import shlex

from absl import flags

from crosspool_jax.cli import progress, run_script, start_script
from crosspool_jax.distributed.launch import LaunchError, launch, python_command
from crosspool_jax.distributed.runtime import ProcessConfig, free_port

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("target", None, "the program: a .py path, or a module (run with -m)",
                      required=True)
  flags.DEFINE_string("target_args", "", "the program's arguments, one shell-quoted string")
  flags.DEFINE_integer("num_processes", 2, "processes to start")
  flags.DEFINE_integer("local_cpu_devices", 1, "CPU devices of each process")
  flags.DEFINE_integer("port", 0, "the coordinator's port on 127.0.0.1 (0: a free one)")
  flags.DEFINE_integer("init_timeout_s", 60, "how long joining waits for every process "
                       "(jax.distributed.initialize's initialization_timeout)")
  flags.DEFINE_integer("heartbeat_timeout_s", 10, "a process silent this long is declared dead "
                       "and the others stop with an error")
  flags.DEFINE_integer("shutdown_timeout_s", 10, "how long the exit barrier waits")
  flags.DEFINE_integer("transfer_timeout_s", 30, "how long a cross-process transfer waits")
  flags.DEFINE_float("join_timeout_s", 90.0, "fail if some process has not joined by then")
  flags.DEFINE_float("timeout_s", 600.0, "fail if the run is still going after this long")
  flags.DEFINE_float("grace_s", 0.0, "after a failure, how long the others may run before "
                     "they are terminated")


def main(argv: list[str]) -> None:
  start_script(argv)
  if FLAGS.num_processes < 1:
    raise ValueError(f"--num_processes must be >= 1, got {FLAGS.num_processes}")
  base = ProcessConfig(
      coordinator_address=f"127.0.0.1:{FLAGS.port or free_port()}",
      num_processes=FLAGS.num_processes, process_id=0,
      local_cpu_devices=FLAGS.local_cpu_devices, init_timeout_s=FLAGS.init_timeout_s,
      heartbeat_timeout_s=FLAGS.heartbeat_timeout_s,
      shutdown_timeout_s=FLAGS.shutdown_timeout_s, transfer_timeout_s=FLAGS.transfer_timeout_s)
  base.check()
  try:
    launch(python_command(FLAGS.target, shlex.split(FLAGS.target_args)), base,
           join_timeout_s=FLAGS.join_timeout_s, timeout_s=FLAGS.timeout_s,
           grace_s=FLAGS.grace_s)
  except LaunchError as e:
    if e.details:
      progress(e.details)
    raise


if __name__ == "__main__":
  define_flags()
  run_script(main)
