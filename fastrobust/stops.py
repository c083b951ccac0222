"""How a training run stops other than by finishing: a streak of bad steps, or a stop signal.

:class:`RunStops` is the part of :class:`~fastrobust.train.Trainer` that counts non-finite or overflowing
steps, names the last good state when a streak ends the run, and turns SIGTERM into a checkpoint at the
next step boundary. It uses the trainer's model, stepper, config, checkpoint folder and counters.
"""
from __future__ import annotations

import contextlib
import math
import signal
import threading
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt_io
from . import distributed as dist
from .errors import CheckpointError, NumericalError, TrainingInterrupted


# A run stopped by bad steps names its last good state: the newest of its checkpoints whose weights are
# finite and whose norm (over every floating tensor of the model's state: weights and batch-norm
# statistics) is at most this factor times the norm this process started training from. Non-finite
# steps are never applied, so every checkpoint's weights come from finite-loss updates; what a storm
# leaves behind is weights blown up by finite but huge updates (--lr 1e4: the norm grows 1e8-fold in a
# few steps), while training at a sound learning rate moves the norm by percents (SmallCNN, 4 steps at
# lr 0.01: 0.01%). A factor of 10 lies far from both.
WEIGHT_NORM_GROWTH_LIMIT = 10.0


def weight_norm(state: dict[str, Any]) -> float:
    """The L2 norm of all floating tensors of a model state dict (inf or nan when one is not finite)."""
    norms = [torch.linalg.vector_norm(v.detach().float()) for v in state.values()
             if torch.is_tensor(v) and v.is_floating_point()]
    return float(torch.linalg.vector_norm(torch.stack(norms).double().cpu())) if norms else 0.0


class RunStops:
    start_weight_norm: float | None = None          # the weights' norm at this process's first step
    last_finite_loss: tuple[int, float] | None = None   # (step, loss) of the last applied step
    last_failure: str | None = None                      # why the last bad step was bad

    # -- bad steps --------------------------------------------------------------------------------
    def healthy(self, norm: float) -> bool:
        """Weights with this norm have not blown up (see WEIGHT_NORM_GROWTH_LIMIT)."""
        start = self.start_weight_norm
        return math.isfinite(norm) and (not start or norm <= WEIGHT_NORM_GROWTH_LIMIT * start)

    def last_good_state(self) -> tuple[Path, int, float, bool] | None:
        """(path, step, weight norm, whether it is the current state): what a stopped run names as its last
        good state. The current weights when they are healthy, written as a step checkpoint (bad steps
        change nothing, so they are the last applied update's). Otherwise the newest healthy checkpoint among the run's step
        checkpoints and best.pt; the blown-up weights are not written, so they do not displace it. None
        when no checkpoint is healthy. A collective under DDP: rank 0 decides, every rank agrees."""
        if dist.on_main(lambda: self.healthy(weight_norm(self.model.state_dict()))):
            return self.save(), self.global_step, weight_norm(self.model.state_dict()), True

        def newest_healthy() -> tuple[Path, int, float, bool] | None:
            found = []
            for path in [*ckpt_io.step_checkpoints(self.ckpt_dir), self.ckpt_dir / "best.pt"]:
                try:
                    ck = ckpt_io.load_checkpoint(path) if path.is_file() else None
                except CheckpointError:
                    continue
                if ck is not None and isinstance(ck.get("global_step"), int) and ck["global_step"] <= self.global_step:
                    found.append((path, ck["global_step"], weight_norm(ck["model"]), False))
            return max((f for f in found if self.healthy(f[2])), key=lambda f: f[1], default=None)

        return dist.on_main(newest_healthy)

    def check_bad_steps_at_end(self) -> None:
        """A run whose last steps were bad and whose weights have blown up ends as one that reached
        max_bad_steps does: the storm began too close to the end to be counted out, and the blown-up
        weights must not become final.pt and the final evaluation. Trailing bad steps over healthy
        weights (a bad batch at the end) are only the warnings they were."""
        if self.bad_steps and not dist.on_main(lambda: self.healthy(weight_norm(self.model.state_dict()))):
            raise self.bad_steps_stop(self.last_failure or "bad steps", at_end=True)

    def bad_steps_stop(self, failure: str, at_end: bool = False) -> NumericalError:
        """The error that ends a run after max_bad_steps bad steps in a row (or, ``at_end``, at the end of
        a run inside a streak of them, over blown-up weights): what failed, the last good state, and advice
        that fits the run: AMP changes only when fp16 was on."""
        start, now = self.start_weight_norm, weight_norm(self.model.state_dict())
        grown = f"{now / start:.3g}x" if start else "?"
        loss = (f"the last finite loss was {self.last_finite_loss[1]:.4g} at step {self.last_finite_loss[0]}"
                if self.last_finite_loss else "no step was applied since training started here")
        good = self.last_good_state()
        if good is None:
            where = (f"no checkpoint holds weights from before they blew up (their norm is now {now:.3g}, {grown} the "
                     f"{start:.3g} training started from; {loss}): start again from the beginning")
        else:
            path, step, norm, current = good
            where = (f"the last good state is in {path} (step {step}, weights' norm {norm:.3g}; training started "
                     f"from {start:.3g}; {loss})")
            if not current:
                where += (f". The weights now have norm {now:.3g} ({grown}): they blew up after it; a new run can "
                          f"start from it with --init-checkpoint {path}")
        lr = self.cfg.lr
        if self.stepper.amp is torch.float16:
            advice = (f"Lower the learning rate (--lr, now {lr:g}), or train with --amp bf16 (fp32's exponent range) "
                      f"or --amp off (fp32): fp16 cannot hold this run's gradients.")
        else:
            advice = (f"Lower the learning rate (--lr, now {lr:g}; e.g. {lr / 10:g}), and check the data and the "
                      f"method's options (a large loss weight such as beta).")
        ended = (f"training ended in {self.bad_steps} consecutive bad steps ({failure}) over blown-up weights; no "
                 f"final.pt is written" if at_end else
                 f"{self.bad_steps} consecutive bad steps ({failure}). Training stopped")
        return NumericalError(f"{ended}; {where}. {advice}")

    # -- stop signals -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def stop_on_signals(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        """While training, SIGTERM only sets a flag, checked at the next step boundary (all ranks agree);
        outside the loop (setup, final evaluation) it raises at once: there is nothing to save."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            self.stop_signal = signal.Signals(signum).name
            if self.phase != "train":
                raise TrainingInterrupted(f"stopped by {self.stop_signal} during {self.phase}; the newest checkpoint in "
                                          f"{self.ckpt_dir} is intact. Resume with --resume.")

        previous = {sig: signal.signal(sig, handler) for sig in signals}
        try:
            yield
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)

    def check_stop(self, saved: Path | None = None) -> None:
        stop = self.stop_signal is not None
        if not (dist.any_flag(stop) if self.world > 1 else stop):
            return
        path = saved or self.save()
        raise TrainingInterrupted(f"stopped by {self.stop_signal or 'a stop signal on another rank'} at epoch "
                                  f"{self.epoch}, batch {self.batch} (step {self.global_step}); checkpoint written to "
                                  f"{path}. Run the same command with --resume to continue.")
