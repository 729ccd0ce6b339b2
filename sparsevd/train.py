"""``python -m sparsevd.train``: the training command of :mod:`sparsevd.experiments.cli`
(also installed as ``sparsevd-train``)."""

from sparsevd.experiments.cli import main

if __name__ == "__main__":
    main()
