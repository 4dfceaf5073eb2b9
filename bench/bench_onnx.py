"""CPU latency of the merged classifier: PyTorch vs ONNX Runtime, batch 1 and 32 (docs/user_paths.md).

    python bench/bench_onnx.py --adapter_dir outputs/run        # a trained run
    python bench/bench_onnx.py                                  # a fresh MiniLM adapter (see below)

Without --adapter_dir a new LoRA adapter is put on the embedded MiniLM and saved to a temporary folder:
latency depends on the merged graph's shapes, not on the trained values, so an untrained adapter times
the same as a trained one. Both runtimes get the same thread count and the same real review texts
(Rotten Tomatoes, padded to the longest of each batch); the figure is the median of --repeats calls
after --warmup calls. Prints a markdown table, and the largest logit difference between the two.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import data  # noqa: E402
import export_onnx  # noqa: E402
import lora_setup  # noqa: E402
import reporting  # noqa: E402
import train_loop  # noqa: E402


def fresh_adapter(folder: Path, model: str = "embedded:minilm") -> Path:
    """A LoRA adapter on ``model`` with train_loop.py's default settings, saved as a training run saves it."""
    tokenizer = lora_setup.load_tokenizer(model)
    peft_model, _ = train_loop.build_model(train_loop.TrainConfig(model=model), data.EMBEDDED_LABEL_NAMES,
                                           tokenizer.pad_token_id)
    lora_setup.save_adapter(peft_model, tokenizer, folder)
    return folder


def median_ms(call, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter_dir", help="a training run's output dir (default: a fresh MiniLM adapter)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for both runtimes")
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    import onnxruntime

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_onnx_"))
    adapter_dir = Path(args.adapter_dir) if args.adapter_dir else fresh_adapter(work / "adapter")
    onnx_path = export_onnx.export_adapter(adapter_dir, work / "onnx" / "model.onnx")
    model, tokenizer = lora_setup.load_adapter(adapter_dir)
    model = model.merge_and_unload().eval()  # the fair comparison: the same merged weights in both
    texts = data.load_splits("embedded:rotten_tomatoes").eval["text"][:32]
    batches = {size: tokenizer(texts[:size], truncation=True, max_length=args.max_length, padding=True,
                               return_tensors="pt") for size in (1, 32)}

    # PyTorch first, before any ONNX Runtime session exists: ORT's worker threads spin-wait after each
    # call and would steal the cores from whatever runs next.
    torch_ms, torch_logits = {}, {}
    with torch.inference_mode():
        for size, encoded in batches.items():
            def torch_call():
                return model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits
            torch_ms[size], torch_logits[size] = median_ms(torch_call, args.warmup, args.repeats), torch_call()

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    rows, worst = [], 0.0
    for size, encoded in batches.items():
        feeds = {name: encoded[name].numpy() for name in export_onnx.INPUT_NAMES}
        onnx_ms = median_ms(lambda: session.run(["logits"], feeds), args.warmup, args.repeats)
        worst = max(worst, float((torch_logits[size] - torch.from_numpy(session.run(["logits"], feeds)[0])).abs().max()))
        rows.append([size, encoded["input_ids"].shape[1], f"{torch_ms[size]:.1f}", f"{onnx_ms:.1f}",
                     f"{torch_ms[size] / onnx_ms:.2f}x"])
    print(reporting.markdown_table(["batch", "tokens (padded)", "PyTorch ms", "ONNX Runtime ms", "speed-up"], rows))
    print(f"\n{args.threads} thread(s), torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; "
          f"largest logit difference {worst:.2e}; adapter {adapter_dir}")


if __name__ == "__main__":
    main()
