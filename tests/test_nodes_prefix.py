"""Stream Generate and Stream Session opening with a start image or a video to extend (issue 15): the
stream goes on exactly as the uninterrupted one, the input's frames open the output, the encodings are
ComfyUI's VAE's, and what cannot work is refused before the model loads, saying what to connect."""

from __future__ import annotations

import pytest
import torch
from native_stand_ins import FakeCLIP, FakeWanVAE

from rf_core.config import StreamConfig
from rf_core.io.checkpoints import load_dit
from rf_core.stream import StreamSession
from rf_core.vae.latent_format import from_comfy_latent, to_comfy_latent

GEN = {"seed": 5, "length_unit": "frames", "width": 32, "height": 32, "steps": 4}
HW = (4, 4)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def nodes(rf_pack, rf_model_dir, rf_output_dir):
    rf_pack.nodes.stream.registry.REGISTRY.free_all()
    yield rf_pack.nodes
    rf_pack.nodes.stream.registry.REGISTRY.free_all()


@pytest.fixture
def vae(rf_model_dir):
    return FakeWanVAE(rf_model_dir / "vae" / "wan_2.1_vae.safetensors")


def cond(text: str = "a paper boat on a pond") -> list:
    return [[FakeCLIP().encode(text), {"pooled_output": None}]]


def generate(nodes, length: int, **kw):
    model = nodes.load.loaders.RewardForcingLoadModel().load("rewardforcing.pt")[0]
    out = nodes.stream.generate.RewardForcingStreamGenerate().generate(
        model, **{**GEN, "length": length, "positive": cond(), **kw}
    )
    return out["ui"], out["result"][0]["samples"], out["result"][1]


def engine(rf_model_dir, prefix: torch.Tensor, chunks: int, seed: int = 5) -> torch.Tensor:
    """rf_core run directly: prefill the model-space prefix, then generate; the new chunks, raw LATENT."""
    dit = load_dit(rf_model_dir / "diffusion_models" / "rewardforcing.pt", dtype=torch.float32)
    session = StreamSession(
        dit, FakeCLIP().encode("a paper boat on a pond")[:, :32], HW, StreamConfig(), seed=seed
    )
    session.prefill(prefix)
    return to_comfy_latent(torch.cat([session.next_chunk() for _ in range(chunks)], dim=1))


def test_extend_a_latent_continues_exactly_as_the_uninterrupted_stream(nodes, vae):
    _, first, _ = generate(nodes, 21)  # 2 chunks = 6 latent frames
    ui, extended, frames = generate(nodes, 24, extend={"samples": first}, vae=vae)  # 2 more chunks
    _, whole, whole_frames = generate(nodes, 45, vae=vae)  # the 4 chunks in one run
    assert extended.shape == whole.shape == (1, 16, 12, 4, 4)
    torch.testing.assert_close(extended[:, :, :6], first, rtol=0, atol=1e-5)  # the input opens the output
    torch.testing.assert_close(
        extended[:, :, 6:], whole[:, :, 6:], rtol=1e-5, atol=1e-5
    )  # same noise, same chunks
    # The decoder decodes the prefix first, so the new frames join it as in one whole decode: 21 + 24 frames.
    assert frames.shape == whole_frames.shape == (45, 32, 32, 3)
    torch.testing.assert_close(frames, whole_frames, rtol=0, atol=1e-5)
    assert ui["text"] == ["21 input frames + 24 new: 45 frames (2.81 s at 16 fps)"]


def test_start_image_is_the_first_frame_and_its_encoding_is_prefilled(nodes, vae, rf_model_dir):
    image = torch.rand(1, 32, 64, 3)  # twice as wide as the video: its middle half is kept
    ui, latent, frames = generate(nodes, 24, start_image=image, vae=vae)
    fitted = image[:, :, 16:48]
    assert frames.shape == (1 + 24, 32, 32, 3)
    assert torch.equal(frames[0], fitted[0])  # the image as given (cropped), not its VAE reconstruction
    raw = vae.encode(fitted)  # ComfyUI's VAE.encode of the cropped image: one latent frame
    torch.testing.assert_close(latent[:, :, :1], raw, rtol=0, atol=1e-5)
    expected = engine(rf_model_dir, from_comfy_latent(raw), chunks=2)
    torch.testing.assert_close(latent[:, :, 1:], expected, rtol=1e-5, atol=1e-5)
    assert ui["text"] == [
        "1 input frame + 24 new: 25 frames (1.56 s at 16 fps)",
        "start_image is 64x32, the video 32x32: centre-cropped to 32x32",
    ]


def test_extend_frames_are_trimmed_to_1_plus_4k_and_open_the_output(nodes, vae, rf_model_dir):
    video = torch.rand(7, 32, 32, 3)  # 7 frames: the first 2 are left out, 5 = 1 + 4 kept
    ui, latent, frames = generate(nodes, 12, extend=video, vae=vae)
    assert frames.shape == (5 + 12, 32, 32, 3) and torch.equal(frames[:5], video[2:])
    raw = vae.encode(video[2:])
    torch.testing.assert_close(latent[:, :, :2], raw, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        latent[:, :, 2:], engine(rf_model_dir, from_comfy_latent(raw), chunks=1), rtol=1e-5, atol=1e-5
    )
    # the new frames are those of a whole-video decode of the output: the decoder went through the prefix
    torch.testing.assert_close(frames[5:], vae.decode(latent)[0, 5:], rtol=0, atol=1e-5)
    assert "its first 2 frames are left out (5 kept)" in ui["text"][1]


def test_load_decoder_wan_vae_encodes_like_comfyui_vae(nodes, vae):
    decoder = nodes.load.loaders.RewardForcingLoadDecoder().load("wan_2.1_vae.safetensors")[0]
    image = torch.rand(1, 32, 32, 3)
    _, with_ours, frames = generate(nodes, 12, start_image=image, decoder=decoder)
    _, with_comfy, _ = generate(nodes, 12, start_image=image, vae=vae)
    torch.testing.assert_close(with_ours, with_comfy, rtol=1e-5, atol=1e-5)
    assert torch.equal(frames[0], image[0])


def test_session_opens_with_the_start_image_then_continues_and_restarts_when_it_changes(nodes, vae):
    model = nodes.load.loaders.RewardForcingLoadModel().load("rewardforcing.pt")[0]
    node = nodes.stream.session.RewardForcingStreamSession()
    image = torch.rand(1, 32, 32, 3)
    args = {"session_id": "i2v", "chunks": 1, "width": 32, "height": 32, "seed": 5, "steps": 4, "vae": vae}
    first = node.run(model, cond(), start_image=image, **args)
    assert first[1].shape[0] == 1 + 12
    torch.testing.assert_close(
        first[1][0], image[0], rtol=0, atol=0.5 / 255 + 1e-6
    )  # sessions keep 8-bit frames
    second = node.run(model, cond(), start_image=image, **args)  # continues: new frames only
    assert second[1].shape[0] == 12
    whole = node.run(model, cond(), start_image=image, output="whole video", **args)
    _, generated, _ = generate(nodes, 36, start_image=image, vae=vae)  # the same 3 chunks in one run
    torch.testing.assert_close(whole[0]["samples"], generated, rtol=1e-5, atol=1e-5)
    other = node.run(model, cond(), start_image=torch.rand(1, 32, 32, 3), **args)  # another image: new stream
    assert other[0]["samples"].shape[2] == 1 + 3


def test_inputs_that_cannot_work_are_refused_before_the_model_loads(nodes, vae):
    gen = nodes.stream.generate.RewardForcingStreamGenerate()
    lazy = {**GEN, "length": 12, "model": None, "positive": None}
    image = torch.rand(1, 32, 32, 3)
    with pytest.raises(
        ValueError, match="start_image must be encoded with the Wan 2.1 VAE: connect Load VAE"
    ):
        gen.check_lazy_status(**lazy, start_image=image)
    with pytest.raises(ValueError, match="start_image: holds 2 images; connect one"):
        gen.check_lazy_status(**lazy, start_image=torch.rand(2, 32, 32, 3), vae=None)
    with pytest.raises(ValueError, match="connect start_image or extend, not both"):
        gen.check_lazy_status(**lazy, start_image=image, extend=image, vae=None)
    with pytest.raises(
        ValueError, match=r"extend: the LATENT is 64x64 \(8x8 latent\) but the video is 32x32"
    ):
        gen.check_lazy_status(**lazy, extend={"samples": torch.zeros(1, 16, 3, 8, 8)})
    with pytest.raises(ValueError, match="connect positive \\(a prompt\\) or timeline"):
        gen.check_lazy_status(**{**GEN, "length": 12, "model": None})
    # a LATENT needs no encoder; lazy inputs are asked for, prompts first
    assert gen.check_lazy_status(**lazy, extend={"samples": torch.zeros(1, 16, 3, 4, 4)}) == ["positive"]
    taehv = nodes.load.loaders.RewardForcingLoadDecoder().load("taew2_1.pth")[0]
    with pytest.raises(ValueError, match="the connected decoder is TAEHV .*cannot encode: connect Load VAE"):
        generate(nodes, 12, start_image=image, decoder=taehv)
