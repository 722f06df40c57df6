"""Encode Prompt List and Re-DMD Train nodes, run as ComfyUI runs them (under inference mode)."""

import pytest
import torch

from rf_core.lora import load_lora
from rf_core.tiny import random_prompt
from rf_core.train.trainer import PromptSet

TRAIN = dict(
    reward="motion",
    steps=2,
    learning_rate=1e-3,
    critic_learning_rate=2e-4,
    batch_size=1,
    gradient_accumulation=1,
    beta=2.0,
    lora_rank=2,
    output_name="tiny_redmd",
    width=48,
    height=32,
    latent_frames=3,
    save_every=1,
)


class Cancelled(Exception):
    pass


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def nodes(rf_pack, rf_model_dir, rf_output_dir):
    return rf_pack.nodes


class TokenCLIP:
    """ComfyUI's CLIP as text encoders use it: tokenize, then a CONDITIONING [1, tokens, width]."""

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, text):
        n = len(text.split()) + 1
        g = torch.Generator().manual_seed(len(text))
        return [[torch.randn(1, n, 64, generator=g), {"pooled_output": None}]]


def tiny_prompt_list():
    return PromptSet(
        random_prompt("tiny", batch=2, seed=3), random_prompt("tiny", seed=4)[0], ["a cat", "a dog"]
    )


def test_encode_prompt_list_pads_to_one_length(nodes):
    (prompts,) = nodes.train.nodes.RewardForcingEncodePromptList().encode(
        TokenCLIP(), "a cat\n\n a red dog runs \n", "bad"
    )
    assert prompts.texts == ["a cat", "a red dog runs"]
    assert prompts.embeds.shape == (2, 5, 64) and prompts.negative.shape == (5, 64)
    clip = TokenCLIP()
    torch.testing.assert_close(prompts.embeds[0, :3], clip.encode_from_tokens_scheduled("a cat")[0][0][0])
    assert prompts.embeds[0, 3:].abs().max() == 0 and prompts.negative[2:].abs().max() == 0
    with pytest.raises(ValueError, match="one training prompt per line"):
        nodes.train.nodes.RewardForcingEncodePromptList().encode(TokenCLIP(), " \n", "bad")


def test_redmd_train_runs_under_inference_mode_and_leaves_the_models_alone(nodes, rf_model_dir):
    with torch.inference_mode():  # as ComfyUI runs every node: loaded weights are inference tensors
        (student,) = nodes.load.loaders.RewardForcingLoadModel().load("rewardforcing.pt")
        (decoder,) = nodes.load.loaders.RewardForcingLoadDecoder().load("wan_2.1_vae.safetensors")
        before = {k: v.clone() for k, v in student.dit.state_dict().items()}
        out = nodes.train.nodes.RewardForcingReDMDTrain().train(
            student, student, tiny_prompt_list(), decoder=decoder, **TRAIN
        )
    path, curves, preview = out["result"]
    assert path == str(rf_model_dir / "loras" / "tiny_redmd.safetensors")
    lora = load_lora(path)
    assert lora.metadata["rf_train_step"] == "2" and {layer.rank for layer in lora.layers.values()} == {2}
    assert curves.shape == (1, 360, 640, 3) and 0 <= curves.min() and curves.max() <= 1
    assert (curves < 0.99).float().mean() > 0.001  # lines were drawn
    assert preview.shape == (1 + 4 * 2, 32, 48, 3)  # 3 latent frames decoded by the Wan VAE
    for k, v in student.dit.state_dict().items():
        assert torch.equal(v, before[k]), k  # no LoRA hooks, no dtype change on the loaded model
    assert not any(hasattr(m, "lora_down") for m in student.dit.modules())


def test_cancel_keeps_the_checkpoints_and_resume_continues(nodes, monkeypatch, tmp_path):
    calls = []

    def cancel_after(n):
        def check():
            calls.append(1)
            if len(calls) > n:
                raise Cancelled

        return check

    node = nodes.train.nodes.RewardForcingReDMDTrain()
    with torch.inference_mode():
        (student,) = nodes.load.loaders.RewardForcingLoadModel().load("rewardforcing.pt")
        monkeypatch.setattr(nodes.comfy, "interrupt_check", lambda: cancel_after(10**9))
        node.train(student, student, tiny_prompt_list(), **{**TRAIN, "steps": 3, "output_name": "full_run"})
        passes_full = len(calls)
        calls.clear()
        monkeypatch.setattr(nodes.comfy, "interrupt_check", lambda: cancel_after(passes_full * 2 // 3))
        with pytest.raises(Cancelled):
            node.train(student, student, tiny_prompt_list(), **{**TRAIN, "steps": 3})
        run = tmp_path / "output" / "reward_forcing_train" / "tiny_redmd" / "checkpoints"
        kept = sorted(p.name for p in run.iterdir())
        assert kept and all(name.startswith("step_") for name in kept)  # nothing half-written
        calls.clear()
        monkeypatch.setattr(nodes.comfy, "interrupt_check", lambda: cancel_after(10**9))
        out = node.train(student, student, tiny_prompt_list(), **{**TRAIN, "steps": 3})
    assert 0 < len(calls) < passes_full  # only the missing steps ran
    assert load_lora(out["result"][0]).metadata["rf_train_step"] == "3"


class Stop(Exception):
    pass


def test_redmd_train_learning_rates_and_batch_reach_the_trainer(nodes, monkeypatch):
    """The critic has its own learning rate, 5:1 below the generator's by default as in the paper
    (2e-6 : 4e-7); batch size and accumulation set the rollouts per optimiser step."""
    from rf_core.train.trainer import ReDMDTrainer

    required = nodes.train.nodes.RewardForcingReDMDTrain.INPUT_TYPES()["required"]
    gen_lr, critic_lr = (
        required["learning_rate"][1]["default"],
        required["critic_learning_rate"][1]["default"],
    )
    assert gen_lr == pytest.approx(5 * critic_lr)
    assert required["gradient_accumulation"][1]["default"] > 1 and required["batch_size"][1]["default"] >= 1

    seen = {}

    def capture(trainer, on_step=None):
        seen["trainer"] = trainer
        raise Stop

    monkeypatch.setattr(ReDMDTrainer, "train", capture)
    with torch.inference_mode():
        (student,) = nodes.load.loaders.RewardForcingLoadModel().load("rewardforcing.pt")
        args = {**TRAIN, "learning_rate": 3e-5, "critic_learning_rate": 7e-6, "batch_size": 2}
        with pytest.raises(Stop):
            nodes.train.nodes.RewardForcingReDMDTrain().train(
                student, student, tiny_prompt_list(), **{**args, "gradient_accumulation": 3}
            )
    trainer = seen["trainer"]
    o = trainer.config.optim
    assert (o.lr, o.lr_critic, o.batch_size, o.gradient_accumulation) == (3e-5, 7e-6, 2, 3)
    assert [g["lr"] for g in trainer.gen_opt.param_groups] == [3e-5]
    assert [g["lr"] for g in trainer.critic_opt.param_groups] == [7e-6]
