"""``torchrun ... tests/ddp_launch.py train ...``: the attnreid CLI with a write audit per rank.

``ATTNREID_AUDIT`` names a folder (outside the run folder) that receives ``writesN.txt``:
everything rank N created, wrote, renamed or deleted under ``ATTNREID_AUDIT_WATCH``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ddp_helpers import install_write_audit  # noqa: E402

install_write_audit([os.environ["ATTNREID_AUDIT_WATCH"]],
                    os.path.join(os.environ["ATTNREID_AUDIT"], f"writes{os.environ.get('RANK', '0')}.txt"))

from attnreid.cli import main  # noqa: E402

main(sys.argv[1:])
