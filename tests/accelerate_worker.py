"""gradsparse under ``accelerate launch`` (MULTI_CPU, gloo), with gradient accumulation.

For tests/multiprocess/test_accelerate.py.

``accelerate launch --cpu --num_processes 2 --mpirun_hostfile HOSTFILE -m tests.accelerate_worker FOLDER``.
Three copies of one model are prepared by the same Accelerator and trained on the same
micro-batches inside ``accelerator.accumulate``: DGC (+ DGCSGD), TopK(1.0) and no hook.
Every rank saves parameters, states and the hook's step count after each micro-batch.
"""

import copy
import os
import sys

import torch
import torch.nn.functional as F
from accelerate import Accelerator

import gradsparse

ACCUMULATE = 4
MICRO_BATCHES = 32  # 8 optimizer steps


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))


def batch(rank, i):
    g = torch.Generator().manual_seed(100 * rank + i)
    x = torch.randn(8, 16, generator=g)
    return x, x[:, :4].argmax(1)


def main(folder):
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATE)
    nets = [make_model() for _ in range(3)]
    opts = [gradsparse.DGCSGD(nets[0].parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4),
            torch.optim.SGD(nets[1].parameters(), lr=0.1), torch.optim.SGD(nets[2].parameters(), lr=0.1)]
    prepared = accelerator.prepare(*nets, *opts)
    models, opts = list(prepared[:3]), list(prepared[3:])
    # on the DDP models prepare returned; the prepared (wrapped) optimizers are checked through the one inside
    states = [gradsparse.ddp.register(models[0], gradsparse.DGC(0.05, warmup=None), optimizer=opts[0],
                                      min_compress_numel=64),
              gradsparse.ddp.register(models[1], gradsparse.TopK(1.0), optimizer=opts[1])]
    iters, syncs = [], []
    for i in range(MICRO_BATCHES + ACCUMULATE):
        if i == MICRO_BATCHES:  # every rank's DGC state into Accelerate's checkpoint, then one more step
            out = {"iters": list(iters), "syncs": list(syncs), "hook_calls": [s.hook_calls for s in states],
                   "history": list(states[0].history), "state": copy.deepcopy(states[0].state_dict()),
                   "params": [{k: v.detach().clone() for k, v in accelerator.unwrap_model(m).state_dict().items()}
                              for m in models]}
            accelerator.register_for_checkpointing(gradsparse.checkpoint.AllRanksState(states[0]))
            accelerator.save_state(os.path.join(folder, "state"))
        x, y = batch(accelerator.process_index, i)
        with accelerator.accumulate(*models):
            for model, opt in zip(models, opts, strict=True):
                accelerator.backward(F.cross_entropy(model(x), y))
                opt.step()
                opt.zero_grad()
            syncs.append(accelerator.sync_gradients)
            iters.append([s.iter for s in states])
    moved = states[0].state_dict()
    accelerator.load_state(os.path.join(folder, "state"))  # each rank takes its own state back
    out["moved_on"] = moved["step"]
    out["restored"] = states[0].state_dict()
    torch.save(out, os.path.join(folder, f"rank{accelerator.process_index}.pt"))
    accelerator.wait_for_everyone()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown (torch 2.13 + gloo aborts there now and then; docs/ddp.md)


if __name__ == "__main__":
    main(sys.argv[1])
