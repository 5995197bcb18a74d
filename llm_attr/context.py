"""One run context: which process this is, how many there are, its device, and the barrier between them.

Built once per process (`run_context()`), from Accelerate's state under `accelerate launch` and for a plain
process alike. Its attribute names are Accelerate's (`process_index`, `num_processes`, `is_main_process`,
`wait_for_everyone`), so code written against a `PartialState` takes it unchanged. `single_process()` is the
context of work that never splits over processes (black-box jobs run in parallel on their backend instead).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class RunContext:
    """rank (`process_index`), world size (`num_processes`), `device`, and `wait_for_everyone()`."""

    process_index: int
    num_processes: int
    device: torch.device
    distributed: bool

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    def wait_for_everyone(self) -> None:
        """A barrier across all processes (nothing to wait for in a single one)."""
        if self.distributed:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    def accelerator(self) -> Any:
        """An `accelerate.Accelerator` on this context's device (what `training.train` takes)."""
        from accelerate import Accelerator

        return Accelerator(cpu=self.device.type == "cpu")


@functools.cache
def run_context() -> RunContext:
    """This process's context, built on first use (Accelerate's state: CPU when no GPU is available)."""
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return RunContext(process_index=state.process_index, num_processes=state.num_processes, device=state.device,
                      distributed=state.num_processes > 1)


def single_process(device: torch.device | str = "cpu") -> RunContext:
    """The context of work done in this process alone (no barrier, rank 0 of 1)."""
    return RunContext(process_index=0, num_processes=1, device=torch.device(device), distributed=False)
