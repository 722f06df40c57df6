"""Tiny synthetic model files in the real formats, for running the example workflows in real ComfyUI.

- DiT: a 2-block Wan DiT (dim 256) in Reward Forcing's released layout (``model.``-prefixed keys in a
  torch pickle). Its text width is 768 so that ComfyUI's CLIP-L can stand in for umT5-XXL (a random
  umT5-XXL has 5.7 B parameters; ComfyUI's "wan" CLIP type builds it at full size whatever the file).
- CLIP-L: random weights under ComfyUI's SD1 text-encoder key names (loaded with CLIPLoader type
  "stable_diffusion"); its CONDITIONING is [1, 77, 768], so the nodes' padding to 512 tokens runs.
- Wan 2.1 VAE: the full architecture (dim 96, 194 tensors) with random weights, which ComfyUI detects
  as a Wan 2.1 VAE; native VAE Decode and our decoders run it.
- TAEHV: full-size taew2_1 layout with random weights.
- A LoRA in ComfyUI's key layout and, for comparison, the DiT with that LoRA merged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from rf_core.config import DiTConfig
from rf_core.lora import Lora, merge_lora
from rf_core.model.dit import WanDiT
from rf_core.tiny import randomize_
from rf_core.vae.taehv import TAEHV
from rf_core.vae.wan_vae import WanVAE

E2E_DIT = DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=768)
CLIP_NAME = "clip_l_random.safetensors"
LORA_NAME = "e2e_lora.safetensors"
LORA_TARGETS = ("blocks.0.self_attn.q", "blocks.1.cross_attn.k", "blocks.1.ffn.0")


def e2e_dit() -> WanDiT:
    model = WanDiT(E2E_DIT)
    return randomize_(model, seed=11).eval().requires_grad_(False)


def e2e_lora(model: WanDiT) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    params = dict(model.named_parameters())
    sd = {}
    for name in LORA_TARGETS:
        out, inp = params[f"{name}.weight"].shape
        sd[f"diffusion_model.{name}.lora_A.weight"] = 0.2 * torch.randn(8, inp, generator=g)
        sd[f"diffusion_model.{name}.lora_B.weight"] = 0.2 * torch.randn(out, 8, generator=g)
        sd[f"diffusion_model.{name}.alpha"] = torch.tensor(4.0)
    return sd


def clip_l_state_dict(seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (0.02 * torch.randn(shape, generator=g)).to(torch.float16)

    d, ffn = 768, 3072
    sd = {
        "text_model.embeddings.token_embedding.weight": rnd(49408, d),
        "text_model.embeddings.position_embedding.weight": rnd(77, d),
        "text_model.final_layer_norm.weight": torch.ones(d, dtype=torch.float16),
        "text_model.final_layer_norm.bias": torch.zeros(d, dtype=torch.float16),
        "text_projection.weight": rnd(d, d),
    }
    for i in range(12):
        p = f"text_model.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[p + f"self_attn.{proj}.weight"] = rnd(d, d)
            sd[p + f"self_attn.{proj}.bias"] = rnd(d)
        for norm in ("layer_norm1", "layer_norm2"):
            sd[p + f"{norm}.weight"] = torch.ones(d, dtype=torch.float16)
            sd[p + f"{norm}.bias"] = torch.zeros(d, dtype=torch.float16)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = rnd(ffn, d), rnd(ffn)
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = rnd(d, ffn), rnd(d)
    return sd


def wan_vae_state_dict(seed: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    vae = WanVAE()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return {k: v.to(torch.float16).contiguous() for k, v in vae.state_dict().items()}


def write_models(models: Path) -> None:
    """Write every file under ``models/<folder>/`` with the names the example workflows use."""
    for folder in ("diffusion_models", "text_encoders", "vae", "vae_approx", "loras"):
        (models / folder).mkdir(parents=True, exist_ok=True)
    dit = e2e_dit()
    torch.save(
        {f"model.{k}": v for k, v in dit.state_dict().items()},
        models / "diffusion_models" / "rewardforcing.pt",
    )
    lora = e2e_lora(dit)
    save_file(lora, models / "loras" / LORA_NAME)
    pairs = {
        name: (
            lora[f"diffusion_model.{name}.lora_A.weight"],
            lora[f"diffusion_model.{name}.lora_B.weight"],
            4.0,
        )
        for name in LORA_TARGETS
    }
    merged = e2e_dit()
    merge_lora(merged, Lora.from_pairs(pairs), 0.7)
    save_file(
        {k: v.contiguous() for k, v in merged.state_dict().items()},
        models / "diffusion_models" / "merged.safetensors",
    )
    save_file(clip_l_state_dict(), models / "text_encoders" / CLIP_NAME)
    vae = wan_vae_state_dict()
    save_file(vae, models / "vae" / "wan_2.1_vae.safetensors")
    # A VAE where a DiT should be: the model loader must say what is wrong.
    save_file(vae, models / "diffusion_models" / "not_a_dit.safetensors")
    torch.manual_seed(6)
    torch.save(TAEHV().state_dict(), models / "vae_approx" / "taew2_1.pth")
