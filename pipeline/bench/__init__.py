"""Benchmarks (`make bench`) and the committed CV comparison reports (`make reports`)."""
from pathlib import Path

CONFIGS = Path("configs/digits")


def experiment_configs() -> list[Path]:
    """The digits demo's experiment configs: every YAML but competition and ensemble."""
    return [p for p in sorted(CONFIGS.glob("*.yaml")) if p.stem not in ("competition", "ensemble")]
