#!/usr/bin/env python
"""RULER-style long-context task suite: scores per task and length, the effective length, heat-maps.

    python tools/ruler.py --model out/x-hf --lengths 1024 4096 --out runs/x/ruler
    python tools/ruler.py --run runs/x --lengths 4096 8192 16384 --out runs/x/ruler   # latest checkpoint
    deepspeed --num_gpus 4 tools/ruler.py --model out/x-hf --lengths 131072 --sp 4 --out runs/x/ruler

Writes OUT/results.json (scores, averages, effective length, seconds per length), OUT/samples.jsonl
(task, length, depth, expected, generated, score per sample), OUT/table.md, OUT/tasks.png and
OUT/depth.png. A killed run continues where it stopped when started again with the same options
(OUT/cells/ holds every finished sample). Only rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from megalong.eval.sp import add_sp_arguments


def parse_args(argv: list[str] | None):
    from megalong.eval.ruler import RULER_THRESHOLD, TASKS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF model directory (with tokenizer files)")
    src.add_argument("--run", help="megalong run directory: evaluate its checkpoint (exported into OUT/model/)")
    p.add_argument("--tag", default="latest", help="with --run: checkpoint tag (default: newest complete)")
    p.add_argument("--lengths", type=int, nargs="+", required=True,
                   help="lengths in tokens (prompt + answer budget, as RULER counts them)")
    p.add_argument("--out", required=True, help="output directory (resumable)")
    p.add_argument("--tasks", nargs="+", default=["all"], help=f"tasks (default all): {' '.join(TASKS)}")
    p.add_argument("--samples", type=int, default=2,
                   help="samples per task and length (default 2: the 2-core CPU default; RULER uses 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", choices=["auto", "on", "off"], default="auto",
                   help="wrap prompts in the tokenizer's chat template (auto: when it has one)")
    p.add_argument("--depths", type=float, nargs="*", default=None,
                   help="fixed depths in [0, 1] of the needle of single-needle tasks, cycled over the samples")
    p.add_argument("--haystack-file", default=None,
                   help="text file for the essay haystack (default: Python's documentation, pydoc_data)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="prompts per generate call (left-padded; on CPU 1 is fastest, on a GPU try 8+)")
    p.add_argument("--threshold", type=float, default=RULER_THRESHOLD,
                   help="pass mark of the effective length (default RULER's 85.6)")
    p.add_argument("--base-length", type=int, default=None,
                   help="the model's own context for the relative score (default: from its config)")
    p.add_argument("--reference", default=None, help="results.json of another model (e.g. the base): deltas")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--overwrite", action="store_true", help="discard stored samples of other configurations")
    p.add_argument("--no-progress", action="store_true", help="no progress bar / lines on stderr")
    add_sp_arguments(p)
    return p.parse_args(argv)


def exported_model(run: str, tag: str, out: Path, rank: int) -> Path:
    """The run's checkpoint as a merged HF directory under OUT/model/<tag> (exported once, by rank 0)."""
    from megalong.engine.export import export_hf, open_checkpoint

    rc = open_checkpoint(run, tag)
    target = out / "model" / rc.tag
    if rank == 0 and not (target / "config.json").is_file():
        print(f"exporting {run} checkpoint {rc.tag} -> {target} (tools/convert_to_hf.py's export)", file=sys.stderr)
        export_hf(run, target, tag=rc.tag)
    return target


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    import torch.distributed as dist

    from megalong.config import ConfigError
    from megalong.engine.export import ExportError
    from megalong.eval.loading import base_context, load_model_and_tokenizer, model_identity
    from megalong.eval.ruler import SuiteConfig, SuiteError, run_suite
    from megalong.eval.ruler.generate import HFGenerator, ParallelGenerator
    from megalong.eval.ruler.prompts import PromptTooShort
    from megalong.eval.ruler.report import results_table
    from megalong.eval.sp import finish_eval_parallel, start_eval_parallel
    from megalong.utils.logging import setup_logging

    rank = int(os.environ.get("RANK", 0))
    setup_logging("INFO", rank=rank)
    out = Path(args.out)
    try:
        parallel, rank, device = start_eval_parallel(args.sp, args.sp_mode, env=os.environ, device=args.device,
                                                     timeout_s=args.timeout_s, tool="tools/ruler.py")
        model_dir = Path(args.model) if args.model else exported_model(args.run, args.tag, out, rank)
        if parallel is not None:
            dist.barrier()  # rank 0 may have exported the checkpoint
        model, tok, device = load_model_and_tokenizer(model_dir, dtype=args.dtype, device=str(device))
        chat = {"on": True, "off": False}.get(args.chat, bool(getattr(tok, "chat_template", None)))
        cfg = SuiteConfig(args.lengths, args.tasks, args.samples, args.seed, chat, args.haystack_file, args.depths,
                          args.threshold, args.base_length or base_context(model.config))
        reference = json.loads(Path(args.reference).read_text()) if args.reference else None
        if parallel is not None:
            from megalong.attention import use_full_attention

            use_full_attention(model)  # the registered attention that reads sp_context
            generate = ParallelGenerator(model, tok, parallel, device)

            def agree(obj):
                box = [obj]
                dist.broadcast_object_list(box, src=0)
                return box[0]
        else:
            generate, agree = HFGenerator(model, tok, device, args.batch_size), (lambda x: x)
        identity = model_identity(model_dir, tok)
        if args.run:
            identity["run"] = str(args.run)
        summary = run_suite(generate, tok, cfg, out, identity=identity, batch=max(1, args.batch_size),
                            overwrite=args.overwrite, writer=rank == 0, progress=not args.no_progress and rank == 0,
                            agree=agree, reference=reference)
    except (ConfigError, ExportError, SuiteError, PromptTooShort, FileNotFoundError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        finish_eval_parallel(barrier=False)
        return 2
    finish_eval_parallel()
    if rank == 0:
        print(results_table(summary), file=sys.stderr)
        print(json.dumps({k: summary[k] for k in ("model", "chat", "average", "effective_length", "seconds",
                                                   "complete")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
