"""Kaggle-style image competitions: folds -> train -> predict (TTA) -> ensemble -> submit.

Stage commands sit directly in this package (`python -m pipeline.<stage>`: folds, train,
predict, ensemble, submit, package, infer, tune, leaderboard, prune, preview, demo, imagenet);
each parses its arguments and calls the library below, grouped by concern in subpackages:
core, data, runtime, models, training, blending, tuning, reports, packaging, datasets; bench
holds the benchmarks and CV reports. No stage imports another (tests/test_structure.py).
"""
