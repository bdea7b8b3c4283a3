"""models.common.checkpoint: safe reading, prefix stripping, strict loading with complete error messages."""

import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from models.common import load_into, read_state_dict, strip_prefixes


def _model():
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))


def test_roundtrip_safetensors_and_pt(tmp_path):
    src = _model()
    sd = src.state_dict()
    save_file(sd, tmp_path / "w.safetensors")
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        dst = _model()
        load_into(dst, read_state_dict(tmp_path / name))
        for k, v in sd.items():
            assert torch.equal(dst.state_dict()[k], v), (name, k)


def test_pickled_code_is_refused(tmp_path):
    class Boom:
        def __reduce__(self):
            return (print, ("this must never run",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"weight": Boom()}, f)
    with pytest.raises(ValueError, match="could not be read safely"):
        read_state_dict(tmp_path / "evil.pt")


def test_missing_file_says_no_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        read_state_dict(tmp_path / "nope.safetensors")


def test_strict_errors_list_everything():
    sd = _model().state_dict()
    sd.pop("1.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["0.weight"] = torch.zeros(3, 5)
    with pytest.raises(ValueError) as e:
        load_into(_model(), sd)
    msg = str(e.value)
    assert "1 missing: 1.bias" in msg and "1 unexpected: extra.weight" in msg
    assert "0.weight: checkpoint (3, 5) vs model (3, 4)" in msg


def test_strip_prefixes():
    sd = {"module._orig_mod.0.weight": torch.ones(1), "0.bias": torch.ones(1)}
    assert set(strip_prefixes(sd)) == {"0.weight", "0.bias"}
