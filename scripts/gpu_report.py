"""Print the short tables of `tokensparse bench attention` / `bench prefill` JSON files.

Usage: python scripts/gpu_report.py ATTENTION_JSON [PREFILL_JSON]
"""

import json
import sys

from tokensparse.bench import attention, prefill

for path in sys.argv[1:]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        print(f"{path}: {err}")
        continue
    bench = prefill if data["results"] and "modes" in data["results"][0] else attention
    print("\n".join(bench.summary_lines(data)))
