"""Where the benchmarks find the real Market-1501: ``$ATTNREID_DATA``, default the repository's ``data/``.

The folder holds ``Market-1501-v15.09.15.zip`` (read in place) or the unpacked folder.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("ATTNREID_DATA") or REPO / "data")
MARKET_ZIP = DATA_ROOT / "Market-1501-v15.09.15.zip"
