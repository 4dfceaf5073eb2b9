"""Worker for tests/test_fsdp2_cpu.py, started by ``torchrun --nproc_per_node 2`` (gloo, CPU).

Every rank builds the same tiny PEFT-LoRA BERT (same seed), keeps an unsharded copy as the reference,
shards the other with FSDP2 (``fully_shard`` on each encoder layer, then the whole model) over a CPU
device mesh, and trains both for two SGD steps on the same global batch: the reference sees the whole
batch in one process, each FSDP2 rank its half. Rank 0 then writes what ``gather_adapter_state_dict``
returned next to the reference adapter, for the test to compare.

Usage: torchrun --nproc_per_node 2 tests/fsdp2_worker.py MODEL_DIR OUT_FILE
"""

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lora_setup  # noqa: E402


def gather_adapter_state_dict(model, is_main_process: bool, adapter_only: bool = True):
    """The trained adapter (LoRA + fully trained head weights) of a PEFT model, FULL tensors on CPU, on the
    main process; ``None`` on the others. EVERY process must call it: it all-gathers FSDP2 shards.

    ``get_model_state_dict(full_state_dict=True, cpu_offload=True)`` gathers every sharded tensor and
    keeps the result on rank 0 only (rank 1 gets an empty dict, on which PEFT's extraction raises
    KeyError: hence the main-process guard). ``ignore_frozen_params=True`` leaves the frozen base out of
    the gather, so only the adapter travels. Works as well on an unsharded or DDP-wrapped model.
    """
    from peft import get_peft_model_state_dict
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=adapter_only)
    full = get_model_state_dict(model, options=options)
    if not is_main_process:
        return None
    return {k: v.contiguous() for k, v in get_peft_model_state_dict(model, state_dict=full).items()}


def main(model_dir: str, out_file: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from peft import get_peft_model_state_dict

    from accelerate import Accelerator

    import eval as evaluation

    accelerator = Accelerator(cpu=True)  # joins the torchrun group over gloo, as train_loop.py would
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))

    tokenizer = lora_setup.load_tokenizer(model_dir)
    torch.manual_seed(0)  # same head init on every rank
    model, heads = lora_setup.load_base_model(model_dir, ["0", "1"], tokenizer.pad_token_id)
    model = lora_setup.apply_lora(model, lora_setup.build_lora_config(model, heads, r=4, alpha=8, dropout=0.0))
    reference = copy.deepcopy(model)
    for layer in model.base_model.model.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded_types = {type(p).__name__ for p in model.parameters()}

    generator = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(5, 20, (8, 10), generator=generator),
             "attention_mask": torch.ones(8, 10, dtype=torch.long),
             "labels": torch.tensor([0, 1] * 4)}
    mine = {k: v.chunk(world)[rank] for k, v in batch.items()}
    # The loop scores the untouched model first. This first forward of the sharded model makes FSDP2's
    # gather buffers, which training then reuses: under inference_mode that reuse fails.
    baseline = evaluation.evaluate(model, [mine], accelerator, ["0", "1"])  # leaves the model in train mode
    reference.train()
    # The optimizers are built after that forward on purpose: a parameter list taken while FSDP2 still held
    # the gathered copies would train copies that the next gather overwrites (evaluate reshards).
    types_after_baseline = {type(p).__name__ for p in model.parameters()}
    optimizers = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in (model, reference)]
    for _ in range(2):
        # FSDP2 averages gradients over ranks (like DDP): sum / global count x world = the global mean.
        logits = model(input_ids=mine["input_ids"], attention_mask=mine["attention_mask"]).logits
        (F.cross_entropy(logits, mine["labels"], reduction="sum") * world / len(batch["labels"])).backward()
        logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        F.cross_entropy(logits, batch["labels"]).backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()

    final = evaluation.evaluate(model, [mine], accelerator, ["0", "1"])
    lean = gather_adapter_state_dict(model, rank == 0)
    full = gather_adapter_state_dict(model, rank == 0, adapter_only=False)
    if rank == 0:
        expected = get_peft_model_state_dict(reference)
        report = {
            "sharded_parameter_types": sorted(sharded_types),
            "keys": sorted(lean), "expected_keys": sorted(expected), "full_keys": sorted(full),
            "shapes_match": all(tuple(lean[k].shape) == tuple(expected[k].shape) for k in expected if k in lean),
            "types_after_baseline": sorted(types_after_baseline),
            "max_diff": max((lean[k] - expected[k]).abs().max().item() for k in expected if k in lean),
            "max_diff_full_gather": max((full[k] - expected[k]).abs().max().item() for k in expected if k in full),
            "eval_counts": [sum(map(sum, m["confusion_matrix"])) for m in (baseline, final)],
            "lora_B_max_abs": max(v.abs().max().item() for k, v in lean.items() if "lora_B" in k),
        }
        Path(out_file).write_text(json.dumps(report))
    else:
        assert lean is None and full is None
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
