"""``tuna eval``: the evaluations of the paper a user can run on local data, in parts.

- ``ranking``: held-out pairwise ranking accuracy (ordered pairs whose model scores agree with the given
  ranking; pairs tied in the ranking are left out, a model tie counts as a disagreement), Kendall's tau-b
  per group averaged over groups where it is defined, and the mean model-score gap between each group's
  best and worst candidate; scores are fused ``sequence_logprobs`` with the training length normalisation.
- ``generation``: greedy generation on instruction tasks with references (Super-NaturalInstructions
  style), ROUGE-L F (``rouge-score``, best over references) per record, averaged per task, then over tasks;
  batched, resumable, generations saved.
- ``verifiable``: greedy generation on records with IFEval ``constraints``, IFEval's four figures with bootstrap
  intervals (:mod:`.verifiable.evaluate`).

Parts: :mod:`.ranking` (ranking metrics, torch and tuna_kernels only: what training imports), :mod:`.text`
(ROUGE-L, exact match), :mod:`.scoring` (the model's scores), :mod:`.generation` (greedy answers),
:mod:`.reports` (report files, Markdown, plots; :func:`.reports.compare` puts reports side by side). This
package file imports none of them, so importing one part loads only what that part needs.
"""
