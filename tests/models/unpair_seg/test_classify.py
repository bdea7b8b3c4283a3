"""Prompt templates, class-name expansion, the text classifier and the FC-CLIP max-ensemble logits."""

import math
import zlib

import pytest
import torch

from models.unpair_seg import templates as T
from models.unpair_seg.classify import LOGIT_SCALE_MAX, fcclip_logits, text_classifier


def test_template_counts_and_structure():
    assert (len(T.SIMPLE), len(T.VILD), len(T.OPENAI_IMAGENET), len(T.OPENAI_IMAGENET_VILD)) == (5, 14, 81, 94)
    assert T.VILD[:5] == T.SIMPLE
    assert T.SIMPLE[0] == "a photo of a {}." and T.SIMPLE[-1] == "a photo of a {} in the scene"
    # OpenAI's 80 plus the duplicated plain template, first and at position 40.
    assert T.OPENAI_IMAGENET[0] == T.OPENAI_IMAGENET[40] == "a photo of a {}."
    assert len(set(T.OPENAI_IMAGENET)) == 80
    assert T.OPENAI_IMAGENET_VILD == T.VILD + T.OPENAI_IMAGENET[1:]
    dups = sorted(t for t in set(T.OPENAI_IMAGENET_VILD) if T.OPENAI_IMAGENET_VILD.count(t) > 1)
    assert dups == ["a photo of a large {}.", "a photo of a small {}.", "a photo of a {}."]
    for name, ts in T.TEMPLATE_SETS.items():
        assert all(t.count("{}") == 1 for t in ts), name
    assert T.get_templates("VILD") is T.VILD


def test_expand_synonyms_and_order():
    names = ["cat", "person, child,girl", ["sky", " heaven "]]
    prompts, counts = T.expand(names, T.SIMPLE)
    assert counts == [5, 15, 10]
    assert len(prompts) == sum(counts)
    expected = [t.format(n) for n in ["cat"] for t in T.SIMPLE]
    expected += [t.format(n) for n in ["person", "child", "girl"] for t in T.SIMPLE]
    expected += [t.format(n) for n in ["sky", "heaven"] for t in T.SIMPLE]
    assert prompts == expected
    p2, c2 = T.expand(["dog"], ["{} here", "a {}"])
    assert p2 == ["dog here", "a dog"] and c2 == [2]


@pytest.mark.parametrize("bad, exc", [("cat", TypeError), ([], ValueError), ([" , "], ValueError),
                                      ([["a", ""]], ValueError), ([3], TypeError)])
def test_expand_rejects_bad_class_names(bad, exc):
    with pytest.raises(exc):
        T.expand(bad)


@pytest.mark.parametrize("bad", ["nope", [], ["no braces"], ["{} and {}"], ["{0}"]])
def test_get_templates_rejects(bad):
    with pytest.raises(ValueError):
        T.get_templates(bad)


def _reference_logits(x, text, counts, scale):
    """Plain loops: cosine of the normalised x with every text row, max per class block, times the factor."""
    b, q, _ = x.shape
    out = torch.empty(b, q, len(counts), dtype=torch.float64)
    for i in range(b):
        for j in range(q):
            v = x[i, j].double()
            v = v / v.norm()
            start = 0
            for k, n in enumerate(counts):
                out[i, j, k] = max(float(v @ text[start + r].double()) for r in range(n))
                start += n
    return out if scale is None else out * scale


@pytest.mark.parametrize("counts", [[2, 3, 1], [3, 3, 3, 3]])
def test_fcclip_logits_matches_hand_computation(counts):
    g = torch.Generator().manual_seed(sum(counts))
    x = torch.randn(2, 5, 8, generator=g) * 3
    text = torch.nn.functional.normalize(torch.randn(sum(counts), 8, generator=g), dim=-1)
    # No scale: the max cosines themselves.
    torch.testing.assert_close(fcclip_logits(x, text, None, counts).double(), _reference_logits(x, text, counts, None),
                               rtol=1e-5, atol=1e-6)
    # A scale below the clamp: exp(log 37) = 37.
    got = fcclip_logits(x, text, torch.tensor(math.log(37.0)), counts)
    torch.testing.assert_close(got.double(), _reference_logits(x, text, counts, 37.0), rtol=1e-5, atol=1e-5)
    # Above the clamp: exp(log 1000) clamps to 100 (also as a plain float).
    got = fcclip_logits(x, text, math.log(1000.0), num_templates=counts)
    torch.testing.assert_close(got.double(), _reference_logits(x, text, counts, LOGIT_SCALE_MAX), rtol=1e-5,
                               atol=1e-5)


def test_fcclip_logits_max_picks_best_template():
    # Class 0 has rows e0, -e0; class 1 has e1. An embedding along -e0 scores cos 1 for class 0 through its 2nd row.
    text = torch.tensor([[1.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 0]])
    x = torch.tensor([[[-2.0, 0, 0], [0, 0.5, 0.5]]])
    got = fcclip_logits(x, text, None, [2, 1])
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(got, torch.tensor([[[1.0, 0.0], [0.0, s]]]))
    # One row per class by default.
    assert fcclip_logits(x, text).shape == (1, 2, 3)


def test_fcclip_logits_rejects_bad_inputs():
    x, text = torch.randn(1, 2, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="num_templates"):
        fcclip_logits(x, text, None, [1, 1])
    with pytest.raises(ValueError, match="num_templates"):
        fcclip_logits(x, text, None, [3, 0])
    with pytest.raises(ValueError, match="'x'"):
        fcclip_logits(torch.randn(2, 4), text)
    with pytest.raises(ValueError, match="'text'"):
        fcclip_logits(x, torch.randn(3, 5))
    with pytest.raises(ValueError, match="logit_scale"):
        fcclip_logits(x, text, torch.ones(2))


class _FakeBackbone:
    """A text tower stand-in: a fixed random (un-normalised) embedding per text, seeded by the text itself."""

    def __init__(self, dim=6):
        self.dim = dim
        self.calls = []

    def embed(self, t):
        g = torch.Generator().manual_seed(zlib.crc32(t.encode()))
        return torch.randn(self.dim, generator=g) * 5

    def get_text_classifier(self, texts):
        self.calls.append(len(texts))
        return torch.stack([self.embed(t) for t in texts])


def test_text_classifier_normalises_in_prompt_order_and_batches():
    bb = _FakeBackbone()
    names = ["cat", "person, child"]
    text, counts = text_classifier(bb, names, T.SIMPLE, batch=4)
    assert counts == [5, 10] and text.shape == (15, 6)
    assert bb.calls == [4, 4, 4, 3]
    prompts, _ = T.expand(names, T.SIMPLE)
    ref = torch.stack([bb.embed(p) for p in prompts])
    torch.testing.assert_close(text, ref / ref.norm(dim=-1, keepdim=True))
    text2, _ = text_classifier(bb, names, T.SIMPLE, batch=128)
    torch.testing.assert_close(text, text2)


def test_text_classifier_mean_ensemble():
    bb = _FakeBackbone()
    text, counts = text_classifier(bb, ["cat", ["dog", "puppy"]], T.SIMPLE, ensemble="mean")
    assert counts == [1, 2] and text.shape == (3, 6)
    for row, name in zip(text, ["cat", "dog", "puppy"]):
        e = torch.stack([bb.embed(t.format(name)) for t in T.SIMPLE])
        e = (e / e.norm(dim=-1, keepdim=True)).mean(0)
        torch.testing.assert_close(row, e / e.norm())
    with pytest.raises(ValueError, match="ensemble"):
        text_classifier(bb, ["cat"], ensemble="median")
    with pytest.raises(TypeError, match="backbone"):
        text_classifier(object(), ["cat"])
