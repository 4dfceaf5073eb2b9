"""Run groups of pytest targets side by side (the GPU check's `gpu-tests` step).

    python scripts/pytest_groups.py OUT_DIR TMP_DIR "GROUP" ["GROUP" ...]

Each GROUP is one pytest command line's targets and options (split as a shell would: quotes work). Group i writes its JUnit
XML to OUT_DIR/gpu_tests_<i>.xml and its output to OUT_DIR/logs/gpu-tests-<i>.log; the logs are printed
one after the other once all groups have ended. Exits 1 if any group failed.

Why side by side: the slow GPU tests (an FSDP2 launch, a DeepSpeed ZeRO-3 launch, torch.compile) spend
their minute starting processes, importing and compiling on the CPU, while the GPU idles; on a 16-core
machine three of them together take about as long as the slowest one, not the sum. Each group gets its
own --basetemp, TMP_DIR/<i> (pytest empties it first: give a folder of scratch space), so that no pytest
process tidies away another one's temporary folders.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path


def run_groups(out_dir: Path, tmp_dir: Path, groups: list[str], python: str = sys.executable) -> int:
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    running = []
    for i, group in enumerate(groups):
        log = out_dir / "logs" / f"gpu-tests-{i}.log"
        command = [python, "-m", "pytest", "-q", "-ra", *shlex.split(group), "--junitxml", str(out_dir / f"gpu_tests_{i}.xml"),
                   "--basetemp", str(tmp_dir / str(i))]
        with log.open("w") as sink:
            running.append((group, log, subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)))
    failed = 0
    for group, log, process in running:
        code = process.wait()
        failed += code != 0
        print(f"--- {group}: exit {code}\n{log.read_text()}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    sys.exit(run_groups(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]))
