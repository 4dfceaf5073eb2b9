"""GPU-only tests (tests/gpu): run by scripts/gpu_check.sh on a CUDA machine, skipped on every other one.

This folder is a package (it has an __init__.py) so that this file does not replace tests/conftest.py
as the module `conftest`, which the tests import helpers from.

CI collects them too, so an import or fixture that breaks shows up there and not only on the rare GPU.
"""

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU here (tests/gpu runs in scripts/gpu_check.sh)")
    for item in items:
        if HERE in Path(item.fspath).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide state (precision, device, compile backend) from the first Accelerator;
    reset it after each test so the next one can build its own."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
