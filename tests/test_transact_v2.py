"""TransAct V2: the per-candidate selection equals a brute-force reading of its definition (nearest tokens by
cosine with the candidate, ties to the newer, the newest realtime actions always kept, time order, padding where a
sequence is short or empty), the encoder's causal mask and padding hold, and a user with no history at all is
scored without NaN."""

import numpy as np
import torch

from pinnerformer.models.transact import EncoderLayer
from pinnerformer.models.transact_v2 import Stream, TransActV2, TransActV2Config, select
from pinnerformer.ops.quantize import dequantize_normalize, int8_table, quantize

A, E = 3, 8
CFG = TransActV2Config(k_lifelong=4, recent=2, k_realtime=2, k_impressions=3, realtime_len=6)


def stream(g, U, S, lengths, n_items):
    item = torch.randint(0, n_items, (U, S), generator=g)
    valid = torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]
    actions = (torch.rand(U, S, A, generator=g) < 0.4).float()
    return Stream(item, actions, torch.randint(0, 3, (U, S), generator=g), valid)


def setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    n_items = 50
    v = quantize(torch.randn(n_items, E, generator=g).numpy())
    table = torch.from_numpy(v.q)
    life = stream(g, 3, 10, [10, 0, 3], n_items)  # user 1 has no lifelong history
    real = stream(g, 3, 6, [6, 4, 1], n_items)
    imp = stream(g, 3, 5, [5, 2, 0], n_items)  # user 2 has no impressions
    offsets = torch.tensor([0, 2, 3, 6])
    cand = torch.randn(6, E, generator=g)
    return table, v, life, real, imp, offsets, cand


def brute_force(table, v, life, real, imp, offsets, cand):
    unit = dequantize_normalize(table, v.scale, v.zero).numpy().astype(np.float64)
    out = []
    for b in range(len(cand)):
        u = int(np.searchsorted(offsets.numpy(), b, side="right") - 1)
        c = cand[b].numpy().astype(np.float64)
        c = c / np.linalg.norm(c)

        def nearest(s, k, allowed):
            pos = [j for j in range(s.item.shape[1]) if allowed[j]]
            pos = sorted(pos, key=lambda j: (-float(unit[int(s.item[u, j])] @ c), -j))[:k]
            return [int(s.item[u, j]) for j in sorted(pos)] + [None] * (k - len(pos))

        n_real = int(real.valid[u].sum())
        recent = list(range(max(0, n_real - CFG.recent), n_real))
        row = nearest(life, CFG.k_lifelong, life.valid[u].tolist())
        row += [int(real.item[u, j]) for j in recent] + [None] * (CFG.recent - len(recent))
        row += nearest(real, CFG.k_realtime, [bool(real.valid[u, j]) and j not in recent for j in range(6)])
        row += nearest(imp, CFG.k_impressions, imp.valid[u].tolist())
        out.append(row)
    return out


def test_selection_equals_its_definition_with_padding_for_short_or_empty_sequences():
    table, v, life, real, imp, offsets, cand = setup()
    item, actions, surface, is_real = select(CFG, table, v.scale, v.zero, life, real, imp, offsets, cand)
    assert item.shape == (6, CFG.tokens) and actions.shape == (6, CFG.tokens, A)
    got = [[int(i) if r else None for i, r in zip(row_i, row_r)] for row_i, row_r in zip(item, is_real)]
    assert got == brute_force(table, v, life, real, imp, offsets, cand)
    assert not is_real[2, :CFG.k_lifelong].any()  # user 1: no lifelong history, padded
    assert not is_real[3:, -CFG.k_impressions:].any()  # user 2: no impressions


def test_causal_mask_and_padding_hold_and_an_empty_user_is_scored():
    torch.manual_seed(0)
    layer = EncoderLayer(16, 1, 8, dropout=0.0).eval()
    x = torch.randn(2, 7, 16)
    visible = torch.ones(2, 7, dtype=torch.bool)
    visible[1, 5:] = False
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    base = layer(x, visible, attn_mask=causal)
    later = x.clone()
    later[:, 4] += 3.0  # a later token changes nothing before it
    assert torch.allclose(layer(later, visible, attn_mask=causal)[:, :4], base[:, :4], atol=1e-6)
    padded = x.clone()
    padded[1, 5:] = 100.0  # padding is never attended to
    assert torch.allclose(layer(padded, visible, attn_mask=causal)[1, :5], base[1, :5], atol=1e-6)
    # the training form (written out) equals SDPA with the causal mask
    layer.p = 1e-12
    layer.train()
    assert torch.allclose(layer(x, visible, attn_mask=causal), base, atol=1e-5)

    table, v, life, real, imp, offsets, cand = setup(1)
    real.valid[2] = False
    life.valid[2] = False  # user 2: nothing at all
    model = TransActV2(CFG, n_actions=A, n_surfaces=2, vector_dim=E).eval()
    item, actions, surface, is_real = select(CFG, table, v.scale, v.zero, life, real, imp, offsets, cand)
    unit = dequantize_normalize(table[item], v.scale, v.zero)
    out = model(unit, actions, surface, is_real, torch.nn.functional.normalize(cand, dim=-1))
    assert out.shape == (6, CFG.out_dim) and torch.isfinite(out).all()
    assert not is_real[3:].any() and torch.allclose(out[3:], model.out.bias.expand(3, -1))


def test_request_streams_split_explicit_actions_and_impressions_before_the_request():
    from pinnerformer.data.timelines import Timelines
    from pinnerformer.features.v2_streams import request_streams

    # user 0: 12 events, actions 0 = impression, 1 = save, 2 = hide (explicit: save, hide); user 1: only impressions
    action = np.array([0, 1, 1, 0, 2, 1, 0, 1, 1, 2, 1, 0] + [0, 0, 0], dtype=np.int16)
    n = len(action)
    tl = Timelines(offsets=np.array([0, 12, 15]), item=np.arange(100, 100 + n, dtype=np.int32), action=action,
                   ts=np.arange(n, dtype=np.int64) * 10, surface=np.full(n, -1, np.int16),
                   duration=np.full(n, np.nan, np.float32))
    explicit = np.array([False, True, True])
    # request of user 0 before event 11 (11 events before it: 8 explicit, 3 impressions); user 1 before event 14
    s = request_streams(tl, np.array([0, 1]), np.array([11, 14]), explicit, realtime_len=3, lifelong_max=4,
                        impressions_max=2)
    item = lambda st, r: st.item[r][st.valid[r]].tolist()  # noqa: E731
    assert item(s.realtime, 0) == [108, 109, 110]  # the 3 newest explicit, oldest first
    assert item(s.lifelong, 0) == [102, 104, 105, 107]  # the 4 newest explicit before those (101 cut)
    assert s.lifelong_cut == 1
    assert item(s.impressions, 0) == [103, 106]  # the 2 newest non-explicit
    assert item(s.realtime, 1) == [] and item(s.lifelong, 1) == [] and item(s.impressions, 1) == [112, 113]
    assert (s.realtime.action[0][s.realtime.valid[0]] > 0).all()
    t = s.lifelong.tensors(3)
    assert t["actions"].shape == (2, 4, 3) and t["actions"][0].sum(-1).tolist() == [1.0] * 4
    assert t["actions"][1].sum() == 0  # padding has no action
    from pinnerformer.features.v2_streams import stream_spec

    spec = stream_spec(["impression", "save", "hide"], [1], [["hide"]], 3, 4, 2)
    assert spec.explicit.tolist() == [False, True, True]
    tensors = spec.tensors(tl, np.array([0, 1]), np.array([11, 14]))
    assert int(tensors["lifelong.cut"]) == 1 and tensors["realtime.item"][0].tolist() == [108, 109, 110]


def test_actions_on_one_item_are_one_multi_hot_token_placed_at_its_newest_explicit_action():
    from pinnerformer.data.timelines import Timelines
    from pinnerformer.features.v2_streams import request_streams

    # actions 0 = view (not explicit), 1 = cart, 2 = buy; Taobao-like: views, then a cart and a buy of item 5
    item = np.array([5, 5, 6, 7, 8, 5, 6, 9], dtype=np.int32)
    action = np.array([0, 1, 0, 2, 0, 2, 0, 1], dtype=np.int16)
    n = len(item)
    tl = Timelines(offsets=np.array([0, n]), item=item, action=action, ts=np.arange(n, dtype=np.int64),
                   surface=np.arange(n, dtype=np.int16), duration=np.full(n, np.nan, np.float32))
    s = request_streams(tl, np.array([0]), np.array([7]), np.array([False, True, True]), realtime_len=1,
                        lifelong_max=10, impressions_max=10)  # the request comes before event 7 (item 9)
    valid = lambda st: st.item[0][st.valid[0]].tolist()  # noqa: E731
    assert valid(s.realtime) == [5] and valid(s.lifelong) == [7] and valid(s.impressions) == [8, 6]
    assert s.realtime.tensors(3)["actions"][0, 0].tolist() == [1.0, 1.0, 1.0]  # viewed, carted and bought
    assert s.lifelong.tensors(3)["actions"][0, 0].tolist() == [0.0, 0.0, 1.0]
    assert s.impressions.tensors(3)["actions"][0, :2].tolist() == [[1.0, 0.0, 0.0]] * 2
    assert s.realtime.surface[0, 0] == 5 + 1 and s.impressions.surface[0].tolist() == [4 + 1, 6 + 1]  # placing event


def test_v2_finds_the_old_lifelong_action_that_transact_cannot_see(tmp_path):
    """Planted: the saved candidates resemble only actions of the user's first day, beyond a 16-action realtime
    window filled with noise every day; neither ranker has the PinnerFormer feature nor the point-in-time counters. TransAct V2's nearest
    lifelong tokens find them; TransAct is at the random order's level."""
    import json

    import polars as pl

    from pinnerformer.data.dataset import Dataset, set_content_vectors
    from pinnerformer.data.requests import RankData, RequestOptions, build_requests, parse_heads
    from pinnerformer.data.synthetic import planted_lifelong_log
    from pinnerformer.ranking.evaluate import evaluate_ranking
    from pinnerformer.ranking.prepare import prepare_ranking
    from pinnerformer.training.config import load_config
    from pinnerformer.training.ranking import load_rank_config, ranking_loop
    from pinnerformer.training.retrieval import retrieval_loop
    from tests.conftest import TINY, run_cli

    planted_lifelong_log().write_csv(tmp_path / "log.csv")
    assert run_cli("data", "prepare", "-f", "events", "-i", tmp_path / "log.csv", "-o", tmp_path / "ds",
                   "--action-col", "action", "--positive", "click,save").exit_code == 0
    ids = Dataset.open(tmp_path / "ds").items["item_id"].cast(pl.Int64).to_numpy()
    vec = np.eye(16, dtype=np.float32)[ids % 10] + np.random.default_rng(0).normal(0, 0.1, (len(ids), 16))
    set_content_vectors(tmp_path / "ds", vec, "planted-groups")
    ds = Dataset.open(tmp_path / "ds")
    opts = RequestOptions(request="session", heads=parse_heads("save=save", ds.manifest.action_names()))
    cfg = load_config("small", overrides=json.loads(json.dumps(
        {**TINY, "eval": {"until": build_requests(ds, opts).pf_until, "test_fraction": 0.0, "val_fraction": 0.2},
         "optim": {**TINY["optim"], "max_epochs": 1}})))
    retrieval_loop(ds, cfg, tmp_path / "pf", log=lambda s: None).fit(progress=False, max_steps=3)
    prepare_ranking(tmp_path / "ds", tmp_path / "rank", opts, pinnerformer=tmp_path / "pf", log=lambda s: None)
    rd = RankData(tmp_path / "rank")
    common = {"device": "cpu", "optim": {"batch_size": 128, "lr": 3e-3, "warmup_steps": 10, "max_epochs": 4,
                                         "patience": 2},
              "data": {"epoch_rows": 6000, "max_val_requests": 300}}
    # the sequence modules alone: the point-in-time counters (user x interest over all time) see the old day too
    models = {"transact": {"sequence": "transact", "features": False,
                           "transact": {"seq_len": 16, "time_window_hours": 0.0}},
              "transact-v2": {"sequence": "transact-v2", "features": False,
                              "v2": {"realtime_len": 16, "recent": 4, "k_realtime": 4, "k_lifelong": 8,
                                     "k_impressions": 4, "lifelong_max": 512, "d": 32, "layers": 1}}}
    runs = {}
    for name, model in models.items():
        over = {**common, "model": {**model, "use_pinnerformer": False, "mlp": [64], "item_id_dim": 0}}
        ranking_loop(rd, load_rank_config("default", overrides=json.loads(json.dumps(over))), tmp_path / name,
                     log=lambda s: None).fit(progress=False)
        runs[name] = tmp_path / name
    report, _ = evaluate_ranking(rd, runs, "test", reference="transact", n_boot=200, log=lambda s: None)
    hit = {n: report.models[n]["hit@3/save"].mean for n in report.models}
    # 3 of 8 shown candidates saved: the random order puts 1.125 of them in the top 3
    assert hit["transact"] < 1.5
    assert hit["transact-v2"] > 2.3
    assert report.lifts["transact-v2"]["hit@3/save"].ci95[0] > 0.4


def test_a_requests_v2_scores_do_not_depend_on_the_other_requests_in_the_batch():
    """Training batches mix the rows of many requests in any order; serving scores one request: the selected tokens
    and the scores must be the same (rows are grouped by request inside the model and put back in order)."""
    from pinnerformer.models.ranker import Ranker, RankerConfig, RankerInputs

    torch.manual_seed(0)
    table, v, life, real, imp, offsets, cand = setup(2)
    n_items = table.shape[0]
    inputs = RankerInputs(n_items=n_items, n_actions=A, n_surfaces=2, vector_dim=E, pf_dim=4, heads=("save",))
    cfg = RankerConfig.model_validate({"sequence": "transact-v2", "use_pinnerformer": False,
                                       "v2": CFG.model_dump(), "mlp": [16]})
    for width in (64, 5):  # the table as it is, and narrowed by the fixed projection
        int8 = int8_table(v.dequantize(), width)
        model = Ranker(cfg, inputs, torch.from_numpy(v.dequantize()), torch.randn(n_items, 4), int8=int8).eval()
        assert model.item_q.shape == (n_items, min(E, width)) and np.array_equal(model.item_q.numpy(), int8.q)
        _check_batch_independence(model, life, real, imp)


def _check_batch_independence(model, life, real, imp):
    from pinnerformer.features.rank_batch import RankBatch

    def batch(requests: list[int], rows: list[tuple[int, int]]) -> RankBatch:
        """rows: (request position in `requests`, candidate item)."""
        pick = lambda s, name: {f"{name}.item": s.item[requests], f"{name}.actions": s.actions[requests],  # noqa: E731
                                f"{name}.surface": s.surface[requests], f"{name}.valid": s.valid[requests]}
        R, N = len(requests), len(rows)
        return RankBatch(seq_action=torch.zeros(R, 1, dtype=torch.long), seq_item=torch.zeros(R, 1, dtype=torch.long),
                         seq_age=torch.zeros(R, 1), user_vec=torch.zeros(R, 4), has_vector=torch.zeros(R, dtype=bool),
                         hour=torch.zeros(R, dtype=torch.long), surface=torch.zeros(R, dtype=torch.long),
                         row_request=torch.tensor([r for r, _ in rows]), cand_item=torch.tensor([i for _, i in rows]),
                         labels=torch.zeros(N, 1), weight=torch.ones(N),
                         streams={**pick(life, "lifelong"), **pick(real, "realtime"), **pick(imp, "impressions")})

    mixed = [(2, 7), (0, 3), (1, 9), (0, 11), (2, 4), (2, 30)]  # interleaved rows of three requests
    with torch.no_grad():
        together = model(batch([0, 1, 2], mixed))
        model.train()  # the training form (dropout on) selects the same tokens as serving
        selected_in_training = model.selected_items(batch([0, 1, 2], mixed))
        model.eval()
        assert (selected_in_training >= 0).any()
        for q in range(3):
            served = batch([q], [(0, i) for r, i in mixed if r == q])
            rows = [k for k, (r, _) in enumerate(mixed) if r == q]
            assert torch.equal(model.selected_items(served), selected_in_training[rows])
            torch.testing.assert_close(model(served), together[rows], atol=1e-5, rtol=1e-5)


def test_next_action_loss_equals_its_float64_definition_and_skips_rows_without_negatives():
    from pinnerformer.objectives.next_action import next_action_loss, next_action_loss_reference

    g = torch.Generator().manual_seed(0)
    q, t = torch.randn(7, 5, generator=g), torch.nn.functional.normalize(torch.randn(7, 5, generator=g), dim=-1)
    negs = torch.nn.functional.normalize(torch.randn(7, 4, 5, generator=g), dim=-1)
    valid = torch.rand(7, 4, generator=g) > 0.4
    valid[2] = False  # no impression: skipped
    loss, used = next_action_loss(q, t, negs, valid, 0.1)
    assert used == int(valid.any(1).sum()) and used < 7
    assert abs(float(loss) - next_action_loss_reference(q, t, negs, valid, 0.1)) < 1e-5
    zero, none = next_action_loss(q, t, negs, torch.zeros_like(valid), 0.1)
    assert none == 0 and float(zero) == 0.0


def test_the_next_action_loss_reaches_the_v2_encoder():
    """In training, the V2 ranker collects each newest realtime token's query and its next positive item; the loss
    on them has a gradient in the encoder."""
    from pinnerformer.features.rank_batch import RankBatch
    from pinnerformer.models.ranker import Ranker, RankerConfig, RankerInputs
    from pinnerformer.objectives.next_action import next_action_loss

    torch.manual_seed(0)
    table, v, life, real, imp, offsets, cand = setup(4)
    real.actions[:] = 0
    real.actions[..., 1] = 1.0  # every realtime action is a positive one (code 1)
    cfg = RankerConfig.model_validate({"sequence": "transact-v2", "use_pinnerformer": False,
                                       "v2": CFG.model_dump(), "mlp": [16]})
    inputs = RankerInputs(n_items=table.shape[0], n_actions=A, n_surfaces=2, vector_dim=E, pf_dim=4, heads=("save",),
                          positive_actions=(1,))
    model = Ranker(cfg, inputs, torch.from_numpy(v.dequantize()), torch.randn(table.shape[0], 4)).train()
    model.collect_next_action = True
    pick = lambda s, n: {f"{n}.item": s.item, f"{n}.actions": s.actions, f"{n}.surface": s.surface,  # noqa: E731
                         f"{n}.valid": s.valid}
    user = torch.repeat_interleave(torch.arange(3), offsets[1:] - offsets[:-1])
    b = RankBatch(seq_action=torch.zeros(3, 1, dtype=torch.long), seq_item=torch.zeros(3, 1, dtype=torch.long),
                  seq_age=torch.zeros(3, 1), user_vec=torch.zeros(3, 4), has_vector=torch.zeros(3, dtype=bool),
                  hour=torch.zeros(3, dtype=torch.long), surface=torch.zeros(3, dtype=torch.long), row_request=user,
                  cand_item=torch.arange(6), labels=torch.zeros(6, 1), weight=torch.ones(6),
                  streams={**pick(life, "lifelong"), **pick(real, "realtime"), **pick(imp, "impressions")})
    model(b)
    x = model.next_action_inputs
    # user 0 has 6 realtime actions: its 2 newest are in S, one predicts the other; user 1 (4 actions) likewise;
    # user 2 has one realtime action: nothing to predict
    assert len(x["query"]) == 2 * 1 + 1 * 1
    loss, used = next_action_loss(x["query"], x["target"], x["negatives"], x["neg_valid"], 0.1)
    assert used == 3
    loss.backward()
    assert model.v2.next_action.weight.grad.abs().sum() > 0 and model.v2.layers[0].qkv.weight.grad.abs().sum() > 0
