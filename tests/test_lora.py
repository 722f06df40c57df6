"""LoRA: every layout loads to the same adapter; apply/remove is bit-exact; runtime and merged LoRA
both equal weights computed here in float64."""

import json

import pytest
import torch
from _checkpoint_formats import diffusers_name
from safetensors.torch import save_file

from rf_core.lora import (
    Lora,
    LoraError,
    applied_loras,
    apply_lora,
    load_lora,
    lora_from_state_dict,
    merge_lora,
    remove_lora,
    save_lora,
)
from rf_core.tiny import random_model, random_prompt

RANK, ALPHA = 4, 2.0  # scale alpha / rank = 0.5
TARGETS = [
    f"blocks.{i}.{m}"
    for i in range(2)
    for m in ("self_attn.q", "self_attn.o", "cross_attn.k", "ffn.0", "ffn.2")
]
TARGETS += ["time_projection.1", "head.head"]


@pytest.fixture
def model():
    return random_model("tiny", seed=8)


def make_pairs(model, seed=0, targets=TARGETS):
    """{module: (A [rank, in], B [out, rank])} with B non-zero (a trained LoRA)."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    out = {}
    for name in targets:
        o, i = params[name + ".weight"].shape
        out[name] = (0.2 * torch.randn(RANK, i, generator=g), 0.2 * torch.randn(o, RANK, generator=g))
    return out


def write_all_layouts(d, pairs):
    """The same adapter in each layout, written as its tools write it."""
    peft = {}
    kohya, comfy, diffusers = {}, {}, {}
    for name, (a, b) in pairs.items():
        peft[f"base_model.model.{name}.lora_A.weight"] = a
        peft[f"base_model.model.{name}.lora_B.weight"] = b
        k = "lora_unet_" + name.replace(".", "_")
        kohya |= {f"{k}.lora_down.weight": a, f"{k}.lora_up.weight": b, f"{k}.alpha": torch.tensor(ALPHA)}
        comfy |= {f"diffusion_model.{name}.lora_A.weight": a, f"diffusion_model.{name}.lora_B.weight": b,
                  f"diffusion_model.{name}.alpha": torch.tensor(ALPHA)}  # fmt: skip
        dn = "transformer." + diffusers_name(name)
        diffusers |= {f"{dn}.lora_A.weight": a, f"{dn}.lora_B.weight": b}
    paths = {}
    torch.save({"generator_lora": peft, "critic_lora": {}}, d / "lora.pt")  # LongLive
    paths["peft-longlive"] = (d / "lora.pt", {"adapter_config": {"r": RANK, "lora_alpha": ALPHA}})
    (d / "peft").mkdir()
    save_file(peft, d / "peft" / "adapter_model.safetensors")
    (d / "peft" / "adapter_config.json").write_text(
        json.dumps({"r": RANK, "lora_alpha": ALPHA, "peft_type": "LORA"})
    )
    paths["peft-dir"] = (d / "peft" / "adapter_model.safetensors", {})
    save_file(kohya, d / "kohya.safetensors")
    paths["kohya"] = (d / "kohya.safetensors", {})
    save_file(comfy, d / "comfy.safetensors")
    paths["comfyui"] = (d / "comfy.safetensors", {})
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": RANK, "transformer.lora_alpha": ALPHA})}
    save_file(diffusers, d / "diffusers.safetensors", metadata=meta)
    paths["diffusers"] = (d / "diffusers.safetensors", {})
    save_lora(
        d / "ours.safetensors", {n: (a, b, ALPHA) for n, (a, b) in pairs.items()}, metadata={"steps": "10"}
    )
    paths["ours"] = (d / "ours.safetensors", {})
    return paths


def test_every_layout_loads_to_the_same_internal_lora(tmp_path, model):
    pairs = make_pairs(model)
    for layout, (path, kw) in write_all_layouts(tmp_path, pairs).items():
        lora = load_lora(path, **kw)
        assert sorted(lora.layers) == sorted(pairs), layout
        for name, (a, b) in pairs.items():
            layer = lora.layers[name]
            assert torch.equal(layer.down, a) and torch.equal(layer.up, b), (layout, name)
            assert layer.scale == ALPHA / RANK, (layout, name)
    assert load_lora(tmp_path / "ours.safetensors").metadata["steps"] == "10"


def test_alpha_defaults_to_rank_without_config_and_rslora(tmp_path, model):
    pairs = make_pairs(model, targets=TARGETS[:2])
    torch.save(
        {
            f"base_model.model.{n}.lora_{x}.weight": t
            for n, (a, b) in pairs.items()
            for x, t in (("A", a), ("B", b))
        },
        tmp_path / "p.pt",
    )
    assert {layer.scale for layer in load_lora(tmp_path / "p.pt").layers.values()} == {1.0}
    rs = load_lora(tmp_path / "p.pt", adapter_config={"lora_alpha": 8, "use_rslora": True})
    assert {round(layer.scale, 12) for layer in rs.layers.values()} == {8 / RANK**0.5}


def reference_weights(base, loras, strengths):
    """W + sum strength * alpha / rank * B @ A, in float64."""
    sd = {k: v.double() for k, v in base.items()}
    for pairs, s in zip(loras, strengths):
        for name, (a, b) in pairs.items():
            sd[name + ".weight"] += s * (ALPHA / RANK) * (b.double() @ a.double())
    return {k: v.float() for k, v in sd.items()}


def forward(model):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    return model(x, torch.tensor([500.0]), random_prompt("tiny", seed=4))


def test_apply_remove_is_bit_exact_and_matches_float64_reference(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    pairs = make_pairs(model, seed=1)
    lora = Lora.from_pairs({n: (a, b, ALPHA) for n, (a, b) in pairs.items()})
    want = reference_weights(before, [pairs], [0.7])
    reference = random_model("tiny", seed=0)
    reference.load_state_dict(want)

    handle = apply_lora(model, lora, 0.7)
    assert applied_loras(model) == [handle]
    got = model.state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    runtime_out = forward(model)
    torch.testing.assert_close(runtime_out, forward(reference), rtol=1e-5, atol=1e-5)

    remove_lora(model, handle)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) and after[k].data_ptr() == ptrs[k] for k in before)
    assert applied_loras(model) == []

    # merging bakes the same update into the weights
    merged = random_model("tiny", seed=8)
    merge_lora(merged, lora, 0.7)
    torch.testing.assert_close(forward(merged), runtime_out, rtol=1e-5, atol=1e-5)


def test_stacked_loras_remove_in_any_order(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p1, p2 = make_pairs(model, seed=2), make_pairs(model, seed=3, targets=TARGETS[3:])
    l1 = Lora.from_pairs({n: (a, b, ALPHA) for n, (a, b) in p1.items()})
    l2 = Lora.from_pairs({n: (a, b, ALPHA) for n, (a, b) in p2.items()})
    h1 = apply_lora(model, l1, 1.0)
    h2 = apply_lora(model, l2, -0.5)
    want = reference_weights(before, [p1, p2], [1.0, -0.5])
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=1e-6)
    remove_lora(model, h1)  # the first one, while the second stays on
    want2 = reference_weights(before, [p2], [-0.5])
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, want2[k], rtol=0, atol=1e-6)
    assert applied_loras(model) == [h2]
    remove_lora(model, h2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(LoraError, match="not applied"):
        remove_lora(model, h2)


def test_diffs_and_bias_deltas(tmp_path, model):
    """ComfyUI/kohya-style full deltas: .diff on a weight and a bare parameter, .diff_b on a bias."""
    g = torch.Generator().manual_seed(6)
    sd = model.state_dict()
    d_norm = 0.1 * torch.randn(sd["blocks.0.norm3.weight"].shape, generator=g)
    d_mod = 0.1 * torch.randn(sd["blocks.1.modulation"].shape, generator=g)
    d_bias = 0.1 * torch.randn(sd["blocks.0.ffn.2.bias"].shape, generator=g)
    save_file({"diffusion_model.blocks.0.norm3.diff": d_norm, "diffusion_model.blocks.1.modulation.diff": d_mod,
               "diffusion_model.blocks.0.ffn.2.diff_b": d_bias}, tmp_path / "d.safetensors")  # fmt: skip
    before = {k: v.clone() for k, v in sd.items()}
    apply_lora(model, load_lora(tmp_path / "d.safetensors"), 2.0)
    now = model.state_dict()
    torch.testing.assert_close(
        now["blocks.0.norm3.weight"], before["blocks.0.norm3.weight"] + 2 * d_norm, rtol=0, atol=1e-6
    )
    torch.testing.assert_close(
        now["blocks.1.modulation"], before["blocks.1.modulation"] + 2 * d_mod, rtol=0, atol=1e-6
    )
    torch.testing.assert_close(
        now["blocks.0.ffn.2.bias"], before["blocks.0.ffn.2.bias"] + 2 * d_bias, rtol=0, atol=1e-6
    )
    remove_lora(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_unknown_keys_are_reported_not_ignored(tmp_path, model):
    a, b = make_pairs(model, targets=["blocks.0.ffn.0"])["blocks.0.ffn.0"]
    sd = {"diffusion_model.blocks.0.ffn.0.lora_A.weight": a, "diffusion_model.blocks.0.ffn.0.lora_B.weight": b,
          "diffusion_model.img_emb.proj.0.lora_A.weight": a.clone(), "text_encoders.t5.lora_up.weight": b.clone()}  # fmt: skip
    save_file(sd, tmp_path / "x.safetensors")
    with pytest.raises(
        LoraError, match=r"2 keys are not LoRA weights.*img_emb\.proj\.0\.lora_A.*text_encoders"
    ) as e:
        load_lora(tmp_path / "x.safetensors")
    assert str(tmp_path / "x.safetensors") in str(e.value)
    lenient = load_lora(tmp_path / "x.safetensors", strict=False)
    assert list(lenient.layers) == ["blocks.0.ffn.0"]
    assert sorted(lenient.unknown_keys) == [
        "diffusion_model.img_emb.proj.0.lora_A.weight",
        "text_encoders.t5.lora_up.weight",
    ]


def test_lora_that_does_not_fit_the_model_is_an_error_and_changes_nothing(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a, b = torch.zeros(RANK, 128), torch.zeros(256, RANK)
    with pytest.raises(
        LoraError,
        match=r"module 'blocks\.0\.self_attn\.q': lora_A \[4, 128\] / lora_B \[256, 4\] do not fit the weight \[256, 256\]",
    ):
        apply_lora(model, Lora.from_pairs({"blocks.0.self_attn.q": (a, b, None)}, source="bad.safetensors"))
    ok = make_pairs(model, targets=["blocks.0.ffn.0"])["blocks.0.ffn.0"]
    with pytest.raises(LoraError, match=r"'blocks\.5\.ffn\.0' has no parameter 'blocks\.5\.ffn\.0\.weight'"):
        apply_lora(model, Lora.from_pairs({"blocks.0.ffn.0": (*ok, None), "blocks.5.ffn.0": (*ok, None)}))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert applied_loras(model) == []
    with pytest.raises(LoraError, match="has lora_A/down but not its pair"):
        lora_from_state_dict({"diffusion_model.blocks.0.ffn.0.lora_A.weight": ok[0]})
