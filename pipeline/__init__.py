"""Kaggle-style image classification: folds -> train -> predict (TTA) -> ensemble -> submit."""
