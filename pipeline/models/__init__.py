"""Models: the factory over timm (classic CNNs included), pretrained weights, fine-tuning
layer groups and schedules, TTA views, and the one inference path."""
