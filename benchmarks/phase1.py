"""The migration guide's §6 benchmark (baseline vs Phase 1 presets); the same as `phase1-jax bench`.

    python benchmarks/phase1.py [--out DIR] [--parts throughput,capped,perplexity] [--smoke] ...

See `phase1_jax/bench.py` for what is measured and how.
"""

import sys

from phase1_jax.bench import main

if __name__ == "__main__":
    sys.exit(main())
