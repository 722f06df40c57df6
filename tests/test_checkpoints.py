"""Checkpoint formats: every layout at tiny size through the real loader, generation parity, and the
key mapping of every layout at full 1.3B / 14B size on the meta device."""

import json

import pytest
import torch
from _checkpoint_formats import diffusers_name, fsdp_name, scaled_fp8, wan_shapes
from safetensors.torch import save_file

from rf_core.config import StreamConfig, get_preset
from rf_core.io.checkpoints import checkpoint_from_state_dict, load_dit, load_dit_state_dict
from rf_core.model.dit import WanDiT
from rf_core.stream import StreamSession
from rf_core.tiny import random_model, random_prompt

CFG = get_preset("tiny")


@pytest.fixture(scope="module")
def source():
    """The source state dict (fp32) every file is written from."""
    return {k: v.clone() for k, v in random_model("tiny", seed=11).state_dict().items()}


@pytest.fixture(scope="module")
def other(source):
    """A second, different set of weights (stands in for the non-EMA generator)."""
    return {k: v + 0.05 * torch.randn_like(v) for k, v in source.items()}


def generate(model: WanDiT) -> torch.Tensor:
    # one chunk is enough: its denoising passes go through every weight of the model
    return StreamSession(
        model, random_prompt(CFG, seed=2), (8, 8), config=StreamConfig(), seed=0
    ).next_chunk()


def reference_model(sd: dict[str, torch.Tensor]) -> WanDiT:
    model = random_model("tiny", seed=0)
    model.load_state_dict(sd, strict=True)
    return model


@pytest.fixture(scope="module")
def source_video(source):
    return generate(reference_model(source))


def assert_same_weights(model: WanDiT, sd: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert got.keys() == sd.keys()
    for k, v in sd.items():
        assert got[k].dtype == torch.float32, k
        assert torch.equal(got[k], v), k


def prefixed(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


# Each case: file name, writer(tmp dir, source, other) -> path to load, expected format, section.
def _rf_flat(d, sd, _):
    torch.save(prefixed(sd, "model."), d / "rewardforcing.pt")
    return d / "rewardforcing.pt"


def _rf_nested(d, sd, other):
    critic = prefixed(other, "model.")
    torch.save(
        {"generator": prefixed(other, "model."), "generator_ema": prefixed(sd, "model."), "critic": critic},
        d / "rf.pt",
    )
    return d / "rf.pt"


def _sf_fsdp_ema(d, sd, other):
    ema = {fsdp_name(k): v for k, v in sd.items()}
    torch.save({"generator": prefixed(other, "model."), "generator_ema": ema}, d / "self_forcing_dmd.pt")
    return d / "self_forcing_dmd.pt"


def _ode_init(d, sd, _):
    torch.save({"generator": prefixed(sd, "model.")}, d / "ode_init.pt")
    return d / "ode_init.pt"


def _model_state_dict(d, sd, _):
    torch.save({"model": {"state_dict": sd}}, d / "causvid.pt")
    return d / "causvid.pt"


def _wan_safetensors(d, sd, _):
    save_file(sd, d / "diffusion_pytorch_model.safetensors")
    return d / "diffusion_pytorch_model.safetensors"


def _wan_sharded(d, sd, _):
    keys = list(sd)
    shards = {
        "diffusion_pytorch_model-00001-of-00002.safetensors": keys[:30],
        "diffusion_pytorch_model-00002-of-00002.safetensors": keys[30:],
    }
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, d / name)
        weight_map.update(dict.fromkeys(ks, name))
    (d / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    cfg = {"_class_name": "WanModel", "dim": 256, "ffn_dim": 512, "num_heads": 2, "num_layers": 2, "in_dim": 16,
           "out_dim": 16, "freq_dim": 256, "text_len": 32, "eps": 1e-6, "model_type": "t2v"}  # fmt: skip
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _comfy_fp32(d, sd, _):
    save_file(prefixed(sd, "model.diffusion_model."), d / "wan_comfy.safetensors")
    return d / "wan_comfy.safetensors"


def _diffusers(d, sd, _):
    (d / "transformer").mkdir()
    save_file(
        {diffusers_name(k): v for k, v in sd.items()},
        d / "transformer" / "diffusion_pytorch_model.safetensors",
    )
    cfg = {"_class_name": "WanTransformer3DModel", "num_attention_heads": 2, "attention_head_dim": 128, "in_channels": 16,
           "out_channels": 16, "text_dim": 64, "freq_dim": 256, "ffn_dim": 512, "num_layers": 2, "patch_size": [1, 2, 2]}  # fmt: skip
    (d / "transformer" / "config.json").write_text(json.dumps(cfg))
    return d


CASES = {
    "rewardforcing-flat": (_rf_flat, "training", None),
    "rewardforcing-nested-ema": (_rf_nested, "training", "generator_ema"),
    "self-forcing-fsdp-ema": (_sf_fsdp_ema, "training", "generator_ema"),
    "ode-init": (_ode_init, "training", "generator"),
    "model-state_dict": (_model_state_dict, "training", "model/state_dict"),
    "wan-safetensors": (_wan_safetensors, "wan", None),
    "wan-sharded-index": (_wan_sharded, "wan", None),
    "comfyui-fp32": (_comfy_fp32, "comfyui", None),
    "diffusers": (_diffusers, "diffusers", None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_layout_loads_the_source_weights_and_generates_the_same_video(
    case, tmp_path, source, other, source_video
):
    write, fmt, section = CASES[case]
    path = write(tmp_path, source, other)
    model = load_dit(path, dtype=torch.float32)
    assert model.load_info.format == fmt
    assert model.load_info.section == section
    assert model.cfg == CFG
    assert_same_weights(model, source)
    assert torch.equal(generate(model), source_video)


def test_prefer_ema_false_and_explicit_section_pick_the_generator(tmp_path, source, other):
    path = _rf_nested(tmp_path, source, other)
    for kw in ({"prefer_ema": False}, {"section": "generator"}):
        sd, _, info = load_dit_state_dict(path, **kw)
        assert info.section == "generator"
        assert all(torch.equal(sd[k], other[k]) for k in other)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_comfyui_half_precision_files(tmp_path, source, dtype):
    save_file(
        prefixed({k: v.to(dtype) for k, v in source.items()}, "model.diffusion_model."),
        tmp_path / "m.safetensors",
    )
    expected = {k: v.to(dtype).float() for k, v in source.items()}
    model = load_dit(tmp_path / "m.safetensors", dtype=torch.float32)
    assert_same_weights(model, expected)
    assert torch.equal(generate(model), generate(reference_model(expected)))
    # without a dtype the file's own precision is kept
    assert load_dit(tmp_path / "m.safetensors").dtype == dtype


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", ""])
def test_comfyui_scaled_fp8_is_dequantised_as_fp8_times_scale(tmp_path, source, prefix):
    file_sd, expected = scaled_fp8(source, prefix)
    save_file(file_sd, tmp_path / "wan_fp8_scaled.safetensors")
    model = load_dit(tmp_path / "wan_fp8_scaled.safetensors", dtype=torch.float32)
    assert model.load_info.quantization == "scaled-fp8"
    assert "scaled_fp8" in model.load_info.ignored_keys[0]
    assert_same_weights(model, expected)
    assert torch.equal(generate(model), generate(reference_model(expected)))
    # fp8 with per-tensor scales stays close to the original weights (relative error of e4m3: 2^-4)
    w, w8 = source["blocks.0.ffn.0.weight"], model.state_dict()["blocks.0.ffn.0.weight"]
    assert (w - w8).abs().max() <= w.abs().max() * 2**-4
    # an unscaled cast of the same fp8 values would be far off: the scale really is applied
    raw = file_sd[prefix + "blocks.0.ffn.0.weight"].float()
    assert (raw - w).abs().max() > 10 * w.abs().max()


def test_plain_fp8_and_comfy_quant_tagged_fp8(tmp_path, source):
    plain = {k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 else v) for k, v in source.items()}
    save_file(plain, tmp_path / "fp8.safetensors")
    model = load_dit(tmp_path / "fp8.safetensors", dtype=torch.float32)
    assert model.load_info.quantization == "fp8"
    assert_same_weights(model, {k: v.float() for k, v in plain.items()})
    # newer ComfyUI files: <layer>.weight_scale plus a <layer>.comfy_quant JSON tag
    tagged, expected = {}, {}
    tag = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
    # one scale for the tensor, or one per output row
    scales = {
        "blocks.1.ffn.2.weight": torch.tensor(0.01),
        "blocks.0.cross_attn.v.weight": torch.rand(256) / 50 + 1e-3,
    }
    for k, v in source.items():
        if k in scales:
            scale, layer = scales[k], k.removesuffix(".weight")
            rows = scale.reshape(-1, 1) if scale.ndim else scale
            q = (v / rows).to(torch.float8_e4m3fn)
            tagged.update({k: q, f"{layer}.weight_scale": scale, f"{layer}.comfy_quant": tag.clone()})
            expected[k] = (q.double() * rows.double()).float()
        else:
            tagged[k] = expected[k] = v
    save_file(tagged, tmp_path / "tagged.safetensors")
    assert_same_weights(load_dit(tmp_path / "tagged.safetensors", dtype=torch.float32), expected)


def test_longlive_base_plus_lora_merges_into_the_generator(tmp_path, source):
    """LongLive: longlive_base.pt (EMA cleaned of FSDP names) + lora.pt (peft keys under generator_lora,
    rank = alpha, so scale 1), merged as W + B @ A."""
    torch.save(
        {"generator": prefixed(source, "model."), "generator_ema": prefixed(source, "model.")},
        tmp_path / "longlive_base.pt",
    )
    g = torch.Generator().manual_seed(5)
    targets = [f"blocks.{i}.{m}" for i in range(2) for m in ("self_attn.q", "cross_attn.o", "ffn.0", "ffn.2")]
    lora, expected = {}, {k: v.double() for k, v in source.items()}
    for name in targets:
        out_f, in_f = source[name + ".weight"].shape
        a, b = 0.1 * torch.randn(8, in_f, generator=g), 0.1 * torch.randn(out_f, 8, generator=g)
        lora[f"base_model.model.{name}.lora_A.weight"] = a
        lora[f"base_model.model.{name}.lora_B.weight"] = b
        expected[name + ".weight"] += b.double() @ a.double()
    torch.save({"generator_lora": lora, "critic_lora": {}}, tmp_path / "lora.pt")
    expected = {k: v.float() for k, v in expected.items()}
    model = load_dit(tmp_path / "longlive_base.pt", dtype=torch.float32, loras=[tmp_path / "lora.pt"])
    for k, v in expected.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=1e-6)
    torch.testing.assert_close(generate(model), generate(reference_model(expected)), rtol=0, atol=1e-4)


def test_load_dit_builds_on_meta_and_assigns_the_file_tensors(tmp_path, source):
    """No second copy: the model's parameters are the tensors read from the file (a pickle's are
    memory-mapped views; no clone is made when device and dtype already match)."""
    torch.save(prefixed(source, "model."), tmp_path / "m.pt")
    model = load_dit(tmp_path / "m.pt")
    assert all(p.device.type == "cpu" for p in model.parameters())
    mapped = torch.load(tmp_path / "m.pt", weights_only=True, mmap=True)
    assert (
        model.blocks[0].ffn[0].weight.untyped_storage().nbytes()
        == mapped["model.blocks.0.ffn.0.weight"].untyped_storage().nbytes()
    )
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("preset", ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b"])
def test_full_size_layouts_map_one_to_one_onto_the_model(preset):
    cfg = get_preset(preset)
    expected = wan_shapes(cfg)
    assert len(expected) == {"wan2.1-t2v-1.3b": 825, "wan2.1-t2v-14b": 1095}[preset]
    with torch.device("meta"):
        model_shapes = {k: tuple(v.shape) for k, v in WanDiT(cfg).state_dict().items()}
    assert model_shapes == expected

    def meta(shape, dtype=torch.bfloat16):
        return torch.empty(shape, device="meta", dtype=dtype)

    fp8 = {"model.diffusion_model.scaled_fp8": meta((0,), torch.float8_e4m3fn)}
    for k, s in expected.items():
        linear = k.endswith(".weight") and len(s) == 2
        fp8["model.diffusion_model." + k] = meta(s, torch.float8_e4m3fn if linear else torch.bfloat16)
        if linear:
            fp8["model.diffusion_model." + k[: -len("weight")] + "scale_weight"] = meta((), torch.float32)
    layouts = {
        "wan": {k: meta(s) for k, s in expected.items()},
        "training-flat": {"model." + k: meta(s) for k, s in expected.items()},
        "training-nested-fsdp": {
            "generator": {"model." + k: meta(s) for k, s in expected.items()},
            "generator_ema": {fsdp_name(k): meta(s) for k, s in expected.items()},
        },
        "comfyui": {"model.diffusion_model." + k: meta(s) for k, s in expected.items()},
        "comfyui-scaled-fp8": fp8,
        "diffusers": {diffusers_name(k): meta(s) for k, s in expected.items()},
    }
    for name, sd in layouts.items():
        ckpt = checkpoint_from_state_dict(sd, source=name)
        assert ckpt.config == cfg, name
        assert {k: tuple(t.shape) for k, t in ckpt.canonical.weights.items()} == expected, name
        # and a forced preset of the other size is refused
        other = "wan2.1-t2v-14b" if preset == "wan2.1-t2v-1.3b" else "wan2.1-t2v-1.3b"
        with pytest.raises(ValueError, match="does not match preset"):
            checkpoint_from_state_dict(sd, source=name, preset=other)
