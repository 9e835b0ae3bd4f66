"""Independent naive implementations, for tests only: Python loops over groups and pairs, float64.

Written from the formulas in docs/METHOD.md and the papers, sharing no code with tuna_kernels.
"""

import math

import torch


def group_pairs(valid_row, target_row=None, skip_ties=False):
    """Ordered pairs (j above l) of one group, as index lists."""
    existing = [k for k, ok in enumerate(valid_row) if ok]
    out = []
    for a in range(len(existing)):
        for b in range(a + 1, len(existing)):
            j, l = existing[a], existing[b]
            if skip_ties and target_row[j] == target_row[l]:
                continue
            out.append((j, l))
    return out


def tuna_margin(scores, valid, margin, target=None, skip_ties=False):
    total = 0.0
    num_candidates = len(valid[0])
    for gap in range(1, num_candidates):
        hinges = []
        for g in range(len(scores)):
            for j, l in group_pairs(valid[g], target and target[g], skip_ties):
                if l - j == gap:
                    hinges.append(max(0.0, scores[g][l] - scores[g][j] + margin * gap))
        if hinges:
            total += sum(hinges) / len(hinges)
    return total


def listmle(scores, valid, temperature, target=None, skip_ties=False):
    losses = []
    for g in range(len(scores)):
        existing = [k for k, ok in enumerate(valid[g]) if ok]
        if len(existing) < 2:
            continue
        nll = 0.0
        for a, j in enumerate(existing):
            rest = [l for l in existing[a:] if l == j or not (skip_ties and target[g][l] == target[g][j])]
            denominator = math.log(sum(math.exp(scores[g][l] / temperature) for l in rest))
            nll -= scores[g][j] / temperature - denominator
        losses.append(nll)
    return sum(losses) / len(losses) if losses else 0.0


def rrhf(scores, valid, target=None, skip_ties=False):
    per_group = []
    for g in range(len(scores)):
        pairs = group_pairs(valid[g], target and target[g], skip_ties)
        if pairs:
            per_group.append(sum(max(0.0, scores[g][l] - scores[g][j]) for j, l in pairs))
    return sum(per_group) / len(per_group) if per_group else 0.0


def pairwise_logistic(scores, valid, beta, ref=None, gamma=0.0, target=None, skip_ties=False):
    losses = []
    for g in range(len(scores)):
        for j, l in group_pairs(valid[g], target and target[g], skip_ties):
            delta = scores[g][j] - scores[g][l]
            if ref is not None:
                delta -= ref[g][j] - ref[g][l]
            x = beta * delta - gamma
            losses.append(math.log1p(math.exp(-x)))  # -log sigmoid(x)
    return sum(losses) / len(losses) if losses else 0.0


def plackett_luce(scores, valid, beta, ref=None, target=None, skip_ties=False):
    """DPO's Plackett-Luce loss: -sum_k log(exp(r_k) / sum_{j >= k} exp(r_j)), r = beta (s - ref), mean over
    groups with >= 2 candidates."""
    losses = []
    for g in range(len(scores)):
        existing = [k for k, ok in enumerate(valid[g]) if ok]
        if len(existing) < 2:
            continue
        reward = {k: beta * (scores[g][k] - (ref[g][k] if ref is not None else 0.0)) for k in existing}
        nll = 0.0
        for a, k in enumerate(existing):
            rest = [j for j in existing[a:] if j == k or not (skip_ties and target[g][j] == target[g][k])]
            nll -= reward[k] - math.log(sum(math.exp(reward[j]) for j in rest))
        losses.append(nll)
    return sum(losses) / len(losses) if losses else 0.0


def lipo_lambda(scores, valid, beta, ref=None, target=None):
    """LiPO-lambda by a double loop over the pairs of each group: weight |G_i - G_j| |1/D(tau_i) - 1/D(tau_j)|,
    G = 2^label - 1 (labels: target, else n - 1 - index), D = log2(1 + rank by the model's rewards)."""
    per_group = []
    for g in range(len(scores)):
        existing = [k for k, ok in enumerate(valid[g]) if ok]
        if len(existing) < 2:
            continue
        n = len(existing)
        reward = {k: beta * (scores[g][k] - (ref[g][k] if ref is not None else 0.0)) for k in existing}
        label = {k: (target[g][k] if target is not None else n - 1 - i) for i, k in enumerate(existing)}
        by_reward = sorted(existing, key=lambda k: (-reward[k], k))
        rank = {k: by_reward.index(k) + 1 for k in existing}
        total = 0.0
        for a in range(n):
            for b in range(a + 1, n):
                i, j = existing[a], existing[b]
                weight = abs((2 ** label[i] - 1) - (2 ** label[j] - 1)) * abs(
                    1 / math.log2(1 + rank[i]) - 1 / math.log2(1 + rank[j]))
                total += weight * math.log1p(math.exp(-(reward[i] - reward[j])))
        per_group.append(total)
    return sum(per_group) / len(per_group) if per_group else 0.0


def tuna_objective_from_logits(logits, labels, seq_of_row, group_rank, margin=0.1, alpha=1.0, mle_weight=1.0,
                               mle_on="all", ignore_index=-100):
    """The whole Tuna objective from materialised logits.

    logits: [N, V] float64 (one row per target position), labels: [N], seq_of_row: [N] sequence of each row,
    group_rank: {seq: (group, rank)}. Scores: mean (alpha=1) of the token log-probs of each sequence.
    """
    logprobs = torch.log_softmax(logits, dim=-1)
    sums, counts = {}, {}
    for row in range(logits.shape[0]):
        if int(labels[row]) == ignore_index:
            continue
        seq = int(seq_of_row[row])
        sums[seq] = sums.get(seq, 0) + logprobs[row, int(labels[row])]
        counts[seq] = counts.get(seq, 0) + 1
    num_groups = 1 + max(g for g, _ in group_rank.values())
    num_candidates = 1 + max(r for _, r in group_rank.values())
    scores = [[None] * num_candidates for _ in range(num_groups)]
    for seq, (g, r) in group_rank.items():
        scores[g][r] = sums[seq] / counts[seq] ** alpha
    valid = [[s is not None for s in row] for row in scores]
    rank_loss = logits.new_zeros(())
    for gap in range(1, num_candidates):
        hinges = []
        for g in range(num_groups):
            for j, l in group_pairs(valid[g]):
                if l - j == gap:
                    hinges.append(torch.relu(scores[g][l] - scores[g][j] + margin * gap))
        if hinges:
            rank_loss = rank_loss + sum(hinges) / len(hinges)
    chosen = [s for s, (g, r) in group_rank.items() if mle_on == "all" or r == 0]
    mle = -sum(sums[s] for s in chosen) / sum(counts[s] for s in chosen)
    return rank_loss + mle_weight * mle
