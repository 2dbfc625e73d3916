"""What the training loop asks of a task (`TrainingLoop` in loop.py). PinnerFormer's retrieval training is one task
(retrieval.py); a ranker's multi-task training is another, and a distributed run wraps the loop, not the task.

A task owns its model, its data and its loss; the loop owns the optimiser, the schedule, the random seeds of each
step, mixed precision, checkpoints, early stopping, logs and progress. Determinism: a task's host batch must be a
function of (seed, epoch, step) alone, so that a resumed run, and any number of loader workers, see the same
batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch


class HostBatch(Protocol):
    """A step's host-side work (built in loader workers): anything the DataLoader can pin and hand over."""

    def pin_memory(self) -> "HostBatch": ...


@dataclass
class StepLoss:
    loss: torch.Tensor  # scalar, on the device, to be minimised
    counts: dict[str, int]  # what the batch held, logged with the step (e.g. {"queries": 512}); 0 means no signal


class TrainingTask(Protocol):
    model: torch.nn.Module
    metric: str  # the validation metric that selects the best checkpoint (higher is better)
    steps_per_epoch: int
    batch_size: int  # training units per step (for the progress bar's rate)
    size_key: str  # the count in StepLoss.counts that is 0 when a batch has nothing to learn from (e.g. "queries")
    resume_keys: tuple[str, ...]  # config sections a resumed run must share with the run it continues
    dataset_fingerprint: str

    def host_batch(self, epoch: int, step: int) -> HostBatch:
        """The host half of step `step` of epoch `epoch` (examples cut, features padded): no device work."""

    def loss(self, batch: HostBatch, global_step: int, device: torch.device) -> StepLoss:
        """The device half: move the batch, run the model, return the loss (random draws seeded from the step)."""

    def step_scalars(self) -> dict[str, torch.Tensor]:
        """Scalars to log after each optimiser step, still on the device (e.g. the learned temperature)."""

    def validate(self, device: torch.device) -> dict[str, float]:
        """Validation metrics of the current model (`metric` among them)."""

    def baseline(self) -> tuple[str, dict[str, float]]:
        """A reference scored like `validate` (e.g. most-popular), logged once at the start: context for the numbers."""

    def describe(self) -> dict[str, Any]:
        """The task's part of the run description (config.json)."""

    def write_inputs(self, run_dir) -> None:
        """Files later stages need besides the checkpoint (e.g. the user split)."""

    def compile(self, mode: str) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """State besides the model's weights that a resumed run needs (e.g. a frequency sketch)."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def epoch_order(seed: int, epoch: int, units: np.ndarray, repeats: int) -> np.ndarray:
    """Every training unit `repeats` times, in the epoch's seeded order."""
    return np.random.default_rng([seed, epoch]).permutation(np.repeat(units, repeats))


def length_bucketed(order: np.ndarray, lengths: np.ndarray, batch_size: int, window: int, seed: int,
                    epoch: int) -> np.ndarray:
    """`order` regrouped so that each batch holds units of similar length: within each run of `window` batches the
    units are sorted by length and cut into batches, then all batches are shuffled (seeded by seed and epoch).
    On CPU, where a batch is padded to its longest sequence, this saves the padding's work (on Beauty, with a
    mean length of 9 under a 50-action cap, about four fifths of it); each batch is still a random draw from
    its window, and every unit still comes `repeats` times per epoch."""
    grouped = sorted_within_windows(order, lengths, batch_size * window)
    n_full = len(grouped) // batch_size
    batches = np.random.default_rng([seed, epoch, 1]).permutation(n_full)
    full = grouped[:n_full * batch_size].reshape(n_full, batch_size)[batches].reshape(-1)
    return np.concatenate([full, grouped[n_full * batch_size:]])


def sorted_within_windows(order: np.ndarray, lengths: np.ndarray, span: int) -> np.ndarray:
    """`order` with each run of `span` units sorted by length (stable)."""
    chunks = [order[i:i + span] for i in range(0, len(order), span)]
    return np.concatenate([c[np.argsort(lengths[c], kind="stable")] for c in chunks]) if chunks else order


def action_budget_steps(total_actions: int, budget: int) -> int:
    """Batches per epoch when each holds about `budget` input actions."""
    return max(1, int(total_actions) // budget)


def action_budget_batches(order: np.ndarray, lengths: np.ndarray, steps: int, seed: int, epoch: int
                          ) -> list[np.ndarray]:
    """`order` cut into `steps` contiguous batches of about equal total length (cuts at multiples of total/steps
    of the running sum), in a seeded shuffled order. No batch is empty when total/steps >= every unit's length
    (the running sum cannot step over a whole interval)."""
    cum = np.cumsum(lengths[order])
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, steps) / steps, side="left") + 1
    batches = np.split(order, cuts)
    return [batches[i] for i in np.random.default_rng([seed, epoch, 2]).permutation(steps)]
