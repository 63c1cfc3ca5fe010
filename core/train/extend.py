"""A run continued to another length: max_steps (or epochs) raised after it finished or stopped.

The length is not part of a backup's settings fingerprint (backup.RUN_LENGTH_KEYS): a longer run
trains the same batches with the same noise up to the backup's step, so everything but the
learning-rate schedule is as in a run that was that long from the start. The schedule is carried on
as follows (docs/long-runs.md, "Extending a run"):

- CONSTANT (and its warmup, which does not depend on the length): nothing changes; the continued
  run equals a run of the new length from the start, bit for bit.
- LINEAR, COSINE, COSINE_WITH_RESTARTS: the schedule is rebuilt over the new total and continues at
  the backup's step, so the learning rate jumps to what the longer schedule has there. From then on
  every step has the learning rate of a run of the new length; the steps before had the shorter
  schedule's, so the weights differ from such a run's. Keeping the old schedule's end value instead
  would train a LINEAR run on at 0 (nothing), a COSINE one at almost 0.
"""

from __future__ import annotations

from typing import Any

from core.errors import UserError

from .backup import Backup


def check_length(backup: Backup, total_steps: int) -> None:
    """A run cannot continue to a total below the step its backup was made after."""
    if total_steps < backup.step:
        raise UserError(f"the backup {backup.path} is of step {backup.step}, but this run is {total_steps} steps long; "
                        f"set max_steps to {backup.step} or more to continue (or train from the start)")


def carry_schedule(scheduler: Any, backup: Backup, total_steps: int, schedule: str) -> str | None:
    """After the scheduler's state was loaded from the backup: when the run's length changed, set
    the learning rates to the rebuilt schedule's at the backup's step and return the line for the
    log saying how the schedule was carried on; None when the length is the one the backup had."""
    before = int(backup.info.get("total_steps", total_steps))
    if before == total_steps:
        return None
    old_lr = float(scheduler.get_last_lr()[0])
    step = int(scheduler.last_epoch)
    # The scheduler's lambdas are the rebuilt ones (a LambdaLR keeps its own on load_state_dict);
    # the optimizer's learning rates came from the backup, i.e. from the shorter schedule.
    new_lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, new_lrs):
        group["lr"] = lr
    scheduler._last_lr = list(new_lrs)
    change = "extended" if total_steps > before else "shortened"
    head = f"the run is {change} from {before} to {total_steps} steps and continues at step {backup.step}: "
    if schedule == "CONSTANT":
        return head + f"the CONSTANT learning rate goes on as it was ({new_lrs[0]:.3g})"
    return head + (f"the {schedule} schedule is rebuilt over {total_steps} steps, so the learning rate goes from "
                   f"{old_lr:.3g} (the {before}-step schedule at step {step}) to {new_lrs[0]:.3g} (the {total_steps}-step "
                   f"schedule's); every step from here has the learning rate of a {total_steps}-step run")
