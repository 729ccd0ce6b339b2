"""``python -m sparsevd.demo``: the demo of :mod:`sparsevd.experiments.demo` (also
installed as ``sparsevd-demo``)."""

from sparsevd.experiments.demo import main

if __name__ == "__main__":
    main()
