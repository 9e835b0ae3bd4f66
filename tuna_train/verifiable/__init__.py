"""Verifiable instruction following: a task set with IFEval constraints (:mod:`.tasks`), a judge that checks
them (:mod:`.judge`, ``tuna rank --judge verifiable``) and IFEval's four figures (:mod:`.evaluate`,
``tuna eval verifiable``). The checkers come from the optional package ``if-verifiable`` (:mod:`.checks`)."""
