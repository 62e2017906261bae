"""The runtime environment: what JAX runs on, and a quiet start on machines without every accelerator.

    python -m medvlp_jax.env                 # devices, versions, bf16, compilation cache, relevant variables
    python -m medvlp_jax.env --json          # the same as JSON
    python -m medvlp_jax.env --expect=tpu    # exit 1 (one line) unless JAX's default backend is a TPU

Startup noise, and where it comes from (``quiet_startup`` silences each at its source):

* ``Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so ...``: jax registers a TPU backend
  factory on every machine and, on the first device query, tries it and logs the failure at INFO on the
  ``jax._src.xla_bridge`` logger ("fail quietly"); absl's ``app.run`` turns INFO logging on, so every
  launcher printed it on CPU and GPU machines. The logger is set to WARNING before the first device query
  (JAX's real warnings, such as a GPU present without a CUDA jaxlib, still show), unless the user asked
  for JAX's logs (``JAX_LOGGING_LEVEL`` / ``JAX_DEBUG_LOG_MODULES``) or set that logger's level already.
* TensorFlow's import banner (``oneDNN custom operations are on``, ``All log messages before
  absl::InitializeLog() ...``, CPU-feature and CUDA-factory lines): TF 2.21 writes these from C++ at
  import, before it reads ``TF_CPP_MIN_LOG_LEVEL`` (TF issue 100442), so the variable cannot hide them.
  ``import_tensorflow_quietly`` imports TF with file descriptor 2 captured and writes back every line but
  these known ones; it does nothing when the user set ``TF_CPP_MIN_LOG_LEVEL=0`` (they want TF's logs).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import os
import re
import sys
import tempfile
from typing import Any, Iterator, Optional, Sequence

# Distributions whose versions the report lists (first installed name wins for each entry).
PACKAGES: dict[str, tuple[str, ...]] = {
    "jax": ("jax",), "jaxlib": ("jaxlib",), "flax": ("flax",), "optax": ("optax",),
    "orbax-checkpoint": ("orbax-checkpoint",), "tensorflow": ("tensorflow", "tensorflow-cpu"),
    "tensorflow-datasets": ("tensorflow-datasets",), "transformers": ("transformers",), "numpy": ("numpy",),
    "jax-cuda12-plugin": ("jax-cuda12-plugin",), "jax-cuda13-plugin": ("jax-cuda13-plugin",),
    "libtpu": ("libtpu", "libtpu-nightly"),
}
# Environment variables that change what JAX, XLA or TF do on this machine.
ENV_VARS = ("JAX_PLATFORMS", "JAX_COMPILATION_CACHE_DIR", "MEDVLP_COMPILATION_CACHE", "JAX_ENABLE_X64", "XLA_FLAGS",
            "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION", "CUDA_VISIBLE_DEVICES",
            "TPU_VISIBLE_CHIPS", "TF_CPP_MIN_LOG_LEVEL", "JAX_LOGGING_LEVEL")

BACKEND_LOGGER = "jax._src.xla_bridge"
# Lines TensorFlow writes to fd 2 while it is imported, before TF_CPP_MIN_LOG_LEVEL applies.
TF_IMPORT_NOISE = tuple(re.compile(p) for p in (
    r"oneDNN custom operations are on",
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"This TensorFlow binary is optimized to use available CPU instructions",
    r"^To enable the following instructions: .*rebuild TensorFlow",
    r"Unable to register cu(DNN|FFT|BLAS) factory",
    r"computation_placer\.cc.*already registered",
    r"Could not find cuda drivers on your machine, GPU will not be used",
    r"TF-TRT Warning: Could not find TensorRT",
))


# ---------------------------------------------------------------------------------------------------------
# Quiet start

def quiet_backend_probe() -> bool:
    """Hides JAX's INFO lines about backends it tried and could not start (see the module docstring).

    Returns:
      True when the logger was lowered, False when the user asked for JAX logs or set its level already.
    """
    if os.environ.get("JAX_LOGGING_LEVEL") or os.environ.get("JAX_DEBUG_LOG_MODULES"):
        return False
    logger = logging.getLogger(BACKEND_LOGGER)
    if logger.level != logging.NOTSET:
        return False
    logger.setLevel(logging.WARNING)
    return True


@contextlib.contextmanager
def filtered_stderr(noise: Sequence[re.Pattern]) -> Iterator[None]:
    """Captures file descriptor 2 (C++ and Python writes alike) and writes back the lines ``noise`` does not match.

    The captured lines are written back when the block ends, also when it raises, so no error is lost.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if not any(p.search(line) for p in noise)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def import_tensorflow_quietly():
    """``import tensorflow`` without its import banner (TF_IMPORT_NOISE); the module.

    Already imported, or ``TF_CPP_MIN_LOG_LEVEL=0`` (TF's logs wanted): a plain import.
    """
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL", "") == "0":
        import tensorflow as tf
        return tf
    with filtered_stderr(TF_IMPORT_NOISE):
        import tensorflow as tf
    return tf


class _QuietTensorFlowImport:
    """A ``sys.meta_path`` finder that runs the first ``import tensorflow`` (wherever it happens) inside
    ``filtered_stderr(TF_IMPORT_NOISE)``, then removes itself.

    TF costs ~5 s to import; launchers that stop on a configuration error before reading data never pay it.
    A mere ``importlib.util.find_spec("tensorflow")`` (libraries probing for TF) executes nothing and leaves
    the finder in place.
    """

    def __init__(self):
        self._finding = False

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow" or self._finding:
            return None
        import importlib.util
        self._finding = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._finding = False
        if spec is None or spec.loader is None or os.environ.get("TF_CPP_MIN_LOG_LEVEL", "") == "0":
            return spec
        real_exec = spec.loader.exec_module

        def exec_module(module):
            self.remove()
            with filtered_stderr(TF_IMPORT_NOISE):
                real_exec(module)
        spec.loader.exec_module = exec_module
        return spec

    def remove(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def quiet_startup(*, import_tensorflow: bool = True) -> None:
    """What every launcher (and notebook) calls first: TF's C++ logging at warnings, no backend-probe lines,
    and (``import_tensorflow``) TensorFlow's banner filtered out of its first import, whenever that happens
    (a launcher that stops on a bad flag or config never imports it). Variables the user set are kept."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    quiet_backend_probe()
    if import_tensorflow and "tensorflow" not in sys.modules and not any(
            isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowImport())


# ---------------------------------------------------------------------------------------------------------
# The report

def versions() -> dict[str, Optional[str]]:
    """Installed version of each of ``PACKAGES`` (None when not installed); read from metadata, nothing imported."""
    out: dict[str, Optional[str]] = {}
    for key, names in PACKAGES.items():
        out[key] = None
        for name in names:
            try:
                out[key] = importlib.metadata.version(name)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return out


def device_info() -> dict[str, Any]:
    """JAX's default backend and its devices (kind, count, compute capability on GPUs), process layout."""
    import jax
    devices = jax.devices()
    first = devices[0]
    kinds: dict[str, int] = {}
    for d in devices:
        kinds[d.device_kind] = kinds.get(d.device_kind, 0) + 1
    info = {
        "backend": jax.default_backend(),
        "platform_version": str(getattr(first.client, "platform_version", "")),
        "device_count": len(devices), "local_device_count": jax.local_device_count(),
        "process_index": jax.process_index(), "process_count": jax.process_count(),
        "device_kinds": kinds,
    }
    cc = getattr(first, "compute_capability", None)
    if cc:
        info["compute_capability"] = str(cc)
    return info


def bf16_native(platform: str, compute_capability: Optional[str] = None) -> tuple[Optional[bool], str]:
    """Whether bfloat16 matmuls are native on this hardware: (answer or None if unknown, reason)."""
    if platform == "tpu":
        return True, "TPU matrix units are bfloat16"
    if platform == "gpu" or platform == "cuda":
        if not compute_capability:
            return None, "GPU of unknown compute capability"
        major = int(str(compute_capability).split(".")[0])
        if major >= 8:
            return True, f"compute capability {compute_capability} (Ampere or newer) has bfloat16 tensor cores"
        return False, f"compute capability {compute_capability} predates bfloat16 tensor cores (8.0)"
    if platform == "cpu":
        return False, "runs on CPU, without a speed-up over float32 (use float32 there)"
    return None, f"platform {platform!r}"


def bf16_status() -> dict[str, Any]:
    """Runs a small bfloat16 matmul on the default device and compares it with float32.

    Returns:
      {"runs": the bf16 result is finite and within bf16 rounding of float32, "max_rel_error": float,
       "native": bool or None, "why": str}; ``config.model.dtype="bfloat16"`` pays off where native.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    x = np.linspace(-1.0, 1.0, 64 * 64, dtype=np.float32).reshape(64, 64)
    want = x @ x.T
    try:
        got = np.asarray(jax.jit(lambda a: jnp.dot(a, a.T, preferred_element_type=jnp.float32))(
            jnp.asarray(x, jnp.bfloat16)), np.float32)
        err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
        runs = bool(np.all(np.isfinite(got)) and err < 2e-2)       # bf16 keeps 8 bits of mantissa
    except Exception as e:  # an unsupported dtype surfaces here as an XLA error
        first = str(e).splitlines()[0] if str(e) else ""
        return {"runs": False, "max_rel_error": float("nan"), "native": False, "why": f"{type(e).__name__}: {first}"}
    d = jax.devices()[0]
    native, why = bf16_native(d.platform, getattr(d, "compute_capability", None))
    return {"runs": runs, "max_rel_error": err, "native": native, "why": why}


# ---------------------------------------------------------------------------------------------------------
# Persistent compilation cache (launchers)

CACHE_ENV = "MEDVLP_COMPILATION_CACHE"        # a directory, or "off"
CACHE_OFF = ("off", "0", "false", "no", "none")


def default_cache_dir(environ=None) -> str:
    """``$XDG_CACHE_HOME/medvlp_jax/jax_cache`` (``~/.cache/medvlp_jax/jax_cache`` when XDG_CACHE_HOME is unset)."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "medvlp_jax", "jax_cache")


def launcher_cache_dir(environ=None, jax_dir: Optional[str] = None) -> Optional[str]:
    """The compilation cache directory the launchers use, or None when it is off.

    ``MEDVLP_COMPILATION_CACHE=off`` turns it off; ``MEDVLP_COMPILATION_CACHE=<dir>`` chooses the directory;
    otherwise a directory JAX already has (``JAX_COMPILATION_CACHE_DIR``, passed as ``jax_dir``) is kept, and
    ``default_cache_dir()`` is used when there is none.
    """
    environ = os.environ if environ is None else environ
    value = environ.get(CACHE_ENV)
    if value is not None and value.strip().lower() in CACHE_OFF + ("",):
        return None
    if value:
        return os.path.expanduser(value)
    return jax_dir or default_cache_dir(environ)


def setup_compilation_cache(environ=None) -> Optional[str]:
    """Turns on JAX's persistent compilation cache for a launcher (``launcher_cache_dir``); returns the directory.

    A resumed or repeated run then loads the compiled step from disk instead of compiling it again (the key
    covers the program, its shardings, jax/jaxlib versions and XLA flags, so any change compiles afresh).
    Programs that compile in under ``jax_persistent_cache_min_compile_time_secs`` (1 s) are not stored; entries
    are never evicted (a few MB to ~100 MB per program: delete the directory to reclaim the space). Off
    (``MEDVLP_COMPILATION_CACHE=off``, which the test suite sets) leaves JAX's cache disabled, and an unwritable
    directory is reported on stderr and left off. Call before the first compilation.
    """
    import jax
    path = launcher_cache_dir(environ, jax.config.jax_compilation_cache_dir)
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        print(f"warning: compilation cache {path!r} cannot be created ({e.strerror}); compiling without it "
              f"(set {CACHE_ENV}=<dir> or {CACHE_ENV}=off)", file=sys.stderr)
        return None
    if not os.access(path, os.W_OK):
        print(f"warning: compilation cache {path!r} is not writable; compiling without it "
              f"(set {CACHE_ENV}=<dir> or {CACHE_ENV}=off)", file=sys.stderr)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    # No size cap (jax_compilation_cache_max_size): with one, JAX's eviction fails on entries that an uncapped
    # writer (a notebook, JAX_COMPILATION_CACHE_DIR) left in the same directory, and then stores nothing.
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def compilation_cache_status() -> dict[str, Any]:
    """Whether JAX's persistent compilation cache is on (``jax_compilation_cache_dir``), where, and its limits."""
    import jax
    path = jax.config.jax_compilation_cache_dir
    status: dict[str, Any] = {"enabled": bool(path), "dir": path or None,
                              "min_compile_time_secs": jax.config.jax_persistent_cache_min_compile_time_secs,
                              "min_entry_size_bytes": jax.config.jax_persistent_cache_min_entry_size_bytes}
    if path and "://" not in str(path):
        probe = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        status["writable"] = os.access(probe, os.W_OK)
    if not path:
        status["how"] = "export JAX_COMPILATION_CACHE_DIR=~/.cache/jax (or jax.config.update(...)) to turn it on"
    status["launchers"] = launcher_cache_dir(jax_dir=path)      # what launch/*.py use (setup_compilation_cache)
    return status


def report() -> dict[str, Any]:
    """Everything ``python -m medvlp_jax.env`` prints."""
    import platform as py_platform
    return {
        "python": py_platform.python_version(),
        "versions": versions(),
        "devices": device_info(),
        "bf16": bf16_status(),
        "compilation_cache": compilation_cache_status(),
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }


def format_report(rep: dict[str, Any]) -> str:
    """The report as aligned text lines."""
    d, b, c = rep["devices"], rep["bf16"], rep["compilation_cache"]
    kinds = ", ".join(f"{n} x {k}" for k, n in d["device_kinds"].items())
    lines = [
        f"backend              {d['backend']} ({d['platform_version']})",
        f"devices              {kinds}; {d['local_device_count']} local, process {d['process_index']} of "
        f"{d['process_count']}" + (f"; compute capability {d['compute_capability']}" if "compute_capability" in d
                                  else ""),
        f"bf16                 {'runs' if b['runs'] else 'FAILS'} "
        f"(max rel. error vs float32 {b['max_rel_error']:.1e}); "
        f"native: {'yes' if b['native'] else 'no' if b['native'] is False else 'unknown'} - {b['why']}",
        f"compile cache        " + (f"on: {c['dir']}" + ("" if c.get("writable", True) else " (NOT writable)")
                              if c["enabled"] else f"off ({c['how']})")
        + f"; launchers: {c.get('launchers') or f'off ({CACHE_ENV}=off)'}",
        f"python               {rep['python']}",
    ]
    for name, version in rep["versions"].items():
        if version is not None or not name.startswith(("jax-cuda", "libtpu")):
            lines.append(f"{name:<21}{version or 'not installed'}")
    for k, v in rep["env"].items():
        lines.append(f"${k:<20}{v}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medvlp_jax.env", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--expect", choices=("cpu", "gpu", "tpu"),
                        help="exit 1 with one line unless JAX's default backend is this one")
    args = parser.parse_args(argv)
    quiet_startup(import_tensorflow=False)
    rep = report()
    print(json.dumps(rep, indent=1) if args.json else format_report(rep))
    if args.expect and rep["devices"]["backend"] != args.expect:
        print(f"error: expected a {args.expect} backend, JAX runs on {rep['devices']['backend']} "
              f"({rep['devices']['device_count']} x {', '.join(rep['devices']['device_kinds'])}); see the README's "
              "'Accelerators' section for the install line", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
