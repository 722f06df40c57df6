"""``reward-forcing convert`` and ``download`` (argument parsing only: tests never touch the network)."""

import json

import pytest
import torch
from _checkpoint_formats import fsdp_name
from safetensors import safe_open
from safetensors.torch import save_file

from rf_core.cli import build_parser, main
from rf_core.io.checkpoints import load_dit
from rf_core.tiny import random_model


@pytest.fixture(scope="module")
def sd():
    return {k: v.clone() for k, v in random_model("tiny", seed=12).state_dict().items()}


def read_back(path):
    with safe_open(path, framework="pt") as f:  # the reference reader, not ours
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_convert_training_checkpoint_to_canonical_bf16(tmp_path, sd):
    ema = {fsdp_name(k): v for k, v in sd.items()}
    torch.save(
        {"generator": {"model." + k: -v for k, v in sd.items()}, "generator_ema": ema}, tmp_path / "rf.pt"
    )
    out = tmp_path / "rf_bf16.safetensors"
    assert main(["convert", str(tmp_path / "rf.pt"), str(out), "--dtype", "bf16"]) == 0
    tensors, meta = read_back(out)
    assert tensors.keys() == sd.keys()
    assert all(
        tensors[k].dtype == torch.bfloat16 and torch.equal(tensors[k], v.to(torch.bfloat16))
        for k, v in sd.items()
    )
    assert meta["rf_source_format"] == "training" and meta["rf_source_section"] == "generator_ema"
    assert json.loads(meta["rf_config"])["dim"] == 256 and json.loads(meta["rf_config"])["text_len"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rf.pt", "rf_bf16.safetensors"]  # no temp file left
    # the converted file loads back as the same model
    assert load_dit(out).load_info.config_source == "file metadata"
    # --no-ema takes the other generator
    main(["convert", str(tmp_path / "rf.pt"), str(tmp_path / "raw.safetensors"), "--no-ema"])
    raw, _ = read_back(tmp_path / "raw.safetensors")
    assert torch.equal(raw["blocks.0.ffn.0.weight"], -sd["blocks.0.ffn.0.weight"])


def test_convert_merges_loras_with_strengths(tmp_path, sd, capsys):
    save_file(sd, tmp_path / "base.safetensors")
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 256, generator=g), torch.randn(256, 2, generator=g)
    k = "lora_unet_blocks_1_self_attn_v"
    save_file(
        {f"{k}.lora_down.weight": a, f"{k}.lora_up.weight": b, f"{k}.alpha": torch.tensor(1.0)},
        tmp_path / "l.safetensors",
    )
    out = tmp_path / "merged.safetensors"
    args = [
        "convert",
        str(tmp_path / "base.safetensors"),
        str(out),
        "--lora",
        str(tmp_path / "l.safetensors"),
        "--lora-strength",
        "0.25",
    ]
    assert main(args) == 0
    tensors, meta = read_back(out)
    want = (sd["blocks.1.self_attn.v.weight"].double() + 0.25 * 0.5 * (b.double() @ a.double())).float()
    torch.testing.assert_close(tensors["blocks.1.self_attn.v.weight"], want, rtol=0, atol=1e-6)
    assert torch.equal(tensors["blocks.1.self_attn.q.weight"], sd["blocks.1.self_attn.q.weight"])
    assert "l.safetensors x 0.25" in json.loads(meta["rf_loras"])[0]
    # refuses to overwrite, and reports bad input without a traceback
    capsys.readouterr()
    assert main(args) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    (tmp_path / "bad.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{}garbage")
    assert main(["convert", str(tmp_path / "bad.safetensors"), str(tmp_path / "x.safetensors")]) == 2


def test_download_arguments_parse_without_network():
    args = build_parser().parse_args(
        ["download", "--what", "rewardforcing", "vae", "taehv", "--dir", "/models"]
    )
    assert args.what == ["rewardforcing", "vae", "taehv"] and args.dir == "/models"
    assert build_parser().parse_args(["download", "--dir", "m"]).what == ["rewardforcing", "vae", "t5"]
    assert main(["download", "--what", "everything", "--dir", "m"]) == 2  # refused while parsing
    assert main(["download", "--what", "vae"]) == 2  # --dir is required
