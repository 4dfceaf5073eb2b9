"""Every supported model family, on tiny configs: train step, save, reload, merge, decoder padding,
target-module choice, PEFT variants (DoRA, rsLoRA) and the QLoRA messages.

Three classes throughout, so a reload that quietly rebuilt a two-class head would fail.
"""

import json

import pytest
import torch
from accelerate import Accelerator
from conftest import DECODERS

import lora_setup
import train_loop

FAMILIES = ["bert", "distilbert", "roberta", "gpt2", "llama"]
LABELS = ["negative", "positive", "neutral"]
TEXTS = ["good film", "the plot was very dull and boring", "a story", "lovely superb fun actor and scene"]
# The new, randomly initialised modules of each family, which are trained and saved in full.
HEADS = {"bert": ["classifier"], "distilbert": ["classifier", "pre_classifier"], "roberta": ["classifier"],
         "gpt2": ["score"], "llama": ["score"]}
# The linear layers LoRA can adapt (the head excluded), as the target-module error must list them.
LINEAR_LAYERS = {
    "bert": ["dense", "key", "query", "value"],
    "distilbert": ["k_lin", "lin1", "lin2", "out_lin", "q_lin", "v_lin"],
    "roberta": ["dense", "key", "query", "value"],
    "gpt2": ["c_attn", "c_fc", "c_proj"],
    "llama": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
}


def build(model_dir: str, **lora_options):
    """Tiny base + new 3-class head + LoRA, as train_loop builds it."""
    tokenizer = lora_setup.load_tokenizer(model_dir)
    torch.manual_seed(0)
    model, heads = lora_setup.load_base_model(model_dir, LABELS, tokenizer.pad_token_id)
    config = lora_setup.build_lora_config(model, heads, r=4, alpha=8, dropout=0.0, **lora_options)
    return lora_setup.apply_lora(model, config), tokenizer, heads


def encode(tokenizer, texts):
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def one_train_step(model, tokenizer):
    """One optimizer step of the real loop (train_loop.train_step) with a plain CPU Accelerator."""
    accelerator = Accelerator(cpu=True)
    optimizer = train_loop.build_optimizer(model, 1e-2, 0.0)
    scheduler = train_loop.build_scheduler(optimizer, "constant", 0, 10)
    batch = {**encode(tokenizer, TEXTS), "labels": torch.tensor([1, 0, 2, 1])}
    train_loop.train_step(model, optimizer, scheduler, [batch], accelerator, max_grad_norm=1.0)


def logits_of(model, tokenizer, texts=TEXTS):
    model.eval()
    with torch.no_grad():
        return model(**encode(tokenizer, texts)).logits


def trained(family: str, tiny_model_dir, **lora_options):
    model, tokenizer, _ = build(tiny_model_dir(family), **lora_options)
    one_train_step(model, tokenizer)
    return model, tokenizer


def assert_reload_reproduces(model, tokenizer, folder):
    """Save, reload with lora_setup.load_adapter under another seed, and compare logits."""
    expected = logits_of(model, tokenizer)
    lora_setup.save_adapter(model, tokenizer, folder)
    torch.manual_seed(1234)  # a head that was not saved would be re-initialised differently
    reloaded, reloaded_tokenizer = lora_setup.load_adapter(folder)
    torch.testing.assert_close(logits_of(reloaded, reloaded_tokenizer), expected, rtol=0, atol=1e-6)
    return reloaded


# --- train step, save, reload -----------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_train_step_changes_only_lora_and_head(family, tiny_model_dir):
    model, tokenizer, heads = build(tiny_model_dir(family))
    assert heads == HEADS[family]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    one_train_step(model, tokenizer)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    # LoRA's B starts at zero, so A gets no gradient on the first step; everything else trainable moves.
    assert changed == {name for name in trainable if "lora_A" not in name}
    assert all(("lora_" in name) or ("modules_to_save" in name) for name in trainable)
    for head in heads:
        assert any(f".{head}.modules_to_save." in name for name in changed), head


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_adapter_reloads_with_identical_logits(family, tiny_model_dir, tmp_path):
    from peft import AutoPeftModelForSequenceClassification

    model, tokenizer = trained(family, tiny_model_dir)
    reloaded = assert_reload_reproduces(model, tokenizer, tmp_path / "adapter")
    assert reloaded.config.id2label == dict(enumerate(LABELS))
    assert reloaded.config.pad_token_id == tokenizer.pad_token_id is not None
    # Plain PEFT, without our helper, rebuilds the same classifier from the same folder.
    torch.manual_seed(99)
    plain = AutoPeftModelForSequenceClassification.from_pretrained(
        tmp_path / "adapter", num_labels=len(LABELS), pad_token_id=tokenizer.pad_token_id)
    torch.testing.assert_close(logits_of(plain, tokenizer), logits_of(model, tokenizer), rtol=0, atol=1e-6)


def test_distilbert_pre_classifier_is_trained_and_saved(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    model, tokenizer = trained("distilbert", tiny_model_dir)
    lora_setup.save_adapter(model, tokenizer, tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    trained_weight = dict(model.named_parameters())["base_model.model.pre_classifier.modules_to_save.default.weight"]
    torch.testing.assert_close(saved["base_model.model.pre_classifier.weight"], trained_weight.detach())
    assert "base_model.model.classifier.weight" in saved


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_export_loads_with_plain_transformers(family, tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model, tokenizer = trained(family, tiny_model_dir)
    expected = logits_of(model, tokenizer)
    lora_setup.merge_and_save(model, tokenizer, tmp_path / "merged")
    merged, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["missing_keys"]  # the trained head is in the file, not re-initialised
    assert merged.config.id2label == dict(enumerate(LABELS))
    torch.testing.assert_close(logits_of(merged, tokenizer), expected, rtol=0, atol=1e-5)


# --- decoders ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(DECODERS))
def test_decoder_pads_with_eos_and_classifies_from_the_last_real_token(family, tiny_model_dir, tmp_path):
    model, tokenizer = trained(family, tiny_model_dir)
    assert tokenizer.pad_token == tokenizer.eos_token and tokenizer.pad_token_id is not None
    assert model.config.pad_token_id == tokenizer.pad_token_id
    lora_setup.save_adapter(model, tokenizer, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "config.json").read_text())["pad_token_id"] == tokenizer.pad_token_id
    short, long = "good film", "the plot was very dull and boring and the actor was weak"
    alone = logits_of(model, tokenizer, [short])
    padded_batch = encode(tokenizer, [short, long])
    assert (padded_batch["input_ids"][0] == tokenizer.pad_token_id).sum() > 0  # the short row is right-padded
    torch.testing.assert_close(logits_of(model, tokenizer, [short, long])[:1], alone, rtol=0, atol=1e-5)


# --- which layers LoRA adapts -----------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_unknown_target_modules_list_the_real_layer_names(family, tiny_model_dir):
    tokenizer = lora_setup.load_tokenizer(tiny_model_dir(family))
    model, heads = lora_setup.load_base_model(tiny_model_dir(family), LABELS, tokenizer.pad_token_id)
    with pytest.raises(lora_setup.ModelSetupError) as raised:
        lora_setup.build_lora_config(model, heads, r=4, alpha=8, dropout=0.0,
                                     target_modules=["qkv", LINEAR_LAYERS[family][0]])
    message = str(raised.value)
    assert "['qkv'] match no layer" in message and str(LINEAR_LAYERS[family]) in message and "all-linear" in message
    assert "\n" not in message
    # The defaults adapt every linear layer of the family.
    assert sorted(lora_setup.DEFAULT_TARGET_MODULES[family]) == LINEAR_LAYERS[family]


@pytest.mark.parametrize("family", ["roberta", "distilbert", "gpt2"])
def test_all_linear_adapts_every_linear_layer_outside_the_head(family, tiny_model_dir, tmp_path):
    from transformers.pytorch_utils import Conv1D

    tokenizer = lora_setup.load_tokenizer(tiny_model_dir(family))
    model, heads = lora_setup.load_base_model(tiny_model_dir(family), LABELS, tokenizer.pad_token_id)
    linear = {name for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, Conv1D))}
    expected = {name for name in linear if not name.startswith(tuple(heads))}
    config = lora_setup.build_lora_config(model, heads, r=4, alpha=8, dropout=0.0, target_modules=["all-linear"])
    model = lora_setup.apply_lora(model, config)
    adapted = {name for name, module in model.get_base_model().named_modules() if hasattr(module, "lora_A")}
    # The head (RoBERTa's classifier.dense, DistilBERT's pre_classifier ...) is trained in full, not adapted.
    assert adapted == expected and len(expected) < len(linear)
    one_train_step(model, tokenizer)
    assert_reload_reproduces(model, tokenizer, tmp_path / "adapter")


# --- PEFT variants ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_dora_trains_its_magnitudes_and_reloads(family, tiny_model_dir, tmp_path):
    model, tokenizer, _ = build(tiny_model_dir(family), use_dora=True)
    magnitudes = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_magnitude_vector" in n}
    assert magnitudes
    one_train_step(model, tokenizer)
    assert all(not torch.equal(p, magnitudes[n]) for n, p in model.named_parameters() if n in magnitudes)
    reloaded = assert_reload_reproduces(model, tokenizer, tmp_path / "adapter")
    assert reloaded.peft_config["default"].use_dora


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_rslora_scales_by_alpha_over_sqrt_r_and_reloads(family, tiny_model_dir, tmp_path):
    from peft.tuners.lora import LoraLayer

    model, tokenizer, _ = build(tiny_model_dir(family), use_rslora=True)
    scalings = {m.scaling["default"] for m in model.modules() if isinstance(m, LoraLayer)}
    assert scalings == {8 / 4 ** 0.5}  # alpha 8, r 4: 4.0, where plain LoRA gives alpha / r = 2.0
    one_train_step(model, tokenizer)
    reloaded = assert_reload_reproduces(model, tokenizer, tmp_path / "adapter")
    assert reloaded.peft_config["default"].use_rslora


def test_training_every_bias_too_finishes_reloads_and_resumes(tiny_model_dir, tiny_csv, tmp_path):
    """``--lora_bias all``: PEFT saves the head's bias twice (once under its wrapper's inner name) and the
    frozen original head's bias; the loop's own reloads (the best adapter at the end, a checkpoint on resume)
    must take such a file as plain PEFT does, and the saved adapter must predict what the run reported."""
    from conftest import reloaded_confusion_matrix, tiny_args

    flags = tiny_args(tiny_model_dir("bert"), tiny_csv, tmp_path / "run", "--lora_bias", "all", "--num_epochs", "2")
    assert train_loop.main(flags) == 0
    reported = json.loads((tmp_path / "run" / "metrics.json").read_text())["final"]["confusion_matrix"]
    assert reloaded_confusion_matrix(flags, tmp_path / "run") == reported
    resumed = tiny_args(tiny_model_dir("bert"), tiny_csv, tmp_path / "resumed", "--lora_bias", "all", "--num_epochs", "2",
                        "--resume_from_checkpoint", str(sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[0]))
    assert train_loop.main(resumed) == 0
    assert json.loads((tmp_path / "resumed" / "metrics.json").read_text())["final"]["confusion_matrix"] == reported


# --- QLoRA ------------------------------------------------------------------------------------


def test_4bit_without_cuda_says_what_is_missing(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = r"needs a CUDA GPU and this machine has none.*drop --load_in_4bit"
    with pytest.raises(lora_setup.ModelSetupError, match=message):
        lora_setup.load_base_model(tiny_model_dir("bert"), LABELS, 0, load_in_4bit=True)


def test_4bit_without_bitsandbytes_says_how_to_install_it(tiny_model_dir, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "bitsandbytes" else find_spec(name, *args))
    with pytest.raises(lora_setup.ModelSetupError, match=r"needs the bitsandbytes package.*pip install bitsandbytes"):
        lora_setup.load_base_model(tiny_model_dir("bert"), LABELS, 0, load_in_4bit=True)


def test_4bit_options_are_nf4_double_quant_bf16_and_keep_heads_trainable():
    options = lora_setup.quantization_options()
    config = options["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert set(config.llm_int8_skip_modules) >= {head for heads in HEADS.values() for head in heads}
