"""The paper's experiments, outside the library: the training command
(``python -m sparsevd.train``), the demo (``python -m sparsevd.demo``), their data,
models and plots. Needs the ``demo`` extra (tqdm, matplotlib, mlxtend)."""
