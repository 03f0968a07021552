"""One line per decode_bench.py entry of the given result files: workload, tokens/s (decode-only where measured), peak."""
import json
import sys

for path in sys.argv[1:]:
    try:
        entries = json.load(open(path))
    except (OSError, ValueError) as e:
        print(f"{path}: {e}")
        continue
    for e in entries:
        g = e.get("generator") if isinstance(e.get("generator"), dict) else {}
        dec = e.get("decode_tokens_per_s", g.get("decode_tokens_per_s"))
        print(f"{path.rsplit('/', 1)[-1]:20s} {e['workload']:18s} tok/s {e['tokens_per_s']:8.1f} decode "
              f"{dec if dec is None else round(dec, 1)} peak {e.get('peak_gib')}")
