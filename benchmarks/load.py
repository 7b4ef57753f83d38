"""Cold and warm load times of the demo model.

Cold: an empty cache, so the GGUF is dequantised and written as safetensors.
Warm: the cache is there. Each load runs in a fresh process, as a user's kernel would,
and the import of circuit_widgets and TransformerLens (once per kernel) is timed
separately from the load itself.

    python benchmarks/load.py [--spec demo] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import circuit_widgets as cw
import transformer_lens.model_bridge  # the libraries' import cost, once per kernel
t1 = time.perf_counter()
cw.load_model(sys.argv[1])
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1}))
"""


def run_once(spec: str, cache: str) -> dict:
    env = dict(os.environ, CIRCUIT_WIDGETS_CACHE=cache, HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-c", CHILD, spec], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="demo")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cw-bench-cache-") as cache:
        cold = run_once(args.spec, cache)
        warm = [run_once(args.spec, cache) for _ in range(args.repeats)]
    best = min(warm, key=lambda r: r["load_s"])
    print(f"model: {args.spec}")
    print(
        f"cold load (dequantise + write cache): {cold['load_s']:6.2f} s  (import {cold['import_s']:.2f} s)"
    )
    print(
        f"warm load (cached safetensors), best of {args.repeats}: {best['load_s']:6.2f} s  "
        f"(import {best['import_s']:.2f} s)"
    )
    print(f"warm / cold: {best['load_s'] / cold['load_s']:.3f}")
    print(f"warm load under 3 s: {'yes' if best['load_s'] < 3 else 'NO'}")


if __name__ == "__main__":
    main()
