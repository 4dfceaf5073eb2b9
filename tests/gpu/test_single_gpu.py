"""The single-GPU paths that CPU tests can only mock, run for real on one CUDA device: bf16 autocast with
fp32 LoRA weights, fused AdamW, loader workers with pinned memory, ``--compile``, the MFU and peak-memory
log, and QLoRA (4-bit base, adapter reloaded with plain PEFT).

Tiny models (tests/conftest.py) keep each test to seconds; scripts/gpu_check.sh runs the real jobs.
"""

import json

import pytest
import torch
from conftest import sentiment_rows, tiny_args

import data
import lora_setup
import metering
import train_loop


@pytest.fixture
def tiny_job(tiny_model_dir):
    """A tiny model's config, tokenizer and tokenized rows, as train() would set them up on a GPU."""
    import datasets

    model_dir = tiny_model_dir("bert")
    cfg = train_loop.TrainConfig(model=model_dir, lora_r=4, lora_alpha=8, lora_dropout=0.0)  # precision: auto
    tokenizer = lora_setup.load_tokenizer(model_dir)
    rows = sentiment_rows(64)
    tokenized = data.tokenize(datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows]}),
                              tokenizer, 32)
    return cfg, tokenizer, tokenized


def test_gpu_loader_collates_in_workers_into_pinned_memory_with_aligned_widths(tiny_job):
    cfg, tokenizer, tokenized = tiny_job
    options = data.loader_options(cfg.num_workers, True)
    assert options["num_workers"] == 2 and options["pin_memory"]
    loader = data.build_dataloader(tokenized, tokenizer.pad_token_id, 8, train=True, **options)
    for batch in loader:
        assert all(t.is_pinned() for t in batch.values())  # page-locked: the copy can run asynchronously
        assert batch["input_ids"].shape[1] % 8 == 0
        on_gpu = batch["input_ids"].to("cuda", non_blocking=True)
        assert torch.equal(on_gpu.cpu(), batch["input_ids"])


def test_bf16_autocast_keeps_lora_weights_fp32_and_fused_adamw_steps(tiny_job):
    cfg, tokenizer, tokenized = tiny_job
    accelerator = train_loop.build_accelerator(cfg)
    assert accelerator.mixed_precision == "bf16"  # "auto" on a GPU with bf16
    model, _ = train_loop.build_model(cfg, ["0", "1"], tokenizer.pad_token_id)
    optimizer = train_loop.build_optimizer(model, 1e-2, 0.0, fused=True)
    loader = data.build_dataloader(tokenized, tokenizer.pad_token_id, 8, train=True,
                                   **data.loader_options(cfg.num_workers, True))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    scheduler = train_loop.build_scheduler(optimizer, "constant", 0, 10)
    lora_layer = next(m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    seen = []
    hook = lora_layer.base_layer.register_forward_hook(lambda module, args, output: seen.append(output.dtype))

    batch = next(iter(loader))
    assert batch["input_ids"].is_cuda
    stats = train_loop.train_step(model, optimizer, scheduler, [batch], accelerator, max_grad_norm=1.0)
    hook.remove()

    assert seen == [torch.bfloat16]  # the frozen matmuls ran in bf16 under autocast
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 and p.is_cuda for p in trainable.values())  # LoRA + head stay fp32
    assert optimizer.optimizer.defaults["fused"] is True
    assert torch.isfinite(torch.tensor(stats["loss"])) and stats["samples"] == 8
    assert all(p.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)  # B starts at 0: it moved


def test_short_run_logs_bf16_mfu_and_peak_memory_with_fused_adamw(tiny_model_dir, tiny_csv, tmp_path, monkeypatch):
    fused = []
    build_optimizer = train_loop.build_optimizer
    monkeypatch.setattr(train_loop, "build_optimizer",
                        lambda *args, **kwargs: fused.append(kwargs.get("fused")) or build_optimizer(*args, **kwargs))
    out = tmp_path / "run"
    assert train_loop.main(tiny_args(tiny_model_dir("bert"), tiny_csv, out, "--max_steps", "4", "--log_every", "2")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mixed_precision"] == "bf16" and fused == [True]
    logs = [h for h in metrics["history"] if "train/loss" in h]
    assert [h["step"] for h in logs] == [2, 4]
    assert all(h["train/peak_memory_gb"] > 0 for h in logs)
    if metering.peak_flops(torch.cuda.get_device_name(), "bf16"):  # MFU needs the card's known peak
        assert all(0 < h["train/mfu"] < 1 for h in logs)


def test_compile_trains_a_compiled_model(tiny_model_dir, tiny_csv, tmp_path):
    import torch._dynamo

    torch._dynamo.reset()
    out = tmp_path / "run"
    args = tiny_args(tiny_model_dir("bert"), tiny_csv, out, "--compile", "--max_steps", "3", "--log_every", "1")
    assert train_loop.main(args) == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # dynamo did capture the model
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(torch.isfinite(torch.tensor(h["train/loss"])) for h in metrics["history"] if "train/loss" in h)


def test_qlora_base_is_4bit_and_the_adapter_reloads_with_plain_peft(tiny_model_dir, tiny_csv, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    model_dir = tiny_model_dir("bert")
    tokenizer = lora_setup.load_tokenizer(model_dir)
    model, heads = lora_setup.load_base_model(model_dir, ["0", "1"], tokenizer.pad_token_id, load_in_4bit=True)
    quantized = [name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert quantized and not any(name.startswith(tuple(heads)) for name in quantized)  # the head stays trainable
    del model

    out = tmp_path / "run"
    assert train_loop.main(tiny_args(model_dir, tiny_csv, out, "--load_in_4bit", "--max_steps", "4")) == 0
    reloaded, _ = lora_setup.load_adapter(out, "cuda")  # plain PEFT on the full-precision base
    saved = load_file(out / "adapter_model.safetensors")
    state = get_peft_model_state_dict(reloaded)
    assert saved.keys() == state.keys()
    assert all(torch.equal(saved[k].cpu(), state[k].cpu()) for k in saved)
