"""app.parse_flags: ``--config.<field>=None`` sets an optional config field to None (ml_collections alone parses
an override with the type of the field's value and rejects 'None' for an int field such as
``method.local_chunk``)."""
import os

import pytest
from absl import flags
from ml_collections import config_flags

from medvlp_jax import app
from tests import helpers

MGCA_TEST = f"--config={os.path.join(helpers.ROOT, 'configs', 'mgca.py')}:test"


def _flag_values(argv):
    """A fresh FlagValues with a config flag, parsed from ``argv`` (config_flags reads overrides from sys_argv)."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=False, sys_argv=argv)
    fv(argv)
    return fv


def test_split_none_overrides():
    argv = ["prog", MGCA_TEST, "--config.method.local_chunk=None", "--config.method.text_chunk=none",
            "--config.train.batch_size=8", "--steps=None"]
    kept, nones = app.split_none_overrides(argv)
    assert kept == ["prog", MGCA_TEST, "--config.train.batch_size=8", "--steps=None"]
    assert nones == [("config", "method.local_chunk"), ("config", "method.text_chunk")]


def test_none_override_reaches_the_config():
    argv = ["prog", MGCA_TEST, "--config.method.local_chunk=None", "--config.train.batch_size=16"]
    with pytest.raises(flags.IllegalFlagValueError, match="local_chunk"):     # what ml_collections does alone
        _flag_values(argv)
    kept, nones = app.split_none_overrides(argv)
    fv = _flag_values(kept)
    assert fv.config.method.local_chunk == 16
    app.apply_none_overrides(fv, nones)
    assert fv.config.method.local_chunk is None and fv.config.train.batch_size == 16


def test_none_override_of_a_missing_field_is_one_line(capsys):
    kept, nones = app.split_none_overrides(["prog", MGCA_TEST, "--config.method.no_such_chunk=None"])
    fv = _flag_values(kept)
    with pytest.raises(SystemExit) as e:
        app.apply_none_overrides(fv, nones)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no field 'method.no_such_chunk'" in err
