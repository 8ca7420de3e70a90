#!/usr/bin/env python
"""Unmasked tuning of a FLIP checkpoint (mask ratio 0, fresh optimizer, the paper's tuning schedule).

    python tools/unmask_tune.py --help
    python tools/unmask_tune.py --from runs/tiny_mask75 --run-dir runs/tiny_mask75_unmask --report
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flip_scale.unmask import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
