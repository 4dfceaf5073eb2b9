"""Export a trained run as one ONNX file, to serve the classifier without PyTorch or PEFT.

    python eval.py --adapter_dir outputs/run --export onnx outputs/run/onnx/model.onnx

The adapter is reloaded on its full-precision base and merged into it (``W + (alpha/r) B A`` becomes
``W``): the ONNX graph is then a plain transformer classifier, as fast as the base model, with inputs
``input_ids`` and ``attention_mask`` (int64, shape batch x sequence, both axes dynamic) and output
``logits`` (float32, batch x classes). The run's class names travel three ways: ``config.json`` and the
tokenizer beside the ONNX file (what transformers and Optimum read), and ``id2label`` in the ONNX file's
own metadata (``label_names`` reads it back), so a server holding only the .onnx file still answers
``positive`` rather than ``LABEL_1``.

Needs ``onnxruntime`` and ``onnxscript`` (requirements-extras.txt): torch's exporter writes the graph
through onnxscript.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

import lora_setup

OPSET = 18
INPUT_NAMES = ("input_ids", "attention_mask")


class _LogitsOnly(torch.nn.Module):
    """The classifier as a function of (input_ids, attention_mask) -> logits: ONNX graphs take and give
    plain tensors, not the ``ModelOutput`` objects transformers returns."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def export_model(model, tokenizer, output_path: str | Path) -> Path:
    """Merge the LoRA ``model`` (a PeftModel) and write it to ``output_path`` (.onnx), with config.json
    and the tokenizer beside it. Refuses a 4-bit base, as merging does. The model is merged in place."""
    lora_setup.check_mergeable(model, "export")
    if importlib.util.find_spec("onnxscript") is None:  # torch's exporter writes the graph through it
        raise lora_setup.ModelSetupError("ONNX export needs the onnxscript package (and onnxruntime to run the "
                                         "result): pip install -r requirements-extras.txt")
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    merged = model.merge_and_unload().float().eval()
    example = tokenizer(["an example review", "and a second, longer example review"], padding=True,
                        return_tensors="pt")
    inputs = tuple(example[name] for name in INPUT_NAMES)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    program = torch.onnx.export(
        _LogitsOnly(merged).eval(), inputs, input_names=list(INPUT_NAMES), output_names=["logits"], opset_version=OPSET,
        dynamic_shapes={name: {0: batch, 1: sequence} for name in INPUT_NAMES}, dynamo=True, verbose=False)
    program.model.metadata_props["id2label"] = json.dumps({str(i): n for i, n in merged.config.id2label.items()})
    program.save(str(output_path))  # one file: the MiniLM weights (91 MB) fit under protobuf's 2 GB limit
    merged.config.save_pretrained(output_path.parent)
    tokenizer.save_pretrained(output_path.parent)
    return output_path


def export_adapter(adapter_dir: str | Path, output_path: str | Path) -> Path:
    """Reload a saved run's adapter (on its full-precision base, with the run's class names) and export it."""
    model, tokenizer = lora_setup.load_adapter(adapter_dir)
    return export_model(model, tokenizer, output_path)


def label_names(onnx_path: str | Path) -> list[str]:
    """The class names stored in an exported file, in class-id order."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    id2label = json.loads(props["id2label"])
    return [id2label[str(i)] for i in range(len(id2label))]
