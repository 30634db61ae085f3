"""Schedule, ids and the Euler loop."""

import pytest
import torch

from fluxion.sampling.denoise import Conditioning, Guidance, denoise
from fluxion.sampling.ids import image_ids, pack, reference_ids, text_ids, unpack
from fluxion.sampling.schedule import empirical_mu, get_schedule


@pytest.mark.parametrize(
    "tokens,steps,mu,times",
    [  # worked examples of spec 6.2
        (4096, 4, 2.291180, [1.0, 0.967384, 0.908144, 0.767200, 0.0]),
        (1024, 4, 2.030690, [1.0, 0.958085, 0.883982, 0.717497, 0.0]),
        (4096, 50, 2.023351, None),
        (16384, 50, 3.229986, None),
    ],
)
def test_schedule_matches_spec_examples(tokens, steps, mu, times):
    assert empirical_mu(tokens, steps) == pytest.approx(mu, abs=1e-6)
    schedule = get_schedule(steps, tokens)
    assert len(schedule) == steps + 1 and schedule[0] == 1.0 and schedule[-1] == 0.0
    assert all(a > b for a, b in zip(schedule, schedule[1:]))
    if times:
        assert schedule == pytest.approx(times, abs=1e-6)


def test_schedule_rejects_zero_steps():
    with pytest.raises(ValueError, match="at least 1"):
        get_schedule(0, 256)


def test_ids():
    t = text_ids(5, batch=2)
    assert t.shape == (2, 5, 4) and t[1, :, 3].tolist() == [0, 1, 2, 3, 4] and t[..., :3].abs().sum() == 0
    i = image_ids(2, 3)
    assert i[0].tolist() == [
        [0, 0, 0, 0],
        [0, 0, 1, 0],
        [0, 0, 2, 0],
        [0, 1, 0, 0],
        [0, 1, 1, 0],
        [0, 1, 2, 0],
    ]
    r = reference_ids([(1, 2), (2, 1)])
    assert r[0, :, 0].tolist() == [10, 10, 20, 20] and r[0, :, 1:3].tolist() == [
        [0, 0],
        [0, 1],
        [0, 0],
        [1, 0],
    ]


def test_pack_is_row_major_and_matches_ids():
    z = torch.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5).float()  # B=2, C=3, h=4, w=5
    tokens = pack(z)
    ids = image_ids(4, 5)
    r, c = ids[0, 7, 1], ids[0, 7, 2]
    assert torch.equal(tokens[:, 7], z[:, :, r, c])
    assert torch.equal(unpack(tokens, 4, 5), z)


class ConstantField(torch.nn.Module):
    """v = noise - data everywhere: the exact velocity of the straight path from `data` (t=0) to `noise` (t=1)."""

    def __init__(self, velocity):
        super().__init__()
        self.velocity = velocity
        self.calls = []

    def forward(self, x, x_ids, t, ctx, ctx_ids, guidance=None):
        self.calls.append((x.shape[0], x.shape[1], None if guidance is None else guidance.tolist()))
        return (
            self.velocity[: x.shape[0]]
            .expand(x.shape[0], -1, -1)
            .repeat(1, x.shape[1] // self.velocity.shape[1], 1)
        )


def test_euler_recovers_the_data_for_a_straight_path():
    g = torch.Generator().manual_seed(0)
    data, noise = torch.randn(1, 6, 4, generator=g), torch.randn(1, 6, 4, generator=g)
    model = ConstantField(noise - data)
    cond = Conditioning(ctx=torch.zeros(1, 3, 8), ctx_ids=text_ids(3))
    out = denoise(model, noise, image_ids(2, 3), cond, get_schedule(7, 6), Guidance(mode="distilled"))
    assert torch.allclose(out, data, atol=1e-5)
    assert len(model.calls) == 7


def test_guidance_modes_call_the_model_as_specified():
    v = torch.ones(1, 4, 2)
    cond = Conditioning(ctx=torch.zeros(1, 3, 8), ctx_ids=text_ids(3), neg_ctx=torch.zeros(1, 3, 8))
    x = torch.zeros(1, 4, 2)
    m = ConstantField(v)
    denoise(m, x, image_ids(2, 2), cond, [1.0, 0.5, 0.0], Guidance(mode="embedded", scale=4.0))
    assert m.calls == [(1, 4, [4.0])] * 2
    m = ConstantField(v)
    denoise(m, x, image_ids(2, 2), cond, [1.0, 0.0], Guidance(mode="cfg", scale=4.0))
    assert m.calls == [(2, 4, None)]  # uncond and cond in one batch of two
    refs = Conditioning(
        ctx=cond.ctx, ctx_ids=cond.ctx_ids, refs=torch.zeros(1, 4, 2), ref_ids=image_ids(2, 2, 10)
    )
    m = ConstantField(v)
    denoise(m, x, image_ids(2, 2), refs, [1.0, 0.0], Guidance())
    assert m.calls == [(1, 8, None)]  # references appended after the output tokens


def test_cfg_without_negative_is_an_error():
    cond = Conditioning(ctx=torch.zeros(1, 3, 8), ctx_ids=text_ids(3))
    with pytest.raises(ValueError, match="negative"):
        denoise(
            ConstantField(torch.ones(1, 4, 2)),
            torch.zeros(1, 4, 2),
            image_ids(2, 2),
            cond,
            [1.0, 0.0],
            Guidance(mode="cfg"),
        )
