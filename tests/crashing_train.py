"""torchrun entry of the crash tests (test_train_deepspeed.py): train/ferret_train.py's `main`
with a callback that kills rank 0 hard (os._exit: no cleanup, no final save), as a crash would.

    torchrun ... tests/crashing_train.py after_step|checkpoint_staged STEP -- ARGS OF ferret_train.py
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))

import ferret_train  # noqa: E402  (the entry point, imported as a module to pass it the callback)

from ferret.training.callbacks import TrainingCallbacks  # noqa: E402

EXIT_CODES = {"after_step": 13, "checkpoint_staged": 17}


def exit_hard_at(step: int, code: int):
    def callback(reached: int) -> None:
        if reached == step:
            sys.stdout.flush()
            os._exit(code)

    return callback


if __name__ == "__main__":
    where, step, separator, *argv = sys.argv[1:]
    if where not in EXIT_CODES or separator != "--":
        sys.exit(f"usage: crashing_train.py {'|'.join(EXIT_CODES)} STEP -- ARGS")
    ferret_train.exit_without_teardown(
        ferret_train.main(argv, TrainingCallbacks(**{where: exit_hard_at(int(step), EXIT_CODES[where])})))
