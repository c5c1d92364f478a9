"""The data path: image decoding and the uint8 cache, augmentation (batched), loaders and
normalisation."""
