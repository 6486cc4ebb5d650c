"""Measuring the peak memory of a training run, to check `finetune.models.memory.estimate` against
(tests/test_models_memory.py and benchmarks/scale_out.py). Not part of the package: it slows training down
on CPU, where it counts every tensor storage.

    from peak_memory import peak_memory_callback
    peak = peak_memory_callback()
    clm.run(recipe, callbacks=[peak]); print(peak.peak)
"""

from __future__ import annotations


def peak_memory_callback():
    """A TrainerCallback measuring the peak bytes of live tensors from train begin to end (`.peak`).

    CUDA: the caching allocator's own peak (`torch.cuda.max_memory_allocated`). CPU has no such
    counter, so a TorchDispatchMode adds up the storages every operation creates and takes them off
    when they are freed (slow: for checking estimates, not for production runs)."""
    import torch
    from transformers import TrainerCallback

    class PeakMemory(TrainerCallback):
        peak = 0

        def on_train_begin(self, args, state, control, model=None, **kw):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
                return
            self.tracker = live_tensor_tracker()
            for tensor in [*model.parameters(), *model.buffers()]:
                self.tracker.add(tensor)
            self.tracker.__enter__()

        def on_train_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                self.peak = torch.cuda.max_memory_allocated()
                return
            self.tracker.__exit__(None, None, None)
            self.peak = self.tracker.peak

    return PeakMemory()


def live_tensor_tracker():
    """A TorchDispatchMode counting the bytes of live tensor storages (`.now`, `.peak`)."""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.weak import WeakIdKeyDictionary

    class LiveTensorBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.sizes = WeakIdKeyDictionary()  # storage -> [bytes], a cell the finaliser reads
            self.now = self.peak = 0

        def add(self, tensor) -> None:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                return
            try:
                storage = tensor.untyped_storage()
            except (RuntimeError, NotImplementedError):  # tensors without storage
                return
            cell = self.sizes.get(storage)
            if cell is None:
                cell = self.sizes[storage] = [0]
                weakref.finalize(storage, self.free, cell)
            n = storage.nbytes()
            self.now += n - cell[0]
            cell[0] = n
            self.peak = max(self.peak, self.now)

        def free(self, cell) -> None:
            self.now -= cell[0]

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in tree_flatten(out)[0]:
                self.add(tensor)
            return out

    return LiveTensorBytes()
