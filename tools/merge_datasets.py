#!/usr/bin/env python
"""Join datasets (the shards of ``tools/preprocess_data.py --shard I/N``) into one PREFIX.bin/.idx/.json.

    # each machine I of N:
    python tools/preprocess_data.py --input /data/rp/ --output-prefix out/rp_0000I --shard I/N ...
    # then, where the shards are:
    python tools/merge_datasets.py --input out/ --pattern 'rp_*' --output-prefix /data/rp_llama2
    python tools/merge_datasets.py --input out/rp_00000 out/rp_00001 --output-prefix /data/rp_llama2

The merged .bin/.idx are byte-identical to one run over all inputs (Megatron-LM's merge layout);
its .json equals that run's except "created" and an added "merged_from". Shards of one run are
checked complete (all N, same input list) and merged in shard order, whatever their names; other
datasets are merged in the order given (a directory: sorted by name). SFT datasets merge their
PREFIX_mask loss masks too. Nothing is loaded whole; the output is moved into place on success.
"""

from __future__ import annotations

import argparse
import os
import sys

from megalong.data.indexed import DataFileError
from megalong.data.merge import list_prefixes, merge_datasets


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="dataset prefixes (paths without .bin/.idx), or one directory holding them")
    p.add_argument("--pattern", default="*", help="with a directory: merge only prefixes whose name matches this glob")
    p.add_argument("--output-prefix", required=True, help="output path without .bin/.idx")
    p.add_argument("--no-shard-check", action="store_true",
                   help="merge shards in the given order even when some of the N shards are missing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar / lines")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        if len(a.input) == 1 and os.path.isdir(a.input[0]):
            prefixes = list_prefixes(a.input[0], a.pattern, exclude=a.output_prefix)
        elif any(os.path.isdir(x) for x in a.input):
            raise DataFileError(f"--input {' '.join(a.input)}: give one directory or a list of prefixes, not both")
        else:
            prefixes = a.input
        if not a.no_progress:
            from megalong.utils.logging import setup_logging

            setup_logging("INFO")
        s = merge_datasets(prefixes, a.output_prefix, progress=not a.no_progress,
                           check_shards=not a.no_shard_check)
    except DataFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    mask = f" (+ {s['prefix']}_mask loss mask)" if s["sft"] else ""
    print(f"merged {s['parts']} datasets into {s['prefix']}.bin/.idx{'/.json' if s['meta'] else ''}{mask}: "
          f"{s['documents']} documents, {s['tokens']} tokens, {s['bytes'] / 1e6:.1f} MB in {s['seconds']:.2f} s "
          f"= {s['MB_per_s']:.0f} MB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
