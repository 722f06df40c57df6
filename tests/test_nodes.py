"""Node contracts and behaviour without ComfyUI: input/output specs, conversions, bad-input errors,
Cancel, progress previews, LoRA/fp8 loading, decoders, prompt files, video files."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from graph_executor import GraphExecutor, PromptError
from native_stand_ins import NATIVE, FakeCLIP, FakeWanVAE

from rf_core.config import StreamConfig
from rf_core.io.checkpoints import load_dit
from rf_core.io.video import read_video_frames
from rf_core.stream import StreamSession
from rf_core.vae.stream_decode import TAEHVStreamDecoder
from rf_core.vae.taehv import load_taehv

WIDGETS = ("INT", "FLOAT", "STRING", "BOOLEAN")
NATIVE_TYPES = {
    "CONDITIONING",
    "LATENT",
    "IMAGE",
    "VAE",
    "MODEL",
    "CLIP",
    "VIDEO",
    "MASK",
    "INT",
    "FLOAT",
    "STRING",
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def nodes(rf_pack, rf_model_dir, rf_output_dir):
    """The pack's node modules, with outputs going to tmp_path and no session left over."""
    rf_pack.nodes.stream.registry.REGISTRY.free_all()
    yield rf_pack.nodes
    rf_pack.nodes.stream.registry.REGISTRY.free_all()


def cond(text: str = "a cat walks on a wall") -> list:
    return [[FakeCLIP().encode(text), {"pooled_output": None}]]


def load_model(nodes, **kw):
    return nodes.load.loaders.RewardForcingLoadModel().load("rewardforcing.pt", **kw)[0]


GEN = {"seed": 5, "length": 6, "length_unit": "frames", "width": 32, "height": 32, "steps": 4}


# ----------------------------------------------------------------------------- contracts
def test_every_node_declares_a_valid_v1_contract(rf_pack):
    mappings = rf_pack.NODE_CLASS_MAPPINGS
    assert len(mappings) >= 11
    for name, cls in mappings.items():
        assert name.startswith("RewardForcing") and name in rf_pack.NODE_DISPLAY_NAME_MAPPINGS, name
        assert cls.CATEGORY.startswith("Reward Forcing"), name
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"}, name
        assert isinstance(cls.RETURN_TYPES, tuple) and all(isinstance(t, str) for t in cls.RETURN_TYPES)
        for attr in ("RETURN_NAMES", "OUTPUT_TOOLTIPS"):
            if hasattr(cls, attr):
                assert len(getattr(cls, attr)) == len(cls.RETURN_TYPES), (name, attr)
        for t in cls.RETURN_TYPES:
            assert t in NATIVE_TYPES or t.startswith("RF_"), (name, t)
        params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
        for section in ("required", "optional"):
            for inp, entry in spec.get(section, {}).items():
                kind, opts = entry[0], entry[1]
                assert opts.get("tooltip"), f"{name}.{inp} has no tooltip"
                assert inp in params, f"{name}.{cls.FUNCTION} does not take {inp}"
                if section == "optional":
                    assert params[inp].default is not inspect.Parameter.empty, f"{name}.{inp} needs a default"
                if isinstance(kind, list):
                    assert "default" not in opts or opts["default"] in kind, (name, inp)
                elif kind in ("INT", "FLOAT"):
                    assert opts.get("min", -math.inf) <= opts["default"] <= opts.get("max", math.inf), (
                        name,
                        inp,
                    )
                elif kind not in WIDGETS:  # a socket; "A,B" takes either type (ComfyUI's type unions)
                    assert all(k in NATIVE_TYPES or k.startswith("RF_") for k in kind.split(",")), (
                        name,
                        inp,
                        kind,
                    )
        for inp in spec.get("hidden", {}):
            assert inp in params, (name, inp)
        for p in params.values():  # every argument of the function is an input of the node
            declared = {**spec.get("required", {}), **spec.get("optional", {}), **spec.get("hidden", {})}
            assert p.name in ("self",) or p.name in declared, (name, p.name)


def test_pack_runs_without_comfyui(nodes):
    assert not nodes.comfy.in_comfyui()
    assert nodes.comfy.interrupt_check() is None
    assert "rewardforcing.pt" in nodes.comfy.filename_list("diffusion_models", "reward_forcing")


def test_interactive_nodes_rerun_on_every_queue(rf_pack):
    for name in ("RewardForcingStreamSession", "RewardForcingFreeSession"):
        value = rf_pack.NODE_CLASS_MAPPINGS[name].IS_CHANGED(session_id="x")
        assert value != value  # NaN


# ----------------------------------------------------------------------------- conversions
def test_conditioning_is_padded_or_cut_to_the_model_length(nodes):
    c = nodes.conditioning
    short = torch.randn(1, 5, 8)
    out = c.prompt_embeds([[short, {}]], text_dim=8, text_len=12)
    assert out.shape == (1, 12, 8) and torch.equal(out[:, :5], short) and not out[:, 5:].any()
    long = torch.randn(1, 520, 8)  # umT5 gives more than 512 rows for long prompts
    out = c.prompt_embeds([[long, {}]], text_dim=8, text_len=512)
    assert torch.equal(out, long[:, :512])


@pytest.mark.parametrize(
    "conditioning, message",
    [
        ("text", "expected a CONDITIONING"),
        ([[torch.zeros(1, 512, 768), {}]], "768 wide but this model takes 64-wide umT5"),
        ([[torch.zeros(1, 512, 64), {}], [torch.zeros(1, 512, 64), {}]], "holds 2 entries"),
    ],
)
def test_conditioning_errors_say_what_to_fix(nodes, conditioning, message):
    with pytest.raises(ValueError, match=message):
        nodes.conditioning.prompt_embeds(conditioning, text_dim=64, text_len=32)


@pytest.mark.parametrize(
    "length, unit, frames",
    [
        (5, "seconds", 81),
        (477, "frames", 477),  # the reference's 30 s setting
        (30, "seconds", 489),  # 480 frames asked: 477 would be shorter
        (81, "frames", 81),
        (10, "frames", 21),  # was 9: rounded to the nearest chunk, shorter than asked
        (9.5, "frames", 21),
        (1, "frames", 9),
        (0.75, "seconds", 21),
    ],
)
def test_length_is_never_shorter_than_asked(nodes, length, unit, frames):
    latent = nodes.common.latent_frames_for(length, unit, chunk_frames=3)
    # 1 + 4 (T - 1) frames from T latent frames, T a multiple of the 3-frame chunk
    assert latent % 3 == 0 and 1 + 4 * (latent - 1) == frames
    asked = length * 16 if unit == "seconds" else length
    assert frames >= asked and 1 + 4 * (latent - 3 - 1) < asked  # one chunk less would be too short


def test_steps_are_even_integer_timesteps(nodes):
    assert nodes.common.denoise_steps(4) == (1000.0, 750.0, 500.0, 250.0)
    assert nodes.common.denoise_steps(3) == (1000.0, 667.0, 333.0)


# ----------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_errors_that_say_what_to_fix(nodes, rf_model_dir):
    gen = nodes.stream.generate.RewardForcingStreamGenerate()
    model = load_model(nodes)
    with pytest.raises(
        FileNotFoundError, match="'missing.pt' not found in models/diffusion_models or models/reward"
    ):
        nodes.load.loaders.RewardForcingLoadModel().load("missing.pt")
    (rf_model_dir / "diffusion_models" / "vae_by_mistake.safetensors").write_bytes(
        (rf_model_dir / "vae" / "wan_2.1_vae.safetensors").read_bytes()
    )
    with pytest.raises(
        ValueError,
        match="^vae_by_mistake.safetensors is a Wan 2.1 VAE, not a Wan2.1 text-to-video diffusion model: "
        "load it with Load VAE",
    ):
        nodes.load.loaders.RewardForcingLoadModel().load("vae_by_mistake.safetensors")
    with pytest.raises(ValueError, match="width 100 is not a positive multiple of 16: use 96 or 112"):
        gen.generate(model, positive=cond(), **{**GEN, "width": 100})
    with pytest.raises(ValueError, match="length must be more than 0"):
        gen.generate(model, positive=cond(), **{**GEN, "length": 0})
    with pytest.raises(ValueError, match="model: expected an RF_MODEL"):
        gen.generate(object(), positive=cond(), **GEN)
    with pytest.raises(ValueError, match="not a Wan 2.1 video VAE"):
        gen.generate(model, positive=cond(), **GEN, vae=object())
    with pytest.raises(ValueError, match="saving an MP4 needs decoded frames"):
        gen.generate(model, positive=cond(), **GEN, filename_prefix="x")
    with pytest.raises(ValueError, match="^height 470 is not a positive multiple of 16: use 464 or 480$"):
        gen.VALIDATE_INPUTS(width=832, height=470)
    with pytest.raises(ValueError, match="length must be more than 0"):
        gen.VALIDATE_INPUTS(length=0)
    assert gen.VALIDATE_INPUTS(width=None, height=480, length=5) is True  # linked inputs arrive as None


def test_queue_time_validation_of_a_graph(rf_pack, nodes):
    prompt = {
        "1": {
            "class_type": "RewardForcingLoadModel",
            "inputs": {"model_name": "nope.pt", "dtype": "auto", "attention": "auto", "placement": "auto"},
        },
        "2": {"class_type": "RewardForcingFreeSession", "inputs": {"session_id": "a", "all_sessions": False}},
    }
    ex = GraphExecutor({**NATIVE, **rf_pack.NODE_CLASS_MAPPINGS})
    ex.validate(prompt)  # node 1 is not needed by the output node
    prompt["2"] = {"class_type": "RewardForcingStreamSession", "inputs": {"model": ["1", 0]}}
    prompt["3"] = {
        "class_type": "RewardForcingSaveVideo",
        "inputs": {"images": ["2", 1], "fps": 16.0, "filename_prefix": "x"},
    }
    with pytest.raises(PromptError, match="required input 'positive' is missing"):
        ex.validate(prompt)


def test_global_policy_refuses_videos_longer_than_its_cache(nodes):
    settings = nodes.stream.settings.RewardForcingStreamSettings().build("global", 3, 9, 0.999, max_frames=6)[
        0
    ]
    with pytest.raises(ValueError, match="holds at most max_frames=6 latent frames but this length needs 21"):
        nodes.stream.generate.RewardForcingStreamGenerate().generate(
            load_model(nodes), positive=cond(), **{**GEN, "length": 81}, settings=settings
        )
    with pytest.raises(ValueError, match="window_frames 4 must be >= sink_frames"):
        nodes.stream.settings.RewardForcingStreamSettings().build("ema", 3, 4, 0.999)


# ----------------------------------------------------------------------------- generation
def test_generate_matches_the_engine_and_settings_reach_it(nodes, rf_model_dir):
    from rf_core.speed import make_fast

    settings = nodes.stream.settings.RewardForcingStreamSettings().build("static", 3, 6, 0.5, shift=3.0)[0]
    latent, images = nodes.stream.generate.RewardForcingStreamGenerate().generate(
        load_model(nodes), positive=cond(), **{**GEN, "length": 33, "steps": 2}, settings=settings
    )["result"]
    dit = load_dit(rf_model_dir / "diffusion_models" / "rewardforcing.pt", dtype=torch.float32)
    make_fast(dit, compile=False)  # the loader's default speed "fast" (nothing compiles on the CPU)
    config = StreamConfig(
        sink_policy="static", window_frames=6, ema_alpha=0.5, shift=3.0, denoise_steps=(1000, 500)
    )
    s = StreamSession(dit, cond()[0][0][:, :32], (4, 4), config, seed=5)
    z = torch.cat([s.next_chunk() for _ in range(3)], dim=1)
    assert latent["samples"].shape == (1, 16, 9, 4, 4)
    torch.testing.assert_close(nodes.stream.generate.to_comfy_latent(z), latent["samples"], rtol=0, atol=0)
    # Without a decoder the IMAGE is a rough preview, one image per latent frame, at pixel size.
    assert images.shape == (9, 32, 32, 3) and 0 <= images.min() and images.max() <= 1


class Cancelled(Exception):
    pass


def cancel_after(n: int):
    calls = {"n": 0}

    def check():
        calls["n"] += 1
        if calls["n"] > n:
            raise Cancelled()

    return check


def test_cancel_stops_generate_within_one_model_pass(nodes, monkeypatch):
    model = load_model(nodes)
    passes = []
    run_blocks = model.dit.run_blocks
    monkeypatch.setattr(model.dit, "run_blocks", lambda *a, **k: (passes.append(1), run_blocks(*a, **k))[1])
    monkeypatch.setattr(nodes.comfy, "interrupt_check", lambda: cancel_after(7))
    with pytest.raises(Cancelled):
        nodes.stream.generate.RewardForcingStreamGenerate().generate(
            model, positive=cond(), **{**GEN, "length": 33}
        )
    assert len(passes) == 7  # Cancel was checked before the 8th pass, which never ran


def test_model_is_placed_again_before_every_chunk(nodes, monkeypatch):
    # Inside ComfyUI, loading the VAE between chunks may offload the model: each chunk re-acquires it.
    model = load_model(nodes)
    calls = []
    monkeypatch.setattr(model.managed, "acquire", lambda extra=0: (calls.append(extra), model.dit)[1])
    nodes.stream.generate.RewardForcingStreamGenerate().generate(
        model, positive=cond(), **{**GEN, "length": 33}
    )
    assert len(calls) == 1 + 3 and calls[0] > 0 and calls[1:] == [0, 0, 0]  # room for the KV cache first


class RecordingProgress:
    log: list = []

    def __init__(self, total, node_id=None):
        self.total = total
        RecordingProgress.log.append(("new", total, node_id))

    def update(self, value, preview=None):
        RecordingProgress.log.append(("update", value, None if preview is None else tuple(preview.shape)))


def test_progress_counts_passes_and_previews_each_chunk(nodes, rf_model_dir, monkeypatch):
    monkeypatch.setattr(nodes.comfy, "Progress", RecordingProgress)
    RecordingProgress.log = []
    vae = FakeWanVAE(rf_model_dir / "vae" / "wan_2.1_vae.safetensors")
    nodes.stream.generate.RewardForcingStreamGenerate().generate(
        load_model(nodes), positive=cond(), **{**GEN, "length": 33}, vae=vae, unique_id="17"
    )
    log = RecordingProgress.log
    assert log[0] == ("new", 12, "17")  # 3 chunks x 4 denoising passes
    values = [v for kind, v, _ in log[1:]]
    assert values == sorted(values) and values[-1] == 12
    previews = [p for _, _, p in log[1:] if p is not None]
    assert previews == [(32, 32, 3)] * 3


def test_generate_writes_the_mp4_as_chunks_arrive(nodes, rf_model_dir, tmp_path, monkeypatch):
    written = []
    original = nodes.video.files.VideoFiles.write
    monkeypatch.setattr(
        nodes.video.files.VideoFiles, "write", lambda self, f: (written.append(f.shape[1]), original(self, f))
    )
    vae = FakeWanVAE(rf_model_dir / "vae" / "wan_2.1_vae.safetensors")
    out = nodes.stream.generate.RewardForcingStreamGenerate().generate(
        load_model(nodes), positive=cond(), **{**GEN, "length": 33}, vae=vae, filename_prefix="clips/test"
    )
    assert written == [9, 12, 12]  # one write per decoded chunk
    (entry,) = out["ui"]["images"]
    assert entry == {"filename": "test_00001_.mp4", "subfolder": "clips", "type": "output"}
    frames = read_video_frames(tmp_path / "output" / "clips" / "test_00001_.mp4")
    assert frames.shape == (33, 32, 32, 3)
    # Lossy H.264 keeps each frame's mean level: the file holds these frames, in this order.
    means = torch.from_numpy(frames).float().mean(dim=(1, 2, 3))
    torch.testing.assert_close(means, out["result"][1].mean(dim=(1, 2, 3)) * 255, rtol=0, atol=3)


# ----------------------------------------------------------------------------- sessions
def session_args(**kw):
    return {
        "session_id": "s",
        "chunks": 2,
        "width": 32,
        "height": 32,
        "seed": 9,
        "steps": 4,
        "recache": False,
        "reset": False,
        "output": "whole video",
        **kw,
    }


def run_session(nodes, model, text="a cat walks on a wall", **kw):
    return nodes.stream.session.RewardForcingStreamSession().run(model, cond(text), **session_args(**kw))


def test_interrupted_session_run_resumes_exactly(nodes, rf_model_dir, monkeypatch):
    model = load_model(nodes)
    vae = FakeWanVAE(rf_model_dir / "vae" / "wan_2.1_vae.safetensors")
    reference = run_session(nodes, model, session_id="ref", chunks=4, vae=vae)
    for stop in (2, 6, 9, 14):  # inside a denoising pass sequence, after a context pass, in chunk 3...
        sid = f"cut{stop}"
        run_session(nodes, model, session_id=sid, chunks=1, vae=vae)
        monkeypatch.setattr(nodes.comfy, "interrupt_check", lambda stop=stop: cancel_after(stop))
        with pytest.raises(Cancelled):
            run_session(nodes, model, session_id=sid, chunks=3, vae=vae)
        monkeypatch.setattr(nodes.comfy, "interrupt_check", lambda: None)
        done = nodes.stream.registry.REGISTRY.get(sid).record.chunks
        latent, images = run_session(nodes, model, session_id=sid, chunks=4 - done, vae=vae)
        torch.testing.assert_close(latent["samples"], reference[0]["samples"], rtol=0, atol=0)
        torch.testing.assert_close(images, reference[1], rtol=0, atol=0)


def test_failed_decode_is_redone_on_the_next_run(nodes, rf_model_dir):
    model = load_model(nodes)
    vae = FakeWanVAE(rf_model_dir / "vae" / "wan_2.1_vae.safetensors")
    reference = run_session(nodes, model, session_id="ref", chunks=3, vae=vae)[1]
    run_session(nodes, model, chunks=1, vae=vae)
    broken = FakeWanVAE(rf_model_dir / "vae" / "wan_2.1_vae.safetensors")
    calls = {"n": 0}
    real = broken.first_stage_model.decoder.forward

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("out of memory")
        return real(*a, **k)

    broken.first_stage_model.decoder.forward = flaky
    with pytest.raises(RuntimeError, match="out of memory"):
        run_session(nodes, model, chunks=1, vae=broken)
    images = run_session(nodes, model, chunks=1, vae=vae)[1]
    torch.testing.assert_close(images, reference, rtol=0, atol=1 / 255)


def test_session_new_frames_settings_change_and_decoder_switch(nodes, rf_model_dir):
    model = load_model(nodes)
    vae = FakeWanVAE(rf_model_dir / "vae" / "wan_2.1_vae.safetensors")
    first = run_session(nodes, model, output="new frames", vae=vae)[1]
    second = run_session(nodes, model, output="new frames", vae=vae)[1]
    whole = run_session(nodes, model, chunks=1, vae=vae)[1]
    assert (first.shape[0], second.shape[0], whole.shape[0]) == (21, 24, 57)
    torch.testing.assert_close(whole[:45], torch.cat([first, second]), rtol=0, atol=0)
    # A decoder switch re-decodes the stored latents: TAEHV frames for the whole stream.
    decoder = nodes.load.loaders.RewardForcingLoadDecoder().load("taew2_1.pth")[0]
    latent, images = run_session(nodes, model, chunks=1, decoder=decoder)
    taehv = TAEHVStreamDecoder(load_taehv(rf_model_dir / "vae_approx" / "taew2_1.pth"))
    expected = taehv.decode_chunk(nodes.stream.decode.from_comfy_latent(latent["samples"]))
    torch.testing.assert_close(images, expected[0].permute(0, 2, 3, 1), rtol=0, atol=1 / 255)
    # A new size cannot continue the stream: it starts over.
    latent, images = run_session(nodes, model, width=48, decoder=decoder)
    assert latent["samples"].shape == (1, 16, 6, 4, 6) and images.shape[0] == 21


def test_session_registry_memory_cap_and_free(nodes):
    model = load_model(nodes)
    registry = nodes.stream.registry.REGISTRY
    run_session(nodes, model, session_id="a")
    one = registry.total_bytes()
    old_cap = registry.max_bytes
    try:
        registry.max_bytes = int(one * 2.5)
        run_session(nodes, model, session_id="b")
        run_session(nodes, model, session_id="a")  # a is now the most recently used
        run_session(nodes, model, session_id="c")
        assert registry.ids() == ["a", "c"]  # b, least recently used, was freed
    finally:
        registry.max_bytes = old_cap
    free = nodes.stream.session.RewardForcingFreeSession()
    assert free.free("a")["ui"]["text"] == ["freed session 'a'"]
    assert free.free("zz")["ui"]["text"] == ["no session 'zz' (open: c)"]
    assert free.free("", all_sessions=True)["ui"]["text"] == ["freed 1 sessions"] and registry.ids() == []


# ----------------------------------------------------------------------------- loading
def test_load_model_profiles(nodes, rf_model_dir, monkeypatch):
    """low-vram streams its fp8 blocks from host memory (outside ComfyUI's memory manager) and gives
    the quality output within its documented bound; turbo names what it needs; LoRAs refuse both."""
    from safetensors.torch import save_file

    from rf_core.profiles import ERROR_BOUNDS

    loader = nodes.load.loaders.RewardForcingLoadModel()
    quality = load_model(nodes, dtype="fp32", placement="auto")
    (low,) = loader.load("rewardforcing.pt", dtype="fp32", profile="low-vram")
    assert low.dit.offload is not None and low.managed.patcher is None
    assert low.dit.blocks[0].self_attn.q.weight.dtype == torch.float8_e4m3fn
    gen = nodes.stream.generate.RewardForcingStreamGenerate()
    want = gen.generate(quality, positive=cond(), **{**GEN, "length": 21})["result"][0]["samples"]
    got = gen.generate(low, positive=cond(), **{**GEN, "length": 21})["result"][0]["samples"]
    assert 0 < ((got - want).norm() / want.norm()).item() < ERROR_BOUNDS["low-vram"]

    monkeypatch.setitem(__import__("sys").modules, "sageattention", None)
    with pytest.raises(ValueError, match="sageattention"):
        loader.load("rewardforcing.pt", dtype="fp32", profile="turbo")
    with pytest.raises(ValueError, match="profile low-vram needs speed fast"):
        loader.load("rewardforcing.pt", speed="reference", profile="low-vram")
    save_file(
        {"diffusion_model.blocks.1.self_attn.q.lora_A.weight": torch.zeros(4, 256),
         "diffusion_model.blocks.1.self_attn.q.lora_B.weight": torch.zeros(256, 4)},
        rf_model_dir / "loras" / "tiny.safetensors",
    )  # fmt: skip
    with pytest.raises(ValueError, match="tiny.safetensors: a LoRA needs the model's bf16 weights.*low-vram"):
        nodes.load.loaders.RewardForcingLoRA().apply(low, "tiny.safetensors", 1.0)


def test_lora_node_patches_a_copy_and_keeps_the_loaded_model(nodes, rf_model_dir):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, 256, generator=g)
    b = torch.randn(256, 4, generator=g)
    save_file(
        {
            "diffusion_model.blocks.1.self_attn.q.lora_A.weight": a,
            "diffusion_model.blocks.1.self_attn.q.lora_B.weight": b,
            "diffusion_model.blocks.1.self_attn.q.alpha": torch.tensor(2.0),
        },
        rf_model_dir / "loras" / "style.safetensors",
    )
    base = load_model(nodes)
    before = base.dit.blocks[1].self_attn.q.weight.clone()
    patched = nodes.load.loaders.RewardForcingLoRA().apply(base, "style.safetensors", 0.5)[0]
    assert torch.equal(base.dit.blocks[1].self_attn.q.weight, before)
    torch.testing.assert_close(patched.dit.blocks[1].self_attn.q.weight, before + 0.5 * (2.0 / 4) * b @ a)
    assert patched.identity != base.identity and patched.base is base
    with pytest.raises(
        ValueError, match="^bad.safetensors: not a safetensors file or a torch.save checkpoint"
    ):
        (rf_model_dir / "loras" / "bad.safetensors").write_bytes(b"not a file")
        nodes.load.loaders.RewardForcingLoRA().apply(base, "bad.safetensors", 1.0)


def test_loading_twice_gives_the_same_weights_while_in_use(nodes):
    first = load_model(nodes)
    assert load_model(nodes) is first
    assert load_model(nodes, dtype="fp32") is not first  # other options, other weights


def test_speed_fast_keeps_roped_keys_and_matches_the_reference_speed(nodes):
    from rf_core.stream import StreamSession
    from rf_core.tiny import random_prompt

    fast, ref = load_model(nodes, placement="cpu"), load_model(nodes, placement="cpu", speed="reference")
    assert fast is not ref and fast.dit.key_storage == "roped" and ref.dit.key_storage == "raw"
    assert not fast.dit.compiled and not fast.dit.cuda_graphs  # on the CPU: nothing to compile or capture
    out = []
    for model in (fast, ref):
        s = StreamSession(model.dit, random_prompt(model.cfg, seed=1), (4, 6), seed=2)
        out.append(torch.cat([s.next_chunk() for _ in range(5)], 1))  # chunks 3 and 4 evict
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="speed must be one of"):
        load_model(nodes, speed="turbo")


def test_fp8_stores_block_linears_in_8_bits(nodes):
    model = load_model(nodes, dtype="fp8_e4m3fn", placement="cpu")
    q = model.dit.blocks[0].self_attn.q
    assert q.weight.dtype == torch.float8_e4m3fn and model.dit.dtype == torch.float32
    x = torch.randn(3, 256)
    expected = x @ q.weight.to(torch.float32).T + q.bias
    torch.testing.assert_close(q(x), expected)
    full = load_model(nodes, dtype="fp32", placement="cpu").dit.blocks[0].self_attn.q.weight
    torch.testing.assert_close(q.weight.float(), full, rtol=0.07, atol=2e-3)  # e4m3 keeps 3 mantissa bits


def test_decoder_loader_recognises_files(nodes, rf_model_dir):
    loader = nodes.load.loaders.RewardForcingLoadDecoder()
    assert loader.load("wan_2.1_vae.safetensors")[0].kind == "wan"
    assert loader.load("taew2_1.pth")[0].kind == "taehv"
    (rf_model_dir / "vae" / "dit.pt").write_bytes(
        (rf_model_dir / "diffusion_models" / "rewardforcing.pt").read_bytes()
    )
    with pytest.raises(ValueError, match="dit.pt is not a Wan 2.1 VAE or TAEHV file"):
        loader.load("dit.pt")


def test_decode_node_matches_whole_video_decode(nodes, rf_model_dir):
    latent = nodes.stream.generate.RewardForcingStreamGenerate().generate(
        load_model(nodes), positive=cond(), **{**GEN, "length": 21}
    )["result"][0]
    vae = FakeWanVAE(rf_model_dir / "vae" / "wan_2.1_vae.safetensors")
    (images,) = nodes.stream.decode.RewardForcingDecode().decode(latent, chunk_frames=2, vae=vae)
    whole = NATIVE["VAEDecode"]().decode(latent, vae)[0]
    assert images.shape == (21, 32, 32, 3)
    torch.testing.assert_close(images, whole, rtol=0, atol=1e-5)
    ours = nodes.load.loaders.RewardForcingLoadDecoder().load("wan_2.1_vae.safetensors")[0]
    torch.testing.assert_close(
        nodes.stream.decode.RewardForcingDecode().decode(latent, 4, decoder=ours)[0], whole, rtol=0, atol=1e-5
    )
    with pytest.raises(ValueError, match="connect a VAE"):
        nodes.stream.decode.RewardForcingDecode().decode(latent)


def test_comfy_vae_on_a_fast_device_decodes_with_our_fast_decoder_and_the_same_frames(
    nodes, rf_model_dir, monkeypatch
):
    """Where our compiled decoder runs (CUDA with Triton), a connected ComfyUI VAE is decoded by it, with
    a copy of that VAE's weights; the frames equal ComfyUI's own decoder's within float rounding."""
    decoders = nodes.stream.decoders
    vae = FakeWanVAE(rf_model_dir / "vae" / "wan_2.1_vae.safetensors")
    args = {**GEN, "length": 21}
    reference = nodes.stream.generate.RewardForcingStreamGenerate().generate(
        load_model(nodes), positive=cond(), vae=vae, **args
    )
    monkeypatch.setattr(decoders, "fast_decoding_available", lambda device: True)
    stream, _ = decoders.decoder_stream(vae)
    assert stream.stream.vae.decoder.fast_path is not None  # ours, made fast, not ComfyUI's decoder
    fast = nodes.stream.generate.RewardForcingStreamGenerate().generate(
        load_model(nodes), positive=cond(), vae=vae, **args
    )
    torch.testing.assert_close(
        fast["result"][0]["samples"], reference["result"][0]["samples"], rtol=0, atol=0
    )
    assert fast["result"][1].shape == reference["result"][1].shape == (21, 32, 32, 3)
    torch.testing.assert_close(fast["result"][1], reference["result"][1], rtol=0, atol=2e-5)


# ----------------------------------------------------------------------------- files
def test_prompt_embeddings_round_trip(nodes, rf_model_dir):
    save = nodes.prompts.embeddings.RewardForcingSavePromptEmbeddings()
    a, b = cond("first prompt"), cond("second prompt here")
    save.save(a, "library", "first", "first prompt")
    out = save.save(b, "library", "second")
    assert out["result"] == (b,) and out["ui"]["text"] == ["saved 'second' to library.safetensors"]
    load = nodes.prompts.embeddings.RewardForcingLoadPromptEmbeddings()
    assert "library.safetensors" in nodes.comfy.filename_list("reward_forcing_prompts")
    torch.testing.assert_close(load.load("library.safetensors", "first")[0][0][0], a[0][0])
    torch.testing.assert_close(load.load("library.safetensors", "second")[0][0][0], b[0][0])
    with pytest.raises(ValueError, match="no prompt embedding named 'third'.*'first', 'second'"):
        load.load("library.safetensors", "third")
    with pytest.raises(ValueError, match="points outside"):
        save.save(a, "../escape", "x")


def test_save_video_node_writes_all_frames(nodes, tmp_path):
    images = torch.rand(30, 32, 48, 3)
    out = nodes.video.save.RewardForcingSaveVideo().save(images, 16.0, "RewardForcing/clip")
    (entry,) = out["ui"]["images"]
    frames = read_video_frames(tmp_path / "output" / "RewardForcing" / entry["filename"])
    assert frames.shape == (30, 32, 48, 3) and out["ui"]["animated"] == (True,)
    with pytest.raises(ValueError, match="no frames to save"):
        nodes.video.save.RewardForcingSaveVideo().save(images[:0])
