"""Shared test set-up: absl flags for grain workers, deterministic CPU JAX, tiny-model helpers."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from absl import flags  # noqa: E402

# grain's worker processes read absl flags; parse them once so they do not fail in tests.
flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded_global_rngs():
    """Every test starts from the same global RNG states, whatever ran before it in its process:
    PyTorch modules draw their initial weights from torch's global generator, and with pytest-xdist
    the tests that precede one differ from run to run (a parity test's error is a property of its
    weights; it must not change with the test order)."""
    np.random.seed(0)
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        torch.manual_seed(0)
        # The PyTorch references are tiny: with XLA's threads already spinning on the same cores,
        # torch's own pool made their forwards ~20x slower on 2-core machines.
        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)
    yield


# The heaviest files first. pytest-xdist's `--dist loadfile` hands files out in collection order; one
# of these collected last would leave the other worker idle for minutes at the end.
HEAVY_FIRST = ("test_train_step.py", "test_train.py", "test_readme.py", "test_shapes_models.py",
               "test_sampling_methods.py", "test_remat.py", "test_compile_check.py", "test_sample_cli.py",
               "test_flux.py", "test_unet.py", "test_sampling.py", "test_lora.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept
