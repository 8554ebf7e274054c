"""Measuring the prefixes of a trained embedding, as evaluate.py does: frozen features (features), linear probes
(probe), kNN and retrieval (retrieval, retrieval_grid), ImageNet's shifted test sets (robustness), the protocols that
run them per run (protocols) and the results a reader gets (results)."""
