"""Tests for safesteer.core.probe (the harm probe of the harm-gated teacher) and its file round trip."""

from __future__ import annotations

import pytest
import torch

from safesteer.config import compose
from safesteer.core.generation import chat_texts
from safesteer.core.probe import (
    HarmProbe,
    auroc,
    balanced_threshold,
    fit,
    last_token_states,
    mean_difference,
)
from safesteer.core.steering import SteeringVector, Teacher, load_vector, vector_bytes
from safesteer.errors import SafeSteerError
from safesteer.prepare import probe_layers


def test_auroc_and_balanced_threshold_on_separable_and_overlapping_scores() -> None:
    pos, neg = torch.tensor([2.0, 3.0, 4.0]), torch.tensor([-1.0, 0.0, 1.0])
    assert auroc(pos, neg) == 1.0
    assert auroc(neg, pos) == 0.0
    t, bal = balanced_threshold(pos, neg)
    assert 1.0 < t < 2.0 and bal == 1.0
    # one harmless prompt above every harmful one: the best cut keeps it on the wrong side
    pos, neg = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 5.0])
    assert auroc(pos, neg) == 0.5
    t, bal = balanced_threshold(pos, neg)
    assert bal == 0.75 and 0.0 < t < 1.0
    assert auroc(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5  # ties count half


def test_mean_difference_is_a_unit_vector_along_the_gap() -> None:
    h = torch.tensor([[2.0, 0.0], [4.0, 0.0]])
    b = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    u = mean_difference(h, b)
    assert torch.allclose(u, torch.tensor([1.0, 0.0]))


def test_fit_picks_the_layer_that_separates_validation_prompts() -> None:
    g = torch.Generator().manual_seed(0)
    D = 8
    signal = torch.zeros(D)
    signal[0] = 3.0

    def sets(shift: float):
        h = torch.randn(20, D, generator=g) + shift * signal
        b = torch.randn(20, D, generator=g)
        return h, b

    train = {3: sets(0.0), 5: sets(1.0)}  # layer 3 carries no harm signal, layer 5 does
    val = {3: sets(0.0), 5: sets(1.0)}
    probe, report = fit(train, val)
    assert probe.layer == 5
    assert report[5]["auroc"] > 0.95 > report[3]["auroc"]
    assert probe.metrics["tpr"] >= 0.85 and probe.metrics["fpr"] <= 0.15
    hv, bv = val[5]
    assert probe.flags(hv).float().mean() >= 0.85 and probe.flags(bv).float().mean() <= 0.15


def test_last_token_states_ignore_left_padding(tiny) -> None:
    """A prompt's state does not depend on the other, longer prompts of its batch."""
    model, tok = tiny
    texts = chat_texts(tok, ["Hi", "Tell me a long story about a lighthouse keeper and his dog"])
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    both = last_token_states(model, ids, [0, 2, 4], batch_size=2)
    alone = last_token_states(model, ids[:1], [0, 2, 4], batch_size=1)
    for layer in (0, 2, 4):
        assert both[layer].shape == (2, model.config.hidden_size)
        assert torch.allclose(both[layer][0], alone[layer][0], atol=1e-4)
    assert not torch.allclose(both[2][0], both[2][1])


def test_probe_travels_in_the_vector_file(tmp_path) -> None:
    u = torch.nn.functional.normalize(torch.randn(16), dim=0)
    sv = SteeringVector(
        vector=torch.randn(16),
        layer=3,
        coeff=0.6,
        method="contrastive",
        probe=HarmProbe(u, 5, 0.25, {"auroc": 0.9}),
    )
    (tmp_path / "v.safetensors").write_bytes(vector_bytes(sv))
    back = load_vector(tmp_path / "v.safetensors", hidden_size=16)
    assert back.probe is not None and back.probe.layer == 5 and back.probe.threshold == 0.25
    assert torch.equal(back.probe.direction, u) and back.probe.metrics == {"auroc": 0.9}
    plain = SteeringVector(vector=torch.randn(16), layer=3, coeff=0.6, method="contrastive")
    (tmp_path / "p.safetensors").write_bytes(vector_bytes(plain))
    assert load_vector(tmp_path / "p.safetensors").probe is None


@pytest.mark.parametrize("steer,expected", [(True, 0.6), (False, -0.3)])
def test_teacher_coefficient_override(steer: bool, expected: float) -> None:
    sv = SteeringVector(vector=torch.randn(4), layer=1, coeff=0.5, method="contrastive")
    t = Teacher(vector=sv, anchor_coeff=-0.3, coeff=0.6)
    assert t.coefficient(steer) == expected
    assert Teacher(vector=sv).coefficient(True) == 0.5


# ---------------------------------------------------------------------------- candidate layers
def test_the_default_probe_depth_picks_the_layers_it_always_used() -> None:
    """probe.depth, fractions of depth, gives layers 14, 18, 22 of the default model's 30 (the absolute
    layers the probe was given before), and scales with depth like steering.depth."""
    depth = compose([]).probe.depth
    assert probe_layers(depth, 30) == [14, 18, 22]  # SmolLM2-135M
    assert probe_layers(depth, 28) == [13, 17, 21]
    assert probe_layers(depth, 36) == [17, 22, 27]
    assert probe_layers([0.25, 0.75], 4) == [1, 3]  # a fraction on a layer boundary is that layer
    assert probe_layers([0.75, 0.3, 0.4], 4) == [2, 3]  # sorted; two fractions at one layer give it once


@pytest.mark.parametrize("f", [0.9, 1.0, 1.5, -0.1])
def test_a_probe_depth_with_no_layer_is_a_one_line_error(f: float) -> None:
    with pytest.raises(SafeSteerError, match=rf"^probe.depth={f:g}: no layer of a 4-layer model") as e:
        probe_layers([0.5, f], 4)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("depth", ["[]", "[0.5,1.0]", "[-0.2]"])
def test_probe_depth_outside_zero_one_is_refused_at_start(depth: str) -> None:
    with pytest.raises(SafeSteerError, match=r"^probe.depth=.*fractions of depth in \[0, 1\)") as e:
        compose([f"probe.depth={depth}"])
    assert "\n" not in str(e.value)
