"""The torch.distributed backend in one process (a world of one under Gloo): which backend the environment
chooses, DDP's routing of the trial's own module, no_sync, and the object collectives' round trip."""

import copy
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist

from harness import cli, distributed
from harness.config.optimizations import TrainingOptions
from harness.distributed import torch_ddp, watchdog
from harness.errors import HarnessError, PeerFailure

TORCHRUN = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def _env(monkeypatch, **values):
    for v in ("HARNESS_BACKEND", "HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", *TORCHRUN):
        monkeypatch.delenv(v, raising=False)
    for k, v in values.items():
        monkeypatch.setenv(k, v)


def test_torchrun_environment_chooses_the_torch_backend(monkeypatch):
    _env(monkeypatch, **TORCHRUN)
    assert distributed.chosen_backend() == "torch"
    assert distributed.under_launcher() and distributed.env_rank() == 1


def test_horovod_is_the_default_and_wins_under_its_own_launcher(monkeypatch):
    _env(monkeypatch)
    assert distributed.chosen_backend() == "horovod"
    _env(monkeypatch, **TORCHRUN, OMPI_COMM_WORLD_RANK="0")  # mpirun with MASTER_* left in the environment
    assert distributed.chosen_backend() == "horovod"
    _env(monkeypatch, **TORCHRUN, OMPI_COMM_WORLD_RANK="0", HARNESS_BACKEND="torch")
    assert distributed.chosen_backend() == "torch"


def test_a_bad_backend_name_is_one_line(monkeypatch):
    _env(monkeypatch, HARNESS_BACKEND="nccl")
    with pytest.raises(HarnessError, match=r"HARNESS_BACKEND='nccl': expected 'horovod' or 'torch'"):
        distributed.chosen_backend()


def test_one_torch_rank_needs_no_process_group(monkeypatch):
    _env(monkeypatch, **{**TORCHRUN, "RANK": "0", "WORLD_SIZE": "1"})
    backend = distributed.init()
    assert backend.name == "local" and backend.size == 1 and not dist.is_initialized()


def test_without_horovod_the_error_names_the_torch_backend(monkeypatch):
    _env(monkeypatch, HOROVOD_RANK="0")
    monkeypatch.setitem(sys.modules, "horovod", None)  # import horovod raises ImportError
    monkeypatch.setitem(sys.modules, "horovod.torch", None)
    with pytest.raises(HarnessError) as e:
        distributed.init()
    assert "Horovod cannot be imported" in str(e.value) and "--backend torch" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.fixture
def world_of_one(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _env(monkeypatch, RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = torch_ddp.TorchDistributed()
    yield backend
    backend.shutdown()


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(x)


def test_the_trial_keeps_its_own_module_and_trains_through_ddp(world_of_one):
    torch.manual_seed(0)
    model = Net()
    keys = list(model.state_dict())
    opt = world_of_one.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    assert isinstance(opt, torch.optim.SGD)
    assert isinstance(model, Net) and type(model).__name__ == "Net" and list(model.state_dict()) == keys
    ddp = world_of_one._ddp[id(model)]
    seen = []
    ddp.register_forward_pre_hook(lambda m, a: seen.append("ddp"))
    model(torch.ones(1, 3)).sum().backward()
    assert seen == ["ddp"] and model.calls == 1  # through DDP, and the module's forward once
    with torch.no_grad():
        model(torch.ones(1, 3))
    model.eval()
    model(torch.ones(1, 3))
    assert seen == ["ddp"] and model.calls == 3  # evaluation runs the module as it is
    model.train()
    twin = copy.deepcopy(model)  # an EMA copy: its own forward, not the original's through DDP
    twin.fc.weight.data.zero_()
    assert torch.equal(twin(torch.ones(1, 3)), twin.fc.bias.expand(1, 2))
    assert seen == ["ddp"]


def test_no_sync_accumulates_a_window(world_of_one):
    torch.manual_seed(0)
    model = Net()
    world_of_one.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    ddp = world_of_one._ddp[id(model)]
    x = torch.randn(4, 3)
    with world_of_one.no_sync():
        assert not ddp.require_backward_grad_sync
        model(x).sum().backward()
    assert ddp.require_backward_grad_sync
    once = model.fc.weight.grad.clone()
    model(x).sum().backward()
    assert torch.allclose(model.fc.weight.grad, 2 * once)


def test_objects_with_tensors_travel(world_of_one):
    state = {"rng": torch.get_rng_state(), "step": 3}
    back = world_of_one.broadcast_object(state)
    assert torch.equal(back["rng"], state["rng"]) and back["step"] == 3
    assert world_of_one.allgather_object([1, torch.ones(2)])[0][0] == 1
    assert world_of_one.allreduce_min(torch.tensor([4, 2])).tolist() == [4, 2]
    stop, interval = world_of_one.finish_vote(world_of_one.start_vote(True, 7))
    assert stop and interval == 7


def test_a_broken_gloo_connection_is_another_ranks_failure():
    gloo = (
        "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:6359: Connection "
        "reset by peer. This is typically caused by a remote worker hanging or bugs in the application."
    )
    failure = torch_ddp.peer_failure(RuntimeError(gloo))
    assert isinstance(failure, PeerFailure)
    assert str(failure) == (
        "another rank is gone: a collective lost its connection to it (Connection reset by peer)"
    )
    assert torch_ddp.peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    # A backend error of the trial's own making is not another rank's failure; NCCL's word for one is.
    assert torch_ddp.peer_failure(dist.DistBackendError("Tensors must be contiguous")) is None
    nccl = "NCCL error: remote process exited or there was a network error, NCCL version 2.21.5"
    assert isinstance(torch_ddp.peer_failure(dist.DistBackendError(nccl)), PeerFailure)


def test_any_command_of_the_ranks_reports_a_lost_peer_as_a_consequence(world_of_one, monkeypatch):
    """Training, `harness evaluate`, `export` and Trainer scripts all end in `cli._guarded`: it turns the
    Gloo error into the PeerFailure line, said only if the launcher does not stop this rank first."""
    gloo = "[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:6359: Connection reset by peer."
    failed = []
    monkeypatch.setattr(
        cli,
        "_fail",
        lambda message, code, consequential, output=None: failed.append((message, code, consequential)),
    )

    def evaluating():
        raise RuntimeError(gloo)

    assert cli._guarded(evaluating, None, None) == 1
    assert failed == [
        (
            "PeerFailure: another rank is gone: a collective lost its connection to it "
            "(Connection reset by peer)",
            1,
            True,
        )
    ]
    failed.clear()

    def mistake():
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    cli._guarded(mistake, None, None)
    assert failed == [("RuntimeError: mat1 and mat2 shapes cannot be multiplied", 1, False)]
    failed.clear()
    # Before the process group exists (set-up's rendezvous), a broken connection is this rank's own error.
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    cli._guarded(evaluating, None, None)
    assert failed == [(f"RuntimeError: {gloo}", 1, False)]


class Spare(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(3, 2)
        self.spare = torch.nn.Linear(2, 2)  # never used in forward

    def forward(self, x):
        return self.body(x)


def test_a_parameter_without_gradient_is_one_line_naming_it(world_of_one):
    model = Spare()
    world_of_one.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    model(torch.ones(1, 3)).sum().backward()
    with pytest.raises(HarnessError) as e:
        model(torch.ones(1, 3)).sum().backward()  # DDP finds the last batch's reduction unfinished
    assert "Spare's parameter(s) spare.weight, spare.bias got no gradient" in str(e.value)
    assert "\n" not in str(e.value)


def test_waiting_in_ddps_backward_is_waiting_for_a_peer(world_of_one):
    marker = os.sep + os.path.join("torch", "autograd") + os.sep
    model = Net()
    world_of_one.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    assert marker in watchdog._WAITING_FILES  # the stall watchdog gives the peer its grace


def test_compression_rounds_to_fp16_as_horovod(world_of_one):
    torch.manual_seed(0)
    model = Net()
    options = TrainingOptions(gradient_compression=True)
    world_of_one.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, options)
    x = torch.randn(4, 3) / 3
    model(x).sum().backward()
    compressed = model.fc.weight.grad.clone()
    model.fc.weight.grad = None
    with world_of_one.no_sync():  # no communication: the full-precision gradient
        model(x).sum().backward()
    exact = model.fc.weight.grad
    assert torch.equal(compressed, exact.half().float()) and not torch.equal(compressed, exact)
