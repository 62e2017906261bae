"""Configs: every method config loads in each variant; bad fields give one clear error naming the field."""
import os
import subprocess
import sys

import pytest

from medvlp_jax import config_lib
from medvlp_jax.methods import OBJECTIVES
from tests import helpers


def _valid_demo(tmp_path):
    from medvlp_jax.data.sources import synthetic
    root = str(tmp_path / "syn")
    synthetic.prepare_synthetic(root, num_train=16, num_test=8, num_shards=2)
    c = helpers.load_config("convirt", "test")
    c.data.root, c.data.tokenizer_dir = root, f"{root}/tokenizer"
    return c


def test_parse_arg_variants_and_overrides():
    a = config_lib.parse_arg("demo,image=resnet", image="vit")
    assert a.variant == "demo" and a.image == "resnet"
    with pytest.raises(config_lib.ConfigError, match="unknown config variant 'dmo'"):
        config_lib.parse_arg("dmo", image="vit")
    with pytest.raises(config_lib.ConfigError, match="unknown config argument 'imag'"):
        config_lib.parse_arg("imag=vit", image="vit")


def test_config_arguments_parse_as_their_default_type():
    """One parser for configs/<method>.py:<arg> and configs/eval/<task>.py:<arg>: 'false' is False."""
    from medvlp_jax import evaluators
    assert config_lib.parse_value("small", True, "False") is False
    assert config_lib.parse_value("small", False, "yes") is True
    assert config_lib.parse_value("n", 3, "5") == 5 and config_lib.parse_value("root", None, "/d") == "/d"
    with pytest.raises(config_lib.ConfigError, match="small='maybe' is not a boolean"):
        config_lib.parse_value("small", False, "maybe")
    with pytest.raises(config_lib.ConfigError, match="n='five' is not of type int"):
        config_lib.parse_value("n", 3, "five")
    assert config_lib.parse_arg("demo,small=false", image="", small=True).small is False
    assert evaluators.parse_config_arg("a,flag=false", ("a", "b"), flag=True).flag is False


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_default_image_encoder_per_variant(name):
    """The demo trains the small ResNet, the test variant the test ViT, the paper setup its paper's encoder."""
    assert helpers.load_config(name, "demo").model.image.name == "resnet50"
    assert helpers.load_config(name, "test").model.image.name == "vit"
    assert helpers.load_config(name, "").model.image.name == ("resnet50" if name == "gloria" else "vit")
    assert helpers.load_config(name, "demo,image=vit").model.image.name == "vit"


def _keys(tree, prefix=""):
    return {k for key, v in tree.items() for k in (_keys(v, f"{prefix}{key}.") if isinstance(v, dict)
                                                    else {prefix + key})}


@pytest.mark.parametrize("image", config_lib.IMAGE_ENCODERS)
def test_every_variant_has_the_same_fields(image):
    """The variants are presets merged onto the paper setup: they change values, never the set of fields (the
    demo alone adds its zero-shot prompts)."""
    keys = {v: {k for k in _keys(config_lib.base(v, image=image).to_dict()) if not k.startswith("evals.prompts.")}
            for v in config_lib.VARIANTS}
    assert keys["demo"] == keys["paper"] and keys["test"] == keys["paper"]
    assert "model.image.image_size" in keys["paper"] and "data.auto_prepare" in keys["paper"]
    with pytest.raises(KeyError, match="'nosuch', which the base config does not have"):
        config_lib.merged(config_lib.PAPER, {"data": {"nosuch": 1}})


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_each_variant_reads_as_model_and_method_settings(name):
    """config.model has no field the model does not know (models/model_config.py), for every variant."""
    from medvlp_jax.models import model_config
    for arg in ("", "demo", "test", "demo,image=vit", "image=resnet"):
        model_config.read(helpers.load_config(name, arg).model)


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_a_misspelt_method_field_is_an_error(name):
    """Every objective reads config.method into its settings dataclass: a typo fails when the objective is
    built instead of silently using a default."""
    from medvlp_jax.methods import make_objective
    c = helpers.load_config(name, "test")
    make_objective(c.method, steps_per_epoch=2)
    c.method.temperatur = 0.1
    with pytest.raises(ValueError, match=r"unknown config keys \['temperatur'\]"):
        make_objective(c.method, steps_per_epoch=2)


def test_method_config_shows_defaults_and_rejects_unknown_fields():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Settings:
        tau: float = 0.1
        k: int = 3
        pair: tuple = (1, 2)

    m = config_lib.method_config("x", Settings, "tau", "pair", k=5)
    assert m.to_dict() == {"name": "x", "tau": 0.1, "pair": (1, 2), "k": 5}
    with pytest.raises(config_lib.ConfigError, match="Settings has no field 'kk'"):
        config_lib.method_config("x", Settings, k=1, kk=2)
    with pytest.raises(config_lib.ConfigError, match="Settings has no field 'taux'"):
        config_lib.method_config("x", Settings, "taux")


def test_unknown_image_encoder():
    with pytest.raises(config_lib.ConfigError, match="unknown image encoder image='vitt'"):
        helpers.load_config("convirt", "demo,image=vitt")


def test_unknown_method(tmp_path):
    c = _valid_demo(tmp_path)
    c.method.name = "clipp"
    with pytest.raises(config_lib.ConfigError, match=r"config.method.name='clipp' is not a known method.*convirt"):
        config_lib.validate(c, num_devices=1)


def test_missing_data_names_the_prepare_command(tmp_path):
    c = helpers.load_config("convirt", "")
    c.data.root = str(tmp_path / "nothing")
    with pytest.raises(config_lib.ConfigError, match="launch/prepare_data.py mimic_cxr"):
        config_lib.validate(c, num_devices=1)


def test_batch_not_divisible_by_devices(tmp_path):
    c = _valid_demo(tmp_path)
    c.train.batch_size = 10
    with pytest.raises(config_lib.ConfigError, match="batch_size=10 is not divisible by the 8 devices"):
        config_lib.validate(c, num_devices=8)


@pytest.mark.parametrize("field,value,message", [
    ("train.batch_size", 0, "batch_size=0 must be a positive number"),
    ("train.batch_size", -8, "batch_size=-8 must be a positive number"),
    ("train.log_every_steps", 0, "log_every_steps=0 must be at least 1"),
    ("train.keep_ckpts", 0, "keep_ckpts=0 must be at least 1"),
])
def test_nonpositive_counts(tmp_path, field, value, message):
    c = _valid_demo(tmp_path)
    section, name = field.split(".")
    c[section][name] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(c, num_devices=1)


def test_no_positive_total_steps_or_epochs(tmp_path):
    c = _valid_demo(tmp_path)
    c.train.total_steps, c.train.epochs = 0, 0
    with pytest.raises(config_lib.ConfigError, match="set one of them to a positive number"):
        config_lib.validate(c, num_devices=1)
    c.train.epochs = 2
    config_lib.validate(c, num_devices=1)


def test_resume_config_changes_lists_run_changing_fields_only():
    old = {"seed": 0, "train": {"total_steps": 10, "log_every_steps": 5, "batch_size": 8},
           "mesh": {"data": 1, "fsdp": 1}, "method": {"name": "mgca", "temp": 0.1}}
    new = {"seed": 0, "train": {"total_steps": 20, "log_every_steps": 1, "batch_size": 8},
           "mesh": {"data": 4, "fsdp": 2}, "method": {"name": "mgca", "temp": 0.2, "extra": 1}}
    assert config_lib.resume_config_changes(old, new) == ["method.extra", "method.temp", "train.total_steps"]
    assert config_lib.resume_config_changes(old, old) == []


def test_missing_tokenizer_and_checkpoint_dirs(tmp_path):
    c = _valid_demo(tmp_path)
    c.data.tokenizer_dir = str(tmp_path / "no_tok")
    with pytest.raises(config_lib.ConfigError, match="config.data.tokenizer_dir="):
        config_lib.validate(c, num_devices=1)
    c = _valid_demo(tmp_path)
    c.model.text.hf_checkpoint = str(tmp_path / "no_bert")
    with pytest.raises(config_lib.ConfigError, match="config.model.text.hf_checkpoint="):
        config_lib.validate(c, num_devices=1)


def test_launcher_prints_one_error_line_for_paper_config_without_data(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(helpers.ROOT, "launch", "pretrain.py"),
         f"--config={os.path.join(helpers.ROOT, 'configs', 'convirt.py')}", f"--workdir={tmp_path}",
         f"--config.data.root={tmp_path / 'missing'}"],
        capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 2
    err = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "prepare_data.py mimic_cxr" in err[0]


@pytest.mark.parametrize("launcher,args,expected", [
    ("pretrain.py", ["--config=configs/nonexistent.py", "--workdir=WORK"],
     "cannot load config file 'configs/nonexistent.py': [Errno 2] No such file or directory"),
    ("pretrain.py", ["--config=configs/convirt.py:nonsense", "--workdir=WORK"],
     "unknown config variant 'nonsense'; known: ['paper', 'demo', 'test']"),
    ("pretrain.py", ["--config=configs/convirt.py:demo", "--workdir=WORK", "--config.train.nosuch=3"],
     "the config has no field 'nosuch' (in --config.train.nosuch=3)"),
    ("evaluate.py", ["--config=configs/eval/nope.py", "--checkpoint=WORK"], "cannot load config file"),
    ("benchmark.py", ["--config=configs/nope.py"], "cannot load config file 'configs/nope.py'"),
])
def test_launchers_bad_config_flags_end_with_one_line(tmp_path, launcher, args, expected):
    proc = subprocess.run(
        [sys.executable, os.path.join(helpers.ROOT, "launch", launcher)]
        + [a.replace("WORK", str(tmp_path)) for a in args],
        capture_output=True, text=True, cwd=helpers.ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    err = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and expected in err[0], proc.stderr[-2000:]


def test_a_config_files_own_attribute_error_is_not_reported_as_an_override(tmp_path):
    """Only a --config.* override names a missing field; a bug inside get_config keeps its traceback."""
    bad = tmp_path / "broken.py"
    bad.write_text("def get_config(arg=None):\n    return object().no_such_attribute\n")
    proc = subprocess.run(
        [sys.executable, os.path.join(helpers.ROOT, "launch", "pretrain.py"), f"--config={bad}",
         f"--workdir={tmp_path / 'w'}"],
        capture_output=True, text=True, cwd=helpers.ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert proc.returncode not in (0, 2)
    assert "no_such_attribute" in proc.stderr and "the config has no field" not in proc.stderr
