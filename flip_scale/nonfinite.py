"""Steps skipped for a non-finite gradient norm: counted into the trainer state, and too many in a
row (more than optim.max_nonfinite_steps) stop the run before a checkpoint of those weights exists.

An engine decides the skip itself (`StepResult.skipped`): a bool read on the host, or, where the
optimizer skips on the device (fused AdamW's found_inf on CUDA), a 0-dim tensor that is counted on
the device with no host read and settled at logging steps and before every save (one read).
"""
import logging
from typing import Optional

import torch

log = logging.getLogger("flip_scale")


class NonfiniteSteps:
    """The trainer's count of skipped steps, on `state` (nonfinite_steps, nonfinite_in_a_row)."""

    def __init__(self, state, limit: int):
        self.state, self.limit = state, limit
        self.on_device = DeviceSkipCounter()

    def count(self, result, loss) -> None:
        """One step's StepResult: a device flag is added there; a host one is counted now."""
        if isinstance(result.skipped, torch.Tensor):
            self.on_device.add(result.skipped, self.state.nonfinite_in_a_row)
        elif result.skipped:
            self._skipped_now(result, loss)
        else:
            self.state.nonfinite_in_a_row = 0

    def _skipped_now(self, result, loss) -> None:
        state, limit = self.state, self.limit
        state.nonfinite_steps += 1
        state.nonfinite_in_a_row += 1
        step = state.step + 1
        if state.nonfinite_in_a_row > limit:
            raise FloatingPointError(
                f"step {step}: gradient norm {float(result.grad_norm)} (loss {float(loss)}), non-finite for "
                f"{state.nonfinite_in_a_row} steps in a row, more than optim.max_nonfinite_steps={limit}: stopping "
                f"with the weights of the last finite step (no checkpoint of them is written); lower optim.lr, check "
                f"the data, or resume from an earlier checkpoint")
        log.warning("step %d: gradient norm %s (loss %s): the step is skipped, the weights are kept (%d in a row, "
                    "at most optim.max_nonfinite_steps=%d)", step, float(result.grad_norm), float(loss),
                    state.nonfinite_in_a_row, limit)

    def settle(self) -> None:
        """The skips counted on the device into the state (one host read); too many in a row within
        the window stop the run as a host-counted skip would, at this step."""
        settled = self.on_device.settle()
        if settled is None:
            return
        steps, in_a_row, longest = settled
        state, limit = self.state, self.limit
        state.nonfinite_steps += steps
        state.nonfinite_in_a_row = in_a_row
        if longest > limit:
            raise FloatingPointError(
                f"by step {state.step}: the gradient norm was non-finite for {longest} steps in a row, more than "
                f"optim.max_nonfinite_steps={limit}: stopping (no checkpoint of these weights is written); lower "
                f"optim.lr, check the data, or resume from an earlier checkpoint")
        if steps:
            log.warning("steps up to %d: %d skipped for a non-finite gradient norm, the weights kept (%d in a row now, "
                        "at most optim.max_nonfinite_steps=%d)", state.step, steps, in_a_row, limit)


class DeviceSkipCounter:
    """Skipped steps counted on the device, from `StepResult.skipped` tensors: the trainer adds each
    step's flag without a host read and `settle`s at logging steps and before a checkpoint (one
    read): -> (skipped steps in the window, the run of skips in a row now, the longest run in the
    window), the runs continuing from `in_a_row` (the trainer's count so far)."""

    def __init__(self):
        self.steps = self.in_a_row = self.longest = None

    def add(self, skipped, in_a_row: int) -> None:
        flag = skipped.long()
        if self.steps is None:
            self.steps = torch.zeros_like(flag)
            self.in_a_row = torch.full_like(flag, in_a_row)
            self.longest = torch.full_like(flag, in_a_row)
        self.steps += flag
        self.in_a_row = (self.in_a_row + flag) * flag
        self.longest = torch.maximum(self.longest, self.in_a_row)

    def settle(self) -> Optional[tuple]:
        if self.steps is None:
            return None
        steps, in_a_row, longest = torch.stack([self.steps, self.in_a_row, self.longest]).tolist()
        self.steps = self.in_a_row = self.longest = None
        return steps, in_a_row, longest
