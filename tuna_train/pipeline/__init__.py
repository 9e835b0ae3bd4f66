"""The ranking-data pipeline's stages: teacher scoring (score), diverse sampling (generate), judge ranking
(rank, with the judges in judge.py and the request loop in pool.py / http.py), pairwise judging for
`tuna eval judge` (pairwise), and resumable JSON-lines stores (store). `tuna pipeline` runs them in order
(tuna_train.workflow)."""
