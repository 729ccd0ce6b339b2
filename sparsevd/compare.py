"""``python -m sparsevd.compare``: the comparison command of :mod:`sparsevd.experiments.compare`
(also installed as ``sparsevd-compare``)."""

from sparsevd.experiments.compare import main

if __name__ == "__main__":
    main()
