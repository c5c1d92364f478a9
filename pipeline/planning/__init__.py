"""The budgeted auto mode (`make auto`): candidates, measurements, the plan, its execution."""
