"""The epoch protocol both loaders share: batches numbered (epoch, position), iteration that
resumes where it stopped, and a state_dict that refuses to resume under other settings."""
from __future__ import annotations

from typing import Iterator, Tuple

import torch


class EpochLoader:
    """Subclasses set ``_len`` (batches per epoch on this rank) and implement ``_next_batch()``
    (the batch at (self.epoch, self.position)) and ``_settings()`` (what a resume must match)."""

    _len: int
    epoch: int = 0
    position: int = 0  # batches of the current epoch already yielded

    def _next_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _settings(self) -> dict:
        raise NotImplementedError

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self._len

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its first batch."""
        self.epoch, self.position = int(epoch), 0

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        if self.position >= self._len:  # finished but not closed (zip, next(iter(...)), break)
            self.set_epoch(self.epoch + 1)
        while self.position < self._len:
            batch = self._next_batch()
            self.position += 1
            yield batch
        self.set_epoch(self.epoch + 1)

    def state_dict(self) -> dict:
        """Where iteration stands: the epoch, the batches already yielded in it, and the
        settings that must match for ``load_state_dict`` to resume exactly."""
        return {"epoch": self.epoch, "position": self.position, **self._settings()}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``'s next batch. ValueError if the loader's settings differ."""
        mine = self._settings()
        wrong = [f"{k}={state[k]!r} (this loader has {mine[k]!r})" for k in mine if k in state and state[k] != mine[k]]
        if wrong:
            raise ValueError("cannot resume exactly, the state was saved with " + ", ".join(wrong))
        position = int(state["position"])
        if not 0 <= position <= self._len:
            raise ValueError(f"position {position} outside 0..{self._len}")
        self.epoch, self.position = int(state["epoch"]), position
