"""Trainable/total parameter counts under QLoRA: bitsandbytes stores a 4-bit weight two entries per byte in
a flat uint8 tensor, so its ``numel()`` is half the weight's real size. bitsandbytes has no CPU path, so a
stand-in parameter with the same packed storage and ``quant_state.shape`` plays the 4-bit weight here."""

from types import SimpleNamespace

import torch

import lora_setup
import train_loop


def pack_like_4bit(linear: torch.nn.Linear) -> None:
    """Replace a Linear's weight by what bitsandbytes' Params4bit holds after quantization."""
    shape = linear.weight.shape
    packed = torch.nn.Parameter(torch.zeros(shape.numel() // 2, 1, dtype=torch.uint8), requires_grad=False)
    packed.quant_state = SimpleNamespace(shape=shape)  # bitsandbytes keeps the real shape here
    linear.weight = packed


def test_4bit_weights_count_their_real_entries_not_their_packed_bytes(tiny_model_dir):
    model_dir = tiny_model_dir("bert")
    cfg = train_loop.TrainConfig(model=model_dir, lora_r=4, lora_alpha=8)
    tokenizer = lora_setup.load_tokenizer(model_dir)
    model, _ = train_loop.build_model(cfg, ["neg", "pos"], tokenizer.pad_token_id)
    before = lora_setup.count_parameters(model)
    for layer in [m.base_layer for m in model.modules() if isinstance(getattr(m, "base_layer", None), torch.nn.Linear)]:
        pack_like_4bit(layer)  # the frozen base under each LoRA layer, as QLoRA quantizes it
    stored = sum(p.numel() for p in model.parameters())
    assert stored < before[1]  # the packed storage is smaller than the model ...
    assert lora_setup.count_parameters(model) == before  # ... but the counts are those of the real weights
