"""The ranking-data pipeline: teacher scoring (score), diverse sampling (generate), judge ranking (rank),
and the whole method as stages in one run directory (run)."""
