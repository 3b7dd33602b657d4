"""A static bound on the loop iterations one invocation of a kernel runs, for llvmpipe.

Why: llvmpipe (lavapipe, the CPU device) keeps one loop counter per shader invocation (per
SIMD batch of invocations), starts it at 65535 (LP_MAX_TGSI_LOOP_ITERATIONS) and decrements it
on every pass through the end of every loop the invocation runs, nested loops included; when
it reaches 0 every loop exits at once, silently, and the kernel returns short sums. A loop
entered with t trips costs t + 1 passes (the pass that finds it done counts too), measured on
lavapipe: two loops of 40000 in a row ran 40000 then 25534 (40001 + 25534 = 65535); a
300 x 300 nested loop stopped at 65101 (217 outer trips of 1 + 301 passes, then one more).

So every `KernelBuilder.loop` states how many trips it may make per entry (from constant
bounds, or the caller's `max_trips`), the builder adds up (trips + 1) x the enclosing loops'
trips over all loops (a loop in an if-branch counts as if taken: an upper bound), and a kernel
for a CPU device whose bound may reach the limit carries notes["problem"]: the plan refuses
the step before it runs (`StepPlan.problems`, `check_fits`) instead of returning short sums.
Loop starts are >= 0: a Value start is assumed so (a thread or workgroup id, an offset).
"""

from __future__ import annotations

import math

CPU_LOOP_BUDGET = 65535  # llvmpipe's counter start: passes (trips + 1 per entry) must stay below


def trip_bound(start: int | None, stop: int | None, step: int | None,
               max_trips: int | None) -> int:
    """Most trips of `for i in range(start, stop, step)` per entry; None: a runtime Value.
    A Value start counts as 0 (loop starts are >= 0); `max_trips` is the caller's bound where
    stop or step is a runtime value (and caps a computable bound otherwise)."""
    if max_trips is not None and (not isinstance(max_trips, int) or max_trips < 0):
        raise ValueError(f"max_trips must be an int >= 0, got {max_trips!r}")
    if step == 0:
        raise ValueError("a loop step of 0 never ends")
    static = None
    if stop is not None and step is not None:
        if step > 0:
            if start is not None and start < 0:
                raise ValueError(f"loop starts are >= 0 (the bound assumes it of runtime "
                                 f"starts), got {start}")
            static = math.ceil(max(stop - (start or 0), 0) / step)
        elif start is not None:  # counting down: both ends must be known
            static = math.ceil(max(start - stop, 0) / -step)
    if static is None and max_trips is None:
        raise ValueError("a loop whose stop or step is a runtime value (or that counts down "
                         "from one) needs max_trips: its worst-case trip count per entry, which "
                         "bounds llvmpipe's per-invocation loop limit")
    return min(t for t in (static, max_trips) if t is not None)


class LoopBudget:
    """The running bound of one kernel: passes = sum over loops of (trips + 1) x the product
    of the enclosing loops' trips."""

    def __init__(self) -> None:
        self.passes = 0
        self._scale = [1]  # product of the open loops' trips, innermost last

    def enter(self, trips: int) -> None:
        self.passes += (trips + 1) * self._scale[-1]
        self._scale.append(self._scale[-1] * trips)

    def exit(self) -> None:
        self._scale.pop()

    def problem(self, kernel: str, workaround: str) -> str | None:
        """Why a CPU device cannot run the kernel correctly, or None where the bound fits."""
        if self.passes < CPU_LOOP_BUDGET:
            return None
        return (f"{kernel} may make up to {self.passes} loop passes per invocation, and "
                f"llvmpipe (the CPU device) ends every loop of an invocation after "
                f"{CPU_LOOP_BUDGET} in all, silently (short results); {workaround}")


GENERIC_WORKAROUND = "run the step on a GPU device, or make the tensors of this kernel smaller"
