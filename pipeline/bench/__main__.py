"""`make bench`: throughput benchmarks, each measuring its ratio side by side in one run."""
import importlib

SECTIONS = ("data_path", "tta", "blend_search")

if __name__ == "__main__":
    for name in SECTIONS:
        importlib.import_module(f"pipeline.bench.{name}").main()
