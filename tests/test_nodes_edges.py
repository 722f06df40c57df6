"""The ComfyUI rough edges of issue 16, each pinned: a bad input reported once, a damaged file's real
cause first, a too-long 'global' stream refused before anything loads, one output order on every
generator, lengths never shorter than asked (and said on the node), LoRA size mismatches explained,
and the batch input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from graph_executor import GraphExecutor, PromptError, load_api_workflow, override
from native_stand_ins import NATIVE, FakeCLIP, FakeWanVAE, VAELoader
from safetensors.torch import save_file

from rf_core.tiny import random_model

ROOT = Path(__file__).resolve().parents[1]
GEN = {"seed": 5, "length": 9, "length_unit": "frames", "width": 32, "height": 32, "steps": 4}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def nodes(rf_pack, rf_model_dir, rf_output_dir):
    rf_pack.nodes.stream.registry.REGISTRY.free_all()
    yield rf_pack.nodes
    rf_pack.nodes.stream.registry.REGISTRY.free_all()


@pytest.fixture
def executor(rf_pack, nodes, rf_model_dir):
    VAELoader.folder["value"] = rf_model_dir / "vae"
    return GraphExecutor({**NATIVE, **rf_pack.NODE_CLASS_MAPPINGS})


def workflow(name: str, **changes) -> dict:
    return override(load_api_workflow(ROOT / "tests" / "workflows_api" / f"{name}.json"), changes)


def cond(text: str = "a cat walks on a wall") -> list:
    return [[FakeCLIP().encode(text), {"pooled_output": None}]]


def load_model(nodes):
    return nodes.load.loaders.RewardForcingLoadModel().load("rewardforcing.pt")[0]


def vae(rf_model_dir):
    return FakeWanVAE(rf_model_dir / "vae" / "wan_2.1_vae.safetensors")


# ----------------------------------------------------------------------------- 1. one report per bad input
@pytest.mark.parametrize(
    "name, node",
    [("reward_forcing_t2v_5s", "5"), ("reward_forcing_interactive_session", "5"), ("live_stream", "4")],
)
def test_a_bad_width_is_reported_once_naming_the_width(executor, name, node):
    with pytest.raises(PromptError) as caught:
        executor.validate(workflow(name, **{node: {"width": 100}}))
    # ComfyUI lists a message VALIDATE_INPUTS returns once under each input it names (it was listed
    # under width, height and length); an exception is listed once, for the node.
    ((where, _, details),) = caught.value.errors
    assert where == node and details == "width 100 is not a positive multiple of 16: use 96 or 112"


def test_two_bad_sizes_give_one_report_naming_both(executor):
    with pytest.raises(PromptError) as caught:
        executor.validate(workflow("reward_forcing_t2v_5s", **{"5": {"width": 100, "height": 8}}))
    ((_, _, details),) = caught.value.errors
    assert details.startswith("width 100 is not") and "; height 8 is not a positive multiple" in details


# ----------------------------------------------------------------------------- 2. damaged files
def dit_safetensors(path: Path) -> None:
    save_file({k: v.contiguous() for k, v in random_model("tiny", seed=0).state_dict().items()}, path)


@pytest.mark.parametrize("name", ["cut_short.pt", "cut_short.safetensors"])
def test_a_truncated_model_file_says_so_first_and_nothing_else(nodes, rf_model_dir, name):
    folder = rf_model_dir / "diffusion_models"
    if name.endswith(".pt"):
        whole = (folder / "rewardforcing.pt").read_bytes()
    else:
        dit_safetensors(folder / name)
        whole = (folder / name).read_bytes()
    (folder / name).write_bytes(whole[: len(whole) * 2 // 3])
    with pytest.raises(ValueError) as caught:
        nodes.load.loaders.RewardForcingLoadModel().load(name)
    message = str(caught.value)
    assert message.startswith(f"{name}: ") and "truncated" in message
    assert "not a Wan2.1" not in message and "causal student" not in message  # no misleading hint
    assert str(rf_model_dir) not in message  # the file as the node lists it, not its full path


@pytest.mark.parametrize(
    "keys, kind, advice",
    [
        (
            {"diffusion_model.blocks.0.self_attn.q.lora_A.weight": (4, 256)},
            "a LoRA",
            "apply the LoRA with Reward Forcing: LoRA",
        ),
        (
            {"encoder.block.0.layer.0.SelfAttention.q.weight": (64, 64), "shared.weight": (10, 64)},
            "a text encoder",
            "Load CLIP (type wan",
        ),
        (
            {"decoder.1.weight": (8, 8, 3, 3), "decoder.2.weight": (8, 8, 3, 3)},
            "a TAEHV decoder",
            "Load Decoder",
        ),
    ],
)
def test_another_kind_of_model_file_is_named_with_what_to_do(nodes, rf_model_dir, keys, kind, advice):
    name = f"wrong_{kind.split()[-1].lower()}.safetensors"
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, rf_model_dir / "diffusion_models" / name)
    with pytest.raises(ValueError) as caught:
        nodes.load.loaders.RewardForcingLoadModel().load(name)
    message = str(caught.value)
    assert message.startswith(f"{name} is {kind}, not a Wan2.1 text-to-video diffusion model: ")
    assert advice in message and str(rf_model_dir) not in message


# ----------------------------------------------------------------------------- 3. global stream, early
def test_a_too_long_global_stream_is_refused_before_anything_loads(executor):
    prompt = workflow("reward_forcing_t2v_5s", **{"5": {"width": 32, "height": 32}})
    prompt["9"] = {
        "class_type": "RewardForcingStreamSettings",
        "inputs": {
            "sink_policy": "global",
            "sink_frames": 3,
            "window_frames": 9,
            "ema_alpha": 0.999,
            "max_frames": 6,
        },
    }
    prompt["5"]["inputs"]["settings"] = ["9", 0]
    executor.validate(prompt)  # VALIDATE_INPUTS cannot see the settings: a linked input reaches it as None
    with pytest.raises(ValueError, match="holds at most max_frames=6 latent frames but this length needs 21"):
        executor.execute(prompt)
    assert executor.executed == ["9"]  # the settings only: no model, text encoder or VAE was loaded
    # A length the cache holds runs, loading the model, prompt and VAE when the node asks for them.
    out = executor.execute(override(prompt, {"5": {"length": 9, "length_unit": "frames"}}))
    assert {"1", "2", "3", "4"} <= set(executor.executed) and out["5"][0]["samples"].shape[2] == 3


def test_saving_without_a_decoder_is_refused_before_anything_loads(executor):
    prompt = workflow("reward_forcing_t2v_5s", **{"5": {"width": 32, "height": 32, "filename_prefix": "x"}})
    del prompt["5"]["inputs"]["vae"], prompt["6"], prompt["7"]
    with pytest.raises(ValueError, match="saving an MP4 needs decoded frames"):
        executor.execute(prompt)
    assert executor.executed == []


# ----------------------------------------------------------------------------- 4. one output order
def test_every_generator_returns_the_latent_then_the_images(rf_pack, nodes):
    generators = {
        name: cls
        for name, cls in rf_pack.NODE_CLASS_MAPPINGS.items()
        if "LATENT" in cls.RETURN_TYPES and "IMAGE" in cls.RETURN_TYPES
    }
    assert {"RewardForcingStreamGenerate", "RewardForcingStreamSession"} <= set(generators)
    for name, cls in generators.items():
        assert cls.RETURN_TYPES == ("LATENT", "IMAGE") and cls.RETURN_NAMES == ("latent", "images"), name
    session = nodes.stream.session.RewardForcingStreamSession().run(
        load_model(nodes), cond(), "order", 1, 32, 32, 9, 4
    )
    assert set(session[0]) == {"samples"} and session[1].shape == (3, 32, 32, 3)  # a preview per latent frame


@pytest.mark.parametrize("path", sorted((ROOT / "workflows").glob("*.json")), ids=lambda p: p.stem)
def test_workflow_links_leave_from_the_slot_of_their_type(rf_pack, path):
    ui = json.loads(path.read_text())
    types = {n["id"]: rf_pack.NODE_CLASS_MAPPINGS.get(n["type"]) for n in ui["nodes"]}
    outputs = {n["id"]: n.get("outputs", []) for n in ui["nodes"]}
    for link_id, src, slot, _dst, _dst_slot, kind in ui["links"]:
        assert outputs[src][slot]["type"] == kind and link_id in outputs[src][slot]["links"], link_id
        if types[src] is not None:  # ours: the node's RETURN_TYPES decide what the slot carries
            assert types[src].RETURN_TYPES[slot] == kind, (path.name, link_id)


# ----------------------------------------------------------------------------- 5. length
@pytest.mark.parametrize("length, unit", [(10, "frames"), (1.4, "seconds"), (21, "frames")])
def test_generate_never_makes_less_than_asked_and_says_what_it_made(
    nodes, rf_model_dir, monkeypatch, length, unit
):
    shown = []
    monkeypatch.setattr(nodes.comfy, "progress_text", lambda text, node_id: shown.append((text, node_id)))
    out = nodes.stream.generate.RewardForcingStreamGenerate().generate(
        load_model(nodes),
        positive=cond(),
        **{**GEN, "length": length, "length_unit": unit},
        vae=vae(rf_model_dir),
        unique_id="8",
    )
    made = out["result"][1].shape[0]
    asked = length * 16 if unit == "seconds" else length
    assert asked <= made < asked + 12  # whole chunks of 12 frames, none more than needed
    (text,) = out["ui"]["text"]
    assert shown == [(text, "8")]
    assert int(re.match(r"(\d+) frames \(", text)[1]) == made and f"{made / 16:.2f} s at 16 fps" in text
    assert ("rounded up to whole chunks" in text) == (made > asked)


# ----------------------------------------------------------------------------- 6. LoRA of another size
def lora_file(rf_model_dir: Path, name: str, module: str, width: int) -> None:
    g = torch.Generator().manual_seed(4)
    save_file(
        {
            f"diffusion_model.{module}.lora_A.weight": torch.randn(4, width, generator=g),
            f"diffusion_model.{module}.lora_B.weight": torch.randn(width, 4, generator=g),
        },
        rf_model_dir / "loras" / name,
    )


@pytest.mark.parametrize(
    "module, width, lora_says, detail",
    [
        (
            "blocks.1.self_attn.q",
            1536,
            "a DiT 1536 wide (wan2.1-t2v-1.3b) with at least 2 blocks",
            "lora_A [4, 1536] / lora_B [1536, 4] do not fit the weight [256, 256]",
        ),
        (
            "blocks.29.cross_attn.k",
            256,
            "a DiT 256 wide (tiny) with at least 30 blocks",
            "has no parameter 'blocks.29.cross_attn.k.weight' in the model",
        ),
    ],
)
def test_a_lora_for_another_model_size_says_which_sizes_and_what_to_do(
    nodes, rf_model_dir, module, width, lora_says, detail
):
    name = f"other_size_{width}.safetensors"
    lora_file(rf_model_dir, name, module, width)
    with pytest.raises(ValueError) as caught:
        nodes.load.loaders.RewardForcingLoRA().apply(load_model(nodes), name, 1.0)
    message = str(caught.value)
    assert type(caught.value) is ValueError  # not the engine's bare LoraError
    assert message.startswith(f"{name} does not fit rewardforcing.pt: the LoRA was made for {lora_says}, ")
    assert "this one is 256 wide (tiny) with 2 blocks" in message and detail in message
    assert message.endswith("Pick a LoRA trained for this model") and str(rf_model_dir) not in message


# ----------------------------------------------------------------------------- 7. batch
def test_generate_batch_gives_one_video_per_seed(nodes, rf_model_dir):
    gen, model, decoder = (
        nodes.stream.generate.RewardForcingStreamGenerate(),
        load_model(nodes),
        vae(rf_model_dir),
    )
    out = gen.generate(model, positive=cond(), **GEN, vae=decoder, batch=2, filename_prefix="batch/v")
    latent, images = out["result"]
    assert latent["samples"].shape == (2, 16, 3, 4, 4) and images.shape == (2 * 9, 32, 32, 3)
    assert [e["filename"] for e in out["ui"]["images"]] == ["v_00001_.mp4", "v_00002_.mp4"]
    assert out["ui"]["text"] == ["2 videos of 9 frames (0.56 s at 16 fps)"]
    for i in range(2):  # video i is the batch-1 video of seed + i; the IMAGE holds them one after another
        single_latent, single_images = gen.generate(
            model, positive=cond(), **{**GEN, "seed": 5 + i}, vae=decoder
        )["result"]
        torch.testing.assert_close(
            latent["samples"][i : i + 1], single_latent["samples"], rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(images[9 * i : 9 * (i + 1)], single_images, rtol=1e-4, atol=1e-5)


def test_session_batch_gives_one_stream_per_seed(nodes):
    session, model = nodes.stream.session.RewardForcingStreamSession(), load_model(nodes)
    args = {"chunks": 2, "width": 32, "height": 32, "steps": 4}
    latent, images = session.run(model, cond(), "batch", seed=7, batch=2, **args)
    assert latent["samples"].shape == (2, 16, 6, 4, 4) and images.shape == (2 * 6, 32, 32, 3)
    single = session.run(model, cond(), "single", seed=8, **args)[0]
    torch.testing.assert_close(latent["samples"][1:], single["samples"], rtol=1e-4, atol=1e-5)
