"""umT5 encoder: key layout, bucket table, numerics against an fp64 reference, file loading."""

from __future__ import annotations

import math

import pytest
import torch
from _text_helpers import build_tiny_tokenizer, random_umt5_state, wan_to_comfy
from safetensors.torch import save_file

from rf_core.io.safe_load import CheckpointError
from rf_core.text import UMT5_TINY, UMT5_XXL, TextEncoder, UMT5Tokenizer, load_umt5
from rf_core.text.umt5 import UMT5Config, UMT5Encoder, fp16_clamp, relative_position_buckets

# ---------------------------------------------------------------- layout


def test_xxl_keys_and_parameter_count_match_wan_file():
    with torch.device("meta"):
        sd = UMT5Encoder(UMT5_XXL).state_dict()
    assert len(sd) == 242
    assert sum(t.numel() for t in sd.values()) == 5_680_910_336
    expected = {
        "token_embedding.weight": [256384, 4096],
        "blocks.0.norm1.weight": [4096],
        "blocks.7.attn.q.weight": [4096, 4096],
        "blocks.7.attn.o.weight": [4096, 4096],
        "blocks.23.norm2.weight": [4096],
        "blocks.23.ffn.gate.0.weight": [10240, 4096],
        "blocks.23.ffn.fc1.weight": [10240, 4096],
        "blocks.23.ffn.fc2.weight": [4096, 10240],
        "blocks.23.pos_embedding.embedding.weight": [32, 64],
        "norm.weight": [4096],
    }
    for key, shape in expected.items():
        assert list(sd[key].shape) == shape, key
    assert not any(k.endswith("bias") for k in sd)


# ---------------------------------------------------------------- relative position buckets


def test_bucket_table_hand_worked():
    # rel = key - query. rel <= 0 -> buckets 0..15, rel > 0 -> 16..31. |rel| < 8 exact;
    # else 8 + floor(8 * log(|rel|/8) / log(16)), capped at 15: 12 -> 9, 20 -> 10, 40 -> 12, 90 -> 14,
    # 100 -> 15, 500 -> 15.
    table = {0: 0, -1: 1, -7: 7, -8: 8, -11: 8, -12: 9, -20: 10, -40: 12, -90: 14, -100: 15, -500: 15}
    table.update({1: 17, 7: 23, 8: 24, 12: 25, 20: 26, 40: 28, 90: 30, 100: 31, 500: 31})
    b = relative_position_buckets(1100, 1100)
    q = 550
    for rel, bucket in table.items():
        assert b[q, q + rel].item() == bucket, rel


def _bucket_by_thresholds(rel: int) -> int:
    # Independent form: boundaries where 8 * 2^(j/2) is first reached (8, 11.3, 16, 22.6, 32, 45.3,
    # 64, 90.5), i.e. integer distances 8, 12, 16, 23, 32, 46, 64, 91.
    dist = abs(rel)
    offset = 16 if rel > 0 else 0
    if dist < 8:
        return offset + dist
    return offset + 7 + sum(dist >= t for t in (8, 12, 16, 23, 32, 46, 64, 91))


def test_bucket_table_matches_threshold_form_for_all_offsets():
    b = relative_position_buckets(300, 300)
    q = 150
    for rel in range(-150, 150):
        assert b[q, q + rel].item() == _bucket_by_thresholds(rel), rel


# ---------------------------------------------------------------- numerics vs fp64 reference


def _reference_encoder(state: dict[str, torch.Tensor], cfg: UMT5Config, ids, mask) -> torch.Tensor:
    """Straightforward float64 T5 encoder, one head at a time."""
    s = {k: v.double() for k, v in state.items()}
    bsz, length = ids.shape
    buckets = torch.tensor([[_bucket_by_thresholds(k - q) for k in range(length)] for q in range(length)])

    def rms(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.eps)

    def gelu_tanh(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    hd = cfg.dim_attn // cfg.num_heads
    x = s["token_embedding.weight"][ids]
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        h = rms(x, s[p + "norm1.weight"])
        q, k, v = (h @ s[p + f"attn.{n}.weight"].T for n in "qkv")
        heads = []
        for n in range(cfg.num_heads):
            sl = slice(n * hd, (n + 1) * hd)
            logits = (
                q[..., sl] @ k[..., sl].transpose(1, 2) + s[p + "pos_embedding.embedding.weight"][buckets, n]
            )
            logits = logits.masked_fill(mask[:, None, :] == 0, float("-inf"))
            heads.append(torch.softmax(logits, -1) @ v[..., sl])
        x = x + torch.cat(heads, -1) @ s[p + "attn.o.weight"].T
        h = rms(x, s[p + "norm2.weight"])
        gated = gelu_tanh(h @ s[p + "ffn.gate.0.weight"].T) * (h @ s[p + "ffn.fc1.weight"].T)
        x = x + gated @ s[p + "ffn.fc2.weight"].T
    x = rms(x, s["norm.weight"])
    for row in range(bsz):
        x[row, int(mask[row].sum()) :] = 0
    return x


def _tiny_inputs(length=24):
    ids = torch.randint(3, UMT5_TINY.vocab_size, (2, length))
    mask = torch.zeros(2, length, dtype=torch.long)
    mask[0, :9] = 1
    mask[1, :length] = 1  # no padding at all
    ids[0, 8] = 1  # EOS
    ids[0, 9:] = 0  # pad
    return ids, mask


def test_tiny_encoder_matches_fp64_reference():
    state = random_umt5_state(UMT5_TINY, dtype=torch.float64)
    model = UMT5Encoder(UMT5_TINY).double()
    model.load_state_dict(state)
    ids, mask = _tiny_inputs()
    ref = _reference_encoder(state, UMT5_TINY, ids, mask)
    with torch.no_grad():
        out64 = model(ids, mask)
        out32 = model.float()(ids, mask)
    torch.testing.assert_close(out64, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out32.double(), ref, atol=2e-4, rtol=2e-4)
    out_bf16 = model.to(torch.bfloat16)(ids, mask).double()
    assert (out_bf16 - ref).abs().max() < 0.1 * ref.abs().max()


def test_padding_content_does_not_change_valid_rows():
    model = UMT5Encoder(UMT5_TINY).eval()
    model.load_state_dict(random_umt5_state(UMT5_TINY))
    ids, mask = _tiny_inputs()
    other = ids.clone()
    other[0, 9:] = torch.randint(3, UMT5_TINY.vocab_size, (other.shape[1] - 9,))
    with torch.no_grad():
        a, b = model(ids, mask), model(other, mask)
    torch.testing.assert_close(a[0, :9], b[0, :9], atol=1e-6, rtol=1e-6)


def test_fp16_clamp_pulls_infinities_into_range():
    x = torch.tensor([1.0, float("inf"), -float("inf")], dtype=torch.float16)
    y = fp16_clamp(x)
    bound = 65504.0 - 1000
    assert y.tolist() == [
        1.0,
        torch.tensor(bound, dtype=torch.float16).item(),
        -torch.tensor(bound).half().item(),
    ]
    big = torch.tensor([70000.0], dtype=torch.float32)
    assert fp16_clamp(big).item() == 70000.0  # other dtypes untouched


def test_fp16_encoder_with_overflowing_ffn_stays_finite():
    state = random_umt5_state(UMT5_TINY)
    for i in range(UMT5_TINY.num_layers):
        state[f"blocks.{i}.ffn.fc2.weight"] *= 3000.0  # residual stream exceeds 65504 in fp16
    model = UMT5Encoder(UMT5_TINY)
    model.load_state_dict(state)
    ids, mask = _tiny_inputs()
    with torch.no_grad():
        out = model.half()(ids, mask)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- tokenizer + encoder


def test_rows_after_eos_are_zero_and_before_are_not(tmp_path):
    tok = UMT5Tokenizer(build_tiny_tokenizer(tmp_path / "tokenizer.json"))
    model = UMT5Encoder(UMT5_TINY).eval()
    model.load_state_dict(random_umt5_state(UMT5_TINY))
    encoder = TextEncoder(tok, model)
    out = encoder.encode_prompts(["a cat runs on the grass", "red dog"])
    assert out.shape == (2, 512, UMT5_TINY.dim)
    for row, n_tokens in enumerate([6 + 1, 2 + 1]):  # words + EOS
        assert (out[row, n_tokens:] == 0).all()
        assert (out[row, :n_tokens].abs().sum(-1) > 0).all()


# ---------------------------------------------------------------- loading


def _assert_same_weights(model: UMT5Encoder, state: dict[str, torch.Tensor]):
    sd = model.state_dict()
    assert set(sd) == set(state)
    for key, t in state.items():
        assert torch.equal(sd[key], t.to(sd[key].dtype)), key


def test_wan_pth_and_comfy_safetensors_load_the_same_weights(tmp_path):
    state = random_umt5_state(UMT5_TINY, dtype=torch.bfloat16)
    wan = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(state, wan)
    comfy = tmp_path / "umt5_xxl_bf16.safetensors"
    save_file({k: v.contiguous() for k, v in wan_to_comfy(state).items()}, str(comfy))
    a, b = load_umt5(wan), load_umt5(comfy)
    for m in (a, b):
        assert m.config == UMT5_TINY
        assert m.token_embedding.weight.dtype == torch.bfloat16  # file dtype by default
        assert not m.training and not any(p.requires_grad or p.is_meta for p in m.parameters())
        _assert_same_weights(m, state)


def test_hf_layout_with_prefix_tied_embedding_and_extra_keys(tmp_path):
    state = random_umt5_state(UMT5_TINY, dtype=torch.float16)
    sd = wan_to_comfy(state, prefix="umt5xxl.transformer.")
    sd["umt5xxl.transformer.encoder.embed_tokens.weight"] = state["token_embedding.weight"].clone()
    sd["umt5xxl.transformer.decoder.final_layer_norm.weight"] = torch.ones(UMT5_TINY.dim)
    sd["spiece_model"] = torch.arange(10, dtype=torch.uint8)
    path = tmp_path / "hf.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    model = load_umt5(path, dtype=torch.float32)
    assert model.norm.weight.dtype == torch.float32
    _assert_same_weights(model, state)


def _fp8_scaled(w: torch.Tensor, per_row: bool):
    amax = w.abs().amax(dim=1, keepdim=True) if per_row else w.abs().max()
    scale = (amax / 448.0).float()
    return (w / scale).to(torch.float8_e4m3fn), scale


@pytest.mark.parametrize("style", ["scaled_fp8", "comfy_quant", "plain_fp8"])
def test_fp8_files_dequantise(tmp_path, style):
    state = random_umt5_state(UMT5_TINY)
    sd = wan_to_comfy(state)
    expected = dict(state)
    comfy_to_wan = {id(v): k for k, v in state.items()}
    for key in [k for k in sd if ".SelfAttention." in k or ".DenseReluDense." in k]:
        w = sd[key]
        base = key.removesuffix(".weight")
        if style == "plain_fp8":
            q, scale = w.to(torch.float8_e4m3fn), torch.tensor(1.0)
        else:
            q, scale = _fp8_scaled(w, per_row=style == "comfy_quant")
            if style == "scaled_fp8":
                sd[base + ".scale_weight"] = scale.reshape(())
                sd[base + ".scale_input"] = torch.tensor(1.0)
            else:
                sd[base + ".weight_scale"] = scale.reshape(-1)
                sd[base + ".comfy_quant"] = torch.tensor(
                    list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8
                )
        sd[key] = q
        expected[comfy_to_wan[id(w)]] = q.float() * scale  # the dequantised value, by definition
    if style == "scaled_fp8":
        sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    path = tmp_path / f"umt5_xxl_{style}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))

    model = load_umt5(path, dtype=torch.float32)
    got = model.state_dict()
    for key, want in expected.items():
        assert torch.equal(got[key], want), key
        # and within e4m3 precision (3 mantissa bits) of the original weight
        orig = state[key]
        if not torch.equal(want, orig):
            tol = orig.abs() / 16 + 2.0**-9 * (orig.abs().max() / 448 if style != "plain_fp8" else 1.0)
            assert ((want - orig).abs() <= tol + 1e-12).all(), key
    assert load_umt5(path).token_embedding.weight.dtype == torch.bfloat16  # fp8 file -> bf16 default


def test_blockwise_scale_is_rejected(tmp_path):
    sd = wan_to_comfy(random_umt5_state(UMT5_TINY))
    key = "encoder.block.0.layer.0.SelfAttention.q.weight"
    sd[key] = sd[key].to(torch.float8_e4m3fn)
    sd["encoder.block.0.layer.0.SelfAttention.q.weight_scale"] = torch.ones(4, 4)
    path = tmp_path / "block.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=r"block.safetensors.*q.weight_scale.*\[4, 4\]"):
        load_umt5(path)


def test_bad_files_give_clear_errors(tmp_path):
    state = random_umt5_state(UMT5_TINY)

    missing = dict(state)
    del missing["blocks.1.ffn.fc1.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing\.pth.*blocks\.1\.ffn\.fc1\.weight"):
        load_umt5(tmp_path / "missing.pth")

    wrong = wan_to_comfy(state)
    wrong["encoder.block.1.layer.1.DenseReluDense.wo.weight"] = torch.zeros(32, 40)
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(
        CheckpointError,
        match=r"wrong\.safetensors.*blocks\.1\.ffn\.fc2\.weight.*DenseReluDense\.wo.*expected \[32, 48\], got \[32, 40\]",
    ):
        load_umt5(tmp_path / "wrong.safetensors")

    torch.save({"head.weight": torch.zeros(2)}, tmp_path / "dit.pth")
    with pytest.raises(CheckpointError, match=r"dit\.pth: not a umT5 encoder checkpoint"):
        load_umt5(tmp_path / "dit.pth")

    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.txt: not a safetensors file"):
        load_umt5(tmp_path / "notes.txt")

    torch.save(state, tmp_path / "tiny.pth")
    with pytest.raises(
        CheckpointError, match=r"tiny\.pth: encoder vocab_size is 96 in the file, expected 256384"
    ):
        load_umt5(tmp_path / "tiny.pth", config=UMT5_XXL)

    with pytest.raises(CheckpointError, match="not found"):
        load_umt5(tmp_path / "absent.pth")
