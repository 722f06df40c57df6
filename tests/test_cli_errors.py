"""Bad inputs and faults of every class, through the command line: each ends in one line
``reward-forcing <command>: error: ...`` naming the flag, file or key, exit code 2, no traceback, every
input untouched and no partial file; what the run would replace or ignore is an error or a warning.

The CLI runs in-process through ``main(argv)``; two checks run it as a real process (exit code, stderr)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rf_core.cli import HelpFormatter, build_parser, main
from rf_core.commands import generate as generate_cmd
from rf_core.io.video import probe_video
from rf_core.text.embeddings import PromptEmbedding, save_prompt_embeddings

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny-random", "--frames", "9", "--width", "32", "--height", "32"]

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- helpers


def run(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def assert_error(rc: int, err: str, command: str, *needles: str) -> str:
    lines = err.splitlines()
    assert rc == 2, err
    assert len(lines) == 1, err  # no warning, progress bar or traceback besides the error
    assert lines[0].startswith(f"reward-forcing {command}: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` with its bytes and mtime (ns)."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def junk(path: Path, size: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(len(str(path))).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """Records every model load; tests of checks that must come first assert it stays empty."""
    calls: list[str] = []

    def refuse(name):
        def load(*a, **k):
            calls.append(name)
            raise AssertionError(f"{name} called before the checks ended")

        return load

    monkeypatch.setattr("rf_core.tiny.random_model", refuse("random_model"))
    monkeypatch.setattr("rf_core.io.checkpoints.load_dit", refuse("load_dit"))
    monkeypatch.setattr("rf_core.train.setup.build_trainer", refuse("build_trainer"))
    return calls


@pytest.fixture
def real_inputs(tmp_path) -> dict[str, Path]:
    """Stand-ins for the real model files (only their existence is looked at before loading)."""
    return {
        "--model": junk(tmp_path / "in" / "model.safetensors"),
        "--vae": junk(tmp_path / "in" / "vae.pth"),
        "--text-encoder": junk(tmp_path / "in" / "umt5.pth"),
        "--tokenizer": junk(tmp_path / "in" / "tokenizer.json"),
    }


def real_argv(inputs: dict[str, Path]) -> list[str]:
    return [str(x) for flag, path in inputs.items() for x in (flag, path)]


def tiny_lora(path: Path, width: int = 256, scale: float = 1.0) -> Path:
    """A kohya-layout LoRA on blocks.1.self_attn.v of a model ``width`` wide (256: tiny-random)."""
    g = torch.Generator().manual_seed(5)
    key = "lora_unet_blocks_1_self_attn_v"
    down, up = torch.randn(2, width, generator=g), scale * torch.randn(width, 2, generator=g)
    save_file(
        {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)},
        path,
    )
    return path


def embeddings(path: Path, width: int = 64, tokens: int = 8, **entries: str) -> Path:
    g = torch.Generator().manual_seed(9)
    save_prompt_embeddings(
        path,
        {
            name: PromptEmbedding(text, 0.3 * torch.randn(tokens, width, generator=g))
            for name, text in entries.items()
        },
        encoder_name="test",
    )
    return path


# ----------------------------------------------------------------------------- values at parse time


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--width", "0"], "argument --width: expected a positive multiple of 16 (e.g. 832, 480), got '0'"),
        (["--width", "-32"], "argument --width"),
        (["--height", "100"], "argument --height: expected a positive multiple of 16"),
        (["--width", "wide"], "argument --width: expected a whole number, got 'wide'"),
        (["--seconds", "nan"], "argument --seconds: expected a finite number, got 'nan'"),
        (["--seconds", "inf"], "argument --seconds: expected a finite number"),
        (["--seconds", "-2"], "argument --seconds: expected a number > 0, got '-2'"),
        (["--seconds", "0"], "argument --seconds: expected a number > 0"),
        (["--frames", "-3"], "argument --frames: expected a whole number >= 1"),
        (["--frames", "2.5"], "argument --frames: expected a whole number, got '2.5'"),
        (["--fps", "0"], "argument --fps: expected a frame rate in [0.1, 240]"),
        (["--fps", "-16"], "argument --fps"),
        (["--fps", "nan"], "argument --fps: expected a finite number"),
        (["--seed", "-1"], "argument --seed: expected a whole number in [0, 2**63)"),
        (["--device", "tpu9"], "argument --device: expected cpu, cuda, cuda:N or mps, got 'tpu9'"),
        (["--attn", "fastest"], "argument --attn: expected one of auto, sdpa"),
        (["--steps", "1000,fast"], "argument --steps: expected comma-separated numbers"),
        (["--steps", "1000,0"], "argument --steps: expected timesteps in (0, 1000]"),
        (["--alpha", "1.5"], "argument --alpha: expected a number in [0, 1]"),
        (["--window", "0"], "argument --window: expected a whole number >= 1"),
        (["--sink", "-1"], "argument --sink: expected a whole number >= 0"),
        (["--lora", "a.safetensors:nan"], "argument --lora: expected a finite number, got 'nan'"),
        (["--dtype", "fp64"], "argument --dtype: invalid choice: 'fp64'"),
        (["--sink-policy", "forever"], "argument --sink-policy: invalid choice"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
        # far beyond reason: they used to fail for want of memory mid-run, or give a black video
        (["--width", "65536"], "argument --width: expected at most 4096"),
        (["--lora", "a.safetensors:1e30"], "argument --lora: expected a strength in [-100, 100], got '1e30'"),
        (["--steps", "250,500,750,1000"], "argument --steps: expected timesteps from high to low"),
    ],
)
def test_bad_values_are_refused_while_parsing(tmp_path, capsys, loads, extra, needle):
    out = tmp_path / "v.mp4"
    rc, err = run(capsys, "generate", "--prompt", "x", "--out", out, *extra)
    # argparse names the sub-command for its own errors, the top level for unknown flags
    line = assert_error(
        rc, err.replace("reward-forcing: error:", "reward-forcing generate: error:"), "generate"
    )
    assert needle in line
    assert loads == [] and list(tmp_path.iterdir()) == []


def test_device_without_cuda_is_refused(tmp_path, capsys, loads):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is for machines without it")
    rc, err = run(capsys, "generate", "--prompt", "x", "--device", "cuda", "--out", tmp_path / "v.mp4")
    assert_error(rc, err, "generate", "argument --device: CUDA is not available", "use --device cpu")
    rc, err = run(
        capsys, "generate", "--prompt", "x", "--attn", "cudnn", "--device", "cpu", "--out", tmp_path / "v.mp4"
    )
    assert_error(rc, err, "generate", "--attn cudnn: needs a CUDA device")
    assert loads == []


def test_lengths_beyond_reason_are_refused_and_long_ones_warned(tmp_path, capsys, loads, monkeypatch):
    rc, err = run(capsys, "generate", "--prompt", "x", "--seconds", "1e9", "--out", tmp_path / "v.mp4")
    assert_error(rc, err, "generate", "--seconds 1e+09", "at most 24 hours")
    rc, err = run(
        capsys, "generate", "--prompt", "x", "--frames", str(16 * 24 * 3600 + 1), "--out", tmp_path / "v.mp4"
    )
    assert_error(rc, err, "generate", "--frames 1382401", "at most 24 hours")
    # a switch far past the end is refused at once (it used to be searched chunk by chunk)
    rc, err = run(
        capsys,
        "generate",
        *TINY,
        "--prompt",
        "x",
        "--prompt-at",
        "99999999999s",
        "y",
        "--out",
        tmp_path / "v.mp4",
    )
    assert_error(
        rc, err, "generate", "--prompt-at 99999999999s", "after the video's end (9 frames, 1 chunks)"
    )
    rc, err = run(
        capsys, "generate", *TINY, "--prompt", "x", "--prompt-at", "1s", "y", "--out", tmp_path / "v.mp4"
    )
    assert_error(rc, err, "generate", "--prompt-at 1s", "video frame 21 (chunk 2)", "after the video's end")
    assert loads == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "seconds, asked, made", [("2.0875", 34, 45), ("0.01", 1, 9), ("2", 32, 33), ("0.5625", 9, 9)]
)
def test_a_length_in_seconds_is_never_cut_short(tmp_path, seconds, asked, made):
    argv = ["generate", "--prompt", "x", "--seconds", seconds, "--out", str(tmp_path / "v.mp4")]
    args = build_parser().parse_args(argv)
    plan = generate_cmd.plan_run(args, tiny=True)
    assert 1 + 4 * (plan.chunks * plan.config.chunk_frames - 1) == made >= float(seconds) * 16
    note = f"{asked} frames asked; whole chunks make {made}"
    assert any(m.startswith(note) for m in plan.messages) == (asked != made), plan.messages


# ----------------------------------------------------------------------------- nothing lost


@pytest.mark.parametrize(
    "flag", ["--model", "--vae", "--text-encoder", "--tokenizer", "--lora", "--prompt-embeds"]
)
def test_output_is_never_an_input(tmp_path, capsys, loads, real_inputs, flag):
    victim = junk(tmp_path / "in" / "precious.mp4", 4096)
    inputs = dict(real_inputs, **{flag: victim})
    before = snapshot(tmp_path)
    for out in (victim, tmp_path / "in" / ".." / "in" / "precious.mp4"):
        rc, err = run(capsys, "generate", "--prompt", "x", *real_argv(inputs), "--out", out, "--overwrite")
        assert_error(rc, err, "generate", f"is the {flag} file", "an input is never overwritten")
    link = tmp_path / "link.mp4"
    link.symlink_to(victim)
    os.link(victim, tmp_path / "hard.mp4")
    for out in (link, tmp_path / "hard.mp4"):
        rc, err = run(capsys, "generate", "--prompt", "x", *real_argv(inputs), "--out", out, "--overwrite")
        assert_error(rc, err, "generate", f"is the {flag} file", "an input is never overwritten")
    assert {k: v for k, v in snapshot(tmp_path).items() if k.startswith("in")} == before
    assert loads == []


def test_checkpoint_named_as_output_is_refused_by_its_name(tmp_path, capsys, loads, real_inputs):
    before = snapshot(tmp_path)
    rc, err = run(
        capsys, "generate", "--prompt", "x", *real_argv(real_inputs), "--out", real_inputs["--model"]
    )
    assert_error(rc, err, "generate", "--out", "expected a .mp4 video name, got .safetensors")
    assert snapshot(tmp_path) == before and loads == []


def test_bad_output_places_fail_before_the_model_loads(tmp_path, capsys, loads, monkeypatch):
    (tmp_path / "folder.mp4").mkdir()
    junk(tmp_path / "afile")
    before = snapshot(tmp_path)
    cases = [
        (tmp_path / "folder.mp4", "is a folder; expected a .mp4 video name"),
        (tmp_path / "afile" / "v.mp4", "afile is a file, not a folder"),
        (tmp_path / "afile" / "deeper" / "v.mp4", "afile is a file, not a folder"),
        (tmp_path / "video", "expected a .mp4 video name, got no extension"),
    ]
    for out, needle in cases:
        rc, err = run(capsys, "generate", *TINY, "--prompt", "x", "--out", out)
        assert_error(rc, err, "generate", f"--out {out}", needle)
    # a folder this user cannot write into (simulated: the tests may run as root, who can write anywhere)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))
    rc, err = run(capsys, "generate", *TINY, "--prompt", "x", "--out", locked / "sub" / "v.mp4")
    assert_error(rc, err, "generate", f"cannot write into {locked} (permission denied)")
    rc, err = run(capsys, "generate", *TINY, "--prompt", "x", "--png", "--out", tmp_path / "afile")
    assert_error(rc, err, "generate", "afile: is a file; expected a folder")
    assert snapshot(tmp_path) == before and not list(locked.iterdir()) and loads == []


def test_existing_output_needs_overwrite_and_missing_folders_are_made(tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "v.mp4"
    rc, err = run(capsys, "generate", *TINY, "--prompt", "x", "--out", out)
    assert rc == 0, err
    first = out.read_bytes()
    rc, err = run(capsys, "generate", *TINY, "--prompt", "other", "--out", out)
    assert_error(rc, err, "generate", f"--out {out}: exists; pass --overwrite to replace it")
    assert out.read_bytes() == first
    rc, err = run(capsys, "generate", *TINY, "--prompt", "other", "--out", out, "--overwrite")
    assert rc == 0, err
    assert out.read_bytes() != first and probe_video(out).frames == 9
    assert sorted(p.name for p in out.parent.iterdir()) == ["v.mp4"]  # no partial file left


def test_png_frames_are_replaced_only_with_overwrite(tmp_path, capsys):
    folder = tmp_path / "frames"
    old = [junk(folder / f"frame_{i:06d}.png") for i in range(12)]
    keep = junk(folder / "notes.txt")
    before = snapshot(tmp_path)
    rc, err = run(capsys, "generate", *TINY, "--prompt", "x", "--png", "--out", folder)
    assert_error(rc, err, "generate", "holds 12 frame files (frame_000000.png ...); pass --overwrite")
    assert snapshot(tmp_path) == before
    rc, err = run(capsys, "generate", *TINY, "--prompt", "x", "--png", "--out", folder, "--overwrite")
    assert rc == 0, err
    # the folder holds this run's 9 frames only: the 3 older ones past them are gone, other files stay
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"frame_{i:06d}.png" for i in range(9)] + ["notes.txt"]
    )
    assert keep.read_bytes() == before["frames/notes.txt"][0] and not old[11].exists()


def test_convert_checks_its_output_like_generate(tmp_path, capsys):
    from rf_core.tiny import random_model

    src = tmp_path / "in" / "tiny.safetensors"
    src.parent.mkdir()
    save_file(random_model("tiny", seed=3).state_dict(), src)
    (tmp_path / "folder.safetensors").mkdir()
    link = tmp_path / "link.safetensors"
    link.symlink_to(src)
    before = snapshot(tmp_path / "in")
    cases = [
        ([src, src], "output", "is the input file"),
        ([src, link, "--overwrite"], "output", "is the input file"),
        ([src, tmp_path / "folder.safetensors"], "output", "is a folder"),
        ([src, tmp_path / "x.pt"], "output", "expected a .safetensors file name, got .pt"),
        ([tmp_path / "missing.pt", tmp_path / "x.safetensors"], "input", "checkpoint file not found"),
        (
            [src, tmp_path / "x.safetensors", "--lora", tmp_path / "nope.safetensors"],
            "--lora",
            "LoRA file not found",
        ),
        (
            [
                src,
                tmp_path / "x.safetensors",
                "--lora",
                "a.safetensors",
                "--lora-strength",
                "0.5",
                "--lora-strength",
                "1",
            ],
            "--lora-strength",
            "got 2",
        ),
        ([src, tmp_path / "x.safetensors", "--lora-strength", "nan"], "argument --lora-strength", "finite"),
        ([junk(tmp_path / "bad.safetensors"), tmp_path / "x.safetensors"], "input", "bad.safetensors"),
    ]
    for argv, flag, needle in cases:
        rc, err = run(capsys, "convert", *argv)
        assert_error(rc, err, "convert", flag, needle)
    assert snapshot(tmp_path / "in") == before and not (tmp_path / "x.safetensors").exists()
    out = tmp_path / "made" / "for" / "it.safetensors"
    rc, err = run(capsys, "convert", src, out, "--dtype", "bf16")
    assert rc == 0 and out.is_file(), err
    assert sorted(p.name for p in out.parent.iterdir()) == ["it.safetensors"]
    rc, err = run(capsys, "convert", src, out)
    assert_error(rc, err, "convert", "exists; pass --overwrite")


def test_convert_reads_and_fits_loras_before_writing_and_says_what_it_ignores(tmp_path, capsys):
    from rf_core.tiny import random_model

    src = tmp_path / "in" / "tiny.safetensors"
    src.parent.mkdir()
    save_file(random_model("tiny", seed=3).state_dict(), src)
    bad, wide = (
        junk(tmp_path / "in" / "bad.safetensors"),
        tiny_lora(tmp_path / "in" / "wide.safetensors", 1536),
    )
    out = tmp_path / "x.safetensors"
    before = snapshot(tmp_path)
    rc, err = run(capsys, "convert", src, out, "--lora", bad)  # one line: no "read ... tensors" before it
    assert_error(rc, err, "convert", f"--lora {bad}: not a safetensors file")
    rc, err = run(capsys, "convert", src, out, "--lora", wide)
    assert_error(rc, err, "convert", f"--lora {wide}: ", "do not fit the weight [256, 256]")
    rc, err = run(capsys, "convert", src, out, "--lora-strength", "0.5")
    assert_error(rc, err, "convert", "--lora-strength 0.5: given without --lora")
    assert snapshot(tmp_path) == before  # no output, not even a partial one
    rc, err = run(capsys, "convert", src, out, "--no-ema")
    assert rc == 0 and f"warning: --no-ema is not used: {src} has no 'generator' section" in err, err
    nested = tmp_path / "in" / "nested.pt"
    torch.save({"generator": random_model("tiny", seed=3).state_dict()}, nested)
    rc, err = run(capsys, "convert", nested, out, "--no-ema", "--overwrite")
    assert rc == 0 and "warning" not in err, err  # the generator section is what --no-ema asks for


def test_convert_never_replaces_an_output_another_run_made_meanwhile(tmp_path, capsys, monkeypatch):
    from rf_core.io.checkpoints import DitCheckpoint
    from rf_core.tiny import random_model

    src, out = tmp_path / "tiny.safetensors", tmp_path / "out.safetensors"
    save_file(random_model("tiny", seed=3).state_dict(), src)
    tensor = DitCheckpoint.tensor

    def other_run_finishes_first(self, *a, **k):  # the other run's output lands while this one writes
        if not out.exists():
            out.write_bytes(b"the other run's output")
        return tensor(self, *a, **k)

    monkeypatch.setattr(DitCheckpoint, "tensor", other_run_finishes_first)
    rc, err = run(capsys, "convert", src, out)
    line = assert_error(rc, err.splitlines()[-1], "convert", f"{out} appeared while this run was writing it")
    assert out.read_bytes() == b"the other run's output"
    (partial,) = tmp_path.glob("out.*.partial.safetensors")  # this run's output, kept and named
    assert str(partial) in line and partial.stat().st_size > 0


def test_download_refuses_a_file_as_its_folder(tmp_path, capsys):
    target = junk(tmp_path / "models")
    rc, err = run(capsys, "download", "--dir", target / "sub")
    assert_error(rc, err, "download", "--dir", "models is a file, not a folder")
    rc, err = run(capsys, "download", "--dir", target)
    assert_error(rc, err, "download", "--dir", "is a file; expected a folder")
    rc, err = run(capsys, "download", "--dir", "")  # not the current folder, silently
    assert_error(rc, err, "download", "--dir: expected a folder name, got ''")


# ----------------------------------------------------------------------------- loaders: one line each


def test_loader_errors_are_one_line_naming_the_flag(tmp_path, capsys, real_inputs):
    bad = junk(tmp_path / "garbage.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    tiny_lora(truncated)
    truncated.write_bytes(truncated.read_bytes()[:-40])
    cases = [
        (real_argv(real_inputs), "--vae", "vae.pth"),  # the VAE loads before the model
        ([*TINY, "--lora", bad], f"--lora {bad}", ""),
        ([*TINY, "--lora", truncated], f"--lora {truncated}", ""),
        ([*TINY, "--prompt-embeds", bad], f"--prompt-embeds {bad}", "not a safetensors file"),
        ([*TINY, "--lora", tmp_path / "nope.safetensors"], "--lora", "LoRA file not found"),
        (
            [*TINY, "--prompt-embeds", tmp_path / "nope.st"],
            "--prompt-embeds",
            "prompt-embedding file not found",
        ),
    ]
    for argv, flag, needle in cases:
        rc, err = run(capsys, "generate", "--prompt", "x", *argv, "--out", tmp_path / "o" / "v.mp4")
        assert_error(rc, err, "generate", flag, needle)
    assert not (tmp_path / "o").exists()


def tiny_files(folder: Path, model: bool = True) -> dict[str, Path]:
    """A real tiny DiT (else junk), Wan VAE and prompt-embedding file (tiny-random's sizes)."""
    from rf_core.vae.wan_vae import WanVAE, WanVAEConfig

    vae = {k: v.contiguous() for k, v in WanVAE(WanVAEConfig(dim=8)).state_dict().items()}
    save_file(vae, junk(folder / "vae.safetensors"))
    if model:
        from rf_core.tiny import random_model

        save_file(random_model("tiny", seed=1).state_dict(), folder / "model.safetensors")
    else:
        junk(folder / "model.safetensors")  # never read: what is checked fails first
    return {
        "--model": folder / "model.safetensors",
        "--vae": folder / "vae.safetensors",
        "--prompt-embeds": embeddings(folder / "e.safetensors", calm="a calm lake"),
    }


def test_every_other_file_is_read_before_the_model(tmp_path, capsys, loads):
    files = tiny_files(tmp_path / "in", model=False)
    bad = junk(tmp_path / "bad.safetensors")
    cases = [
        ({"--vae": bad}, [], f"--vae {bad}"),
        ({}, ["--lora", bad], f"--lora {bad}"),
        (
            {"--prompt-embeds": None},
            ["--text-encoder", bad, "--tokenizer", tmp_path / "tok.json"],
            "--tokenizer",
        ),
    ]
    (tmp_path / "tok.json").write_text('{"model": 3}')
    for change, extra, needle in cases:
        argv = real_argv({k: v for k, v in {**files, **change}.items() if v is not None})
        rc, err = run(capsys, "generate", "--prompt", "calm", *argv, *extra, "--out", tmp_path / "v.mp4")
        assert_error(rc, err, "generate", needle)
    assert loads == []  # the DiT never started loading


def test_a_plain_pickle_is_one_line(tmp_path, capsys):
    import pickle
    import warnings

    with open(tmp_path / "plain.pt", "wb") as f:
        pickle.dump({"generator": {"x": 1}}, f, protocol=4)  # not from torch.save: torch warns about it
    argv = ["generate", *TINY, "--prompt", "x", "--lora", tmp_path / "plain.pt", "--out", tmp_path / "v.mp4"]
    with warnings.catch_warnings(record=True) as shown:  # a warning is a second line on a user's stderr
        warnings.simplefilter("always")
        rc, err = run(capsys, *argv)
    assert_error(rc, err, "generate", f"--lora {tmp_path / 'plain.pt'}: cannot read")
    assert [str(w.message) for w in shown] == []


def test_no_ema_on_a_file_without_sections_is_said(tmp_path, capsys):
    files = tiny_files(tmp_path / "in")
    rc, err = run(
        capsys,
        "generate",
        "--prompt",
        "calm",
        *real_argv(files),
        *TINY[2:],
        "--no-ema",
        "--out",
        tmp_path / "v.mp4",
    )
    assert rc == 0, err
    assert (
        f"reward-forcing generate: warning: --no-ema is not used: {files['--model']} has no 'generator'"
        in err
    )


def test_a_lora_for_another_model_size_is_refused_with_the_reason(tmp_path, capsys):
    lora = tiny_lora(tmp_path / "wan13b.safetensors", width=1536)
    rc, err = run(capsys, "generate", *TINY, "--prompt", "x", "--lora", lora, "--out", tmp_path / "v.mp4")
    assert_error(rc, err, "generate", f"--lora {lora}", "tiny-random is a small random model")
    assert not (tmp_path / "v.mp4").exists()


def test_tiny_random_applies_loras_and_prompt_embeddings(tmp_path, capsys):
    def frames(*extra) -> np.ndarray:
        out = tmp_path / f"f{len(list(tmp_path.iterdir()))}"
        rc, err = run(capsys, "generate", *TINY, "--png", "--out", out, *extra)
        assert rc == 0, err
        return np.stack([_png(p) for p in sorted(out.glob("*.png"))])

    plain = frames("--prompt", "calm")
    assert np.array_equal(
        frames("--prompt", "calm", "--lora", tiny_lora(tmp_path / "z.safetensors", scale=0.0)), plain
    )
    assert not np.array_equal(
        frames("--prompt", "calm", "--lora", tiny_lora(tmp_path / "l.safetensors", scale=30.0)), plain
    )
    emb = embeddings(tmp_path / "e.safetensors", calm="a calm lake")
    from_file = frames("--prompt", "calm", "--prompt-embeds", emb)
    assert not np.array_equal(from_file, plain)
    assert np.array_equal(
        frames("--prompt", "a calm lake", "--prompt-embeds", emb), from_file
    )  # by its prompt too


def _png(path: Path) -> np.ndarray:
    import imageio.v3 as iio

    return iio.imread(path)


def test_prompt_embedding_mismatches_are_found_before_the_model(tmp_path, capsys, loads):
    emb = embeddings(tmp_path / "e.safetensors", calm="a calm lake")
    rc, err = run(
        capsys, "generate", *TINY, "--prompt", "storm", "--prompt-embeds", emb, "--out", tmp_path / "v.mp4"
    )
    assert_error(
        rc, err, "generate", f"--prompt-embeds {emb}", "no entry named or prompted 'storm'", "['calm']"
    )
    assert loads == []


def test_prompt_embeddings_of_another_width_are_refused(tmp_path, capsys):
    wide = embeddings(tmp_path / "wide.safetensors", width=4096, calm="a calm lake")
    rc, err = run(
        capsys, "generate", *TINY, "--prompt", "calm", "--prompt-embeds", wide, "--out", tmp_path / "v.mp4"
    )
    assert_error(rc, err, "generate", "entry 'calm' is 8 tokens x 4096", "at most 32 tokens x 64")
    assert not (tmp_path / "v.mp4").exists()


# ----------------------------------------------------------------------------- silent cases are said


def test_what_is_ignored_or_replaced_is_a_warning(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(generate_cmd, "LONG_SECONDS", 0.25)  # a 9-frame video is "long" here
    vae = junk(tmp_path / "vae.pth")
    rc, err = run(
        capsys,
        "generate", *TINY, "--prompt", "x", "--vae", vae, "--alpha", "0.5", "--sink-policy", "static",
        "--prompt-at", "0c", "y", "--fps", "16", "--out", tmp_path / "v.mp4",
    )  # fmt: skip
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("reward-forcing generate: warning: ")]
    assert any("tiny-random ignores --vae" in w for w in warnings)
    assert any("--alpha is not used by --sink-policy static" in w for w in warnings)
    assert any("--prompt-at 0c 'y' starts at the same chunk (0) as --prompt" in w for w in warnings)
    assert any("--frames 9 is a long run" in w for w in warnings)
    rc, err = run(
        capsys,
        "generate",
        *TINY[:2],
        "--frames",
        "10",
        *TINY[4:],
        "--prompt",
        "x",
        "--out",
        tmp_path / "w.mp4",
    )
    assert rc == 0 and "10 frames asked; whole chunks make 21" in err  # rounding up is said
    assert probe_video(tmp_path / "w.mp4").frames == 21


# ----------------------------------------------------------------------------- train


TRAIN_OK = """\
model: {random_preset: tiny}
video: {frames: 3, height: 32, width: 48}
reward: {kind: none}
optim: {gradient_accumulation: 1}
run: {steps: 1, save_every: 1, output_dir: OUT, device: cpu}
"""


@pytest.mark.parametrize(
    "text, extra, needles",
    [
        ("optim: {learning_rate: 1.0}\n", [], ["c.yaml: optim: unknown key 'learning_rate'", "'lr'"]),
        ("run: {steps: many}\n", [], ["c.yaml: run.steps must be a whole number, got 'many'"]),
        ("run: {steps: true}\n", [], ["run.steps must be a whole number, got True"]),
        ("lora: {targets: q}\n", [], ["lora.targets must be a list, got 'q'"]),
        ("lora: {enabled: yes please}\n", [], ["lora.enabled must be true or false"]),
        ("run: [1\n", [], ["c.yaml: not valid YAML"]),
        ("- a\n- b\n", [], ["c.yaml: expected sections", "got list"]),
        ("nonsense: {a: 1}\n", [], ["unknown section 'nonsense'"]),
        (
            "model: {student: nope.pt, teacher: nope.pt}\n",
            [],
            ["model.student nope.pt: student checkpoint file not found"],
        ),
        ("data: {prompt_embeddings: none.safetensors}\n", [], ["data.prompt_embeddings none.safetensors"]),
        (TRAIN_OK, ["--set", "run.steps=abc"], ["--set run.steps=abc: run.steps must be a whole number"]),
        (TRAIN_OK, ["--set", "run.stepz=3"], ["--set run.stepz=3: run: unknown key 'stepz'"]),
        (TRAIN_OK, ["--set", "steps=3"], ["--set: expected SECTION.KEY=VALUE", "'steps=3'"]),
        (TRAIN_OK, ["--set", "run.steps=[1"], ["--set run.steps=[1: the value is not valid YAML"]),
        (TRAIN_OK, ["--set", "run.device=warp9"], ["run.device 'warp9': expected cpu, cuda"]),
        (TRAIN_OK, ["--resume", "nope.pt"], ["--resume nope.pt: training checkpoint file not found"]),
        # values that used to fail after the models loaded, or not at all
        ("video: {height: 0}\n", [], ["video.height/width must be positive multiples of 16, got 0x832"]),
        ("video: {chunk_frames: 0}\n", [], ["video.chunk_frames must be >= 1, got 0"]),
        ("video: {denoise_steps: [250, 1000]}\n", [], ["video: denoise_steps must go from high to low"]),
        ("optim: {lr: .nan}\n", [], ["optim.lr must be a finite number, got nan"]),
        ("optim: {lr: -1.0e-5}\n", [], ["optim.lr must be >= 0, got -1e-05"]),
        ("optim: {betas: [0.9]}\n", [], ["optim.betas must be two numbers in [0, 1), got (0.9,)"]),
        ("optim: {betas: [a, b]}\n", [], ["optim.betas[0] must be a number, got 'a'"]),
        ("optim: {ema_decay: 1.5}\n", [], ["optim.ema_decay must be in [0, 1], got 1.5"]),
        ("loss: {min_timestep: 990}\n", [], ["loss.min_timestep / max_timestep must be 0 <= min < max"]),
        ("loss: {beta: .inf}\n", [], ["loss.beta must be a finite number"]),
        ("run: {keep_checkpoints: 0}\n", [], ["run.keep_checkpoints must be >= 1, got 0"]),
        ("run: {output_name: ../x}\n", [], ["run.output_name must be a file name without folders"]),
        (
            "lora: {enabled: true, targets: [attn.qq]}\n",
            [],
            ["lora.targets ['attn.qq'] match no linear layer"],
        ),
        ("lora: {enabled: true, rank: 0}\n", [], ["lora.rank must be >= 1, got 0"]),
        ("model: {random_preset: huge}\n", [], ["model.random_preset 'huge' is not a preset"]),
        ("model: {attn_backend: fastest}\n", [], ["model.attn_backend must be one of"]),
        (TRAIN_OK, ["--set", "run.output_dir=''"], ["run.output_dir: expected a folder name, got ''"]),
    ],
)
def test_train_config_errors_are_one_line(tmp_path, capsys, loads, monkeypatch, text, extra, needles):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text.replace("OUT", str(tmp_path / "run")))
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)  # relative names in the configs above are relative to here
    rc, err = run(capsys, "train", "--config", cfg, *extra)
    assert_error(rc, err, "train", *needles)
    assert snapshot(tmp_path) == before and loads == []


def test_train_files_and_outputs_are_checked_before_loading(tmp_path, capsys, loads, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, err = run(capsys, "train", "--config", tmp_path / "missing.yaml")
    assert_error(rc, err, "train", "--config", "training config file not found")
    (tmp_path / "c.toml").write_text("[run]\nsteps = \n")
    rc, err = run(capsys, "train", "--config", tmp_path / "c.toml")
    assert_error(rc, err, "train", "c.toml: not valid TOML")
    out = junk(tmp_path / "run")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TRAIN_OK.replace("OUT", str(out)))
    rc, err = run(capsys, "train", "--config", cfg)
    assert_error(rc, err, "train", f"run.output_dir {out}: is a file; expected a folder")
    # the trained weights would overwrite the student they start from
    student, teacher = junk(tmp_path / "w" / "redmd.safetensors"), junk(tmp_path / "teacher.safetensors")
    emb = embeddings(tmp_path / "p.safetensors", width=64, negative="bad", one="a cat")
    cfg.write_text(
        f"model: {{student: {student}, teacher: {teacher}}}\ndata: {{prompt_embeddings: {emb}}}\n"
        f"run: {{output_dir: {student.parent}, device: cpu}}\n"
    )
    before = snapshot(tmp_path)
    rc, err = run(capsys, "train", "--config", cfg)
    assert_error(rc, err, "train", "run.output_name 'redmd'", "which is the model.student input")
    assert snapshot(tmp_path) == before and loads == []


@pytest.fixture
def models_refused(monkeypatch) -> list[str]:
    """The DiT loads of training refused (the rest of build_trainer runs): what must fail, fails first."""
    calls: list[str] = []

    def refuse(*a, **k):
        calls.append("model")
        raise AssertionError("a DiT was loaded before the checks ended")

    monkeypatch.setattr("rf_core.tiny.random_model", refuse)
    monkeypatch.setattr("rf_core.io.checkpoints.load_dit", refuse)
    return calls


def test_train_files_and_reward_fail_before_the_models_and_name_their_key(tmp_path, capsys, models_refused):
    bad = junk(tmp_path / "bad.safetensors")
    cases = [
        ("data: {prompt_embeddings: BAD}\n", f"data.prompt_embeddings {bad}: not a safetensors file"),
        ("model: {random_preset: tiny, vae: BAD}\n", f"model.vae {bad}: not a safetensors file"),
        (
            "reward: {kind: videoalign, options: {path: nowhere}}\n",
            "reward.kind 'videoalign': nowhere: no model_config.json",
        ),
        ("reward: {kind: 'json:dumps'}\n", "reward.kind 'json:dumps' scores decoded frames: give model.vae"),
    ]
    for extra, needle in cases:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(TRAIN_OK.replace("OUT", str(tmp_path / "run")) + extra.replace("BAD", str(bad)))
        rc, err = run(capsys, "train", "--config", cfg)
        assert_error(rc, err, "train", needle)
    assert models_refused == []


def test_an_earlier_run_is_continued_or_replaced_only_when_asked(tmp_path, capsys):
    out = tmp_path / "run"
    old = junk(out / "checkpoints" / "step_0000050.pt")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TRAIN_OK.replace("OUT", str(out)))
    before = snapshot(tmp_path)
    rc, err = run(capsys, "train", "--config", cfg)
    assert_error(
        rc, err, "train", f"run.output_dir {out}: holds an earlier run ({old})", "--resume", "--overwrite"
    )
    assert snapshot(tmp_path) == before
    rc, err = run(capsys, "train", "--config", cfg, "--overwrite")
    assert rc == 0, err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_0000001.pt"
    ]  # the old run's went
    rc, err = run(
        capsys, "train", "--config", cfg, "--resume"
    )  # run.steps 1: the checkpoint is there already
    assert (
        rc == 0 and "warning: run.steps 1: the checkpoint is at step 1 already, so nothing is trained" in err
    )


def test_train_settings_that_are_not_used_are_said(tmp_path, capsys, monkeypatch):
    def stop(*a, **k):
        raise ValueError("stopped before loading")

    monkeypatch.setattr("rf_core.train.setup.build_trainer", stop)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TRAIN_OK.replace("OUT", str(tmp_path / "run")))
    rc, err = run(
        capsys, "train", "--config", cfg, "--set", "lora.rank=8", "--set", "reward.options={pool: 2}"
    )
    assert rc == 2 and err.splitlines()[:2] == [
        "reward-forcing train: warning: lora.rank not used: lora.enabled is false (full fine-tuning)",
        "reward-forcing train: warning: reward.options ['pool'] not used: reward.kind is none",
    ], err


def test_bad_resume_file_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TRAIN_OK.replace("OUT", str(tmp_path / "run")))
    bad = junk(tmp_path / "bad.pt")
    before = snapshot(tmp_path)
    rc, err = run(capsys, "train", "--config", cfg, "--resume", bad)
    assert_error(rc, err, "train", f"--resume {bad}: ")
    assert snapshot(tmp_path) == before  # nothing written: not even the run's config.yaml


# ----------------------------------------------------------------------------- help


def test_help_teaches_every_flag_with_its_default_and_examples(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit) as done:
        parser.parse_args(["--help"])
    assert done.value.code == 0
    top = capsys.readouterr().out
    assert "rf_core/commands" not in top and "register(" not in top  # no internal docstring
    assert "examples:" in top
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == {"generate", "convert", "download", "train"}
    for name, command in sub.choices.items():
        assert (
            command.description
            and "examples:" in command.epilog
            and f"reward-forcing {name}" in command.epilog
        )
        formatter = HelpFormatter(command.prog)
        for action in command._actions:
            if not action.option_strings or action.dest == "help":
                continue
            text = formatter._get_help_string(action)
            assert action.help and ("(default" in text or "(required)" in text), (name, action.option_strings)
    assert "(default: 16.0)" in sub.choices["generate"].format_help()


# ----------------------------------------------------------------------------- as a real process


def test_real_process_exit_code_and_no_traceback(tmp_path):
    bad = junk(tmp_path / "bad.safetensors")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = ["generate", *TINY, "--prompt", "x", "--lora", bad, "--out", tmp_path / "v.mp4"]
    done = subprocess.run(
        [sys.executable, "-m", "rf_core.cli", *map(str, argv)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(
        f"reward-forcing generate: error: --lora {bad}"
    )
    assert "Traceback" not in done.stderr and "small random model" not in done.stderr  # no shape hint here
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def test_debug_adds_the_traceback(tmp_path, capsys):
    bad = junk(tmp_path / "bad.safetensors")
    argv = ["generate", *TINY, "--prompt", "x", "--lora", bad, "--out", tmp_path / "v.mp4"]
    rc, plain = run(capsys, *argv)
    for debug in (["--debug", *argv], [*argv, "--debug"]):  # before or after the command
        rc_debug, err = run(capsys, *debug)
        assert rc == rc_debug == 2 and "Traceback (most recent call last)" in err
        assert err.splitlines()[-1] == plain.strip()
