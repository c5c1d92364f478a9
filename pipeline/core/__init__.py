"""The core: configs, the competition folder, tasks, metrics, thresholds, folds, the submission
format, the run layout and history, errors, atomic artifacts and provenance."""
