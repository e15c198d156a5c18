"""Training curves for TensorBoard, off by default (``--tensorboard DIR`` on the training verbs).

Each run writes to its own sub-folder of DIR (``zoo/<task>__seed<k>``, ``generator/<name>``), so one
``tensorboard --logdir DIR`` shows a whole zoo build or a set of generators side by side.
"""

from __future__ import annotations

from pathlib import Path

from deltalora.errors import UsageError


class Curves:
    """Scalars of one training run; a no-op when ``log_dir`` is None."""

    def __init__(self, log_dir: str | Path | None, run: str):
        self._writer = None
        if log_dir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # an optional dependency: say how to get it
            raise UsageError("--tensorboard needs the tensorboard package: pip install 'deltalora[tensorboard]'") from e
        self._writer = SummaryWriter(str(Path(log_dir) / run))

    def log(self, step: int, **scalars: float) -> None:
        """Record named scalars at a step (e.g. ``loss=…, lr=…``)."""
        if self._writer is not None:
            for name, value in scalars.items():
                self._writer.add_scalar(name, float(value), step)

    def close(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()
