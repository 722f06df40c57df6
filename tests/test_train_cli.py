"""``reward-forcing train``: config files and a tiny end-to-end run with resume."""

import csv
from pathlib import Path

import pytest
import torch

from rf_core.cli import main
from rf_core.lora import load_lora
from rf_core.train.config import TrainConfig, load_train_config

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_default_config_holds_the_paper_hyper_parameters():
    c = load_train_config(ROOT / "configs" / "train_default.yaml")
    o, loss = c.optim, c.loss
    assert (o.lr, o.lr_critic, o.betas, o.weight_decay, o.eps) == (2e-6, 4e-7, (0.0, 0.999), 0.01, 1e-8)
    assert (o.grad_clip, o.batch_size, o.gradient_accumulation, o.critic_steps_per_generator) == (
        10.0,
        1,
        8,
        5,
    )
    assert (o.ema_decay, o.ema_start_step) == (0.99, 200)
    assert (loss.beta, loss.guidance_scale, loss.timestep_shift, loss.min_timestep, loss.max_timestep) == (
        2.0,
        3.0,
        5.0,
        20.0,
        980.0,
    )
    assert (c.video.frames, c.video.height, c.video.width) == (21, 480, 832)
    assert c.video.denoise_steps == (1000.0, 750.0, 500.0, 250.0)
    assert (c.video.grad_frames, c.video.chunk_frames) == (21, 3)
    assert (c.reward.kind, c.reward.options["dimension"]) == ("videoalign", "MQ")
    assert c.run.gradient_checkpointing and c.run.mixed_precision == "bf16"
    # the code's defaults are the file's: a config that leaves a key out gets the paper's value too
    defaults = TrainConfig()
    assert (defaults.optim, defaults.loss, defaults.video) == (c.optim, c.loss, c.video)


def test_toml_config_and_clear_errors(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[optim]\nlr = 1e-5\n[lora]\nenabled = true\nrank = 8\n[run]\nsteps = 7\n")
    c = load_train_config(toml, {"loss.beta": 0})
    assert (c.optim.lr, c.lora.enabled, c.lora.rank, c.run.steps, c.loss.beta) == (1e-5, True, 8, 7, 0.0)
    with pytest.raises(ValueError, match=r"optim: unknown key 'learning_rate'"):
        TrainConfig.from_dict({"optim": {"learning_rate": 1.0}})
    with pytest.raises(ValueError, match=r"lora.enabled must be true or false"):
        TrainConfig.from_dict({"lora": {"enabled": "yes"}})
    with pytest.raises(ValueError, match="multiple of chunk_frames"):
        TrainConfig.from_dict({"video": {"frames": 4}})
    with pytest.raises(
        ValueError, match=r"video.grad_frames 20 must be a positive multiple of chunk_frames 3"
    ):
        TrainConfig.from_dict({"video": {"grad_frames": 20}})
    with pytest.raises(ValueError, match=r"\.yaml, \.yml or \.toml"):
        (tmp_path / "c.json").write_text("{}")
        load_train_config(tmp_path / "c.json")


def test_cli_trains_logs_checkpoints_resumes_and_exports(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        f"""
model: {{random_preset: tiny}}
video: {{frames: 3, height: 32, width: 48}}
reward: {{kind: motion, options: {{latent_center: 1.5, latent_scale: 0.1}}}}
optim: {{gradient_accumulation: 1, critic_steps_per_generator: 2, ema_start_step: 0, lr: 1.0e-3}}
lora: {{enabled: true, rank: 2, alpha: 2.0}}
run: {{steps: 2, save_every: 1, output_dir: {tmp_path / "run"}, output_name: mylora, device: cpu}}
"""
    )
    assert main(["train", "--config", str(cfg)]) == 0
    run = tmp_path / "run"
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["0", "1"]
    assert rows[0]["generator_loss"] and not rows[1]["generator_loss"]  # generator every 2nd step
    assert float(rows[0]["reward"]) != 0.0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000001.pt", "step_0000002.pt"]
    first = load_lora(run / "mylora.safetensors")
    assert first.metadata["rf_train_step"] == "2" and first.metadata["rf_train_weights"] == "ema"

    assert main(["train", "--config", str(cfg), "--resume", "--set", "run.steps=3"]) == 0
    with open(run / "metrics.csv") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["0", "1", "2"]
    assert load_lora(run / "mylora.safetensors").metadata["rf_train_step"] == "3"
    assert (run / "config.yaml").is_file() and (run / "curves.png").stat().st_size > 0
    assert main(["train", "--config", str(cfg), "--set", "nodot=1"]) == 2  # one-line error, exit code 2


def test_prompt_text_file_is_encoded_per_micro_batch(tmp_path):
    """data.prompts: a text file encoded on the fly by the umT5 encoder (tiny files made here)."""
    from _text_helpers import build_tiny_tokenizer, random_umt5_state

    from rf_core.text import WAN_NEGATIVE_PROMPT, TextEncoder, UMT5Config
    from rf_core.train.setup import build_trainer

    tokenizer = build_tiny_tokenizer(tmp_path / "tokenizer" / "tokenizer.json")
    umt5 = UMT5Config(
        vocab_size=96, dim=64, dim_attn=64, dim_ffn=96, num_heads=4, num_layers=1
    )  # tiny DiT: 64 wide
    torch.save(random_umt5_state(umt5), tmp_path / "umt5.pth")
    (tmp_path / "prompts.txt").write_text("a cat runs\n\na red dog on the grass\nthe cat\n")
    cfg = TrainConfig.from_dict(
        {
            "model": {"random_preset": "tiny"},
            "data": {
                "prompts": str(tmp_path / "prompts.txt"),
                "text_encoder": str(tmp_path / "umt5.pth"),
                "tokenizer": str(tokenizer),
            },
            "video": {"frames": 3, "height": 32, "width": 48},
            "reward": {"kind": "none"},
            "optim": {"gradient_accumulation": 1},
            "run": {"steps": 1, "save_every": 1, "output_dir": str(tmp_path / "run"), "device": "cpu"},
        }
    )
    trainer = build_trainer(cfg)
    assert trainer.prompts.texts == ["a cat runs", "a red dog on the grass", "the cat"]
    encoder = TextEncoder.from_files(tokenizer, tmp_path / "umt5.pth", max_length=32)
    torch.testing.assert_close(
        trainer.prompts.batch([1, 2]), encoder.encode_prompts(["a red dog on the grass", "the cat"])
    )
    torch.testing.assert_close(trainer.prompts.negative, encoder.encode_prompts([WAN_NEGATIVE_PROMPT])[0])
    trainer.train()
    assert trainer.step == 1
    with pytest.raises(ValueError, match="data.text_encoder and data.tokenizer"):
        build_trainer(
            TrainConfig.from_dict({"model": {"random_preset": "tiny"}, "data": {"prompts": "x.txt"}})
        )
