"""The ranking-data pipeline: its stages, teacher scoring (score), diverse sampling (generate), judge ranking
(rank, with the judges in judge.py and the request loop in pool.py / http.py), the training controls'
data (training_controls), pairwise judging for `tuna eval judge` (pairwise) and resumable JSON-lines stores
(store); and `tuna pipeline`, the table of stages that runs them with training and evaluation (workflow)."""
