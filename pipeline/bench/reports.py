"""`make reports`: the CV comparisons on the digits demo, written to reports/*.md."""
import importlib

REPORTS = ("report_transfer", "report_augment", "report_tta", "report_ensemble")

if __name__ == "__main__":
    for name in REPORTS:
        importlib.import_module(f"pipeline.bench.{name}").main()
