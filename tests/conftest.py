import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402


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
