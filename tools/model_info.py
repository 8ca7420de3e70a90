#!/usr/bin/env python
"""Parameters, forward GFLOPs per sample and visible tokens of a recipe's FLIP model.

    python tools/model_info.py --config configs/flip_l16.yaml model.mask_ratio=0.75 --json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flip_scale.models.info import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
