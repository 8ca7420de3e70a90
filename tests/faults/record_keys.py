"""`flip-train` that also appends each step's sample keys to RUN_DIR/keys_rank<r>.jsonl (the chaos
test checks with them that every sample of every epoch was trained on exactly once)."""

import json
import os
import sys
from pathlib import Path

from flip_scale import train


def main() -> int:
    argv = sys.argv[1:]
    run_dir = Path(argv[argv.index("--run-dir") + 1])
    rank = os.environ.get("RANK", "0")
    original = train.Trainer.train_step

    def train_step(self, batch):
        out = original(self, batch)
        with open(run_dir / f"keys_rank{rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": self.state.step + 1, "keys": batch["keys"]}) + "\n")
        return out

    train.Trainer.train_step = train_step
    return train.main(argv)


if __name__ == "__main__":
    sys.exit(main())
