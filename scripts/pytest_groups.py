"""Run groups of pytest targets side by side (the GPU check's `gpu-tests` step).

    python scripts/pytest_groups.py OUT_DIR "GROUP" ["GROUP" ...]

Each GROUP is one pytest command line's targets and options (split as a shell would: quotes work).
Group i writes its JUnit XML to OUT_DIR/gpu_tests_<i>.xml and its output to OUT_DIR/logs/gpu-tests-<i>.log;
the logs are printed one after the other once all groups have ended. Exits 1 if any group failed.

Why side by side: the slow GPU tests (an FSDP2 launch, a DeepSpeed ZeRO-3 launch, torch.compile) spend
their minute starting processes, importing and compiling on the CPU, while the GPU idles; on a 16-core
machine three of them together take about as long as the slowest one, not the sum. Each group gets its
own pytest --basetemp inside a fresh temporary folder made here (pytest empties its basetemp first, so
it must never be a folder of anyone else's), and no pytest process tidies away another one's files.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def run_groups(out_dir: Path, groups: list[str], python: str = sys.executable) -> int:
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="pytest_groups_"))
    try:
        running = []
        for i, group in enumerate(groups):
            log = out_dir / "logs" / f"gpu-tests-{i}.log"
            command = [python, "-m", "pytest", "-q", "-ra", *shlex.split(group),
                       "--junitxml", str(out_dir / f"gpu_tests_{i}.xml"), "--basetemp", str(scratch / str(i))]
            with log.open("w") as sink:
                running.append((group, log, subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)))
        failed = 0
        for group, log, process in running:
            code = process.wait()
            failed += code != 0
            print(f"--- {group}: exit {code}\n{log.read_text()}", flush=True)
        return 1 if failed else 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # made above, by this function


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    sys.exit(run_groups(Path(sys.argv[1]), sys.argv[2:]))
