"""The exceptions the launchers turn into one line (``app.run_main``): the bottom layer, importing nothing of ours.

``config_lib.ConfigError``, ``train.loop.Preempted`` and ``train.checkpoint.CheckpointError`` are also
re-exported where they are raised; ``BadRecordError`` (raised by ``data.host_batches``) is imported from here.
``app`` needs none of those modules to catch them.
"""


class ConfigError(ValueError):
    """A config field is wrong; the message names the field and the fix (one line)."""


class BadRecordError(ValueError):
    """A record of a shard file cannot be used; the message names the file, the record and the problem."""


class CheckpointError(ConfigError):
    """No checkpoint (or not the requested one) restores; the message is one line naming step, file, reason."""


class Preempted(Exception):
    """SIGTERM or Ctrl-C arrived; a checkpoint was written. ``args``: (step, signal name)."""
