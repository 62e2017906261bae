"""Test setup: 8 fake CPU devices before jax is imported anywhere; quiet TensorFlow."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Launchers turn on the persistent compilation cache under ~/.cache (medvlp_jax.env.setup_compilation_cache);
# tests and the launchers they start must not write there.
os.environ.setdefault("MEDVLP_COMPILATION_CACHE", "off")
