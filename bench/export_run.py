"""A finished training run's network, sparsified and exported: ``python bench/export_run.py RUN_DIR``.

Rebuilds the run's model from its checkpoint (the fine-tuned masks fixed), checks that
``sparsevd.sparsify`` of it computes what its eval mode computes on the run's test images,
exports the sparsified network with ``torch.export`` (a dynamic batch), saves it, and runs
the saved program in a fresh process that only imports sparsevd: the issue's "it exports"
for a real run, not a toy model. Prints one line per check; exits 1 if one fails.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from types import SimpleNamespace

import torch

import sparsevd
from sparsevd.experiments import checkpoints, data

FRESH = """
import sys, torch, sparsevd
program = torch.export.load(sys.argv[1])
x, expected = torch.load(sys.argv[2])
out = program.module()(x)
print(float((out - expected).abs().max()))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a finished run's output directory")
    parser.add_argument("--examples", type=int, default=256, help="test images to compare on")
    args = parser.parse_args()
    model, config = checkpoints.trained_model(args.run)
    _, images = data.load_data(SimpleNamespace(**config))
    x = images["test_x"][:args.examples]
    with torch.no_grad():
        expected = model(x)
        fast = sparsevd.sparsify(model, batch_size=64, input_shape=tuple(x.shape[1:]))
        error = float((fast(x) - expected).abs().max())
    scale = float(expected.abs().max())
    ok = error <= 1e-4 * max(scale, 1.0)
    print(f"sparsify() vs eval on {len(x)} test images: max |difference| {error:.2e} (outputs up to {scale:.1f}) "
          f"{'ok' if ok else 'FAILED'}; {type(fast).__name__}")
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(fast, (x[:7],), dynamic_shapes=({0: batch},), strict=False)
    with tempfile.TemporaryDirectory() as tmp:
        path, inputs = os.path.join(tmp, "model.pt2"), os.path.join(tmp, "inputs.pt")
        torch.export.save(program, path)
        torch.save((x, expected), inputs)
        fresh = subprocess.run([sys.executable, "-c", FRESH, path, inputs], capture_output=True, text=True)
    if fresh.returncode:
        print(f"export: the saved program failed in a fresh process:\n{fresh.stderr[-2000:]}")
        return 1
    fresh_error = float(fresh.stdout.split()[-1])
    fresh_ok = fresh_error <= 1e-4 * max(scale, 1.0)
    print(f"torch.export (dynamic batch, saved, run at batch {len(x)} in a fresh process): max |difference| "
          f"{fresh_error:.2e} {'ok' if fresh_ok else 'FAILED'}")
    return 0 if ok and fresh_ok else 1


if __name__ == "__main__":
    sys.exit(main())
