"""Configuration: dataclasses, YAML files that list only what differs, `key=value` overrides last.

Every component keeps a `@dataclass` of its settings next to its code (UNetConfig in models/unet.py, ...).
A training script nests them in one run config; this module turns a YAML file plus command-line overrides
into that dataclass, strictly:

    python -m train.diffusion --config configs/shapes/diffusion_pixel.yaml train.steps=500 unet.channels=32

- nested fields are addressed with dots (`unet.channels`); values are read as YAML (`true`, `3e-4`, `[1, 2]`);
- an unknown key is an error naming the closest valid key (`unknown config key 'unet.chanels'; did you
  mean 'unet.channels'?`);
- a value of the wrong type is an error naming the key and the expected type;
- the resolved config is printed at start and stored in every checkpoint (`config_to_dict`), so a checkpoint
  alone rebuilds its model (`config_from_dict`).
"""
import argparse
import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the config dataclass."""


def _all_keys(cls, prefix=""):
    keys, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _all_keys(hints[f.name], prefix + f.name + ".")
    return keys


def _unknown_key_error(root_cls, full_key):
    valid = _all_keys(root_cls)
    close = difflib.get_close_matches(full_key, valid, n=1, cutoff=0.0)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{full_key}'{hint}")


def _coerce(value, annotation, key):
    """Check `value` against a field's annotation and convert where YAML's reading is looser than ours."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key '{key}' does not accept {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin in (tuple, list) or annotation in (tuple, list):
        if isinstance(value, (list, tuple)):
            args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
            item_type = args[0] if args else None
            items = [_coerce(v, item_type, key) if item_type else v for v in value]
            return tuple(items) if (origin or annotation) is tuple else items
    else:
        return value
    name = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"config key '{key}' expects {name}, got {value!r}")


def _default_of(f):
    """The default value of a dataclass field (a fresh one from its default_factory)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def config_from_dict(cls, d, prefix="", root_cls=None, base=None):
    """Build dataclass `cls` from a nested dict; keys not given keep their defaults; unknown keys are errors.
    A section given in part keeps the defaults of its field for the rest: `model.text.width=32` changes the width of
    the text config a default_factory made (a causal CLIP tower stays causal), not of a fresh TextEncoderConfig.
    base: the instance whose values stand for the keys not given (by default the dataclass defaults)."""
    if not isinstance(d, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        if key not in fields:
            raise _unknown_key_error(root_cls or cls, prefix + key)
        field_type = hints[key]
        if dataclasses.is_dataclass(field_type):
            default = getattr(base, key) if base is not None else _default_of(fields[key])
            kwargs[key] = config_from_dict(field_type, value or {}, prefix + key + ".", root_cls or cls, default)
        else:
            kwargs[key] = _coerce(value, field_type, prefix + key)
    if base is not None:
        kwargs = {**{name: getattr(base, name) for name in fields if fields[name].init}, **kwargs}
    return cls(**kwargs)


def config_to_dict(cfg):
    """Plain nested dict of python types (tuples as lists), fit for YAML and torch.load(weights_only=True)."""
    return _to_plain(dataclasses.asdict(cfg))


def _to_plain(v):
    if isinstance(v, dict):
        return {k: _to_plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_to_plain(x) for x in v]
    return v


def _set_dotted(tree, root_cls, dotted, value):
    """Put `value` at `a.b.c` inside the nested dict `tree`, checking every part of the path."""
    parts = dotted.split(".")
    cls, node = root_cls, tree
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            raise _unknown_key_error(root_cls, dotted)
        field_type = typing.get_type_hints(cls)[part]
        last = i == len(parts) - 1
        if last:
            if dataclasses.is_dataclass(field_type):
                raise ConfigError(f"config key '{dotted}' is a section; set one of its keys, e.g. '{dotted}."
                                  f"{dataclasses.fields(field_type)[0].name}=...'")
            node[part] = value
        else:
            if not dataclasses.is_dataclass(field_type):
                raise _unknown_key_error(root_cls, dotted)
            node = node.setdefault(part, {})
            cls = field_type


def load_config(cls, config_path=None, overrides=()):
    """YAML file (optional) then `key=value` overrides -> an instance of `cls`."""
    tree = {}
    if config_path:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}; pass an existing file, e.g. one under configs/")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.steps=100)")
        key, raw = item.split("=", 1)
        _set_dotted(tree, cls, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return config_from_dict(cls, tree)


def config_changes(stored, wanted, filled_in=(), prefix=""):
    """The dotted keys whose values differ between a checkpoint's config and a wanted one (both config_to_dict),
    as 'key: stored -> wanted'. `filled_in`: dotted keys the training script sets before it stores the config
    (train/clip.py's FILLED_IN: the vocabulary size its tokenizer came to); any stored value matches them."""
    changes = []
    for key in sorted(set(stored) | set(wanted), key=lambda k: (k not in stored, k)):
        a, b = stored.get(key, "<unset>"), wanted.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, filled_in, f"{prefix}{key}.")
        elif (type(a), a) != (type(b), b) and prefix + key not in filled_in:  # False != 0, 0.0 != 0
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes


def stored_config_changes(cls, stored, wanted, sections=None, filled_in=()):
    """How a checkpoint's stored config differs from the wanted one (a config_to_dict of `cls`), as one line
    'key: stored -> wanted; ...' ('' when they agree). The stored config is read through `cls` first, so a key added
    to the dataclass since the checkpoint was written counts as its default, not as a change (a key removed since
    cannot be read: then it is compared as stored and named). `sections`: compare only these top-level keys."""
    try:
        stored = config_to_dict(config_from_dict(cls, stored))
    except ValueError:
        pass
    if sections is not None:
        stored = {k: stored.get(k, "<unset>") for k in sections}
        wanted = {k: wanted[k] for k in sections}
    changes = config_changes(stored, wanted, filled_in)
    return "; ".join(changes[:3]) + ("; ..." if len(changes) > 3 else "")


def format_config(cfg):
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None).rstrip()


def parse_config(cls, argv=None, description=None):
    """Command line `--config FILE key=value ...` -> (cfg, config_path). Prints the resolved config."""
    parser = argparse.ArgumentParser(description=description,
                                     epilog="Overrides: key=value pairs after the flags, dotted for nested "
                                            "sections, e.g. train.steps=200 unet.channels=32.")
    parser.add_argument("--config", help="YAML file listing what differs from the defaults")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, applied after the file")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(cls, args.config, args.overrides)
    print(format_config(cfg), flush=True)
    return cfg, args.config


def default_out_dir(config_path, fallback):
    """`runs/<config file name>`, or `runs/<fallback>` when no file was given."""
    return str(Path("runs") / (Path(config_path).stem if config_path else fallback))
