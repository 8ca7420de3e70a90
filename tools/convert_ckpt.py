#!/usr/bin/env python
"""Convert flip_scale checkpoints: consolidate, to-openclip, from-openclip, inspect.

    python tools/convert_ckpt.py --help
    python tools/convert_ckpt.py consolidate runs/flip_l16/step_00010000 --out exports/l16
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flip_scale.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
