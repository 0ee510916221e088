"""What both contenders of tests/gpu/amp_bench.py train, and the probe that measures them from outside.

Both the harness (through model_def.py in this folder) and the hand-written loop (tests/gpu/amp_loop.py)
import this module, so the network, its initialisation, the data, the optimizer and the loader settings are
the same by construction; both read their sizes from the same experiment config.

- ``ResNet18``: torchvision's ResNet-18 layout (BasicBlocks [2, 2, 2, 2], widths 64-128-256-512: 11.2 M
  parameters at ``width: 64``) with the CIFAR stem (3x3 convolution, stride 1, no max-pool) for small images.
  It takes uint8 images and normalises them itself, so the loaders move a quarter of the bytes.
- ``datasets``: synthetic, fixed-seed images: a smooth random pattern per class plus uniform noise, so the
  task is learnable (the loss falls within a few dozen batches) and nothing is downloaded.
- The probe (armed when ``AMP_BENCH_OUT`` is set): stamps the start of every training forward pass (a CUDA
  event on the GPU, so nothing is synchronised for it; ``perf_counter`` on the CPU). Training samples/s:
  the records of the batches from the first one after the warm-up to the one before the last, over the time
  between the first one's stamp and the last batch's (on the GPU stream, every step of those batches comes
  before that stamp). Forward passes are stamped rather than optimizer steps because the GradScaler skips
  ``optimizer.step()`` after an inf/NaN gradient, so a step hook would miss batches. At the first
  ``model.eval()`` after training (validation) the probe writes ``$AMP_BENCH_OUT/probe.json``: the rate;
  the peak GPU memory of steady training (``torch.cuda.max_memory_allocated``/``max_memory_reserved``
  since the end of the warm-up, so without cuDNN's autotuning workspaces); the autocast state and the
  network's output dtype in the first training forward pass (what the contender really ran). It writes
  the file again at exit, adding the peak since the warm-up over the whole run (validation included).
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

SEED = 42
NUM_CLASSES = 10

# Both contenders import this module before building anything: cuDNN picks its fastest algorithms alike.
torch.backends.cudnn.benchmark = True


# ----------------------------------------------------------------------------------------------------------
# The network.


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for small images; input uint8 (N, 3, H, W), output logits (N, classes)."""

    def __init__(self, width: int = 64, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        layers: List[nn.Module] = []
        cin = width
        for i, blocks in enumerate((2, 2, 2, 2)):
            cout = width * 2**i
            for b in range(blocks):
                layers.append(BasicBlock(cin, cout, 2 if (i > 0 and b == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            PROBE.training_forward(x)
        x = (x.float() - 127.5) / 64.0  # uint8 -> roughly zero mean, unit range, on the device
        out = self.head(self.layers(self.stem(x)))
        if self.training:
            PROBE.first_output(out)
        return out

    def train(self, mode: bool = True) -> ResNet18:
        PROBE.mode_switch(mode)
        return super().train(mode)


def build_model(hparams: Dict[str, Any]) -> ResNet18:
    """The network; every contender calls it right after seeding torch with the experiment seed."""
    return ResNet18(width=int(hparams["width"]))


def build_optimizer(model: nn.Module, hparams: Dict[str, Any]) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        model.parameters(),
        lr=float(hparams["learning_rate"]),
        momentum=0.9,
        weight_decay=float(hparams.get("weight_decay", 5e-4)),
    )


# ----------------------------------------------------------------------------------------------------------
# The data.


def _images(
    templates: torch.Tensor, n: int, generator: torch.Generator, noise: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    size = templates.shape[-1]
    labels = torch.randint(NUM_CLASSES, (n,), generator=generator)
    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    for start in range(0, n, 1024):  # in chunks: float32 noise for all records at once would be large
        stop = min(n, start + 1024)
        x = (1 - noise) * templates[labels[start:stop]]
        x += noise * torch.rand(stop - start, 3, size, size, generator=generator)
        images[start:stop] = (x * 255).round().to(torch.uint8)
    return images, labels


def datasets(data: Dict[str, Any]) -> Tuple[torch.utils.data.TensorDataset, torch.utils.data.TensorDataset]:
    """(training, validation) TensorDatasets of uint8 images (3, size, size) and int64 labels, from the
    config's ``data`` keys: image_size, train_records, validation_records, noise, seed."""
    size = int(data["image_size"])
    g = torch.Generator().manual_seed(int(data.get("seed", 0)))
    coarse = torch.rand(NUM_CLASSES, 3, max(2, size // 8), max(2, size // 8), generator=g)
    templates = nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    noise = float(data.get("noise", 0.5))
    train = _images(templates, int(data["train_records"]), g, noise)
    val = _images(templates, int(data["validation_records"]), g, noise)
    return torch.utils.data.TensorDataset(*train), torch.utils.data.TensorDataset(*val)


def loader_kwargs(data: Dict[str, Any], device_type: str) -> Dict[str, Any]:
    """DataLoader settings both contenders use: ``num_workers`` from the config (workers keep the collation
    of the next batches off the training thread), pinned memory on CUDA."""
    workers = int(data.get("num_workers", 0))
    kw: Dict[str, Any] = {"num_workers": workers, "pin_memory": device_type == "cuda"}
    if workers:
        kw["persistent_workers"] = True
    return kw


# ----------------------------------------------------------------------------------------------------------
# The probe.


def _autocast_state(device_type: str) -> Tuple[bool, Optional[torch.dtype]]:
    """(autocast on?, its dtype or None) for `device_type`; torch < 2.4 has only the per-device functions."""
    try:
        on = torch.is_autocast_enabled(device_type)
        return on, (torch.get_autocast_dtype(device_type) if on else None)
    except (TypeError, AttributeError):
        if device_type == "cuda":
            on = torch.is_autocast_enabled()
            return on, (torch.get_autocast_gpu_dtype() if on else None)
        on = torch.is_autocast_cpu_enabled()
        return on, (torch.get_autocast_cpu_dtype() if on else None)


_RANK_VARS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "RANK")  # RANK: torchrun


class Probe:
    def __init__(self) -> None:
        self.out = os.environ.get("AMP_BENCH_OUT")
        self.warmup = int(os.environ.get("AMP_BENCH_WARMUP", "0"))
        self.forwards = 0  # training forward passes so far
        self.timed_records = 0  # records of the timed batches (after the warm-up, before the last one)
        self._pending_records = 0  # the records of the batch whose forward started last
        self.cuda = False
        self._start: Any = None  # the stamp at the first timed forward (CUDA event or perf_counter)
        self._last: Any = None  # the stamp at the latest forward
        self.first_forward: Dict[str, Any] = {}
        self.training_done = False
        self.train_wall: Optional[Tuple[float, float]] = None
        self.result: Dict[str, Any] = {}
        self.extra: Dict[str, Any] = {}
        if self.out:
            atexit.register(self.write)

    def _stamp(self, previous: Any = None) -> Any:
        if self.cuda:
            event = previous if previous is not None else torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def training_forward(self, x: torch.Tensor) -> None:
        if not self.out:
            return
        self.forwards += 1
        if self.forwards == 1:
            self.cuda = x.is_cuda
            autocast, dtype = _autocast_state(x.device.type)
            self.first_forward = {
                "input_device": str(x.device),
                "autocast_dtype": str(dtype).replace("torch.", "") if dtype else None,
                "grad_enabled": torch.is_grad_enabled(),
            }
            self.training_done = False
        if self.forwards == self.warmup + 1:
            if self.cuda:  # the peak of steady training, without cuDNN's autotuning in the warm-up
                torch.cuda.reset_peak_memory_stats()
            self._start = self._stamp()
            self._last = self._stamp()  # a second event: re-recorded from now on
            self.train_wall = (time.time(), time.time())
        elif self.forwards > self.warmup + 1:
            self.timed_records += self._pending_records
            self._last = self._stamp(self._last)
            self.train_wall = (self.train_wall[0], time.time())  # type: ignore[index]
        self._pending_records = int(x.shape[0])

    def first_output(self, out: torch.Tensor) -> None:
        if self.out and self.forwards == 1 and "output_dtype" not in self.first_forward:
            self.first_forward["output_dtype"] = str(out.dtype).replace("torch.", "")

    def mode_switch(self, training: bool) -> None:
        if self.out and not training and self.forwards and not self.training_done:
            self.training_done = True
            self._finish_training()
            self.write()

    def _finish_training(self) -> None:
        seconds = None
        if self._start is not None and self.timed_records:
            if self.cuda:
                torch.cuda.synchronize()
                seconds = self._start.elapsed_time(self._last) / 1e3
            else:
                seconds = self._last - self._start
        self.result.update(
            forwards=self.forwards,
            warmup=self.warmup,
            timed_batches=max(0, self.forwards - self.warmup - 1),
            timed_records=self.timed_records,
            train_seconds=seconds,
            samples_per_s=(self.timed_records / seconds) if seconds else None,
        )
        if self.cuda:
            self.result.update(
                peak_train_allocated_mib=torch.cuda.max_memory_allocated() / 2**20,
                peak_train_reserved_mib=torch.cuda.max_memory_reserved() / 2**20,
            )

    def write(self) -> None:
        if not self.out:
            return
        if self.forwards and not self.training_done:  # no validation came: training ended at exit
            self.training_done = True
            self._finish_training()
        result = dict(self.result)
        result.update(
            pid=os.getpid(),
            first_forward=self.first_forward,
            max_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            torch=torch.__version__,
            torch_threads=torch.get_num_threads(),
            **self.extra,
        )
        if self.cuda:
            result.update(
                device_name=torch.cuda.get_device_name(),
                peak_allocated_mib=torch.cuda.max_memory_allocated() / 2**20,
                peak_reserved_mib=torch.cuda.max_memory_reserved() / 2**20,
                cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version(),
            )
        os.makedirs(self.out, exist_ok=True)
        rank = next((int(os.environ[v]) for v in _RANK_VARS if v in os.environ), 0)
        path = os.path.join(self.out, "probe.json" if rank == 0 else f"probe-rank{rank}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(path + ".tmp", path)


PROBE = Probe()
