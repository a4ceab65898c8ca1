"""Run by tests/test_distributed.py under `accelerate launch` (2 CPU processes): how processes wait for each other.

    wait_probe.py OUT TIMEOUT_MINUTES MODE

MODE collective: process 0 sleeps 8 s, then both meet in a barrier: with a timeout of 3 s, process 1 must give up
(the configured timeout reaches the process group). MODE main-only: process 0 runs an 8 s step alone with
`run_on_main`, then fails a second one; process 1 must wait for the first without a collective (no timeout) and get
its result, then raise the second one's error. Each process writes what happened to OUT/rank<r>.json.
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from retromae.config import ConfigError  # noqa: E402
from retromae.distributed import configure_timeout, process_state, run_on_main  # noqa: E402


def slow_step():
    time.sleep(8)
    return {"answer": 42}


def failing_step():
    raise ConfigError("the main process's step failed: data/x.tsv:3: bad line")


def main() -> None:
    out, minutes, mode = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    configure_timeout(minutes)
    state = process_state()
    record = {"rank": state.process_index}
    started = time.monotonic()
    if mode == "collective":
        if state.is_main_process:
            time.sleep(8)
        try:
            state.wait_for_everyone()
            record["barrier"] = "passed"
        except Exception as err:  # noqa: BLE001 (the probe records whatever the barrier raised)
            record["barrier"] = f"{type(err).__name__}: {str(err)[:200]}"
    else:
        record["result"] = run_on_main("slow step", slow_step)
        try:
            run_on_main("failing step", failing_step)
        except ConfigError as err:
            record["error"] = str(err)
    record["seconds"] = time.monotonic() - started
    (out / f"rank{state.process_index}.json").write_text(json.dumps(record))
    if mode == "collective":  # the group is broken after a timeout: leave without destroying it
        import os

        os._exit(0)


if __name__ == "__main__":
    main()
