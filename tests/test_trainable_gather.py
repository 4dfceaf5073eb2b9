"""Checkpoints and best-adapter saves gather only what trains (LoRA matrices and the head), never the
frozen base: under FSDP and ZeRO-3 the gather is an all-gather, and of the whole model it would cost a
full copy of the base at every save for weights that are never written."""

import pytest
import torch
from accelerate import Accelerator
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

import checkpointing
import lora_setup
import train_loop


@pytest.fixture
def prepared(tiny_model_dir):
    model_dir = tiny_model_dir("bert")
    cfg = train_loop.TrainConfig(model=model_dir, lora_r=4, lora_alpha=8)
    tokenizer = lora_setup.load_tokenizer(model_dir)
    model, _ = train_loop.build_model(cfg, ["neg", "pos"], tokenizer.pad_token_id)
    accelerator = Accelerator(cpu=True)
    optimizer = train_loop.build_optimizer(model, 1e-3, 0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = train_loop.build_scheduler(optimizer, "constant", 0, 10)
    with torch.no_grad():  # LoRA's B starts at zero: make the adapter tell apart from a fresh one
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    return accelerator, model, optimizer, scheduler, tokenizer, trainable


def handed_over(monkeypatch) -> list[dict]:
    """Every state dict the savers hand to the adapter writers (what was gathered)."""
    seen = []
    to_adapter, save_adapter = checkpointing.adapter_weights, lora_setup.save_adapter
    monkeypatch.setattr(checkpointing, "adapter_weights",
                        lambda accelerator, model, state: seen.append(state) or to_adapter(accelerator, model, state))
    monkeypatch.setattr(lora_setup, "save_adapter",
                        lambda model, tokenizer, folder, state_dict=None: seen.append(state_dict)
                        or save_adapter(model, tokenizer, folder, state_dict=state_dict))
    return seen


def test_checkpoint_and_adapter_saves_gather_only_the_trainable_tensors(prepared, tmp_path, monkeypatch):
    accelerator, model, optimizer, scheduler, tokenizer, trainable = prepared
    seen = handed_over(monkeypatch)
    checkpoint, _ = checkpointing.save_checkpoint(accelerator, model, optimizer, scheduler, checkpointing.TrainState(),
                                                  tmp_path / "checkpoints")
    checkpointing.save_adapter(accelerator, model, tokenizer, tmp_path / "best")  # what BestAdapter.update calls
    assert len(seen) == 2
    total = sum(p.numel() for p in model.parameters())
    for state in seen:
        assert set(state) == set(trainable)  # no frozen base weight, no buffer
        assert sum(t.numel() for t in state.values()) == sum(trainable.values()) < total / 4

    # And what is written is the adapter PEFT itself would save.
    expected = get_peft_model_state_dict(model)
    for folder in (checkpoint, tmp_path / "best"):
        saved = load_file(folder / "adapter_model.safetensors")
        assert saved.keys() == expected.keys()
        assert all(torch.equal(saved[k], expected[k]) for k in expected)


def test_saves_never_ask_the_hub_about_the_base_models_vocabulary(prepared, tmp_path, monkeypatch):
    """PEFT's default (``save_embedding_layers="auto"``) looks the base model's config up on the Hub at every
    save when the base is named by a Hub id, as the embedded default is: a network request per checkpoint
    online, a warning per checkpoint offline. LoRA never adapts the embeddings here, so no save asks."""
    import peft.utils.save_and_load as peft_saving

    accelerator, model, optimizer, scheduler, tokenizer, _ = prepared
    peft = checkpointing.peft_model(accelerator, model)
    peft.peft_config[peft.active_adapter].base_model_name_or_path = "sentence-transformers/all-MiniLM-L6-v2"
    asked = []
    monkeypatch.setattr(peft_saving, "check_file_exists_on_hf_hub", lambda *args, **kwargs: asked.append(args))
    checkpointing.save_checkpoint(accelerator, model, optimizer, scheduler, checkpointing.TrainState(),
                                  tmp_path / "checkpoints")
    checkpointing.save_adapter(accelerator, model, tokenizer, tmp_path / "adapter")
    assert asked == []
