import pytest

from nlvid.config import Config, bundled_configs, config_from_dict, load_config, model_kwargs, parse_override
from nlvid.errors import ConfigError


def test_defaults_roundtrip():
    cfg = Config()
    assert config_from_dict(cfg.to_dict()) == cfg


def test_set_overrides_typed():
    cfg = load_config(None, ["optim.lr=0.1", "data.train_short_side=[128, 160]", "model.scale=false"])
    assert cfg.optim.lr == 0.1
    assert cfg.data.train_short_side == [128, 160]
    assert cfg.model.scale is False
    assert model_kwargs(cfg.model)["scale"] is False


def test_int_accepted_for_float():
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0


@pytest.mark.parametrize(
    "override, needle",
    [
        ("optim.lrr=0.1", "unknown config key 'optim.lrr'"),
        ("nope.x=1", "unknown config key 'nope'"),
        ("train.epochs=ten", "config key 'train.epochs': expected an integer"),
        ("train.amp=fp8", "'train.amp': 'fp8' is not one of none, bf16, fp16"),
        ("model.pool_size=[1, 'a', 2]", "model.pool_size[1]"),
        ("optim.lr", "expected KEY=VALUE"),
    ],
)
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError) as ei:
        load_config(None, [override])
    assert needle in str(ei.value)
    assert ei.value.exit_code == 2


def test_parse_override_yaml_values():
    assert parse_override("model.nonlocal_blocks={res3: [1, 3]}") == ("model.nonlocal_blocks", {"res3": [1, 3]})


def test_missing_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_file_unknown_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.epochz'; valid keys here: epochs"):
        load_config(p)


@pytest.mark.parametrize("name", bundled_configs())
def test_bundled_configs_load(name):
    from nlvid.models import list_models

    cfg = load_config(name)
    assert cfg.model.name in list_models()


def test_float_in_exponent_form():
    # YAML 1.1 reads "1e10" as a string; a float key still takes it
    assert load_config(None, ["optim.lr=1e10"]).optim.lr == 1e10
    with pytest.raises(ConfigError, match="expected a number"):
        load_config(None, ["optim.lr=fast"])
