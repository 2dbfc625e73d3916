"""TransAct: the shared sequence projection equals the plain form, the time-window mask never empties a sequence and
is off at inference, every fusion and output option has the width it says, padding changes nothing."""

import numpy as np
import pytest
import torch

from pinnerformer.models.transact import TransAct, TransActConfig


def batch(B=6, T=12, E=16, n_actions=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    action = torch.randint(1, n_actions + 1, (B, T), generator=g)
    lengths = torch.tensor([T, T - 3, 1, 5, T, 2])[:B]
    action[torch.arange(T)[None, :] >= lengths[:, None]] = 0  # padding after each row's length
    age = torch.sort(torch.rand(B, T, generator=g) * 3 * 86400, dim=1).values  # newest first: ages grow
    return action, torch.randn(B, T, E, generator=g), age, torch.randn(B, E, generator=g)


def model(seed=0, **over) -> TransAct:
    torch.manual_seed(seed)
    return TransAct(TransActConfig(seq_len=12, **over), n_actions=4, vector_dim=16)


@pytest.mark.parametrize("heads", [1, 2])
def test_request_level_projection_equals_the_plain_form(heads):
    m = model(heads=heads).eval()
    action, item, age, _ = batch()
    action[2] = 0  # a user with no action before the request
    cands = torch.randn(7, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for r in range(action.shape[0]):
            plain = m(action[r].expand(7, -1), item[r].expand(7, -1, -1), age[r].expand(7, -1), cands)
            shared = m.forward_request(action[r], item[r], age[r], cands)
            torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)


def test_time_window_mask_hides_recent_actions_in_training_only_and_never_all():
    m = model(time_window_hours=24.0)
    action, _, age, _ = batch(B=6)
    m.train()
    torch.manual_seed(0)
    for _ in range(200):
        vis = m.visible(action, age)
        real = action > 0
        assert (vis <= real).all() and vis.any(1).all()  # never a real action added; never all hidden
        hidden = real & ~vis
        assert (age[hidden] < 24 * 3600).all()  # only actions of the last 24 h are ever hidden
    m.eval()
    assert torch.equal(m.visible(action, age), action > 0)
    m.train()
    vis = m.visible(action, torch.full_like(age, 60.0))  # every action a minute ago: the newest one stays
    assert vis.any(1).all() and vis[:, 0].all()


@pytest.mark.parametrize("fusion", ["concat", "append", "none"])
@pytest.mark.parametrize("output", ["first-k+max", "max", "first-k", "all"])
def test_every_fusion_and_output_has_its_width(fusion, output):
    m = model(fusion=fusion, output=output).eval()
    action, item, age, cand = batch()
    with torch.no_grad():
        out = m(action, item, age, cand)
    d = 32 + 32 + (32 if fusion == "concat" else 0)
    assert out.shape == (6, m.out_dim) and np.isfinite(out.numpy()).all()
    assert m.out_dim == d * {"first-k+max": 11, "max": 1, "first-k": 10, "all": 12 + (fusion == "append")}[output]



def test_the_papers_shape():
    """Defaults: 100 actions, tokens of 32 + 32 + 32 = 96, first 10 positions + max-pool: (10 + 1) * 96 = 1056."""
    m = TransAct(TransActConfig(), n_actions=5, vector_dim=32)
    assert m.token_dim == 96 and m.out_dim == 1056 and isinstance(m.item_proj, torch.nn.Identity)
    assert len(m.layers) == 2 and m.layers[0].heads == 1 and m.layers[0].ffn[0].out_features == 32


def test_padding_and_hidden_actions_do_not_leak():
    """What is not visible (padding, or actions the mask hides) cannot change the output."""
    m = model().eval()
    action, item, age, cand = batch()
    other_item = item.clone()
    pad = action == 0
    other_item[pad] = torch.randn(int(pad.sum()), 16)
    with torch.no_grad():
        torch.testing.assert_close(m(action, item, age, cand), m(action, other_item, age, cand))
    # the candidate matters with early fusion, and does not without it
    with torch.no_grad():
        assert not torch.allclose(m(action, item, age, cand), m(action, item, age, cand.flip(0)))
        none = model(fusion="none").eval()
        torch.testing.assert_close(none(action, item, age, cand), none(action, item, age, cand.flip(0)))


def test_written_out_training_attention_equals_sdpa_and_dropout_keeps_the_mean():
    from pinnerformer.models.transact import EncoderLayer, dropout

    torch.manual_seed(0)
    layer = EncoderLayer(8, 2, 16, dropout=1e-12)  # the training form, with (practically) nothing dropped
    q, k, v = torch.randn(3, 3, 2, 5, 4).unbind(0)
    visible = torch.tensor([[True] * 5, [True, True, False, False, True], [False] * 5])  # the last sees nothing
    layer.train()
    written = layer.attention(q, k, v, visible)
    layer.eval()
    torch.testing.assert_close(written, layer.attention(q, k, v, visible), atol=1e-6, rtol=1e-5)
    assert torch.equal(written[2], torch.zeros_like(written[2]))
    x = torch.ones(200_000)
    y = dropout(x, 0.1, True)
    assert abs((y == 0).float().mean().item() - 0.1) < 0.005 and abs(y.mean().item() - 1.0) < 0.01
    assert torch.equal(dropout(x, 0.1, False), x)


def test_low_rank_cross_layers_compute_x0_times_u_v_x_plus_x_with_fewer_parameters():
    """DCN v2's low-rank cross layer, x_{l+1} = x0 ⊙ (U_l (V_l^T x_l) + b_l) + x_l, written out by hand; a rank above
    a quarter of the width is the full-rank layer (little to save)."""
    from pinnerformer.models.ranker import CrossNetwork

    torch.manual_seed(0)
    d, r = 40, 4
    net = CrossNetwork(d, 2, rank=r)
    x0 = torch.randn(5, d)
    x = x0
    for layer in net.layers:
        v, u = layer[0].weight, layer[1].weight  # [r, d], [d, r]
        x = x0 * (x @ v.T @ u.T + layer[1].bias) + x
    assert torch.allclose(net(x0), x, atol=1e-5)
    assert sum(p.numel() for p in net.parameters()) == 2 * (2 * d * r + d)
    assert sum(p.numel() for p in CrossNetwork(d, 2, rank=d // 4 + 1).parameters()) == 2 * (d * d + d)


def test_user_id_rows_known_unknown_and_dropped():
    """The user-ID table: users with training rows read their own row; a user the ranking data does not know (-1),
    one past the table (a user the daily job added) and one without training rows read the shared row 0; training
    drops a request's user to row 0 at the configured rate, evaluation never; no user tensor means row 0 for all."""
    from pinnerformer.features.rank_batch import RankBatch
    from pinnerformer.models.ranker import Ranker, RankerConfig, RankerInputs

    inputs = RankerInputs(n_items=6, n_actions=2, n_surfaces=1, vector_dim=4, pf_dim=3, heads=("save",), n_users=5)
    model = Ranker(RankerConfig(sequence="none", user_id_dim=4, user_id_dropout=0.5), inputs, torch.randn(6, 4),
                   torch.randn(6, 3))
    assert model.user_id.weight.shape == (6, 4)
    model.set_user_rows(np.array([0, 2, 2, 4]))  # users 1 and 3 have no training row
    users = torch.tensor([0, 1, 2, 3, 4, -1, 7])
    R = len(users)
    b = RankBatch(seq_action=torch.zeros(R, 1, dtype=torch.long), seq_item=torch.zeros(R, 1, dtype=torch.long),
                  seq_age=torch.zeros(R, 1), user_vec=torch.zeros(R, 3), has_vector=torch.zeros(R, dtype=torch.bool),
                  hour=torch.zeros(R, dtype=torch.long), surface=torch.zeros(R, dtype=torch.long),
                  row_request=torch.arange(R), cand_item=torch.zeros(R, dtype=torch.long), labels=torch.zeros(R, 1),
                  weight=torch.ones(R), user=users)
    model.eval()
    assert model.user_rows(b).tolist() == [1, 0, 3, 0, 5, 0, 0]
    model.train()
    torch.manual_seed(0)
    dropped = torch.stack([model.user_rows(b) for _ in range(2000)])
    assert ((dropped == 0) | (dropped == torch.tensor([1, 0, 3, 0, 5, 0, 0]))).all()
    assert (dropped[:, [0, 2, 4]] == 0).float().mean().item() == pytest.approx(0.5, abs=0.03)
    b.user = None
    assert model.user_rows(b).tolist() == [0] * R
    assert model(b).shape == (R, 1)
