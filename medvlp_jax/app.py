"""Process setup shared by the launchers: distributed init, TF off accelerators, one-line errors."""
from __future__ import annotations

import os
import sys
from typing import Callable


def initialize_distributed() -> None:
    """jax.distributed from the environment, when this is one process of several.

    Explicit: MEDVLP_COORDINATOR=host:port, MEDVLP_NUM_PROCESSES, MEDVLP_PROCESS_ID (and optionally
    MEDVLP_LOCAL_DEVICE_IDS). Cloud TPU VMs and SLURM jobs (SLURM_NTASKS > 1) are auto-detected by JAX.
    """
    import jax
    if os.environ.get("MEDVLP_COORDINATOR"):
        local = os.environ.get("MEDVLP_LOCAL_DEVICE_IDS")
        jax.distributed.initialize(
            coordinator_address=os.environ["MEDVLP_COORDINATOR"],
            num_processes=int(os.environ["MEDVLP_NUM_PROCESSES"]),
            process_id=int(os.environ["MEDVLP_PROCESS_ID"]),
            local_device_ids=[int(x) for x in local.split(",")] if local else None)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        jax.distributed.initialize()


def run_main(fn: Callable[[], object]) -> None:
    """Runs a launcher body; configuration and input errors end with one clear line and exit code 2."""
    from medvlp_jax.config_lib import ConfigError
    from medvlp_jax.train.loop import Preempted
    try:
        initialize_distributed()
        fn()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (FileNotFoundError, KeyError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        sys.exit(2)
    except Preempted as e:
        print(f"preempted: checkpoint saved at step {e.args[0]}; rerun the same command to resume", file=sys.stderr)
        sys.exit(0)
