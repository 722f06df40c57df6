"""Bad checkpoint files: each is refused with a message naming the file and the key."""

import json
import os
import pickle
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rf_core.io.checkpoints import load_dit, open_dit_checkpoint
from rf_core.io.safe_load import CheckpointError, SafetensorsFile, read_state_dict, save_tensors
from rf_core.tiny import random_model


@pytest.fixture(scope="module")
def sd():
    return {k: v.clone() for k, v in random_model("tiny", seed=4).state_dict().items()}


def refused(path, match, **kw):
    with pytest.raises(CheckpointError) as e:
        load_dit(path, **kw)
    assert str(path) in str(e.value)
    assert re.search(match, str(e.value)), str(e.value)
    return str(e.value)


def test_truncated_safetensors(tmp_path, sd):
    save_file(sd, tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    msg = refused(
        tmp_path / "cut.safetensors", r"truncated: key '[\w.]+' ends at byte \d+ but the file has \d+ bytes"
    )
    # a cut inside the header is caught as well
    (tmp_path / "head.safetensors").write_bytes(data[:100])
    refused(tmp_path / "head.safetensors", r"truncated or corrupt safetensors file")
    assert "m.safetensors" not in msg


def test_truncated_and_corrupt_pickles(tmp_path, sd):
    torch.save(sd, tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    refused(tmp_path / "cut.pt", r"truncated or corrupt")
    (tmp_path / "junk.pt").write_bytes(b"\x80\x04" + bytes(range(7, 207)))
    refused(tmp_path / "junk.pt", r"cannot read: the file is truncated or corrupt")
    (tmp_path / "notes.pt").write_text("this is not a checkpoint at all")
    refused(tmp_path / "notes.pt", r"not a safetensors file or a torch.save checkpoint")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _CustomObject:
    pass


def test_pickle_that_needs_code_is_refused_and_nothing_runs(tmp_path, sd):
    marker = tmp_path / "pwned"
    torch.save(
        {"generator": {"model." + k: v for k, v in sd.items()}, "hook": _RunsCode(marker)},
        tmp_path / "evil.pt",
    )
    msg = refused(tmp_path / "evil.pt", r"refused to load: this pickle needs Python code")
    assert "system" in msg
    assert not marker.exists()
    torch.save({"state_dict": sd, "config": _CustomObject()}, tmp_path / "custom.pt")
    refused(tmp_path / "custom.pt", r"refused to load.*_CustomObject")
    # sanity check of the test itself: unrestricted unpickling would have run the command
    pickle.loads(pickle.dumps(_RunsCode(marker)))
    assert marker.exists()


def test_wrong_shape_missing_and_unexpected_keys(tmp_path, sd):
    bad = dict(sd)
    bad["blocks.1.self_attn.q.weight"] = torch.zeros(256, 128)
    save_file(bad, tmp_path / "shape.safetensors")
    refused(
        tmp_path / "shape.safetensors",
        r"blocks\.1\.self_attn\.q\.weight: expected \[256, 256\], got \[256, 128\]",
    )

    bad = {"model." + k: v for k, v in sd.items() if k != "blocks.1.norm3.bias"}
    bad["model.blocks.0.extra.weight"] = torch.zeros(3)
    torch.save(bad, tmp_path / "keys.pt")
    msg = refused(tmp_path / "keys.pt", r"missing keys \(1\): blocks\.1\.norm3\.bias")
    assert "unexpected keys (1): model.blocks.0.extra.weight" in msg


def test_unknown_format_lora_instead_of_model_and_non_tensor_entries(tmp_path, sd):
    save_file({"encoder.layer.0.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    refused(tmp_path / "other.safetensors", r"unknown checkpoint format.*encoder\.layer\.0\.weight")
    torch.save(
        {"generator_lora": {"base_model.model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 256)}},
        tmp_path / "lora.pt",
    )
    refused(tmp_path / "lora.pt", r"LoRA adapter")
    torch.save(
        {"model.patch_embedding.weight": sd["patch_embedding.weight"], "step": 100}, tmp_path / "odd.pt"
    )
    refused(tmp_path / "odd.pt", r"entry 'step' is a int, not a tensor")


def test_preset_and_config_json_mismatches_are_errors(tmp_path, sd):
    save_file(sd, tmp_path / "diffusion_pytorch_model.safetensors")
    refused(
        tmp_path / "diffusion_pytorch_model.safetensors",
        r"does not match preset 'wan2.1-t2v-1.3b': dim is 256 in the file but 1536",
        preset="wan2.1-t2v-1.3b",
    )
    (tmp_path / "config.json").write_text(
        json.dumps({"_class_name": "WanModel", "dim": 256, "num_heads": 2, "num_layers": 3})
    )
    with pytest.raises(
        CheckpointError, match=r"config\.json does not agree with .*num_layers is 2 in the weights but 3"
    ):
        open_dit_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps(
            {"_class_name": "WanModel", "dim": 256, "num_heads": 2, "num_layers": 2, "model_type": "i2v"}
        )
    )
    with pytest.raises(CheckpointError, match=r"model_type is 'i2v'"):
        open_dit_checkpoint(tmp_path)


def test_unsupported_quantisation_and_orphan_scales(tmp_path, sd):
    q = dict(sd)
    q["blocks.0.ffn.0.weight"] = sd["blocks.0.ffn.0.weight"].to(torch.float8_e4m3fn)
    q["blocks.0.ffn.0.comfy_quant"] = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
    save_file(q, tmp_path / "q.safetensors")
    refused(
        tmp_path / "q.safetensors",
        r"key 'blocks\.0\.ffn\.0\.comfy_quant': quantisation format 'nvfp4' is not supported",
    )
    s = dict(sd)
    s["blocks.0.ffn.9.scale_weight"] = torch.tensor(1.0)
    save_file(s, tmp_path / "s.safetensors")
    refused(tmp_path / "s.safetensors", r"scale 'blocks\.0\.ffn\.9\.scale_weight' has no weight")


def test_missing_shard_and_key_outside_its_index(tmp_path, sd):
    keys = list(sd)
    save_file({k: sd[k] for k in keys[:10]}, tmp_path / "a.safetensors")
    index = {
        "weight_map": {
            **dict.fromkeys(keys[:10], "a.safetensors"),
            **dict.fromkeys(keys[10:], "b.safetensors"),
        }
    }
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"shard b\.safetensors is listed but missing"):
        open_dit_checkpoint(tmp_path)
    save_file({k: sd[k] for k in keys[9:]}, tmp_path / "b.safetensors")  # one key in both shards
    with pytest.raises(
        CheckpointError, match=rf"b\.safetensors: key '{re.escape(keys[9])}' is also in .*a\.safetensors"
    ):
        open_dit_checkpoint(tmp_path)


def raw(t):
    return t.reshape(-1).view(torch.uint8)


def test_our_safetensors_reader_and_writer_agree_with_the_reference_library(tmp_path):
    tensors = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(7).to(torch.bfloat16),
        "f16": torch.randn(2, 2, 2).half(),
        "fp8": torch.randn(4, 4).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "i64": torch.arange(5),
        "flag": torch.tensor([True, False]),
    }
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"a": "b"})
    ours = SafetensorsFile(tmp_path / "ref.safetensors")
    assert ours.metadata == {"a": "b"}
    for k, v in tensors.items():
        got = ours.read(k)
        assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(raw(got), raw(v)), k
    save_tensors(tmp_path / "ours.safetensors", tensors, {"c": "d"})
    with safe_open(tmp_path / "ours.safetensors", framework="pt") as f:
        assert f.metadata() == {"c": "d"}
        for k, v in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(raw(got), raw(v)), k
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_state_dict_reader_unwraps_state_dict_and_converts_only_float_tensors(tmp_path):
    # The reader the VAE, TAEHV and umT5 loaders share: same result from a pickle nested under
    # "state_dict" and from a flat safetensors file.
    w, n, skipped = torch.randn(2, 3), torch.tensor([3, 1 << 40]), torch.ones(4)
    torch.save({"state_dict": {"w": w, "n": n, "encoder.x": skipped}}, tmp_path / "nested.pth")
    save_tensors(tmp_path / "flat.safetensors", {"w": w, "n": n, "encoder.x": skipped})
    for name in ("nested.pth", "flat.safetensors"):
        got = read_state_dict(tmp_path / name, dtype=torch.float64, keep=lambda k: k != "encoder.x")
        assert set(got) == {"w", "n"}, name
        assert got["w"].dtype == torch.float64 and torch.equal(got["w"], w.double()), name
        assert got["n"].dtype == torch.int64 and torch.equal(got["n"], n), name  # integers kept as stored

    torch.save({"blocks": {"0.weight": torch.ones(1)}}, tmp_path / "deep.pth")
    with pytest.raises(CheckpointError, match=r"deep\.pth: entry 'blocks' is a dict, not a tensor"):
        read_state_dict(tmp_path / "deep.pth")
    torch.save([torch.ones(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match=r"list\.pth: expected a state dict .*got a list"):
        read_state_dict(tmp_path / "list.pth")
