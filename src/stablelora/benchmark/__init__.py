"""The benchmark harness: ``stablelora compare CONFIG.yaml`` (grid.py plans, runner.py runs, results.py reports)."""
