#!/usr/bin/env python
"""Command-line wrapper of `flip_scale.data.tokenizer.main`; run with --help for the options."""

import sys
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flip_scale.data.tokenizer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
