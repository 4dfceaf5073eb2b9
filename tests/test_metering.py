"""MFU's two halves, checked by hand: the FLOPs a LoRA training step needs per token, and the card's peak."""

import pytest

import lora_setup
import metering
import train_loop


def tiny_lora_bert(tiny_model_dir):
    """The tiny BERT of conftest (hidden 16, 2 layers, 2 heads, intermediate 32) with LoRA r=4 on its
    default targets (query, key, value, and every layer named dense)."""
    model_dir = tiny_model_dir("bert")
    cfg = train_loop.TrainConfig(model=model_dir, lora_r=4, lora_alpha=8)
    tokenizer = lora_setup.load_tokenizer(model_dir)
    return train_loop.build_model(cfg, ["neg", "pos"], tokenizer.pad_token_id)[0]


def test_matmul_counts_of_a_tiny_lora_bert_match_a_hand_count(tiny_model_dir):
    counts = metering.matmul_counts(tiny_lora_bert(tiny_model_dir))
    # Per layer, frozen: query, key, value, attention output 4 x 16x16 = 1024; intermediate 16x32 = 512;
    # output 32x16 = 512. Embeddings (lookups), pooler and classifier (once per text) are not counted.
    frozen_per_layer = 4 * 16 * 16 + 16 * 32 + 32 * 16
    # LoRA r=4, A (in x 4) + B (4 x out): the four 16->16 layers 4 x (64 + 64); intermediate 16->32:
    # 64 + 128; output 32->16: 128 + 64.
    lora_per_layer = 4 * (16 * 4 + 4 * 16) + (16 * 4 + 4 * 32) + (32 * 4 + 4 * 16)
    assert counts == metering.MatmulCounts(frozen=2 * frozen_per_layer, trainable=2 * lora_per_layer,
                                           layers=2, attention_width=16)
    assert (counts.frozen, counts.trainable) == (4096, 1792)


def test_training_flops_per_token_of_the_tiny_lora_bert_by_hand():
    counts = metering.MatmulCounts(frozen=4096, trainable=1792, layers=2, attention_width=16)
    seq_len, layers = 32, 2
    attention = layers * 2 * (2 * seq_len * 16)  # per layer Q K^T and scores x V, 2 x seq_len x width each
    forward = 2 * 4096 + 2 * 1792 + attention  # 11,776 for the weights + 4,096
    backward_inputs = 2 * 4096 + 2 * 1792 + 2 * attention  # attention: both operands get a gradient
    backward_weights = 2 * 1792  # the frozen base's weight gradients are never computed
    assert forward + backward_inputs + backward_weights == 39_424
    assert metering.training_flops_per_token(counts, seq_len) == 39_424
    # The usual 6N rule on the same weights would claim 6 x 5888 = 35,328 and no attention at all.
    assert metering.training_flops_per_token(counts, 0) == 4 * 4096 + 6 * 1792


def test_a_4bit_packed_weight_counts_its_real_entries(tiny_model_dir):
    """A QLoRA layer stores two 4-bit entries per byte: its FLOPs are those of the full in x out matmul."""
    import torch

    model = tiny_lora_bert(tiny_model_dir)
    before = metering.matmul_counts(model)
    layer = model.base_model.model.bert.encoder.layer[0].intermediate.dense.base_layer
    packed = torch.zeros(layer.in_features * layer.out_features // 2, 1, dtype=torch.uint8)
    layer.weight = torch.nn.Parameter(packed, requires_grad=False)
    assert metering.matmul_counts(model) == before


@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.5e12), ("NVIDIA H100 80GB HBM3", "tf32", 494.5e12),
    ("NVIDIA H100 80GB HBM3", "fp32", 67e12), ("NVIDIA H100 PCIe", "bf16", 756.5e12),
    ("NVIDIA H100 NVL", "fp16", 835.5e12), ("NVIDIA H200", "bf16", 989.5e12), ("NVIDIA H200 NVL", "bf16", 835.5e12),
    ("NVIDIA A100-SXM4-40GB", "bf16", 312e12), ("NVIDIA A100 80GB PCIe", "tf32", 156e12),
    ("NVIDIA L4", "bf16", 121e12), ("NVIDIA L40", "bf16", 181.05e12), ("NVIDIA L40S", "bf16", 362.05e12),
    ("NVIDIA L40S", "fp32", 91.6e12),
    # A name not known exactly gives no peak (no MFU) rather than a neighbour's: a PCIe card is not an SXM.
    ("NVIDIA H100", "bf16", None), ("NVIDIA H100 PCIe-X", "bf16", None), ("Tesla T4", "fp16", None), ("", "bf16", None),
])
def test_peak_flops_by_exact_card_name_and_precision(name, precision, peak):
    assert metering.peak_flops(name, precision) == peak


def test_the_precision_a_run_computes_in():
    assert metering.matmul_precision("bf16", allow_tf32=False) == "bf16"
    assert metering.matmul_precision("fp16", allow_tf32=True) == "fp16"
    assert metering.matmul_precision("no", allow_tf32=True) == "tf32"
    assert metering.matmul_precision("no", allow_tf32=False) == "fp32"


def test_mfu_is_achieved_flops_over_the_peak():
    assert metering.model_flops_utilisation(2e12, 4.0, 1e12) == 0.5
    assert metering.model_flops_utilisation(2e12, 4.0, None) is None


def test_the_bert_base_shaped_bench_model_counts_as_the_docs_say():
    """docs/gpu_at_scale.md's figures for the bench's BERT-base shape with the default LoRA (r=16 on every
    projection), built on the meta device (no memory, no time)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from bench.bench_speed import MODEL_SHAPES

    with torch.device("meta"):
        model = BertForSequenceClassification(BertConfig(vocab_size=30522, max_position_embeddings=512,
                                                         **MODEL_SHAPES["bert-base"]))
    model = lora_setup.apply_lora(model, lora_setup.build_lora_config(model, ["classifier"], r=16, alpha=32, dropout=0.1))
    counts = metering.matmul_counts(model)
    per_layer = 4 * 768 * 768 + 2 * 768 * 3072  # query, key, value, output; intermediate, output
    lora_per_layer = 4 * (768 * 16 + 16 * 768) + 2 * (768 * 16 + 16 * 3072)
    assert counts == metering.MatmulCounts(12 * per_layer, 12 * lora_per_layer, 12, 768)
    assert (round(counts.frozen / 1e6, 1), round(counts.trainable / 1e6, 2)) == (84.9, 2.65)
    assert round(metering.training_flops_per_token(counts, 512) / 1e6) == 412
    total = lora_setup.count_parameters(model)[1]
    assert (round(total / 1e6, 1), round(6 * total / 1e6)) == (112.2, 673)  # the 6N rule, for comparison


def test_the_formula_counts_the_matmuls_pytorch_runs(tiny_model_dir):
    """torch's FlopCounterMode over one forward + backward of the tiny LoRA BERT on one text of 32 tokens:
    its matmul FLOPs (mm, addmm) are the formula's weight terms, exactly, once two known differences are
    accounted for. (Attention runs in fused scaled_dot_product_attention, which it does not count on CPU.)"""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_lora_bert(tiny_model_dir)
    counts = metering.matmul_counts(model)
    ids = torch.randint(5, 20, (1, 32))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.sum().backward()
    flops = counter.get_flop_counts()["Global"]
    measured = flops[torch.ops.aten.mm] + flops[torch.ops.aten.addmm]
    weights_only = 32 * metering.training_flops_per_token(counts, 0)  # the attention term set to zero
    # 1. The embeddings are frozen, so nothing needs the gradient of layer 0's input: autograd skips the
    #    input gradients of its query, key and value (base 16x16, LoRA A 16x4), 2 FLOPs a weight and token.
    skipped = 32 * 3 * 2 * (16 * 16 + 16 * 4)
    # 2. The pooler (16x16 with LoRA r=4) and the head (16x2) run once per text: forward 2 per weight,
    #    backward 2 for the input and, for what trains (LoRA, head), 2 for the weight.
    per_text = (2 * (256 + 128) + 2 * (256 + 128) + 2 * 128) + (2 * 32 + 2 * 32 + 2 * 32)
    assert measured == weights_only - skipped + per_text


def test_the_training_log_reports_mfu_from_the_real_tokens_and_their_texts_lengths(tiny_model_dir, monkeypatch):
    """ThroughputMeter's MFU on a (pretended) H100, two processes, bf16: the steps' real tokens, each step's
    mean text length for attention's term, the interval's seconds and twice the card's peak."""
    import time
    from types import SimpleNamespace

    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    accelerator = SimpleNamespace(device=torch.device("cuda"), mixed_precision="bf16", num_processes=2)
    meter = metering.ThroughputMeter(accelerator, tiny_lora_bert(tiny_model_dir))
    meter.add({"loss": 0.6, "samples": torch.tensor(4.0), "tokens": torch.tensor(128.0)})  # 4 texts of 32 tokens
    meter.add({"loss": 0.4, "samples": torch.tensor(2.0), "tokens": torch.tensor(32.0)})  # 2 texts of 16
    meter.started = time.perf_counter() - 2.0
    record, interval = meter.record(learning_rate=1e-3)
    flops = 128 * (4 * 4096 + 6 * 1792 + 12 * 2 * 32 * 16) + 32 * (4 * 4096 + 6 * 1792 + 12 * 2 * 16 * 16)
    assert record["train/mfu"] == pytest.approx(flops / interval["seconds"] / (2 * 989.5e12))
    assert interval["seconds"] == pytest.approx(2.0, abs=0.5) and record["train/peak_memory_gb"] == 3
    assert (interval["samples"], interval["tokens"]) == (6, 160) and record["train/loss"] == pytest.approx(0.5)


def test_a_model_whose_config_does_not_size_attention_logs_no_mfu_and_trains_on(monkeypatch):
    from types import SimpleNamespace

    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))  # no config at all
    with pytest.raises(ValueError, match="cannot size attention"):
        metering.matmul_counts(model)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 0)
    meter = metering.ThroughputMeter(SimpleNamespace(device=torch.device("cuda"), mixed_precision="bf16",
                                                     num_processes=1), model)
    meter.add({"loss": 0.5, "samples": torch.tensor(2.0), "tokens": torch.tensor(8.0)})
    assert "train/mfu" not in meter.record(1e-3)[0]
