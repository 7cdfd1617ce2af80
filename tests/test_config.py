"""Config files + key=value overrides: strict keys with a suggestion, types checked, round trip through dicts."""
from dataclasses import dataclass, field

import pytest

from core.config import (ConfigError, config_changes, config_from_dict, config_to_dict, default_out_dir, load_config,
                         stored_config_changes)


@dataclass
class Inner:
    channels: int = 64
    mult: tuple[int, ...] = (1, 2)
    rate: float = 0.1


@dataclass
class Outer:
    name: str = "run"
    flag: bool = False
    inner: Inner = field(default_factory=Inner)


def test_file_then_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("inner:\n  channels: 32\n  rate: 3e-4\nname: base\n")
    cfg = load_config(Outer, path, ["inner.mult=[1, 2, 4]", "name=other", "flag=true"])
    assert cfg == Outer(name="other", flag=True, inner=Inner(channels=32, mult=(1, 2, 4), rate=3e-4))
    assert isinstance(cfg.inner.rate, float) and isinstance(cfg.inner.mult, tuple)


@pytest.mark.parametrize("source", ["file", "override"])
def test_unknown_key_names_the_closest(tmp_path, source):
    path = tmp_path / "bad.yaml"
    path.write_text("inner:\n  chanels: 3\n" if source == "file" else "{}\n")
    overrides = [] if source == "file" else ["inner.chanels=3"]
    with pytest.raises(ConfigError, match=r"unknown config key 'inner.chanels'; did you mean 'inner.channels'\?"):
        load_config(Outer, path, overrides)


@pytest.mark.parametrize("override,message", [("inner.channels=abc", "expects int"), ("flag=3", "expects bool"),
                                              ("inner=3", "is a section"), ("steps", "key=value")])
def test_bad_values_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, [override])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Outer, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("inner: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, bad)


def test_dict_round_trip_is_plain():
    cfg = Outer(inner=Inner(mult=(3, 4)))
    d = config_to_dict(cfg)
    assert d["inner"]["mult"] == [3, 4]
    assert config_from_dict(Outer, d) == cfg


def test_default_out_dir():
    assert default_out_dir("configs/shapes/diffusion_pixel.yaml", "x") == "runs/diffusion_pixel"
    assert default_out_dir(None, "diffusion") == "runs/diffusion"


def test_config_changes_names_every_differing_key_and_lets_training_fill_in_its_own():
    stored = {"model": {"width": 64, "vocab_size": 376}, "bf16": True, "snr_gamma": 5.0, "steps": 1000}
    assert config_changes(stored, stored) == []
    wanted = {"model": {"width": 32, "vocab_size": 0}, "bf16": False, "snr_gamma": 0.0, "steps": 1000, "seed": 1}
    assert config_changes(stored, wanted, filled_in=("model.vocab_size",)) == [
        "bf16: True -> False", "model.width: 64 -> 32", "snr_gamma: 5.0 -> 0.0", "seed: '<unset>' -> 1"]
    assert "model.vocab_size: 376 -> 0" in config_changes(stored, wanted)  # only the named keys are filled in
    assert config_changes({"lr": 1}, {"lr": 1.0}) == ["lr: 1 -> 1.0"]  # the same number, another type


def test_stored_config_changes_reads_the_checkpoint_through_the_dataclass():
    wanted = config_to_dict(Outer())
    older = {"name": "run", "inner": {"channels": 64, "mult": [1, 2]}}  # written before `flag` and `inner.rate`
    assert stored_config_changes(Outer, older, wanted) == ""  # keys added since take their defaults
    assert stored_config_changes(Outer, older, config_to_dict(Outer(flag=True))) == "flag: False -> True"
    removed = {**older, "depth": 3}  # a key the dataclass no longer has: compared as stored, and named
    assert stored_config_changes(Outer, removed, wanted) == "depth: 3 -> '<unset>'; inner.rate: '<unset>' -> 0.1; " \
                                                             "flag: '<unset>' -> False"
    other = config_to_dict(Outer(name="x", flag=True, inner=Inner(channels=8, mult=(1,), rate=0.5)))
    assert stored_config_changes(Outer, older, other).endswith("; ...")  # four changes, three named
    assert stored_config_changes(Outer, older, other, sections=("flag",)) == "flag: False -> True"


@dataclass
class WithFactory:
    inner: Inner = field(default_factory=lambda: Inner(channels=8, rate=0.5))


def test_a_section_given_in_part_keeps_its_default_factorys_values():
    """`inner.channels=16` changes one value of the Inner the default_factory made; the others stay (rate 0.5, not
    Inner's own 0.1): a YAML file lists only what differs from the defaults, also inside a section."""
    cfg = load_config(WithFactory, None, ["inner.channels=16"])
    assert cfg.inner == Inner(channels=16, rate=0.5)
    assert config_from_dict(WithFactory, {"inner": {}}).inner == Inner(channels=8, rate=0.5)
    assert load_config(WithFactory).inner == Inner(channels=8, rate=0.5)
