"""Run a script as plain `python` runs it on a machine with several GPUs, on this CPU:

    python tests/simulate_gpus.py 2 train.py --smoke ...

The Trainer sees n_gpu = 2 and wraps the model in nn.DataParallel, which here does what the real one does to
the inputs: every tensor argument is cut along dim 0 into one chunk a GPU (index tensors too), the module runs on
each chunk, and the outputs are gathered (tensors concatenated along dim 0, scalars stacked into a vector).
(On a CPU, the real nn.DataParallel passes the whole batch through, which would hide the split.)
"""

import os
import runpy
import sys

import torch
from transformers import TrainingArguments
from transformers.utils import ModelOutput

GPUS = int(sys.argv[1])


def split(value, n: int) -> list:
    """What scatter gives each replica: a tensor's chunk along dim 0; anything else as it is."""
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return list(value.chunk(n, dim=0))
    return [value] * n


def gather(outputs: list):
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat([out.reshape(1) if out.dim() == 0 else out for out in outputs])
    if isinstance(first, ModelOutput):
        return type(first)(**{key: gather([out[key] for out in outputs]) for key in first.keys()})
    if isinstance(first, (tuple, list)):
        return type(first)(gather(list(parts)) for parts in zip(*outputs))
    return first


class SplitDataParallel(torch.nn.DataParallel):
    def __init__(self, module, device_ids=None, output_device=None, dim=0):
        torch.nn.Module.__init__(self)
        self.module, self.device_ids, self.dim = module, list(range(GPUS)), 0

    def forward(self, *inputs, **kwargs):
        chunks = max(1, min(GPUS, *(v.shape[0] for v in [*inputs, *kwargs.values()]
                                    if isinstance(v, torch.Tensor) and v.dim() > 0)))
        args = list(zip(*(split(value, chunks) for value in inputs))) or [()] * chunks
        parts = [dict(zip(kwargs, values)) for values in zip(*(split(value, chunks) for value in kwargs.values()))]
        return gather([self.module(*a, **k) for a, k in zip(args, parts or [{}] * chunks)])


TrainingArguments.n_gpu = property(lambda self: GPUS)
torch.nn.DataParallel = SplitDataParallel
sys.argv = sys.argv[2:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))  # as `python SCRIPT` puts the script's dir first
runpy.run_path(sys.argv[0], run_name="__main__")
