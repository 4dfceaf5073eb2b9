"""Run ``train_loop.main`` under Accelerate's own FSDP2 path on CPU processes, for tests/test_fsdp2_accelerate_cpu.py.

Usage: accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 \
           tests/fsdp_on_cpu_worker.py TRAIN_LOOP_FLAGS...

Accelerate honours an FSDP plugin only when its processes are of an accelerator type (MULTI_GPU and the
like); on CPU it silently runs plain DDP over gloo. This worker forms the CPU process group as usual and
then labels it MULTI_GPU, which is the one thing it changes: from there on Accelerate's FSDP2 code runs
unmodified (fully_shard over a CPU mesh, its optimizer rewiring, get_state_dict), and so does ours
(shard_blocks_not_embeddings, evaluation, sharded checkpoints, the gathered adapter). Without
ACCELERATE_USE_FSDP in the environment (a plain --multi_gpu launch) nothing is relabelled: DDP.

It prints one line, ``parameters: <types>``, after setup, so the test can see the model was sharded.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from accelerate.state import PartialState  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

state = PartialState(cpu=True)
if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
    state.distributed_type = DistributedType.MULTI_GPU  # shared state: every later Accelerator sees it

import train_loop  # noqa: E402

_setup = train_loop.setup


def setup_and_report(*args, **kwargs):
    run = _setup(*args, **kwargs)
    run.accelerator.print("parameters:", sorted({type(p).__name__ for p in run.model.parameters()}))
    return run


train_loop.setup = setup_and_report
sys.exit(train_loop.main(sys.argv[1:]))
