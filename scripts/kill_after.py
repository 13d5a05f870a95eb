"""Fault injection for tests and benchmarks: run the engine on a config and SIGKILL this process when a
chosen event arrives.

    python scripts/kill_after.py CONFIG.json KIND LABEL BLOCK [STEP]

KIND is an event kind (block_finished, step_loss, phase_started, ...); the process kills itself the moment the
first event of that kind with that label (and block, and step, where given; -1 for any) has been recorded:
a crash at an exact point, with no clean-up of any kind.
"""
import json
import os
import signal
import sys

from ebft_engine import RunConfig, run


def main() -> None:
    config = RunConfig.from_dict(json.loads(open(sys.argv[1]).read()))
    kind, label, block = sys.argv[2], sys.argv[3], int(sys.argv[4])
    step = int(sys.argv[5]) if len(sys.argv) > 5 else -1
    for event in run(config):
        if (event.kind == kind and getattr(event, "label", None) == label
                and block in (-1, getattr(event, "block", -1)) and step in (-1, getattr(event, "step", -1))):
            os.kill(os.getpid(), signal.SIGKILL)
    sys.exit(3)  # the event never came: the test's kill point is wrong


if __name__ == "__main__":
    main()
