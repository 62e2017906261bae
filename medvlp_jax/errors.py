"""The exceptions the launchers turn into one line (``app.run_main``): the bottom layer, importing nothing of ours.

Each is re-exported where it is raised (``config_lib.ConfigError``, ``data.pipeline.BadRecordError``,
``train.loop.Preempted``, ``train.checkpoint.CheckpointError``), so ``app`` needs none of those modules to
catch them.
"""


class ConfigError(ValueError):
    """A config field is wrong; the message names the field and the fix (one line)."""


class BadRecordError(ValueError):
    """A record of a shard file cannot be used; the message names the file, the record and the problem."""


class CheckpointError(ConfigError):
    """No checkpoint (or not the requested one) restores; the message is one line naming step, file, reason."""


class Preempted(Exception):
    """SIGTERM or Ctrl-C arrived; a checkpoint was written. ``args``: (step, signal name)."""
