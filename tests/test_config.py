"""Typed configuration: presets, `key=value` overrides with type coercion, and errors that name the field."""

import dataclasses

import pytest
import yaml

from dlm.config import CONFIG_DIR, ConfigError, RunConfig, build_config, preset_groups, to_yaml
from dlm.process import PROCESSES


def test_every_preset_applies_its_fields():
    groups = preset_groups()
    assert {"model", "process"} <= set(groups) and "tiny" in groups["model"] and "ar" in groups["process"]
    for group, names in groups.items():
        for name in names:
            cfg = build_config([f"{group}={name}"])
            path = CONFIG_DIR / group / f"{name}.yaml"
            if not path.is_file():  # a registered process without a file: its config dataclass is the preset
                assert group == "process" and cfg.process == PROCESSES[name].config_class()
                continue
            data = yaml.safe_load(path.read_text()) or {}
            data = data if group == "run" else {group: data}
            for section, fields in data.items():
                if not isinstance(fields, dict):
                    assert getattr(cfg, section) == fields
                    continue
                for key, value in fields.items():
                    got = getattr(getattr(cfg, section), key)
                    assert got == value or (isinstance(got, float) and got == pytest.approx(float(value))), \
                        f"{group}={name}: {section}.{key}"


def test_presets_apply_before_field_overrides_whatever_the_order():
    assert build_config(["model=tiny"]).model.n_layer == 4
    assert build_config(["model.n_layer=2", "model=tiny"]).model.n_layer == 2
    assert build_config(["model=tiny", "model.n_layer=2"]).model.d_model == 256  # the rest of the preset stays
    assert build_config(["process=ar"]).process.name == "ar"
    assert build_config(["trainer.max_steps=5", "trainer.max_steps=7"]).trainer.max_steps == 7  # last one wins


def test_overrides_are_coerced_to_the_field_type():
    cfg = build_config(["trainer.max_steps=2000", "optim.lr=3e-4", "trainer.lora_embeddings=false", "optim.warmup_steps=1e2", "trainer.val_every=+7",
                        "model.dropout=0", "data.source=123", "trainer.max_steps=2.0", "init_from=", "process.eps=0"])
    assert cfg.trainer.max_steps == 2 and type(cfg.trainer.max_steps) is int
    assert cfg.optim.lr == 3e-4 and type(cfg.optim.lr) is float  # YAML reads "3e-4" as a string
    assert cfg.trainer.lora_embeddings is False
    assert cfg.optim.warmup_steps == 100 and type(cfg.optim.warmup_steps) is int and cfg.trainer.val_every == 7
    assert cfg.model.dropout == 0.0 and type(cfg.model.dropout) is float
    assert cfg.data.source == "123" and cfg.init_from == "" and type(cfg.process.eps) is float
    assert build_config(["trainer.compile=true"]).trainer.compile is True
    # trainer.progress is a mode name; its old bool values still work (tests/test_progress.py)
    assert build_config(["trainer.progress=false"]).trainer.progress == "off"


@pytest.mark.parametrize("override, field", [
    ("trainer.max_steps=2.5", "trainer.max_steps"),
    ("trainer.max_steps=abc", "trainer.max_steps"),
    ("trainer.max_steps=2.5e0", "trainer.max_steps"),
    ("trainer.progress=3", "trainer.progress"),
    ("model.dropout=high", "model.dropout"),
    ("optim.lr=true", "optim.lr"),
    ("trainer.max_steps=null", "trainer.max_steps"),
    ("softmask.p_sm=~", "softmask.p_sm"),
    ("trainer.out_dir=null", "trainer.out_dir"),
])
def test_values_of_the_wrong_type_name_the_field(override, field):
    with pytest.raises(ConfigError, match=f"'{field}' must be a"):
        build_config([override])


def test_unknown_key_lists_the_valid_keys():
    with pytest.raises(ConfigError, match="unknown config key 'trainer.max_step'") as err:
        build_config(["trainer.max_step=3"])
    assert "trainer.max_steps" in str(err.value) and "trainer.batch_size" in str(err.value)
    with pytest.raises(ConfigError, match="unknown config key 'garbage'") as err:
        build_config(["garbage=1"])
    for key in ("model", "trainer", "init_from"):
        assert key in str(err.value)
    with pytest.raises(ConfigError, match="unknown config key 'modle'"):
        build_config(["modle.n_layer=2"])
    with pytest.raises(ConfigError, match="'trainer' is a group"):
        build_config(["trainer=5"])
    with pytest.raises(ConfigError, match="key=value"):
        build_config(["garbage"])


def test_unknown_preset_lists_the_valid_presets():
    with pytest.raises(ConfigError, match="unknown model preset 'huge'") as err:
        build_config(["model=huge"])
    for name in preset_groups()["model"]:
        assert name in str(err.value)


@pytest.mark.parametrize("override, field", [
    ("trainer.max_steps=0", "trainer.max_steps"),
    ("trainer.max_steps=-5", "trainer.max_steps"),
    ("trainer.batch_size=0", "trainer.batch_size"),
    ("trainer.ckpt_every=-1", "trainer.ckpt_every"),
    ("trainer.ema=1.0", "trainer.ema"),
    ("optim.lr=0", "optim.lr"),
    ("model.dropout=1.0", "model.dropout"),
    ("process.name=no_such_process", "process.name"),  # (was "sedd", registered since)
    ("process.schedule=sqrt", "process.schedule"),
    ("process.eps=1.0", "process.eps"),
    ("data.vocab_size=100", "data.vocab_size"),
    ("trainer.precision=16", "trainer.precision"),
    ("model.context=2", "model.context"),
    ("optim.grad_clip=-1", "optim.grad_clip"),  # clip_grad_norm_ would flip the gradients: gradient ascent
    ("optim.min_lr_ratio=-0.5", "optim.min_lr_ratio"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("optim.beta1=1.5", "optim.beta1"),
    ("optim.beta2=1.0", "optim.beta2"),
])
def test_bad_values_raise_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build_config([override])


def test_d_model_must_divide_into_heads():
    with pytest.raises(ConfigError, match=r"model\.d_model=100 must be divisible by model\.n_head=3"):
        build_config(["model.d_model=100", "model.n_head=3"])
    with pytest.raises(ConfigError, match=r"model\.d_model / model\.n_head must be even"):
        build_config(["model.d_model=96", "model.n_head=32"])  # head size 3: rotary needs pairs


def test_yaml_round_trip():
    cfg = build_config(["model=tiny", "process=ar", "optim.lr=1e-3", "trainer.max_steps=42"])
    again = RunConfig.from_dict(yaml.safe_load(to_yaml(cfg)))
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)
