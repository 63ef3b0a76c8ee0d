import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402

# Files whose float results depend on the CPU's kernels (matmuls, convolutions, reductions):
# `python -m pytest -m numerics` runs them, and .ci/run runs them again on older CPUs' kernel
# paths (docs/testing.md).
NUMERICS_FILES = {
    "test_backbones.py", "test_deploy.py", "test_deploy_export.py", "test_evaluation_onepass.py",
    "test_evaluation_properties.py",
    "test_evaluation_rank.py", "test_evaluation_rerank.py", "test_hacnn.py", "test_losses.py",
    "test_mhsanet.py", "test_paper_mutations.py", "test_precision.py", "test_onnx_contract.py",
}
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in NUMERICS_FILES:
            item.add_marker(pytest.mark.numerics)


def pytest_report_header(config):
    """Which kernels the floats come from: a failure on one CPU but not another starts here."""
    import torch

    env = " ".join(f"{k}={os.environ[k]}" for k in KERNEL_ENV if k in os.environ) or "none"
    return (f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
            f"{torch.get_num_threads()} threads; kernel-path variables: {env}")


def _single_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny models gain nothing from more, and on a shared
    2-core machine OpenMP threads waiting for a busy core make each small op many times slower."""
    yield from _single_thread()


@pytest.fixture(scope="module")
def one_thread_module():
    """:func:`one_thread` for a whole module (``pytestmark = pytest.mark.usefixtures("one_thread_module")``),
    so its module-scoped fixtures run on one thread too."""
    yield from _single_thread()


@pytest.fixture
def fresh_announcements(monkeypatch):
    """The inference backend's once-per-process announcements forgotten, so a test sees its own."""
    from attnreid.inference import backend

    monkeypatch.setattr(backend, "_announced", set())


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A data root holding a small synthetic set in the Market layout (10 ids x 8 images, 3 cameras, 64x32).

    ``build_dataset("market1501", synthetic_root)`` reads it (the set is in ``<root>/market1501``).
    """
    from attnreid.data.datasets.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("synthetic_root")
    generate_synthetic(root, num_ids=10, images_per_id=8, num_cameras=3, height=64, width=32,
                       occluded_query_share=1.0, seed=0)
    return root
