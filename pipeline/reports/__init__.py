"""Reports: per experiment, ensemble and tuning study, the leaderboard, the augmentation preview."""
