"""One rank of a sequence-parallel evaluation test: several runs of the real tools in one process start.

    deepspeed --num_gpus 2 tests/dist/sp_eval_worker.py TOOL ARGS... -- TOOL ARGS... -- ...

TOOL is ``eval_ppl``, ``passkey`` or ``ruler`` (tools/eval_ppl.py, tools/passkey.py, tools/ruler.py); each run's ``main`` is
called with its ARGS in order, keeping the process group between runs (each tool tears it down when
it finishes; a launcher start costs seconds, so a test pays for one). Rank 0 prints
``RUN i TOOL rc=N`` after each run; the worker always exits 0 once every run returned.
"""

from __future__ import annotations

import sys

import torch.distributed as dist


def _keep_group(barrier: bool = True) -> None:
    if barrier and dist.is_initialized():
        dist.barrier()


def main() -> int:
    from megalong.eval import sp
    from tools import eval_ppl, passkey, ruler

    tools = {"eval_ppl": eval_ppl.main, "passkey": passkey.main, "ruler": ruler.main}
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    runs, run = [], []
    for a in [*args, "--"]:
        if a == "--":
            runs.append(run)
            run = []
        else:
            run.append(a)
    real_finish = sp.finish_eval_parallel
    sp.finish_eval_parallel = _keep_group  # the tools import it at call time
    try:
        for i, (tool, *tool_args) in enumerate(runs):
            rc = tools[tool](tool_args)
            if dist.get_rank() == 0:
                print(f"RUN {i} {tool} rc={rc}", flush=True)
    finally:
        sp.finish_eval_parallel = real_finish
    sp.finish_eval_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
