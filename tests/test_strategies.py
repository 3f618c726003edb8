"""Decoding strategies (engine/strategies.py, order "confidence" in the sampler) against
hand-built orders, a plain-Python greedy and the uncached reference decoder of test_sampler."""

from __future__ import annotations

import math

import pytest
import torch
from test_sampler import CLASSES, GRID, N, Recorder, _block_causal_reference, _tiny

from arpg.engine import sampler as S
from arpg.engine import strategies as T
from arpg.errors import ArpgError
from arpg.utils import make_generator


@pytest.fixture(scope="module")
def arpg():
    return _tiny("ARPG-T")


# ---- region-parallel (PAR) ------------------------------------------------------------------

@pytest.mark.parametrize("name,blocks", [("region-2x2", 2), ("region-4x4", 4)])
def test_region_orders_decode_the_same_cell_of_every_block_together(name, blocks):
    side = 8
    order = S.fixed_order(name, side, side).tolist()
    assert sorted(order) == list(range(side * side))
    size = side // blocks
    for g in range(0, side * side, blocks * blocks):
        group = order[g:g + blocks * blocks]
        assert {(p // side // size, p % side // size) for p in group} == {(R, C) for R in range(blocks)
                                                                          for C in range(blocks)}
        assert len({(p // side % size, p % side % size) for p in group}) == 1  # one relative cell
    assert order[:4] == ([0, 4, 32, 36] if blocks == 2 else [0, 2, 4, 6])


def test_region_order_needs_a_divisible_grid():
    with pytest.raises(ArpgError, match="divisible by 4"):
        S.fixed_order("region-4x4", 6, 6)


# ---- locality-aware (LPD) ------------------------------------------------------------------

def _locality_reference(counts, h, w, batch, gen, known=None):
    """The same greedy in plain Python: per sample, per pick, a loop over the cells."""
    n = h * w
    cell = [divmod(i, w) for i in range(n)]
    dist = [[math.dist(cell[a], cell[b]) for b in range(n)] for a in range(n)]
    decoded = [set() if known is None else {i for i in range(n) if known[b, i]} for b in range(batch)]
    orders = [sorted(d) for d in decoded]
    for k in counts:
        noise = (torch.rand(batch, n, generator=gen, dtype=torch.float64) * T._TIE_NOISE).tolist()
        for b in range(batch):
            before = set(decoded[b])
            spacing = math.sqrt((n - len(before)) / k)
            chosen = []
            for _ in range(k):
                def score(i):
                    spread = min([dist[i][j] for j in chosen] + [math.inf])
                    near = min([dist[i][j] for j in before] + [math.inf]) if before else 0.0
                    return min(spread, spacing) - near + noise[b][i]
                best = max((i for i in range(n) if i not in decoded[b]), key=score)
                chosen.append(best)
                decoded[b].add(best)
            orders[b] += chosen
    return torch.tensor(orders)


@pytest.mark.parametrize("side,steps,with_context", [(8, 8, False), (8, 3, True), (6, 5, False)])
def test_locality_orders_match_a_plain_python_greedy(side, steps, with_context):
    n = side * side
    known = None
    if with_context:
        known = torch.zeros(3, n, dtype=torch.bool)
        known[:, :n // 2] = True  # the top half known (outpainting-like)
    counts = S.step_counts(n - (n // 2 if with_context else 0), steps, "cosine")
    got = T.locality_orders(counts, side, side, 3, make_generator(5), known)
    want = _locality_reference(counts, side, side, 3, make_generator(5), known)
    assert torch.equal(got, want)


def _step_stats(orders_BN, counts, side):
    """Mean over steps > 0 of: nearest same-step distance of each pick, nearest decoded distance."""
    dist = T.grid_distances(side, side)
    spread, near = [], []
    for b in range(orders_BN.shape[0]):
        done = orders_BN[b, :counts[0]].tolist()
        start = counts[0]
        for k in counts[1:]:
            group = orders_BN[b, start:start + k].tolist()
            if k > 1:
                d = dist[group][:, group] + torch.eye(k, dtype=torch.float64) * 1e9
                spread.append(d.min(dim=1).values.mean().item())
            near.append(dist[group][:, done].min(dim=1).values.mean().item())
            done += group
            start += k
    return sum(spread) / len(spread), sum(near) / len(near)


def test_locality_groups_spread_out_and_stay_near_the_decoded_tokens():
    side, counts = 8, S.step_counts(64, 8, "cosine")
    local = T.locality_orders(counts, side, side, 32, make_generator(0))
    rand = S.make_orders("random", 32, side, side, make_generator(0))
    local_spread, local_near = _step_stats(local, counts, side)
    rand_spread, rand_near = _step_stats(rand, counts, side)
    assert local_near < 0.8 * rand_near  # close to the context
    assert local_spread > rand_spread  # far from each other
    first = local[:, :counts[0]]  # the first step spreads: its 2 cells at least half the grid apart
    assert (T.grid_distances(side, side)[first[:, 0], first[:, 1]] >= side / 2).all()


def test_strategies_chosen_while_decoding_are_refused_up_front():
    for name in (T.LOCALITY, T.CONFIDENCE):
        with pytest.raises(ArpgError, match="chosen while decoding"):
            S.make_orders(name, 2, 4, 4, make_generator(0))


# ---- confidence-ordered decoding ---------------------------------------------------------------

def _confidence_reference(model, labels_B, steps, cfg, seed, noise):
    """Uncached: every step reruns the block-causal forward, queries every remaining position (in raster
    order), draws a token at each and commits the k highest log-probabilities (+ annealed Gumbel)."""
    gen = make_generator(seed)
    B = labels_B.shape[0]
    guided = cfg != 1.0
    ids = S._class_ids(model, labels_B, guided)[:, None]
    pos = torch.full_like(ids, -1)
    block = torch.zeros(1, dtype=torch.long)
    tokens = torch.zeros(B, N, dtype=torch.long)
    remaining = [list(range(N)) for _ in range(B)]
    counts = S.step_counts(N, steps, "arccos")
    for s, k in enumerate(counts):
        rest = torch.tensor(remaining)  # [B, R]
        logits = _block_causal_reference(model, ids, pos, block, rest.repeat(1 + guided, 1))
        logits = S.mix_guidance(logits, B, S.cfg_weight(cfg, "linear", N - rest.shape[1] + k, N))
        drawn, logprob = S.sample_tokens(logits, temperature=1.0, top_k=0, top_p=1.0, generator=gen,
                                         with_logprob=True)
        scale = noise * (1 - (s + 1) / steps)
        if scale > 0:
            u = torch.rand(logprob.shape, generator=gen).clamp_(1e-20, 1 - 1e-7)
            logprob = logprob - scale * torch.log(-torch.log(u))
        pick = logprob.topk(k, dim=1).indices  # [B, k]
        targets, new = rest.gather(1, pick), drawn.gather(1, pick)
        tokens.scatter_(1, targets, new)
        for b in range(B):
            taken = set(targets[b].tolist())
            remaining[b] = [p for p in remaining[b] if p not in taken]
        ids = torch.cat([ids, new.repeat(1 + guided, 1)], dim=1)
        pos = torch.cat([pos, targets.repeat(1 + guided, 1)], dim=1)
        block = torch.cat([block, torch.full((k,), s + 1)])
    return tokens


@pytest.mark.parametrize("steps,cfg,noise", [(4, 1.0, 0.0), (5, 3.0, 4.5)])
def test_confidence_matches_the_uncached_reference(arpg, steps, cfg, noise):
    labels = torch.tensor([0, 1, 2])
    rec = Recorder(arpg)
    tokens, orders = S.generate_arpg(rec, labels, steps=steps, cfg=cfg, order="confidence", confidence_noise=noise,
                                     generator=make_generator(9), return_orders=True)
    with torch.no_grad():
        want = _confidence_reference(arpg, labels, steps, cfg, seed=9, noise=noise)
    assert torch.equal(tokens, want)
    # each step queried every remaining position: the cost is sum of what is left, not N
    assert [q.shape[1] for q in rec.queried] == [N - sum(S.step_counts(N, steps, "arccos")[:s])
                                                 for s in range(steps)]
    assert torch.equal(orders.sort(dim=1).values, torch.arange(N).expand(3, -1))


@pytest.mark.parametrize("order", ["locality", "confidence", "region-2x2"])
def test_strategies_keep_the_zero_shot_context(arpg, order):
    known = torch.zeros(2, N, dtype=torch.bool)
    known[:, :6] = True
    context = S.Context(tokens_BN=torch.randint(0, 32, (2, N), generator=make_generator(1)), known_BN=known)
    tokens, orders = S.generate_arpg(arpg, torch.tensor([0, CLASSES - 1]), steps=3, cfg=2.0, order=order,
                                     generator=make_generator(2), context=context, return_orders=True)
    assert torch.equal(tokens[:, :6], context.tokens_BN[:, :6])
    assert torch.equal(orders[:, :6], torch.arange(6).expand(2, -1))  # the context first
    assert GRID == 4
