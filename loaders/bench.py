"""Loader benchmark cases: one timed window of batches per backend.

:func:`window` builds a backend's training loader (shuffle + the paper's augmentation, drop_last) and
returns a callable that produces ``batches`` batches per call, crossing epoch boundaries as needed
(batches are produced, not consumed: the loader's upper bound). ``fastrobust bench loaders`` times
the windows of every backend with its shared interleaved timer, after a warm-up window (FFCV's JIT
compile, worker start-up, first-touch allocations), and compares them with the images/s a training
step consumes.
"""
from __future__ import annotations

from typing import Iterator, Optional


class Window:
    """``window()`` draws the next ``batches`` batches; ``images`` is how many images that is."""

    def __init__(self, loader, batches: int):
        self.loader, self.batches = loader, batches
        self.images = batches * loader.batch_size
        self._it = self._stream()

    def _stream(self) -> Iterator:
        while True:
            yielded = False
            for batch in self.loader:
                yielded = True
                yield batch
            if not yielded:
                raise RuntimeError("loader yields no batches (batch_size > samples with drop_last?)")

    def __call__(self) -> None:
        for _ in range(self.batches):
            next(self._it)


def window(backend: str, device, *, batch_size: int = 128, batches: int = 200, dataset: str = "cifar10",
           data_dir=None, beton_dir=None, limit: Optional[int] = None, num_workers: Optional[int] = None,
           seed: int = 0) -> Window:
    import loaders
    loader = loaders.build(dataset, "train", batch_size, device, backend=backend, seed=seed, data_dir=data_dir,
                           limit=limit, drop_last=True, num_workers=num_workers, beton_dir=beton_dir)
    return Window(loader, batches)
