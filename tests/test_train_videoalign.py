"""VideoAlign (VideoReward) reward: preprocessing, checkpoint layout and scoring with a tiny random
Qwen2-VL built here (no download). Needs the optional ``transformers`` package."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the VideoAlign reward is an optional extra")

from rf_core.train.rewards import build_reward  # noqa: E402
from rf_core.train.videoalign import (  # noqa: E402
    CLIP_MEAN,
    CLIP_STD,
    REWARD_TOKENS,
    VideoAlignError,
    sample_frame_indices,
    smart_resize,
    video_to_patches,
)

SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|video_pad|>",
    "<|image_pad|>",
]
WORDS = ["[UNK]", "user", "assistant", "system", "a", "cat", "runs", "motion", "quality"]
# Qwen2-VL's chat layout for one user turn with a video (test data, not the real template file)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NORM = {"VQ_mean": 3.0, "VQ_std": 2.0, "MQ_mean": 1.0, "MQ_std": 0.5, "TA_mean": -1.0, "TA_std": 4.0}


def test_qwen2vl_size_and_frame_rules():
    assert smart_resize(480, 832, 28, 128 * 28 * 28, 200704) == (336, 588)  # the reference's 336x588
    assert sample_frame_indices(81, 16.0, 2.0) == [0, 9, 18, 27, 36, 44, 53, 62, 71, 80]
    assert len(sample_frame_indices(9, 16.0, 2.0)) == 4  # at least 4 frames


def test_patches_match_the_transformers_image_processor_and_the_temporal_layout():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 28, 56, generator=g) * 255
    ref = Qwen2VLImageProcessorPil(do_resize=False).preprocess(
        images=[image.numpy()], return_tensors="pt", input_data_format="channels_first"
    )
    mine, grid = video_to_patches(image[None])  # one frame, repeated to fill the temporal patch
    torch.testing.assert_close(mine, ref["pixel_values"], rtol=0, atol=1e-5)
    assert grid.tolist() == ref["image_grid_thw"].tolist() == [[1, 2, 4]]

    video = torch.rand(3, 3, 28, 56, generator=g) * 255  # 3 frames -> padded to 4 -> 2 groups
    patches, grid = video_to_patches(video)
    assert grid.tolist() == [[2, 2, 4]]
    norm = (video / 255 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    norm = torch.cat([norm, norm[-1:]])
    # patch order per frame group: 2x2 merge blocks row-major, inside a block row-major
    for index, (group, row, col) in {
        0: (0, 0, 0),
        1: (0, 0, 14),
        2: (0, 14, 0),
        4: (0, 0, 28),
        13: (1, 0, 42),
    }.items():
        block = norm[2 * group : 2 * group + 2, :, row : row + 14, col : col + 14]  # [t, c, 14, 14]
        torch.testing.assert_close(patches[index], block.permute(1, 0, 2, 3).flatten(), rtol=0, atol=1e-6)


def _tiny_base(folder):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vocab = {w: i for i, w in enumerate(WORDS + SPECIALS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE
    )
    tokenizer.save_pretrained(folder)
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
            bos_token_id=None,
            eos_token_id=None,
        ),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2),
        image_token_id=vocab["<|image_pad|>"],
        video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"],
    )
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder)


def _old_layout(key: str) -> str:
    """transformers >= 4.52 names -> the names of VideoReward's checkpoint (older transformers)."""
    key = key.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
    return "base_model.model." + key


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    """A VideoReward-like folder: model_config.json + checkpoint-7/model.pth in the peft-wrapped
    layout of old transformers, with LoRA factors on q_proj/v_proj and a fine-tuned embedding."""
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    root = tmp_path_factory.mktemp("videoalign")
    base = root / "qwen2vl-tiny"
    _tiny_base(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_special_tokens({"additional_special_tokens": list(REWARD_TOKENS)})
    model = Qwen2VLForConditionalGeneration.from_pretrained(base)
    model.resize_token_embeddings(len(tokenizer))
    g = torch.Generator().manual_seed(1)
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    merged["model.language_model.embed_tokens.weight"] = torch.randn(
        merged["model.language_model.embed_tokens.weight"].shape, generator=g
    )
    ckpt = {}
    rank, alpha = 4, 8.0
    for k, v in merged.items():
        if ".self_attn.q_proj.weight" in k or ".self_attn.v_proj.weight" in k:
            stem = _old_layout(k).removesuffix(".weight")
            a = torch.randn(rank, v.shape[1], generator=g) * 0.1
            b = torch.randn(v.shape[0], rank, generator=g) * 0.1
            ckpt[f"{stem}.base_layer.weight"] = v
            ckpt[f"{stem}.lora_A.default.weight"] = a
            ckpt[f"{stem}.lora_B.default.weight"] = b
            merged[k] = v + (alpha / rank) * b @ a
        else:
            ckpt[_old_layout(k)] = v
    head = torch.randn(1, 32, generator=g)
    ckpt["base_model.model.rm_head.weight"] = head
    folder = root / "VideoReward"
    (folder / "checkpoint-3").mkdir(parents=True)  # an older step, must be ignored
    (folder / "checkpoint-7").mkdir()
    torch.save(ckpt, folder / "checkpoint-7" / "model.pth")
    config = {
        "data_config": {
            "eval_dim": ["VQ", "MQ", "TA"],
            "prompt_template_type": "detailed_special",
            "fps": 2.0,
            "max_frame_pixels": 200704,
        },
        "model_config": {
            "model_name_or_path": str(base),
            "use_special_tokens": True,
            "output_dim": 1,
            "reward_token": "special",
        },
        "peft_lora_config": {"lora_enable": True, "lora_r": rank, "lora_alpha": alpha},
        "inference_config": NORM,
    }
    (folder / "model_config.json").write_text(json.dumps(config))
    # a stand-in for VideoAlign's prompt text (the real one is supplied by the user)
    (folder / "prompt_template.txt").write_text(
        "Rate this video for the prompt: {text_prompt}\nQuality <|VQ_reward|> motion <|MQ_reward|> "
        "alignment <|TA_reward|>"
    )
    return root, base, merged, head


def _expected_scores(base, merged, head, inputs):
    """Raw (VQ, MQ, TA) by transformers' own Qwen2VLModel forward (its video embedding and
    scatter), with VideoAlign's sequential positions and the merged weights."""
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(base)
    model.resize_token_embeddings(merged["model.language_model.embed_tokens.weight"].shape[0])
    model.load_state_dict(merged)
    ids = inputs["input_ids"]
    positions = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)
    with torch.no_grad():
        hidden = model.model(
            input_ids=ids,
            pixel_values_videos=inputs["pixel_values_videos"],
            video_grid_thw=inputs["video_grid_thw"],
            position_ids=positions,
        ).last_hidden_state
    return (hidden[0] @ head.T)[:, 0]


def test_videoalign_reward_loads_the_checkpoint_and_scores_frames(reward_dir):
    from transformers import AutoTokenizer

    root, base, merged, head = reward_dir
    reward = build_reward("videoalign", {"path": str(root), "dimension": "MQ"})
    g = torch.Generator().manual_seed(2)
    frames = torch.rand(2, 33, 3, 64, 112, generator=g)  # [B, T, 3, H, W] in [0, 1]
    prompts = ["a cat runs", "motion quality"]
    scores = reward(frames, prompts)
    assert scores.shape == (2,)

    inputs = reward.prepare(frames[1], prompts[1])
    ids = inputs["input_ids"][0]
    tokenizer = AutoTokenizer.from_pretrained(base)
    video_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    t, h, w = inputs["video_grid_thw"][0].tolist()
    assert t == len(sample_frame_indices(33, 16.0, 2.0)) // 2  # 2 fps of a 16 fps clip
    assert (h * 14, w * 14) == smart_resize(64, 112, 28, 128 * 28 * 28, 200704)
    assert int((ids == video_id).sum()) == t * h * w // 4
    raw = _expected_scores(base, merged, head, inputs)
    special = [int(torch.nonzero(ids == reward.tokenizer.convert_tokens_to_ids(tk))) for tk in REWARD_TOKENS]
    assert special == sorted(special)  # VQ, MQ, TA in this order in the prompt
    torch.testing.assert_close(reward.scores(inputs), raw[special], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        scores[1], (raw[special[1]] - NORM["MQ_mean"]) / NORM["MQ_std"], rtol=1e-4, atol=1e-5
    )
    overall = build_reward("videoalign", {"path": str(root), "dimension": "Overall"})
    norm = [
        (raw[special[i]] - NORM[f"{d}_mean"]) / NORM[f"{d}_std"] for i, d in enumerate(("VQ", "MQ", "TA"))
    ]
    torch.testing.assert_close(overall(frames[1:], prompts[1:])[0], sum(norm) / 3, rtol=1e-4, atol=1e-5)


def test_videoalign_sees_frames_in_0_255(reward_dir):
    """§13.15 fix: frames in [0, 1] become [0, 255] before the processor's 1/255 rescale, so a white
    video reaches the model as (1 - mean) / std in every channel."""
    reward = build_reward("videoalign", {"path": str(reward_dir[0]), "sample_fps": False})
    pixels = reward.prepare(torch.ones(4, 3, 56, 56), "a cat")["pixel_values_videos"]
    expected = ((1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)).repeat_interleave(2 * 14 * 14)
    # all 4 frames kept (2 temporal groups); 56x56 is enlarged to the video minimum, 336x336
    assert smart_resize(56, 56, 28, 128 * 28 * 28, 200704) == (336, 336)
    assert pixels.shape == (2 * 24 * 24, 3 * 2 * 14 * 14)
    torch.testing.assert_close(pixels, expected.expand_as(pixels), rtol=0, atol=1e-5)


def test_videoalign_errors_name_the_problem(tmp_path):
    with pytest.raises(VideoAlignError, match="no model_config.json"):
        build_reward("videoalign", {"path": str(tmp_path)})


def test_videoalign_needs_the_user_supplied_prompt_template(reward_dir):
    template = reward_dir[0] / "VideoReward" / "prompt_template.txt"
    text = template.read_text()
    template.unlink()
    try:
        with pytest.raises(VideoAlignError, match="prompt_template.txt is missing"):
            build_reward("videoalign", {"path": str(reward_dir[0])})
    finally:  # the fixture is shared by the module
        template.write_text(text)
