"""Model definitions in Determined's trial API, shared by tests/unit/test_determined_api.py and
tests/integration/test_determined_launchers.py."""

# The digits subset of conftest, built by the trial itself (Determined's loaders).
CONTEXT_HEAD = """
import torch
from torch import nn
from determined.pytorch import DataLoader, LRScheduler, MetricReducer, PyTorchCallback, PyTorchTrial


def datasets():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images[:400] / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target[:400])
    return torch.utils.data.TensorDataset(x[:300], y[:300]), torch.utils.data.TensorDataset(x[300:], y[300:])


def net():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
"""

# GOOD_MODEL_DEF's model, optimizer and data in Determined's API.
CONTEXT_DEF = (
    CONTEXT_HEAD
    + """

class Trial(PyTorchTrial):
    def __init__(self, context):
        self.context = context
        self.model = context.wrap_model(net())
        self.opt = context.wrap_optimizer(torch.optim.SGD(self.model.parameters(), lr=0.1))
        self.train_set, self.val_set = datasets()

    def build_training_data_loader(self):
        return DataLoader(self.train_set, batch_size=self.context.get_per_slot_batch_size(), shuffle=True)

    def build_validation_data_loader(self):
        return DataLoader(self.val_set, batch_size=16)

    def train_batch(self, batch, epoch_idx, batch_idx):
        data, labels = batch
        loss = nn.functional.cross_entropy(self.model(data), labels)
        self.context.backward(loss)
        self.context.step_optimizer(self.opt)
        return {"loss": loss}

    def evaluate_batch(self, batch):
        data, labels = batch
        output = self.model(data)
        return {
            "loss": nn.functional.cross_entropy(output, labels),
            "accuracy": (output.argmax(1) == labels).float().mean(),
        }
"""
)
GAN_DEF = (
    CONTEXT_HEAD
    + """
import os
import signal


class Counter(PyTorchCallback):
    def __init__(self):
        self.calls = {}

    def _count(self, name):
        self.calls[name] = self.calls.get(name, 0) + 1

    def on_training_start(self):
        self._count("training_start")

    def on_training_epoch_start(self, epoch_idx):
        self._count("epoch_start")

    def on_training_epoch_end(self, epoch_idx):
        self._count("epoch_end")

    def on_validation_start(self):
        self._count("validation_start")

    def on_validation_end(self, metrics):
        self._count("validation_end")
        self.last = metrics

    def state_dict(self):
        return dict(self.calls)

    def load_state_dict(self, state):
        self.calls = dict(state)


class Hits(MetricReducer):
    def __init__(self):
        self.reset()

    def reset(self):
        self.hits, self.seen = 0, 0

    def update(self, output, labels):
        self.hits += int((output.argmax(1) == labels).sum())
        self.seen += len(labels)

    def per_slot_reduce(self):
        return self.hits, self.seen

    def cross_slot_reduce(self, per_slot):
        return sum(h for h, _ in per_slot) / sum(s for _, s in per_slot)


class Trial(PyTorchTrial):
    def __init__(self, context):
        self.context = context
        self.a = context.wrap_model(net())
        self.b = context.wrap_model(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
        self.opt_a = context.wrap_optimizer(torch.optim.SGD(self.a.parameters(), lr=0.1, momentum=0.9))
        self.opt_b = context.wrap_optimizer(torch.optim.Adam(self.b.parameters(), lr=0.01))
        context.wrap_lr_scheduler(
            torch.optim.lr_scheduler.StepLR(self.opt_a, step_size=4, gamma=0.5),
            step_mode=LRScheduler.StepMode.STEP_EVERY_BATCH,
        )
        context.wrap_lr_scheduler(
            torch.optim.lr_scheduler.StepLR(self.opt_b, step_size=1, gamma=0.5),
            step_mode=LRScheduler.StepMode.STEP_EVERY_EPOCH,
        )
        self.hits = context.wrap_reducer(Hits(), name="exact_accuracy")
        self.train_set, self.val_set = datasets()

    def build_callbacks(self):
        self.counter = Counter()
        return {"counter": self.counter}

    def build_training_data_loader(self):
        return DataLoader(self.train_set, batch_size=self.context.get_per_slot_batch_size(), shuffle=True)

    def build_validation_data_loader(self):
        return DataLoader(self.val_set, batch_size=16)

    def train_batch(self, batch, epoch_idx, batch_idx):
        kill_at, marker = int(os.environ.get("KILL_AT", "0")), os.environ.get("MARKER", "")
        rank = self.context.distributed.get_rank()
        if batch_idx + 1 == kill_at and rank == 1 and not os.path.exists(marker):
            open(marker, "w").close()  # once: the resumed run goes on
            os.kill(os.getpid(), signal.SIGKILL)
        data, labels = batch
        output_a = self.a(nn.functional.dropout(data, 0.2))
        self.hits.update(output_a, labels)  # a training metric too (for_training defaults to True)
        loss_a = nn.functional.cross_entropy(output_a, labels)
        self.context.backward(loss_a)
        self.context.step_optimizer(self.opt_a)
        loss_b = nn.functional.cross_entropy(self.b(data), labels)
        self.context.backward(loss_b)
        self.context.step_optimizer(self.opt_b)
        return {"loss_a": loss_a, "loss_b": loss_b}

    def evaluate_batch(self, batch):
        data, labels = batch
        output = self.a(data)
        self.hits.update(output, labels)
        return {"accuracy": (output.argmax(1) == labels).float().mean()}
"""
)
