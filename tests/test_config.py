"""Config loading, overrides and validation: every user mistake is one clear sentence."""

import pytest

from trainer.config import UserError, load_config, split_override_args


def test_defaults_load_and_overrides_apply_with_types():
  cfg = load_config("configs/default.py", ["model.d_model=64", "optimizer.learning_rate=1e-3", "keep_best=false",
                                           "mesh.rules=(('batch', 'data'),)"])
  assert cfg.model.d_model == 64 and isinstance(cfg.model.d_model, int)
  assert cfg.optimizer.learning_rate == 1e-3
  assert cfg.keep_best is False
  assert cfg.mesh.rules == (("batch", "data"),)


def test_split_override_args_accepts_both_forms():
  rest, ov = split_override_args(["--workdir=x", "--config.seed=3", "--config.model.mixer", "attention"])
  assert rest == ["--workdir=x"] and ov == ["seed=3", "model.mixer=attention"]


@pytest.mark.parametrize("override,needle", [
    ("model.d_modle=3", "did you mean 'model.d_model'"),
    ("optimizer.lr=3", "optimizer.lr"),
    ("totl_steps=3", "did you mean 'total_steps'"),
])
def test_unknown_key_names_it_and_suggests(override, needle):
  with pytest.raises(UserError) as e:
    load_config("configs/default.py", [override])
  assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("override,needle", [
    ("model.mixer=attenton", "'attenton' is not a known mixer; valid mixers: attention"),
    ("task.name=lisops", "task.name='lisops' is not valid; choose one of: induction, listops, mqar, pathfinder, retrieval, selective_copy, text, textdir, tfds"),
    ("model.num_heads=3", "model.d_model=128 is not divisible by model.num_heads=3"),
    ("total_steps=abc", "takes an integer, not 'abc'"),
    ("model.positions=alibi", "model.positions='alibi' is not valid"),
    ("mesh.data=0", "mesh.data=0 must be a positive integer or -1"),
    ("model.mixer_schedule=attention,nope", "model.mixer_schedule[1]='nope' is not a known mixer"),
    ("model.mixer_schedule=conv,local,local,local,local,local,local,local,local,attention",
     "has 10 entries but model.num_layers="),
])
def test_bad_values_are_named(override, needle):
  with pytest.raises(UserError) as e:
    load_config("configs/default.py", [override])
  assert needle in str(e.value)


def test_a_config_gives_each_mixer_family_its_layout():
  """configs/mqar.py: a conv layer in front of attention-like mixers, Mamba in every layer
  (model.schedule_for); an explicit schedule_for entry wins, and a bad one is named."""
  from trainer.config import mixer_schedule
  schedule = lambda *o: mixer_schedule(load_config("configs/mqar.py", list(o)))
  assert schedule("model.mixer=attention") == ["conv", "attention"]
  assert schedule("model.mixer=mamba") == ["mamba", "mamba"] and schedule("model.mixer=mamba2") == ["mamba2"] * 2
  assert schedule("model.mixer=mamba", "model.schedule_for.mamba=conv,mixer") == ["conv", "mamba"]
  # A schedule typed on the command line wins over the config file's entry.
  assert schedule("model.mixer=mamba", "model.mixer_schedule=conv,mixer") == ["conv", "mamba"]
  with pytest.raises(UserError, match=r"model.schedule_for.mamba2='conv,nope' holds no known mixer \('nope'\)"):
    load_config("configs/mqar.py", ["model.schedule_for.mamba2=conv,nope"])  # checked even when not in force
  with pytest.raises(UserError, match="is a group; set one of its fields"):
    load_config("configs/default.py", ["model.schedule_for=x"])
  with pytest.raises(UserError, match=r"model.schedule_for.mamba='conv,nope' holds no known mixer \('nope'\)"):
    load_config("configs/mqar.py", ["model.mixer=mamba", "model.schedule_for.mamba=conv,nope"])
  cfg = load_config("configs/mqar.py")
  with cfg.unlocked():
    cfg.model.schedule_for.mambo = ""
  from trainer.config import validate
  with pytest.raises(UserError, match="model.schedule_for.mambo names no known mixer"):
    validate(cfg)


def test_resuming_compares_the_layers_built_not_the_keys_that_chose_them():
  """A checkpoint of mamba behind the conv layer (a config from before schedule_for) is refused
  by the new layout; an entry for another mixer changes nothing that is trained."""
  import json
  from trainer.experiment import config_changes
  as_saved = lambda *o: json.loads(load_config("configs/mqar.py", list(o)).to_json())
  old = as_saved("model.mixer=mamba")
  del old["model"]["schedule_for"]
  assert config_changes(old, as_saved("model.mixer=mamba")) == {"model.layers": ("conv,mamba", "mamba,mamba")}
  assert config_changes(as_saved(), as_saved("model.schedule_for.mamba=conv,mixer")) == {}
  # The same layers named another way are no change; other layers are, with the keys that made them.
  assert config_changes(as_saved("model.mixer=mamba"), as_saved("model.mixer=mamba", "model.mixer_schedule=")) == {}
  assert config_changes(as_saved(), as_saved("model.mixer=linear")) == {
      "model.layers": ("conv,attention", "conv,linear"), "model.mixer": ("attention", "linear")}


def test_missing_config_file_and_bad_arg():
  with pytest.raises(UserError, match="does not exist"):
    load_config("configs/nope.py")
  with pytest.raises(UserError, match="'bogus'"):
    load_config("configs/default.py:bogus")


def test_helpfull_lists_every_key_with_its_default_and_meaning():
  from configs import base
  from trainer.config import _flat_keys, describe_keys
  from tests.helpers import run_cli
  rows = describe_keys()
  keys = [k for k, _, _ in rows]
  assert len(keys) == len(set(keys)) and set(keys) == set(_flat_keys(base.get_config()))  # every key, once
  assert not [k for k, _, text in rows if not text], "a key in configs/base.py has no comment"
  out = run_cli("trainer.train", "--helpfull", timeout=120)
  assert out.returncode == 0
  assert any(line.split()[:3] == ["model.d_model", "=", "128"] and "residual width" in line
             for line in out.stdout.splitlines())
