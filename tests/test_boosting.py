"""`mos.boosting`, the drop-in recipe: a user's own model around `MoSLayer`, trained by
`boosted_loss`, keeps its backbone part on the backbone's gradients alone; `choose_correction`
serves the correction only beyond its standard error."""
import numpy as np
import pytest
import torch
from torch import nn

from mos import MoSConfig, MoSLayer
from mos.boosting import Candidates, boosted_loss, candidates, choose_correction
from mos.delong import auc_difference


class UserModel(nn.Module):
    """What a user writes: their embeddings and head, MoS as the sequence encoder."""

    def __init__(self):
        super().__init__()
        self.items = nn.Embedding(30, 16)
        self.layer = MoSLayer(MoSConfig(dim=16, num_heads=2, num_themes=3, session_len=3, fusion="residual",
                                        extras_detach_inputs=True))
        self.head = BilinearHead(16)

    def forward(self, items, offsets, target_items):
        target = self.items(target_items)
        out = self.layer(self.items(items), target, offsets)
        return candidates(self.head, target, out.global_output, out.extras_output), out


class BilinearHead(nn.Module):
    """A head of the user's own: logits [B] from (target, user)."""

    def __init__(self, dim):
        super().__init__()
        self.bilinear = nn.Bilinear(dim, dim, 1)

    def forward(self, target, user):
        return self.bilinear(target, user).squeeze(1)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 0, 4, 9])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return (torch.randint(1, 30, (int(lengths.sum()),), generator=g), offsets,
            torch.randint(1, 30, (4,), generator=g), torch.tensor([1.0, 0.0, 1.0, 0.0]))


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: (p.grad is not None and bool(p.grad.abs().sum() > 0)) for name, p in model.named_parameters()}


def test_each_candidate_loss_trains_only_its_own_part():
    torch.manual_seed(0)
    model = UserModel()
    with torch.no_grad():
        model.layer.extras_out.weight.normal_()       # a correction that is not zero yet
    items, offsets, targets, label = _inputs()
    cands, out = model(items, offsets, targets)
    backbone_part = ("items.", "layer.global_expert.", "head.")
    moved = _grads(model, nn.functional.binary_cross_entropy_with_logits(cands.backbone, label))
    assert {n for n, m in moved.items() if m} and all(n.startswith(backbone_part) for n, m in moved.items() if m)
    cands, out = model(items, offsets, targets)
    moved = _grads(model, nn.functional.binary_cross_entropy_with_logits(cands.corrected, label))
    assert moved["layer.extras_out.weight"] and moved["layer.theme_experts.w_value"]
    assert not any(m for n, m in moved.items() if n.startswith(backbone_part))
    cands, out = model(items, offsets, targets)
    total = boosted_loss(cands, label, out.aux_loss)
    want = (nn.functional.binary_cross_entropy_with_logits(cands.backbone, label)
            + nn.functional.binary_cross_entropy_with_logits(cands.corrected, label) + out.aux_loss)
    torch.testing.assert_close(total, want)


def test_the_candidates_agree_while_the_correction_is_zero():
    torch.manual_seed(1)
    model = UserModel()
    items, offsets, targets, _ = _inputs(1)
    cands, _ = model(items, offsets, targets)
    assert torch.equal(cands.backbone, cands.corrected)


def test_the_correction_is_served_only_when_its_gain_exceeds_its_standard_error():
    rng = np.random.default_rng(0)
    n = 3000
    users = np.repeat(np.arange(500), 6)
    signal = rng.normal(size=n)
    labels = (signal + rng.normal(size=n) > 0).astype(int)
    backbone = signal + 1.5 * rng.normal(size=n)
    for corrected, served in ((backbone + 1e-3 * rng.normal(size=n), False),    # a gain inside its noise
                              (signal + 0.5 * rng.normal(size=n), True),         # a clear gain
                              (backbone - 0.5 * signal, False)):                  # a loss
        choice = choose_correction(labels, backbone, corrected, groups=users)
        d = auc_difference(labels, corrected, backbone, users)
        assert (choice.gain, choice.se) == (d.difference, d.se)
        assert choice.serve_correction == served == (d.difference > d.se)
        assert (choice.backbone_auc, choice.corrected_auc) == (d.auc_b, d.auc_a)


def test_a_layer_without_the_residual_parts_is_refused():
    with pytest.raises(ValueError, match=r"extras_output: expected the residual fusion's two parts"):
        candidates(nn.Identity(), torch.zeros(2, 4), torch.zeros(2, 4), None)
    assert isinstance(Candidates(torch.zeros(1), torch.zeros(1)), tuple)


class NormedHead(nn.Module):
    """A head with buffers updated in place in training (BatchNorm's running statistics)."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim)
        self.out = nn.Linear(dim, 1)

    def forward(self, target, user):
        return self.out(self.norm(target * user)).squeeze(1)


def test_the_corrected_candidate_leaves_the_heads_buffers_to_the_backbone():
    """The backbone part is the backbone: the corrected call (here with a large correction) must
    not move a BatchNorm's running statistics, which the backbone candidate alone updates."""
    torch.manual_seed(0)
    target, user = torch.randn(8, 4), torch.randn(8, 4)
    alone, head = NormedHead(4), NormedHead(4)
    head.load_state_dict(alone.state_dict())
    alone(target, user)                                           # the backbone trained alone
    candidates(head, target, user, torch.full((8, 4), 100.0))
    for name, buffer in alone.named_buffers():
        assert torch.equal(head.get_buffer(name), buffer), name


@pytest.mark.parametrize("call, error", [
    (lambda h: candidates(h, torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(4)),
     r"extras_output: expected a float tensor \[B, d\], got \(4,\)"),
    (lambda h: candidates(h, torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, 1)),
     r"extras_output: expected global_output's shape and device \(\(3, 4\), 'cpu'\), got \(\(3, 1\), 'cpu'\)"),
    (lambda h: candidates(h, torch.zeros(3, 4), None, torch.zeros(3, 4)), r"global_output: expected the residual"),
    (lambda h: candidates(h, torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(3, 4)), r"target: expected \[B = 3"),
    (lambda h: candidates(lambda t, u: u, torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, 4)),
     r"head: expected it to return float logits \[B = 3\], got \(3, 4\)"),
    (lambda h: boosted_loss(Candidates(torch.zeros(3), torch.zeros(3)), torch.zeros(3, 1)), r"label: expected \[B\]"),
    (lambda h: boosted_loss(Candidates(torch.zeros(3), torch.zeros(3)), torch.zeros(3, dtype=torch.long)),
     r"label: expected a float tensor of 0s and 1s, got torch.int64"),
    (lambda h: boosted_loss(Candidates(torch.zeros(3), torch.zeros(3)), torch.tensor([0.0, 2.0, 1.0])),
     r"label: expected values in \{0, 1\}"),
    (lambda h: boosted_loss(Candidates(torch.zeros(3), torch.zeros(3)), torch.tensor([0.0, float("nan"), 1.0])),
     r"label: expected values in \{0, 1\}"),
    (lambda h: boosted_loss(Candidates(torch.zeros(3), torch.zeros(3)), torch.zeros(3), torch.zeros(3)),
     r"aux_loss: expected a scalar tensor, got \(3,\)"),
    (lambda h: choose_correction([0, 1, 0, 1], [0.1, 0.2, 0.3, float("nan")], [0.1, 0.2, 0.3, 0.4]),
     r"backbone_scores: expected finite values"),
    (lambda h: choose_correction([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], [[0.1, 0.2, 0.3, 0.4]]),
     r"corrected_scores: expected one score per label"),
    (lambda h: choose_correction([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4], z=-1.0),
     r"z: expected a finite number >= 0"),
], ids=["extras_1d", "extras_shape", "global_none", "target_batch", "head_shape", "label_shape", "label_int",
        "label_2", "label_nan", "aux_vector", "backbone_nan", "corrected_2d", "negative_z"])
def test_bad_arguments_are_named(call, error):
    head = BilinearHead(4)
    with pytest.raises(ValueError, match=error):
        call(head)


def test_z_sets_how_many_standard_errors_the_gain_must_clear():
    """A gain of 1.43 standard errors: served at the default z = 1, not at z = 1.645 (5 % one-sided)."""
    rng = np.random.default_rng(1)
    signal = rng.normal(size=400)
    labels = (signal + rng.normal(size=400) > 0).astype(int)
    backbone, corrected = signal + 2 * rng.normal(size=400), signal + rng.normal(size=400)
    d = auc_difference(labels, corrected, backbone)
    assert 1.0 < d.difference / d.se < 1.645
    assert [choose_correction(labels, backbone, corrected, **z).serve_correction
            for z in ({}, dict(z=0.0), dict(z=1.645))] == [True, True, False]


def test_the_layer_output_form_checks_the_correction_reads_its_inputs_detached():
    """Built without extras_detach_inputs, the correction's loss would train the embeddings: the
    output form of `candidates` refuses that layer; with it, it equals the parts form."""
    torch.manual_seed(0)
    items, offsets, targets, _ = _inputs()
    embed, head = nn.Embedding(30, 16), BilinearHead(16)
    for detach in (False, True):
        layer = MoSLayer(MoSConfig(dim=16, num_heads=2, num_themes=3, session_len=3, extras_detach_inputs=detach))
        out = layer(embed(items), embed(targets), offsets)
        assert out.extras_detached is detach
        if not detach:
            with pytest.raises(ValueError, match=r"MoSConfig\.extras_detach_inputs: expected True for boosted "):
                candidates(head, embed(targets), out)
            continue
        whole, parts = candidates(head, embed(targets), out), candidates(head, embed(targets), out.global_output,
                                                                        out.extras_output)
        assert torch.equal(whole.backbone, parts.backbone) and torch.equal(whole.corrected, parts.corrected)
        with pytest.raises(ValueError, match=r"extras_output: expected None when the layer's MoSOutput is given"):
            candidates(head, embed(targets), out, out.extras_output)
