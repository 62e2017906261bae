"""Process setup shared by the launchers: distributed init, logging on process 0 only, one-line errors."""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from typing import Callable


def initialize_distributed() -> None:
    """jax.distributed from the environment, when this is one process of several.

    Explicit: MEDVLP_COORDINATOR=host:port, MEDVLP_NUM_PROCESSES, MEDVLP_PROCESS_ID (and optionally
    MEDVLP_LOCAL_DEVICE_IDS=0,1,...). Auto-detected by JAX: SLURM jobs with SLURM_NTASKS > 1 (see
    ``slurm_local_device_ids`` for one task per node), Cloud TPU VM slices with several workers
    (TPU_WORKER_HOSTNAMES), or anything when MEDVLP_DISTRIBUTED=auto (launch/tpu_vm.sh sets it).
    Several CPU processes (tests/test_multiprocess.py) need cross-process CPU collectives: jax 0.10 uses gloo
    by default; older versions had none, so it is asked for explicitly when unset.

    Afterwards only process 0 logs at INFO level (the others log warnings and errors), so a multi-host run
    prints one copy of every progress line.
    """
    import jax
    local = os.environ.get("MEDVLP_LOCAL_DEVICE_IDS")
    local_ids = [int(x) for x in local.split(",")] if local else None
    if os.environ.get("MEDVLP_COORDINATOR"):
        if str(getattr(jax.config, "jax_cpu_collectives_implementation", "gloo")).lower() in ("none", ""):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=os.environ["MEDVLP_COORDINATOR"],
            num_processes=int(os.environ["MEDVLP_NUM_PROCESSES"]),
            process_id=int(os.environ["MEDVLP_PROCESS_ID"]),
            local_device_ids=local_ids)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize(local_device_ids=local_ids or slurm_local_device_ids(os.environ))
    elif os.environ.get("MEDVLP_DISTRIBUTED") == "auto" or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        jax.distributed.initialize(local_device_ids=local_ids)
    if jax.process_count() > 1 and jax.process_index() != 0:
        quiet_non_main_process()


def slurm_local_device_ids(env) -> list[int] | None:
    """The GPUs one SLURM task drives: all of its node's GPUs when there is one task per node, else None.

    JAX's SLURM detection gives each process only the GPU numbered by its SLURM_LOCALID (right for one task
    per GPU); with one task per node that would leave all GPUs but one idle. The node's GPU count comes from
    SLURM_GPUS_ON_NODE or CUDA_VISIBLE_DEVICES.
    """
    per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_STEP_TASKS_PER_NODE") or ""
    per_node = per_node.split("(")[0].split(",")[0]          # "1(x2)" -> "1"
    if per_node != "1":
        return None
    if env.get("SLURM_GPUS_ON_NODE", "").isdigit():
        n = int(env["SLURM_GPUS_ON_NODE"])
    elif env.get("CUDA_VISIBLE_DEVICES"):
        n = len([d for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()])
    else:
        return None
    return list(range(n)) if n > 0 else None


def quiet_non_main_process() -> None:
    """Warnings and errors only, on a process other than 0 (its metrics writer and progress bar are off too)."""
    logging.getLogger("medvlp_jax").setLevel(logging.WARNING)
    try:
        from absl import logging as absl_logging
        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:
        pass


def _last_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else str(text)


# ``--config.<path>=None``: ml_collections parses an override with the type of the field's current value, so an
# int field such as ``method.local_chunk`` rejected 'None'. These overrides are set after parsing instead.
_NONE_OVERRIDE = re.compile(r"--([A-Za-z_]\w*)\.([A-Za-z_][\w.]*)=(?:None|none)")


def split_none_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(argv without the ``--<flag>.<path>=None`` overrides, [(flag, path)] of those overrides); argv[0] is kept."""
    kept, nones = argv[:1], []
    for a in argv[1:]:
        m = _NONE_OVERRIDE.fullmatch(a)
        if m:
            nones.append((m.group(1), m.group(2)))
        else:
            kept.append(a)
    return kept, nones


def apply_none_overrides(flag_values, nones: list[tuple[str, str]]) -> None:
    """Sets each config field named by ``split_none_overrides`` to None; an unknown flag or field ends the
    program with one line (exit 2)."""
    for flag, path in nones:
        config = flag_values[flag].value if flag in flag_values else None
        if not hasattr(config, "keys"):
            print(f"error: --{flag}.{path}=None: --{flag} is not a config flag", file=sys.stderr)
            sys.exit(2)
        *parents, leaf = path.split(".")
        node = config
        for p in parents:
            node = node.get(p) if hasattr(node, "get") else None
        if not hasattr(node, "keys") or leaf not in node:
            print(f"error: the config has no field {path!r} (in --{flag}.{path}=None); see the config file for "
                  "its fields", file=sys.stderr)
            sys.exit(2)
        node[leaf] = None


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing for ``app.run(main, flags_parser=parse_flags)``: a bad flag ends with one line, exit 2.

    absl's own parser prints the whole traceback of a config file's ``get_config`` (e.g. an unknown variant in
    ``--config=configs/mgca.py:nonsense``); this prints the flag and the error's last line instead.
    ``--config.<path>=None`` sets an optional field (e.g. ``method.local_chunk``) to None.
    """
    from absl import flags
    argv, nones = split_none_overrides(argv)
    try:
        rest = flags.FLAGS(argv)
        apply_none_overrides(flags.FLAGS, nones)
        return rest
    except flags.Error as e:
        first = str(e).splitlines()[0] if str(e) else ""
        flag = first.split(": Error whilst parsing config file")[0].rstrip(":")
        detail = _last_line(e)
        message = detail if detail.startswith(flag) else f"{flag}: {detail}"
        print(f"error: {message}\nPass --helpshort to see the flags.", file=sys.stderr)
        sys.exit(2)
    except (AttributeError, KeyError) as e:   # an override of a field the config does not have
        key, hint = _missing_field(e)
        culprits = [a for a in argv[1:] if a.startswith("--") and "." in a.split("=")[0]
                    and key in a.split("=")[0].split(".")]
        if not culprits:                      # raised by the config file itself: its traceback is the message
            raise
        advice = hint or "see the config file for its fields"
        print(f"error: the config has no field {key!r} (in {' '.join(culprits)}); {advice}", file=sys.stderr)
        sys.exit(2)


def _missing_field(e: BaseException) -> tuple[str, str]:
    """(the missing field's name, ml_collections' "Did you mean ..." suggestion or "") of an override error.

    ml_collections raises ``KeyError("'trian'\\nDid you mean \"train\" instead of \"trian\"?")`` (AttributeError
    for a leaf), so the message's first line is the quoted name and its second the suggestion.
    """
    while e.args and isinstance(e.args[0], BaseException):    # AttributeError(KeyError(...)) for a leaf
        e = e.args[0]
    text = str(e.args[0]) if e.args else str(e)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    key = (lines[0] if lines else text).strip("\"'")
    hint = next((line for line in lines[1:] if line.startswith("Did you mean")), "")
    return key, hint


def _config_load_error(e: OSError) -> str | None:
    """The one-line cause of an ml_collections config file that failed to load (None for other OSErrors)."""
    text = str(e)
    if "Failed loading config file" not in text:
        return None
    attempted = [line.strip() for line in text.splitlines()[1:] if line.strip() and not line.strip().startswith(
        ("Attempted", "["))]
    path = attempted[0] if attempted else "?"
    return f"cannot load config file {path!r}: {_last_line(text)}"


def _exit_now(code: int) -> None:
    """Exits with ``code`` once output is flushed, without waiting for interpreter teardown.

    Used after a preemption or interrupt, when the checkpoint is written and every writer closed: the
    interpreter's teardown (tf.data, XLA and orbax threads) kept the process alive after the "preempted" line
    (~40 s reported on the demo; 3.1 s measured on the test variant, 0.1 s with this), time a preempted job
    may not have.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        import jax
        if jax.process_count() > 1:          # leave the coordination service in order: the others exit too
            jax.distributed.shutdown()
    except Exception:                        # noqa: BLE001 - exiting anyway
        pass
    os._exit(code)


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the launchers with sub-commands or positional arguments (prepare_data, import_checkpoint,
    compare_runs): a bad flag ends with one ``error:`` line and exit code 2, as ``parse_flags`` does for the absl
    launchers (pretrain, evaluate, benchmark)."""

    def error(self, message):
        print(f"error: {message}\nPass --help to see the flags.", file=sys.stderr)
        sys.exit(2)


def run_main(fn: Callable[[], object], *, jax_launcher: bool = True, input_errors: tuple = ()) -> None:
    """Runs a launcher body; configuration and input errors end with one clear line and exit code 2.

    Non-finite training in ``config.train.nonfinite="stop"`` mode exits with 3; a preemption (SIGTERM, after
    the checkpoint) with 0 after printing "preempted: ..." (launch/slurm.sbatch requeues on that line); a first
    Ctrl-C (after the checkpoint) with 130 after printing "interrupted: ...".

    jax_launcher: set up the compilation cache and jax.distributed (False for data preparation).
    input_errors: further exception types that mean bad input for this launcher (e.g. ValueError for a data
        converter); they end with one line too.
    """
    from medvlp_jax import env
    env.quiet_startup()                      # before anything imports TF or asks JAX for devices
    if jax_launcher:
        env.setup_compilation_cache()        # before the first compilation: a rerun loads the compiled step
    from medvlp_jax.errors import BadRecordError, ConfigError, Preempted
    try:
        if jax_launcher:
            initialize_distributed()
        fn()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (FileNotFoundError, KeyError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:                     # --config file missing or unreadable (ml_collections defers it)
        message = _config_load_error(e)
        if message is None and e.filename and e.strerror:    # e.g. an output path that cannot be written
            message = f"{e.filename}: {e.strerror}"
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except BadRecordError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except input_errors as e:
        print(f"error: {_last_line(e)}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:          # config.train.nonfinite="stop"
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except Preempted as e:
        step, name = (tuple(e.args) + ("SIGTERM",))[:2]
        if name == "SIGINT":
            print(f"interrupted: checkpoint saved at step {step}; rerun the same command to resume",
                  file=sys.stderr)
            _exit_now(130)
        print(f"preempted: checkpoint saved at step {step}; rerun the same command to resume", file=sys.stderr)
        _exit_now(0)
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C) before a checkpoint could be saved; steps since the last checkpoint "
              "are lost, rerun the same command to resume from it", file=sys.stderr)
        _exit_now(130)
