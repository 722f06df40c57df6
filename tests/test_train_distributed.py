"""Two CPU processes (gloo, FSDP2) train exactly like one process with the same global batch."""

import os
import socket

import torch
import torch.multiprocessing as mp
from _train_helpers import tiny_config, tiny_trainer

SECTIONS = dict(
    optim={"batch_size": 1, "eps": 1e-4},
    lora={"enabled": False},
    run={"steps": 3, "save_every": 3},
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    from rf_core.train.distributed import destroy, init_distributed

    info = init_distributed("cpu")
    try:
        trainer = tiny_trainer(tiny_config(out_dir, **SECTIONS), dist=info)
        trainer.train()
        state = trainer.state()  # gathered full tensors (collective)
        ema = trainer.ema.full_state()
        if rank == 0:
            weights = {f"gen.{k}": v for k, v in state["generator"].items()}
            weights.update({f"critic.{k}": v for k, v in state["critic"].items()})
            weights.update({f"ema.{k}": v for k, v in ema.items()})
            queue.put({k: v.numpy().copy() for k, v in weights.items()})
            queue.put([{k: v for k, v in r.items() if k != "seconds"} for r in trainer.history])
    finally:
        destroy(info)


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    """Adam's eps is raised to 1e-4 here: with eps 1e-8 its first steps are sign(g)·lr, so float
    rounding differences of batched vs split matmuls on near-zero gradients flip whole updates."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(tmp_path / "dist"), queue)) for r in range(2)]
    for p in procs:
        p.start()
    weights, history = queue.get(), queue.get()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sections = dict(SECTIONS, optim={**SECTIONS["optim"], "batch_size": 2})
        single = tiny_trainer(tiny_config(tmp_path / "single", **sections))
        initial = {k: p.detach().clone() for k, p in single.gen_params.items()}
        single.train()
    finally:
        torch.set_num_threads(n)
    expected = {f"gen.{k}": p.detach() for k, p in single.gen_params.items()}
    expected.update({f"critic.{k}": p.detach() for k, p in single.critic_params.items()})
    expected.update({f"ema.{k}": v for k, v in single.ema.full_state().items()})
    assert weights.keys() == expected.keys()
    moved = max((single.gen_params[k].detach() - v).abs().max().item() for k, v in initial.items())
    assert moved > 1e-3
    for k, v in expected.items():
        torch.testing.assert_close(torch.from_numpy(weights[k]), v, rtol=0, atol=5e-6, msg=k)
    for got, want in zip(history, single.history):
        for key in ("generator_loss", "critic_loss", "reward", "exit_step"):
            if key in want:
                assert abs(got[key] - want[key]) <= 1e-5 * max(1.0, abs(want[key])), (key, got, want)
