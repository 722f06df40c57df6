"""Built-in rewards: the motion reward's calibration on latents and frames, its saturation warning,
and the reward kind check (reference-algorithm.md §9.4: weight exp(β·r))."""

import logging

import pytest
import torch
import torch.nn.functional as F

from rf_core.train.config import TrainConfig, load_train_config
from rf_core.train.losses import reward_weights
from rf_core.train.rewards import MotionReward, build_reward
from rf_core.vae.latent_format import LATENT_MEAN, LATENT_STD

pytestmark = pytest.mark.usefixtures("one_thread")

SPEEDS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)  # latent pixels per latent frame


def moving_latents(speed: float, frames: int = 21, hw=(60, 104), width: int = 4, seed: int = 0):
    """Model-space latents [1, F, 16, h, w] at the real 480x832 latent grid, of realistic scale and
    structure: per channel a smooth random field (Gaussian blur of width ``width`` latent pixels,
    unit standard deviation, as normalised Wan latents), channels sharing a common component (as
    real latent channels do), translated by ``speed`` latent pixels per frame."""
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    taps = torch.arange(-3 * width, 3 * width + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps / width) ** 2)
    kernel = kernel / kernel.sum()
    pad = len(taps) // 2
    noise = torch.randn(17, 1, h, 3 * w, generator=g)
    field = F.conv2d(F.pad(noise, (0, 0, pad, pad), mode="circular"), kernel.view(1, 1, -1, 1))
    field = F.conv2d(F.pad(field, (pad, pad, 0, 0), mode="circular"), kernel.view(1, 1, 1, -1))[:, 0]
    field = 0.6 * field[:1] + 0.8 * field[1:]  # 16 channels with a shared component
    field = field / field.std(dim=(1, 2), keepdim=True)
    out = []
    for f in range(frames):
        i, frac = divmod(speed * f, 1.0)
        a = torch.roll(field, -int(i), dims=2)
        b = torch.roll(field, -int(i) - 1, dims=2)
        out.append(((1 - frac) * a + frac * b)[..., :w])
    return torch.stack(out)[None]


def test_latent_motion_reward_is_calibrated_to_realistic_latents():
    """On latents of the scale the trainer feeds (normalised, or raw VAE space), the reward stays off
    its clamp for still to fast motion, rises with motion, and the Re-DMD weights vary."""
    reward = MotionReward()
    latents = torch.cat([moving_latents(s) for s in SPEEDS])
    r = reward(latents)
    assert (r.abs() < reward.limit - 0.25).all(), r
    assert (r[1:] > r[:-1] + 0.1).all(), r  # strictly more reward for more motion
    w = reward_weights(r, beta=2.0, batch=len(SPEEDS), device="cpu")
    assert w.max() / w.min() > 20 and 0.05 < w.min() and w.max() < 200, w
    # the same clips in raw VAE space (ComfyUI's LATENT scale): the same rewards
    mean = torch.tensor(LATENT_MEAN).view(1, 1, -1, 1, 1)
    std = torch.tensor(LATENT_STD).view(1, 1, -1, 1, 1)
    torch.testing.assert_close(reward(latents * std + mean), r, rtol=1e-4, atol=1e-4)


def test_motion_reward_matches_hand_computation():
    """Frames: luma difference of uniform frames; latents: change over spread, per channel."""
    # RGB frames in [0, 1], uniform grey 0.2 then 0.25: m = 0.05, r = (0.05 - 0.03) / 0.02 = 1
    frames = torch.stack([torch.full((3, 8, 8), 0.2), torch.full((3, 8, 8), 0.25)])[None]
    assert MotionReward().motion(frames).item() == pytest.approx(0.05, abs=1e-6)
    assert MotionReward()(frames).item() == pytest.approx(1.0, abs=1e-4)
    # latents, 2 channels of 1x2 values, no pooling. Channel 0: [0, 2] -> [2, 0]: change 2, mean 1,
    # spread 1 -> 2. Channel 1: [1, 1] -> [1, 3]: change (0 + 2) / 2 = 1, mean 1.5, spread
    # (0.5 + 0.5 + 0.5 + 1.5) / 4 = 0.75 -> 4/3. m = (2 + 4/3) / 2 = 5/3; r = (5/3 - 0.4) / 0.3.
    x = torch.tensor([[[[0.0, 2.0]], [[1.0, 1.0]]], [[[2.0, 0.0]], [[1.0, 3.0]]]])[None]
    assert x.shape == (1, 2, 2, 1, 2)
    reward = MotionReward(pool=1, limit=10.0)
    assert reward.motion(x).item() == pytest.approx(5 / 3, rel=1e-6)
    assert reward(x).item() == pytest.approx((5 / 3 - 0.4) / 0.3, rel=1e-6)


def test_saturated_motion_reward_warns_once(caplog):
    reward = MotionReward()
    noise = torch.randn(2, 6, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    still = moving_latents(0.0, frames=6, hw=(8, 8), width=1)
    with caplog.at_level(logging.WARNING, logger="reward_forcing"):
        reward(still)  # in range: no warning
        assert not caplog.records
        assert (reward(noise) == reward.limit).all()  # independent frames: +3 for each sample
        reward(noise)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "\n" not in message and "clamp" in message and "latent_center/latent_scale" in message


def test_unknown_reward_kind_lists_the_built_ins_and_suggests_the_closest(tmp_path):
    with pytest.raises(
        ValueError, match=r"unknown reward 'motoin'.*motion, videoalign, none.*did you mean 'motion'"
    ):
        build_reward("motoin")
    with pytest.raises(ValueError, match=r"reward.kind: unknown reward 'motoin'.*did you mean 'motion'"):
        TrainConfig.from_dict({"reward": {"kind": "motoin"}})
    config = tmp_path / "train.yaml"
    config.write_text("reward: {kind: videoalgn}\n")
    with pytest.raises(ValueError, match=rf"{config}: reward.kind: .*did you mean 'videoalign'"):
        load_train_config(config)
    with pytest.raises(ValueError, match=r"'centre'.*expected some of"):
        build_reward("motion", {"centre": 0.1})
    assert isinstance(build_reward("motion", {"latent_center": 1.0}), MotionReward)
    assert build_reward("none") is None
