"""Measuring the prefixes of a trained embedding, as evaluate.py does: frozen features (features), linear probes
(probe), kNN and retrieval (retrieval, retrieval_grid), shortlists at a few bytes per image (quantized), ImageNet's
shifted test sets (robustness), the runs and the protocols run on each (protocols) and the results a reader gets
(results)."""
