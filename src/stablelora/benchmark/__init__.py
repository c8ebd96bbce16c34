"""The benchmark harness, ``stablelora compare CONFIG.yaml``, one stage per module: grid.py plans, runner.py runs,
records.py keeps one record per finished run, aggregate.py turns records into figures, render.py writes them."""
