"""What a training checkpoint holds besides the engine's state, as CheckpointManager components.

    TrainState        the counters of the run (step, samples seen, bad samples, skipped steps)
    TrainerRecord     -> trainer_state.json: the counters, the lr schedule's position, the layout
                         it was written with and the model architecture (resume refuses another)
    DataPosition      -> data_rank{r}.json: each data-parallel rank's stream positions, merged on
                         load so that they continue under any layout (flip_scale/data/resume.py)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

log = logging.getLogger("flip_scale")


@dataclass
class TrainState:
    step: int = 0
    samples_seen: int = 0
    skipped_samples: int = 0
    # Skipped samples per kind (flip_scale.data.fields.SKIP_KINDS), over the run; they add up to
    # skipped_samples. `pending_skips`: this rank's since the last flush, not yet in the totals.
    skipped_by_kind: dict = field(default_factory=dict)
    pending_skips: dict = field(default_factory=dict)
    # A mixture's samples and bad samples per source over the run ("source_<name>_samples", "..._skipped").
    source_counts: dict = field(default_factory=dict)
    nonfinite_steps: int = 0  # skipped optimizer steps (non-finite gradient norm), over the run
    nonfinite_in_a_row: int = 0

    def note_skipped(self, kinds: dict) -> None:
        """A batch's skipped samples per kind (its "skipped_kinds"), kept until `flush_skipped`."""
        for kind, count in kinds.items():
            self.pending_skips[kind] = self.pending_skips.get(kind, 0) + int(count)

    def note_sources(self, samples: dict, skipped: dict) -> None:
        """A mixture batch's samples and bad samples per source, kept until `flush_skipped`."""
        for suffix, counts in (("_samples", samples), ("_skipped", skipped)):
            for name, count in counts.items():
                key = f"source:source_{name}{suffix}"
                self.pending_skips[key] = self.pending_skips.get(key, 0) + int(count)

    def flush_skipped(self, kinds: tuple, group, device, sources: tuple = ()) -> None:
        """Add every data-parallel rank's pending skips (and a mixture's per-source counts, keys
        `sources`: the configured names) to the totals (collective over `group`; None: this process
        alone). Called at every log step and before every save, so a checkpoint holds every sample
        skipped up to its step."""
        keys = [f"source_{name}{suffix}" for name in sources for suffix in ("_samples", "_skipped")]
        per_source = [self.pending_skips.pop("source:" + key, 0) for key in keys]
        counts = [self.pending_skips.get(kind, 0) for kind in kinds]
        counts.append(sum(n for kind, n in self.pending_skips.items()
                          if kind not in kinds and not kind.startswith("source:")))  # none expected
        if group is not None:
            import torch
            import torch.distributed as dist

            tensor = torch.tensor(counts + per_source, dtype=torch.int64, device=device)
            dist.all_reduce(tensor, group=group)
            values = tensor.tolist()
            counts, per_source = values[:len(counts)], values[len(counts):]
        for key, count in zip(keys, per_source):
            self.source_counts[key] = self.source_counts.get(key, 0) + int(count)
        for kind, count in zip(kinds, counts):
            if count:
                self.skipped_by_kind[kind] = self.skipped_by_kind.get(kind, 0) + int(count)
        self.skipped_samples += int(sum(counts))
        self.pending_skips = {}


class TrainerRecord:
    """trainer_state.json (CheckpointManager kind "json"; the manager adds "step")."""

    checkpoint_kind = "json"

    def __init__(self, state: TrainState, engine, world_size: int):
        self.state = state
        self.engine = engine
        self.world_size = world_size

    def state_dict(self) -> dict:
        dims, state = self.engine.dims, self.state
        return {
            "samples_seen": state.samples_seen, "skipped_samples": state.skipped_samples,
            "skipped_by_kind": dict(state.skipped_by_kind), "source_counts": dict(state.source_counts),
            "nonfinite_steps": state.nonfinite_steps, "nonfinite_in_a_row": state.nonfinite_in_a_row,
            "layout": dims.describe(), "world_size": self.world_size, "dp_size": dims.dp_size,
            "engine": self.engine.name,
            "model_arch": self.engine.arch.to_dict(),
            "scheduler": self.engine.schedule_state(),
        }

    def load_state_dict(self, saved: dict) -> None:
        self.state.step = saved["step"]
        self.state.samples_seen = saved.get("samples_seen", 0)
        self.state.skipped_samples = saved.get("skipped_samples", 0)
        self.state.skipped_by_kind = dict(saved.get("skipped_by_kind", {}))  # absent in older checkpoints
        self.state.source_counts = dict(saved.get("source_counts", {}))
        self.state.pending_skips = {}
        self.state.nonfinite_steps = saved.get("nonfinite_steps", 0)
        self.state.nonfinite_in_a_row = saved.get("nonfinite_in_a_row", 0)
        if saved.get("scheduler"):
            self.engine.load_schedule_state(saved["scheduler"])
        layout = self.engine.dims.describe()
        if saved.get("layout") not in (None, layout):
            log.info("checkpoint layout %s re-sharded into %s", saved["layout"], layout)


class DataPosition:
    """The data stream's position (CheckpointManager kind "rank_blobs": data_rank{dp_rank}.json).

    The tensor- and pipeline-parallel ranks of one replica read the same stream: one of them
    writes it. On load every rank's saved positions are merged (`data.resume`), so the stream
    continues sample for sample under any layout whose data-parallel size divides the stream count."""

    checkpoint_kind = "rank_blobs"
    blob_prefix = "data_rank"

    def __init__(self, loader, dp_rank: int, writes: bool):
        self.loader = loader
        self.dp_rank = dp_rank
        self.writes = writes
        self.found = False  # the checkpoint held positions (continued, or restarted at an epoch)

    @property
    def blob_name(self) -> str:
        return f"{self.blob_prefix}{self.dp_rank}"

    def state_dict(self) -> Optional[dict]:
        if not self.writes or self.loader is None:
            return None
        return self.loader.state_dict()

    def load_state_dict(self, blobs: list) -> None:
        from .data.resume import data_state_for_resume

        self.found = bool(blobs)
        if not blobs or self.loader is None:
            return
        state, reason = data_state_for_resume(blobs, self.loader.state_dict())
        if reason is not None:
            log.warning("data stream: %s", reason)
        if state is not None:
            self.loader.load_state_dict(state)
