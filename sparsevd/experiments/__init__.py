"""The paper's experiments, outside the library: the training command (``sparsevd-train``,
``python -m sparsevd.train``), the comparison of finished runs (``sparsevd-compare``,
``python -m sparsevd.compare``) and the demo (``sparsevd-demo``, ``python -m sparsevd.demo``),
split by concern: flags (:mod:`.config`), data (:mod:`.data`), networks (:mod:`.models`),
the loop (:mod:`.loop`), magnitude pruning (:mod:`.magnitude`), several processes
(:mod:`.distributed`), checkpoints (:mod:`.checkpoints`), the threshold
(:mod:`.thresholds`), the report (:mod:`.results`: :mod:`.measure`, :mod:`.render`,
:mod:`.plots`), the commands (:mod:`.cli`, :mod:`.compare`) and the demo (:mod:`.demo`). They need the
``demo`` extra (tqdm, matplotlib, mlxtend); ``import sparsevd`` imports none of this.
"""

import os
import sys


def _check_package():
    # `python -m` puts the working folder first on sys.path. A folder there named
    # sparsevd without an __init__.py (the clone of this repository, seen from the folder
    # above it) then becomes a namespace package `sparsevd` that hides the installed one;
    # an editable install still finds this subpackage, which would fail later on a
    # missing sparsevd.<name> with a baffling AttributeError.
    package = sys.modules.get("sparsevd")
    if package is None or getattr(package, "__file__", None) is not None:
        return
    folders = ", ".join(os.path.abspath(p) for p in getattr(package, "__path__", [])) or "a folder"
    sys.exit(f"error: Python imported {folders} as the package `sparsevd` (a folder named sparsevd with no "
             "__init__.py, such as a clone of the repository, in the working folder), so the installed sparsevd is "
             "hidden. Run the command from another folder, or use "
             "`sparsevd-train` / `sparsevd-demo`, which do not look in the working folder.")


_check_package()
