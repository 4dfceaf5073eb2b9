"""Performance tricks that change no result's meaning, each kept only while it pays (measured in the README).

FastDropout: on CPU, PyTorch's dropout draws one random number per element (``aten::bernoulli_``), a third
of a MiniLM training step under the profiler. A mask needs far fewer random bits: 16 bits per element set
p to within 1/65536, and one 64-bit draw from ``torch.randint`` yields four of them. Round-robin on an
idle machine (``bench/bench_speed.py --arms a e --repeats 3``) it made training about 1.2x faster; on a
GPU the fused dropout kernel is already cheap and nothing is swapped. ``train_loop.setup`` applies it, in
this one place (``--no-fast_dropout`` turns it off).
"""

from __future__ import annotations

import torch


class FastDropout(torch.nn.Dropout):
    """``nn.Dropout`` whose mask costs 16 random bits per element; about 3x cheaper on CPU.

    Same contract: in training each element is zeroed with probability p and the rest are scaled so the
    expected output equals the input; in eval it is the identity. p is rounded to a multiple of 1/65536
    (0.1 becomes 0.100006) and the scale uses the rounded value, so the expectation stays exact. The bits
    come from torch's default generator: ``set_seed`` and the RNG states in checkpoints cover them.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p == 1:
            return x * 0
        drop_below = round(self.p * 65536)  # how many of the 65536 equally likely 16-bit values drop
        words = torch.randint(-2**63, 2**63 - 1, ((x.numel() + 3) // 4,), dtype=torch.int64, device=x.device)
        bits = words.view(torch.int16)[: x.numel()].view(x.shape)  # uniform on -32768 .. 32767
        keep = bits >= drop_below - 32768
        # where() keeps only the 1-byte mask for the backward pass, as PyTorch's own dropout does.
        return torch.where(keep, x * (65536 / (65536 - drop_below)), 0.0)


def use_fast_dropout(model, device: torch.device) -> int:
    """On CPU, turn every ``nn.Dropout`` of ``model`` (the model's own and LoRA's) into a
    ``FastDropout`` with the same p; returns how many. Elsewhere leaves the model alone and returns 0.

    The attention-probability dropout runs inside ``scaled_dot_product_attention`` and keeps
    PyTorch's kernel. Re-classing in place keeps each module's p and position in the model, and
    dropout has no weights, so saved adapters are unchanged.
    """
    if torch.device(device).type != "cpu":
        return 0
    swapped = 0
    for module in model.modules():
        if type(module) is torch.nn.Dropout:  # exactly nn.Dropout: subclasses may do more
            module.__class__ = FastDropout
            swapped += 1
    return swapped
