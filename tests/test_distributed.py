"""Two gloo processes on CPU train exactly what one process trains with the same global batch."""
import socket

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nsa.model import PRESETS
from nsa.train import TrainConfig, Trainer

TINY = PRESETS["tiny"].replace(n_layer=1)


def _corpus():
    rng = np.random.default_rng(1)
    data = rng.integers(32, 127, 30000).astype(np.uint8)
    return data[:27000], data[27000:]


def _cfg(out):
    return TrainConfig(steps=3, batch_size=4, seq_len=128, passkey_rows=2, eval_every=3, eval_batches=1,
                       warmup=1, device="cpu", out_dir=out)


def _worker(rank, world, port, out, result):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        tr = Trainer(TINY, _cfg(out), corpus=_corpus(), log=None)
        h = tr.fit()
        if rank == 0:
            torch.save(([p.detach().clone() for p in tr.model.parameters()], [r["loss"] for r in h]), result)
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = tmp_path / "ddp.pt"
    mp.start_processes(_worker, args=(2, port, str(tmp_path / "ddp"), str(result)), nprocs=2, join=True,
                       start_method="spawn")
    params_ddp, losses_ddp = torch.load(result)
    one = Trainer(TINY, _cfg(str(tmp_path / "one")), corpus=_corpus(), log=None)
    losses_one = [r["loss"] for r in one.fit()]
    np.testing.assert_allclose(losses_ddp, losses_one, rtol=1e-5)
    for a, b in zip(params_ddp, one.model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
