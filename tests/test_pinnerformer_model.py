"""Model: causality, shapes and normalisation, feature switches, the data pipeline's time features."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pinnerformer.data.timelines import Timelines
from pinnerformer.features.sequence_batch import build_sequence_batch, to_torch
from pinnerformer.errors import PinnerformerError
from pinnerformer.models.pinnerformer import InputSpec, PinnerFormer, PinnerFormerConfig

INPUTS = InputSpec(n_items=50, n_actions=3, n_surfaces=2, max_len=16)


def random_batch(B=3, T=12, n_items=50, seed=0):
    g = np.random.default_rng(seed)
    ts = np.sort(g.integers(1_600_000_000, 1_600_900_000, (B, T)), axis=1)
    return {"item": g.integers(0, n_items, (B, T)), "action": g.integers(-1, 3, (B, T)),
            "surface": g.integers(-1, 2, (B, T)), "duration": np.where(g.random((B, T)) < 0.3, np.nan,
                                                                        g.exponential(10, (B, T))).astype(np.float32),
            "length": np.array([T, T - 2, 5]), "t_since": g.exponential(1e5, (B, T)).astype(np.float32),
            "t_gap": g.exponential(1e4, (B, T)).astype(np.float32),
            "t_abs_frac": g.random((B, T, 12)).astype(np.float32), "t_abs_days": (ts / 86400).astype(np.float32)}


def make_model(features="both", time=True, seed=0):
    torch.manual_seed(seed)
    cfg = PinnerFormerConfig(width=32, layers=2, heads=4, dim=24, dropout=0.0, item_features=features, id_dim=16)
    spec = InputSpec(n_items=50, n_actions=3, n_surfaces=2, max_len=16, content_dim=8 if features != "id" else 0,
                     has_clock=time)
    content = torch.randn(50, 8) if features != "id" else None
    return PinnerFormer(cfg, spec, content).eval()


@pytest.mark.parametrize("i", [0, 4, 9])
def test_output_at_position_i_ignores_later_actions(i):
    model = make_model()
    a = random_batch()
    b = {k: v.copy() for k, v in a.items()}
    other = random_batch(seed=1)
    for k in ["item", "action", "surface", "duration", "t_since", "t_gap", "t_abs_frac", "t_abs_days"]:
        b[k][:, i + 1:] = other[k][:, i + 1:]  # everything about the later actions changes
    with torch.no_grad():
        out_a = model.encode_sequence(to_torch(a))
        out_b = model.encode_sequence(to_torch(b))
    # positions are indexed by recency from each row's length, so compare rows with the same length
    assert torch.allclose(out_a[:, :i + 1], out_b[:, :i + 1], atol=1e-6)
    assert not torch.allclose(out_a[0, i + 1:], out_b[0, i + 1:], atol=1e-3)  # the later positions did change


def test_dropping_later_actions_keeps_earlier_outputs():
    model = make_model()
    a = random_batch()
    b = {k: v.copy() for k, v in a.items()}
    b["length"] = np.array([4, 4, 4])  # the same users, seen only up to their 4th action
    with torch.no_grad():
        full = model.encode_sequence(to_torch(a))
        cut = model.encode_sequence(to_torch(b))
        last = model.user_embedding(to_torch(b))
    assert torch.allclose(full[:, :4], cut[:, :4], atol=1e-6)
    assert torch.allclose(last, full[:, 3], atol=1e-6)


def test_user_embedding_is_the_newest_position_with_the_last_block_at_that_position_only():
    """user_embedding runs the last block at each row's newest position only (Block.forward_at): the same vectors
    as encode_sequence at length - 1, for rows of different lengths (1 included), with the skipped work counted."""
    from torch.utils.flop_counter import FlopCounterMode

    model = make_model()
    b = random_batch(B=4, T=12)
    b["length"] = np.array([12, 7, 1, 3])
    batch = to_torch(b)
    with torch.no_grad():
        full = model.encode_sequence(batch)
        got = model.user_embedding(batch)
        with FlopCounterMode(display=False) as every:
            model.hidden_states(batch)
        with FlopCounterMode(display=False) as newest:
            model.user_state(batch)
    torch.testing.assert_close(got, full[torch.arange(4), batch["length"] - 1], atol=1e-6, rtol=0)
    # the last block's projections: 24·B·T·H² FLOPs at every position, 4·B·T·H² (keys, values) + 20·B·H² at one;
    # the one position's attention (4·B·T·H) is written out, so counted, where the full pass's fused kernel is not
    B, T, H = 4, 12, model.cfg.width
    assert every.get_total_flops() - newest.get_total_flops() == 20 * B * H * H * (T - 1) - 4 * B * T * H


def test_residual_dtype_compute_is_a_no_op_without_autocast():
    b = to_torch(random_batch())
    outs = []
    for mode in ("float32", "compute"):
        model = make_model()
        model.cfg.residual_dtype = mode
        with torch.no_grad():
            outs.append(model.encode_sequence(b))
    assert torch.equal(outs[0], outs[1])


def test_residual_stream_is_bf16_under_autocast_with_residual_dtype_compute():
    """model.residual_dtype=compute: under bf16 autocast the blocks pass a bf16 residual stream (float32 otherwise),
    and the outputs stay within bf16 rounding of the float32 model. Run in a subprocess on the CPU: its bf16
    matmuls need oneDNN capped below AMX on this kind of VM (ONEDNN_MAX_CPU_ISA, read at start-up)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = """
import sys, torch
sys.path.insert(0, "tests")
from test_pinnerformer_model import make_model, random_batch
from pinnerformer.features.sequence_batch import to_torch
b = to_torch(random_batch())
for mode in ("float32", "compute"):
    model = make_model()
    model.cfg.residual_dtype = mode
    seen = []
    for blk in model.blocks:
        blk.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    with torch.no_grad():
        ref = model.encode_sequence(b)
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.encode_sequence(b)
    print(mode, sorted({str(d) for d in seen}), float((ref * out).sum(-1).min()))
"""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {line.split()[0]: line for line in r.stdout.splitlines()}
    assert "['torch.float32']" in rows["float32"] and "['torch.bfloat16']" in rows["compute"]
    assert all(float(line.split()[-1]) > 0.999 for line in rows.values())


def test_padding_does_not_leak_into_real_positions():
    model = make_model()
    a = random_batch()
    b = {k: v.copy() for k, v in a.items()}
    b["item"][2, 5:] = 0  # row 2 has length 5: everything after it is padding
    b["action"][2, 5:] = 2
    with torch.no_grad():
        ua = model.user_embedding(to_torch(a))
        ub = model.user_embedding(to_torch(b))
    assert torch.allclose(ua, ub, atol=1e-6)


@pytest.mark.parametrize("features, time", [("both", True), ("content", True), ("id", False)])
def test_outputs_are_unit_vectors(features, time):
    model = make_model(features, time)
    batch = to_torch(random_batch())
    with torch.no_grad():
        out = model.encode_sequence(batch)
        items = model.item_embedding(torch.arange(50))
    assert out.shape == (3, 12, 24) and items.shape == (50, 24)
    assert torch.allclose(out.norm(dim=-1), torch.ones(3, 12), atol=1e-5)
    assert torch.allclose(items.norm(dim=-1), torch.ones(50), atol=1e-5)


def test_temperature_is_clamped():
    model = make_model()
    with torch.no_grad():
        model.log_tau.fill_(-10.0)
    assert model.temperature.item() == pytest.approx(0.01)


def test_sequence_batch_time_features_are_exact():
    ts = np.array([1_700_000_000, 1_700_000_900, 1_700_086_400], dtype=np.int64)
    tl = Timelines(offsets=np.array([0, 3]), item=np.array([4, 5, 6], np.int32), action=np.array([0, 1, 0], np.int16),
                   ts=ts, surface=np.array([-1, 0, 1], np.int16), duration=np.array([np.nan, 0, 5], np.float32))
    b = build_sequence_batch(tl, np.array([0, 0]), np.array([3, 2]), time_features=True)
    assert b["length"].tolist() == [3, 2]
    assert b["item"].tolist() == [[4, 5, 6], [4, 5, 0]] and b["action"][1].tolist() == [0, 1, -1]
    assert b["t_since"][0].tolist() == [86400, 85500, 0] and b["t_since"][1].tolist() == [900, 0, 0]
    assert b["t_gap"][0].tolist() == [0, 900, 85500]
    # 1_700_000_000 mod 900 = 800 (0.25 h period); exact even though the timestamp does not fit float32
    assert b["t_abs_frac"][0, 0, 0] == pytest.approx(800 / 900)
    # with an explicit query time, earlier positions do not depend on later actions
    q = np.array([1_700_100_000, 1_700_100_000])
    bq = build_sequence_batch(tl, np.array([0, 0]), np.array([3, 2]), True, query_time=q)
    assert bq["t_since"][0, :2].tolist() == bq["t_since"][1, :2].tolist()


def test_tied_item_tower_scores_with_the_shared_item_features():
    """item_tower=none: the item embedding is the normalised input item features (SASRec's tied table), with no
    tower parameters in between; linear is one projection."""
    torch.manual_seed(0)
    cfg = PinnerFormerConfig(width=32, layers=1, heads=4, dim=16, item_features="id", id_dim=16, time_features=False,
                             item_tower="none")
    model = PinnerFormer(cfg, INPUTS).eval()
    items = torch.arange(50)
    expected = torch.nn.functional.normalize(model.items(items), dim=-1)
    assert torch.allclose(model.item_embedding(items), expected)
    assert not any(n.startswith("item_tower") for n, _ in model.named_parameters())
    linear = PinnerFormer(cfg.model_copy(update={"item_tower": "linear"}), INPUTS)
    assert [tuple(p.shape) for n, p in linear.named_parameters() if n.startswith("item_tower")] == [(16, 16), (16,)]
    with pytest.raises(PinnerformerError, match=r"item_features=id\) must equal model.dim \(24\)"):
        PinnerFormer(cfg.model_copy(update={"dim": 24}), INPUTS)


def test_input_dropout_is_active_in_training_only():
    torch.manual_seed(0)
    cfg = PinnerFormerConfig(width=32, layers=1, heads=4, dim=16, dropout=0.0, item_features="id", id_dim=16,
                             time_features=False, input_dropout=0.5)
    model = PinnerFormer(cfg, INPUTS)
    b = to_torch({k: v for k, v in random_batch(n_items=50).items() if not k.startswith("t_")})
    model.train()
    assert not torch.allclose(model.encode_sequence(b), model.encode_sequence(b))  # two dropout masks
    model.eval()
    assert torch.equal(model.encode_sequence(b), model.encode_sequence(b))
    cfg0 = cfg.model_copy(update={"input_dropout": 0.0})
    torch.manual_seed(0)
    model0 = PinnerFormer(cfg0, INPUTS).eval()
    model0.load_state_dict(model.state_dict())  # the dropout adds no parameters
    assert torch.equal(model0.encode_sequence(b), model.encode_sequence(b))


def test_a_users_vector_does_not_depend_on_who_shares_the_batch():
    """The daily job copies vectors between snapshots and recomputes only some users, relying on a user's vector being
    bit-for-bit the same whichever users share the (fixed-shape) batch and in which row; several CPU threads
    included (the fused attention kernel broke this in the last bit)."""
    torch.manual_seed(0)
    model = PinnerFormer(PinnerFormerConfig(width=32, layers=1, heads=2, dim=32, item_features="id", id_dim=32),
                         InputSpec(n_items=500, n_actions=3, n_surfaces=2, max_len=16)).eval()
    g = np.random.default_rng(0)
    B, T = 256, 16
    batch = random_batch(B=B, T=T, n_items=500)
    batch["length"] = g.integers(1, T + 1, B)
    perm = g.permutation(B)
    other = {k: v[perm] for k, v in batch.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            a = model.user_embedding(to_torch(batch)).numpy()
            b = model.user_embedding(to_torch(other)).numpy()
    finally:
        torch.set_num_threads(threads)
    assert a[perm].tobytes() == b.tobytes()


def test_dot_score_uses_unnormalised_embeddings_and_the_raw_item_table():
    """score=dot: user embeddings are the head's output as is, items (item_tower none) the ID table itself (no
    LayerNorm, so an item's norm is free to carry its popularity), τ fixed at 1; cosine keeps unit vectors."""
    import torch
    from pinnerformer.models.pinnerformer import InputSpec, PinnerFormer, PinnerFormerConfig

    spec = InputSpec(n_items=30, n_actions=1, n_surfaces=1, max_len=8, has_clock=False)
    kw = dict(width=16, dim=16, id_dim=16, item_features="id", item_tower="none", heads=2)
    torch.manual_seed(0)
    dot = PinnerFormer(PinnerFormerConfig(score="dot", **kw), spec).eval()
    torch.manual_seed(0)
    cos = PinnerFormer(PinnerFormerConfig(**kw), spec).eval()
    items = torch.arange(30)
    assert torch.equal(dot.item_embedding(items), dot.items.id_emb.weight)
    assert torch.allclose(cos.item_embedding(items).norm(dim=-1), torch.ones(30))
    assert dot.temperature.item() == 1.0 and cos.temperature.item() == pytest.approx(0.07)
    b = {"item": torch.randint(0, 30, (3, 5)), "action": torch.zeros(3, 5, dtype=torch.long),
         "surface": torch.zeros(3, 5, dtype=torch.long), "duration": torch.full((3, 5), float("nan")),
         "length": torch.tensor([5, 3, 1])}
    with torch.no_grad():
        u_dot, u_cos = dot.user_embedding(b), cos.user_embedding(b)
        seq = dot.encode_sequence(b)
    assert not torch.allclose(u_dot.norm(dim=-1), torch.ones(3), atol=1e-3)
    assert torch.allclose(u_cos.norm(dim=-1), torch.ones(3))
    # the same network underneath: cosine's embedding is dot's, normalised; the newest position's path agrees
    assert torch.allclose(torch.nn.functional.normalize(u_dot, dim=-1), u_cos, atol=1e-5)
    assert torch.allclose(seq[torch.arange(3), b["length"] - 1], u_dot, atol=1e-5)


def test_sasrec_shaped_head_and_feed_forward():
    """head=norm: the final LayerNorm only (plus Linear(H, D) when D != H); ffn_mult sets the blocks' MLP width;
    the newest-position path still equals the every-position one."""
    import torch
    from pinnerformer.models.pinnerformer import InputSpec, PinnerFormer, PinnerFormerConfig

    spec = InputSpec(n_items=30, n_actions=1, n_surfaces=1, max_len=8, has_clock=False)
    m = PinnerFormer(PinnerFormerConfig(width=16, dim=16, id_dim=16, heads=2, head="norm", ffn_mult=1,
                                        item_features="id"), spec).eval()
    assert [type(x).__name__ for x in m.head] == ["LayerNorm"]
    assert m.blocks[0].ffn[0].weight.shape == (16, 16)
    narrow = PinnerFormer(PinnerFormerConfig(width=16, dim=8, id_dim=16, heads=2, head="norm"), spec)
    assert [type(x).__name__ for x in narrow.head] == ["LayerNorm", "Linear"] and narrow.blocks[0].ffn[0].out_features == 64
    b = {"item": torch.randint(0, 30, (3, 5)), "action": torch.zeros(3, 5, dtype=torch.long),
         "surface": torch.zeros(3, 5, dtype=torch.long), "duration": torch.full((3, 5), float("nan")),
         "length": torch.tensor([5, 3, 1])}
    with torch.no_grad():
        assert torch.allclose(m.encode_sequence(b)[torch.arange(3), b["length"] - 1], m.user_embedding(b), atol=1e-5)


def test_item_interests_add_the_mean_of_their_embeddings_to_the_id_embedding():
    """item_interests: raw item feature = ID embedding + mean of the item's interest embeddings (none: + 0); the
    interest embeddings get gradients; the model refuses interests without an ID part or a table."""
    spec = InputSpec(n_items=4, n_actions=1, n_surfaces=1, max_len=8, has_clock=False, interests=("a", "b", "c"))
    table = torch.tensor([[0, 1], [2, 3], [3, 3], [1, 0]])  # index 3 pads: item 2 has no interests
    cfg = PinnerFormerConfig(width=8, dim=8, id_dim=8, heads=2, item_features="id", item_tower="none",
                             item_interests="on")
    m = PinnerFormer(cfg, spec, interests=table)
    ids, ints = m.items.id_emb.weight, m.items.interest_emb.weight
    assert torch.equal(ints[3], torch.zeros(8))  # the padding row stays zero
    raw = m.items.raw(torch.arange(4))
    expected = ids + torch.stack([(ints[0] + ints[1]) / 2, ints[2], torch.zeros(8), (ints[1] + ints[0]) / 2])
    assert torch.allclose(raw, expected, atol=1e-7)
    raw.sum().backward()
    assert m.items.interest_emb.weight.grad[:3].abs().sum() > 0 and m.items.interest_emb.weight.grad[3].abs().sum() == 0
    with pytest.raises(PinnerformerError, match="need item_features id or both"):
        PinnerFormer(cfg.model_copy(update={"item_features": "content", "item_tower": "mlp"}),
                     InputSpec(n_items=4, n_actions=1, n_surfaces=1, max_len=8, content_dim=8, interests=("a",)),
                     torch.randn(4, 8), table)
    with pytest.raises(PinnerformerError, match="interest table"):
        PinnerFormer(cfg, spec)


def test_id_dropout_leaves_out_id_embeddings_of_items_with_interests_in_training_only():
    spec = InputSpec(n_items=4, n_actions=1, n_surfaces=1, max_len=8, has_clock=False, interests=("a", "b", "c"))
    table = torch.tensor([[0, 1], [2, 3], [3, 3], [1, 0]])  # item 2 has no interests: it always keeps its ID
    cfg = PinnerFormerConfig(width=8, dim=8, id_dim=8, heads=2, item_features="id", item_tower="none",
                             item_interests="on", id_dropout=0.3, duration_surface_features=False,
                             action_features=False)
    m = PinnerFormer(cfg, spec, interests=table)
    items = torch.arange(4).repeat(5000)
    torch.manual_seed(0)
    raw = m.items.raw(items, 0.3)
    full, no_id = m.items.raw(torch.arange(4)), m.items.raw(torch.arange(4)) - m.items.id_emb.weight
    dropped = torch.isclose(raw, no_id[items], atol=1e-7).all(-1)
    kept = torch.isclose(raw, full[items], atol=1e-7).all(-1)
    assert bool((dropped ^ kept).all())  # each row is one or the other
    share = dropped.view(5000, 4).float().mean(0)
    assert share[2] == 0 and all(abs(share[i] - 0.3) < 0.03 for i in (0, 1, 3)), share
    b = {"item": items.view(100, 200)[:, :8], "action": torch.zeros(100, 8, dtype=torch.long),
         "surface": torch.zeros(100, 8, dtype=torch.long), "duration": torch.full((100, 8), float("nan")),
         "length": torch.full((100,), 8)}
    m.eval()
    assert torch.equal(m.action_features(b), m.items(b["item"]))  # evaluation: every ID is read
    m.train()
    assert not torch.equal(m.action_features(b), m.items(b["item"]))
    # target_id_dropout: the same for the scored items, in training only (the input side's setting aside)
    assert torch.equal(m.item_embedding(items), F.normalize(m.items(items), dim=-1))  # 0: every scored ID is read
    m.cfg = cfg.model_copy(update={"id_dropout": 0.0, "target_id_dropout": 0.5})
    torch.manual_seed(1)
    scored = m.item_embedding(items)
    gone = torch.isclose(scored, F.normalize(m.items.norm(no_id[items]), dim=-1), atol=1e-6).all(-1).view(5000, 4)
    share = gone.float().mean(0)
    assert share[2] == 0 and all(abs(share[i] - 0.5) < 0.03 for i in (0, 1, 3)), share
    m.eval()
    assert torch.equal(m.item_embedding(items), F.normalize(m.items(items), dim=-1))


def test_gated_block_is_causal_and_its_newest_position_path_agrees():
    """block=gated (sigmoid-gated branches, SwiGLU feed-forward): causal at every position, and the inference path
    (last block at the newest position only) equals the every-position one."""
    torch.manual_seed(0)
    cfg = PinnerFormerConfig(width=32, layers=2, heads=4, dim=24, dropout=0.0, item_features="id", id_dim=16,
                             block="gated", ffn_mult=2)
    model = PinnerFormer(cfg, InputSpec(n_items=50, n_actions=3, n_surfaces=2, max_len=16)).eval()
    blk = model.blocks[0]
    assert not hasattr(blk, "ffn") and blk.ffn_gate_up.out_features == 2 * 2 * 32 and blk.gate_attn.in_features == 32
    assert_causal_with_agreeing_newest_path(model)


def assert_causal_with_agreeing_newest_path(model: PinnerFormer) -> dict:
    """Every position ignores later actions, and the inference path (the last block at the newest position only)
    equals the every-position one. Returns the batch it used."""
    a, other = random_batch(B=4, T=12), random_batch(B=4, T=12, seed=1)
    a["length"] = np.array([12, 7, 1, 3])
    b = {k: v.copy() for k, v in a.items()}
    for k in ["item", "action", "surface", "duration", "t_since", "t_gap", "t_abs_frac", "t_abs_days"]:
        b[k][:, 5:] = other[k][:, 5:]
    with torch.no_grad():
        full_a, full_b = model.encode_sequence(to_torch(a)), model.encode_sequence(to_torch(b))
        newest = model.user_embedding(to_torch(a))
    assert torch.allclose(full_a[:, :5], full_b[:, :5], atol=1e-6) and not torch.allclose(full_a[0, 5:], full_b[0, 5:])
    torch.testing.assert_close(newest, full_a[torch.arange(4), torch.tensor(a["length"]) - 1], atol=1e-6, rtol=0)
    return a


def test_prefix_low_pass_filters_each_prefix_like_bsarec_on_that_prefix_alone():
    """Row t of the causal filter is BSARec's low-pass (rfft, frequencies >= cutoff zeroed, irfft) of x[0..t] read at
    t; prefixes with no frequency at or above the cutoff pass unchanged."""
    from pinnerformer.models.pinnerformer import prefix_low_pass
    T, c = 12, 3
    x = torch.randn(T, 5, dtype=torch.float64)
    L = prefix_low_pass(T, c).double()
    assert torch.equal(L, L.tril())
    for t in range(T):
        spec = torch.fft.rfft(x[:t + 1], dim=0)
        spec[c:] = 0
        torch.testing.assert_close((L @ x)[t], torch.fft.irfft(spec, n=t + 1, dim=0)[t], atol=1e-6, rtol=0)
    torch.testing.assert_close((L @ x)[:2 * c - 2], x[:2 * c - 2], atol=1e-6, rtol=0)  # n // 2 + 1 <= c: no cut
    assert not torch.allclose((L @ x)[2 * c:], x[2 * c:])


@pytest.mark.parametrize("block", ["pre-norm", "gated"])
def test_frequency_branch_is_causal_learns_beta_and_its_newest_position_path_agrees(block):
    torch.manual_seed(0)
    cfg = PinnerFormerConfig(width=32, layers=2, heads=4, dim=24, dropout=0.0, item_features="id", id_dim=16,
                             block=block, frequency_mix=0.7, frequency_cutoff=2)
    model = PinnerFormer(cfg, InputSpec(n_items=50, n_actions=3, n_surfaces=2, max_len=16)).eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.sqrt_beta.uniform_(0.2, 1.5)  # away from β = 1, where the filter would pass its input unchanged
    a = assert_causal_with_agreeing_newest_path(model)
    with torch.no_grad():
        full_a = model.encode_sequence(to_torch(a))
        at = torch.tensor([3, 2, 0, 1])  # any position per row, not only the newest, through the one-position path
        torch.testing.assert_close(model.user_embedding(to_torch(a), at), full_a[torch.arange(4), at], atol=1e-6, rtol=0)
    # the filter is a buffer built once (not saved with the weights); inputs longer than max_len build their own
    assert "blocks.0.low_pass" not in model.state_dict() and model.blocks[0].low_pass.shape == (16, 16)
    torch.testing.assert_close(model.blocks[0]._low_pass(20)[:16, :16], model.blocks[0].low_pass)
    # the branch is in the computation: β gets a gradient, and without the branch the outputs differ
    model.train()
    model.encode_sequence(to_torch(a)).sum().backward()
    assert model.blocks[0].sqrt_beta.grad.abs().sum() > 0
    plain = PinnerFormer(cfg.model_copy(update={"frequency_mix": 0.0}), model.spec).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "sqrt_beta" not in k})
    with torch.no_grad():
        assert not torch.allclose(plain.encode_sequence(to_torch(a)), full_a, atol=1e-3)


def test_positions_from_the_newest_action_put_every_rows_newest_at_index_0():
    """position_from: newest (SASRec's left-padded positions): the position read at inference is index 0 for every
    row whatever its length; outputs still ignore what later actions are (not how many there are); the
    one-position inference path agrees with the every-position one, at the newest and at any other position."""
    torch.manual_seed(0)
    spec = InputSpec(n_items=50, n_actions=3, n_surfaces=2, max_len=16)
    models = {p: PinnerFormer(PinnerFormerConfig(width=32, layers=2, heads=4, dim=24, dropout=0.0,
                                                 item_features="id", id_dim=16, position_from=p), spec).eval()
              for p in ("oldest", "newest")}
    models["newest"].load_state_dict(models["oldest"].state_dict())
    a = assert_causal_with_agreeing_newest_path(models["newest"])
    lengths = torch.tensor(a["length"])
    rows = torch.arange(4)
    with torch.no_grad():
        for p, want in (("newest", lambda n: 0), ("oldest", lambda n: n - 1)):
            m = models[p]
            x = to_torch(a)
            added = (m.block_inputs(x) - m.input_proj(m.action_features(x)))[rows, lengths - 1]
            torch.testing.assert_close(added, m.pos_emb.weight[[want(int(n)) for n in lengths]], atol=1e-6, rtol=0)
        # one more action after position i changes i's output under newest (one step further from the end),
        # never under oldest
        longer = {k: v.copy() for k, v in a.items()}
        longer["length"] = a["length"] + np.array([0, 1, 1, 1])
        for p, moves in (("newest", True), ("oldest", False)):
            before = models[p].encode_sequence(to_torch(a))[1, :7]
            after = models[p].encode_sequence(to_torch(longer))[1, :7]
            assert torch.allclose(before, after, atol=1e-6) != moves
        # any position through the one-position path: the every-position output there
        at = torch.tensor([3, 0, 0, 1])
        m = models["newest"]
        torch.testing.assert_close(m.user_embedding(to_torch(a), at),
                                   m.encode_sequence(to_torch(a))[rows, at], atol=1e-6, rtol=0)
