"""Time datasetup's tokenization of real Alpaca records: a cold run, then a run served from the cache.

    python benchmarks/tokenize_speed.py                      # the 5,000 records in ../shared
    python benchmarks/tokenize_speed.py --dataset tatsu-lab/alpaca --tokenizer distilgpt2   # all 52k (network)

Uses a fresh, temporary datasets cache so the first run is really cold.
"""

from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from throughput import scratch_dir  # noqa: E402  (a temporary directory removed at exit)

# ---- settings (each has a flag: DATASET -> --dataset) ----
DATASET = os.path.join(ROOT, "..", "shared", "data", "alpaca_5000.json")  # records to tokenize
TOKENIZER = os.path.join(ROOT, "..", "shared", "gpt2-tokenizer")  # the GPT-2 tokenizer
TEMPLATE = "alpaca"  # prompt template: seed|alpaca


def main(args) -> None:
    os.environ["HF_DATASETS_CACHE"] = scratch_dir("tokenize-speed-")
    import datasets

    datasets.disable_progress_bars()
    from tuning.data import sft
    from tuning.models.loading import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer, flag="--tokenizer")
    timings = []
    for label in ("cold (tokenize + cache)", "warm (from the cache)"):
        start = time.perf_counter()
        dsd, report = sft.prepare_datasets(args.dataset, tokenizer, args.template)
        timings.append(time.perf_counter() - start)
        examples = sum(len(split) for split in dsd.values())
        print(f"{label:<26} {timings[-1]:6.2f} s  ({examples} examples, from cache: {report['from_cache']})")
    print(f"records read: {report['read']}; tokenizer loading not included")


if __name__ == "__main__":
    from tuning import cli

    main(cli.parse_or_exit(cli.build_parser(sys.modules[__name__]), lambda a: None))
