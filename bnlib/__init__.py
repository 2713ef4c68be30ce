"""bnlib: a reproducible study of batch normalisation under small and non-i.i.d. batches (the training code in
``train/`` and ``norms/``; grids, tables, analysis, figures and the book around them)."""
