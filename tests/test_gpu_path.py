"""The GPU path's set-up, checked where no GPU is: fp32 logits under bf16 autocast, the
deterministic mode's environment, the process-group backend that takes offloaded (CPU) gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_distributed

from flip_scale import loss as loss_module
from flip_scale import runtime


def test_logits_are_fp32_under_bf16_autocast(monkeypatch):
    seen = []
    cross_entropy = F.cross_entropy

    def spy(logits, labels, *args, **kwargs):
        seen.append(logits.dtype)
        return cross_entropy(logits, labels, *args, **kwargs)

    monkeypatch.setattr(loss_module.F, "cross_entropy", spy)
    generator = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(4, 8, generator=generator), dim=-1).bfloat16()
    text = F.normalize(torch.randn(4, 8, generator=generator), dim=-1).bfloat16()
    scale = torch.tensor(4.6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # Under autocast a plain matmul of fp32 tensors is bf16: the case the loss must escape.
        assert (image.float() @ text.float().t()).dtype == torch.bfloat16
        value = loss_module.ContrastiveLoss()(image, text, scale)
    assert seen == [torch.float32, torch.float32]
    assert value.dtype == torch.float32
    exact = loss_module.contrastive_loss_rows(image.double(), text.double(), image.double(), text.double(),
                                              scale.double(), 0)
    assert abs(value.item() - exact.item()) < 1e-5


def _deterministic_off():
    torch.use_deterministic_algorithms(False)


def test_deterministic_setup_without_cuda_sets_no_variable(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    env = {}
    try:
        assert runtime.configure_determinism(True, "auto", env) == {}
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        _deterministic_off()
    assert env == {}
    assert runtime.configure_determinism(False, "auto", env) == {} and not torch.are_deterministic_algorithms_enabled()


def test_deterministic_setup_with_cuda_sets_the_cublas_workspace(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # nothing below touches the device
    try:
        env = {}
        assert runtime.configure_determinism(True, "auto", env) == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
        assert env == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
        env = {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}  # the user's value is kept
        assert runtime.configure_determinism(True, "cuda", env) == {} and env["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
        env = {}
        assert runtime.configure_determinism(True, "cpu", env) == {} and env == {}  # train.device=cpu
        with pytest.raises(ValueError, match="CUBLAS_WORKSPACE_CONFIG=:0:0: cuBLAS is deterministic only with"):
            runtime.configure_determinism(True, "cuda", {"CUBLAS_WORKSPACE_CONFIG": ":0:0"})
    finally:
        _deterministic_off()


def test_a_workspace_cublas_would_not_make_deterministic_is_a_config_error():
    from flip_scale.config import ConfigError
    from flip_scale.preflight import check_determinism

    cfg = _engine_cfg("train.deterministic=true", "train.device=auto")
    with pytest.raises(ConfigError, match=r"CUBLAS_WORKSPACE_CONFIG=:1:1: .* :4096:8 or :16:8"):
        check_determinism(cfg, {"CUBLAS_WORKSPACE_CONFIG": ":1:1"})
    for env in ({}, {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}):
        check_determinism(cfg, env)
    check_determinism(_engine_cfg("train.deterministic=false"), {"CUBLAS_WORKSPACE_CONFIG": ":1:1"})
    check_determinism(_engine_cfg("train.deterministic=true"), {"CUBLAS_WORKSPACE_CONFIG": ":1:1"})  # train.device=cpu


# ----------------------------------------------------------------------------- offloaded gradient norms


def test_process_group_backend_takes_cpu_tensors_beside_nccl():
    from flip_scale.config import ParallelConfig
    from flip_scale.distributed import needs_cpu_collectives, process_group_backend

    assert process_group_backend("cuda", cpu_collectives=True) == "cpu:gloo,cuda:nccl"
    assert process_group_backend("cuda") == "nccl" and process_group_backend("cpu", True) == "gloo"
    assert needs_cpu_collectives(ParallelConfig(cpu_offload=True))
    assert not needs_cpu_collectives(ParallelConfig()) and not needs_cpu_collectives(ParallelConfig(engine="deepspeed"))


def _offloaded_and_plain_norms(rank: int, world_size: int) -> dict:
    import dataclasses

    import torch.distributed as dist

    from flip_scale.loss import ContrastiveLoss
    from flip_scale.models.registry import arch_from_config
    from flip_scale.parallel import ParallelDims, build_model_parts, total_grad_norm
    from flip_scale.step import forward_backward
    from test_parallel import GLOBAL_BATCH, global_batch, tiny_config

    norms, backends, devices, prefetch = {}, set(), set(), False
    for offload in (False, True):
        cfg = tiny_config(dp_shard=world_size, cpu_offload=offload)
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, grad_accum_steps=2))
        dims = ParallelDims.from_config(cfg.parallel, world_size, arch_from_config(cfg.model), GLOBAL_BATCH, 2)
        dims.build_mesh("cpu")
        backends |= {str(dist.get_backend(dims.dp_group)), str(dist.get_backend(dims.mesh.get_group("dp_shard")))}
        (model,), _ = build_model_parts(cfg, dims, torch.device("cpu"))
        images, tokens, noise = global_batch(0, cfg.model)
        rows = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
        forward_backward(model, ContrastiveLoss(dims.dp_group), images[rows], tokens[rows], noise[rows], microbatches=2)
        norms[offload] = total_grad_norm(list(model.parameters()), dims).item()
        blocks = list(model.visual.blocks.values())
        prefetch = (blocks[0]._get_fsdp_state()._states_to_forward_prefetch == [blocks[1]._get_fsdp_state()]
                    and blocks[1]._get_fsdp_state()._states_to_backward_prefetch == [blocks[0]._get_fsdp_state()])
        if offload:
            devices |= {p.grad.to_local().device.type for p in model.parameters() if hasattr(p.grad, "to_local")}
    return dict(norms=norms, backends=backends, devices=devices, prefetch=prefetch)


@pytest.mark.slow
def test_offloaded_gradient_norm_under_a_cpu_gloo_group_equals_the_plain_one():
    # The process group as `init_distributed` makes it for CPU offload on CUDA, with its CPU half only
    # (this machine has no GPU): each mesh axis must inherit it and the offloaded norm must reduce on it.
    results = run_distributed(_offloaded_and_plain_norms, 2, timeout=120, backend="cpu:gloo")
    for result in results:
        assert all("gloo" in backend for backend in result["backends"]), result["backends"]
        assert result["devices"] == {"cpu"}
        assert result["prefetch"]  # explicit FSDP2 prefetch along the block sequence (parallel/fsdp.py)
        assert result["norms"][True] == pytest.approx(result["norms"][False], rel=1e-6), result["norms"]
    assert results[0]["norms"] == results[1]["norms"]


# ----------------------------------------------------------------------------- the skip decided on the device


def _engine_cfg(*overrides):
    from flip_scale.config import load_config

    return load_config(None, ["train.global_batch_size=8", "logging.tensorboard=false", "train.device=cpu",
                              "train.precision=fp32", "optim.fused=true", "optim.lr=1e-3", *overrides])


def test_the_skip_on_the_device_steps_exactly_as_the_host_skip():
    # PyTorch's fused AdamW runs on the CPU too: the CUDA path (found_inf) is the same code here.
    from flip_scale.engine import build_engine
    from flip_scale.preflight import plan_run

    cfg = _engine_cfg()
    host, device = (build_engine(cfg, plan_run(cfg, 1), "cpu") for _ in range(2))
    assert not host.skip_on_device  # a CPU run keeps the host decision
    device.skip_on_device = True
    generator = torch.Generator().manual_seed(0)
    for poisoned in (False, True, False, True):
        grads = [torch.randn(p.shape, generator=generator) for p in host.parameters()]
        if poisoned:
            grads[1].view(-1)[0] = float("nan")
        results = []
        for engine in (host, device):
            for param, grad in zip(engine.parameters(), grads):
                param.grad = grad.clone()
            results.append(engine.clip_and_step())
        assert isinstance(results[1].skipped, torch.Tensor) and bool(results[1].skipped) == results[0].skipped == poisoned
        assert results[0].lr == results[1].lr and host.lr == device.lr
        for a, b in zip(host.parameters(), device.parameters()):
            assert torch.equal(a, b)
    steps = [[float(s["step"]) for s in opt.state.values()] for opt in (host.optimizers.optimizers[0],
                                                                          device.optimizers.optimizers[0])]
    assert steps[0] == steps[1] and set(steps[0]) == {2.0}  # two applied steps of four


def test_the_trainer_counts_device_skips_at_log_steps(tmp_path):
    from flip_scale.distributed import ProcessInfo
    from flip_scale.metrics import StepMetrics
    from flip_scale.train import Trainer

    cfg = _engine_cfg("optim.max_nonfinite_steps=1", "train.log_every_steps=100", "train.max_steps=100")
    trainer = Trainer(cfg, tmp_path, ProcessInfo(0, 1, 0, torch.device("cpu")), with_data=False)
    trainer.engine.skip_on_device = True
    arch, generator = trainer.arch, torch.Generator().manual_seed(0)
    metrics = StepMetrics(cfg, trainer.dims, trainer.device, 1, 1.0, "fp32", 0)

    def step(poisoned=False):
        images = torch.randn(8, 3, arch.image_size, arch.image_size, generator=generator)
        if poisoned:
            images[3] = float("nan")
        tokens = torch.randint(4, arch.vocab_size, (8, arch.context_length), generator=generator)
        out = trainer.train_step({"images": images, "tokens": tokens})
        trainer.state.step += 1
        metrics.add(out["loss"], out["skipped_step"], 0, 0.0)
        return out

    losses = [step()["loss"], step(poisoned=True)["loss"], step()["loss"]]
    assert trainer.state.nonfinite_steps == 0  # not read yet
    values, _ = metrics.collect(3)
    assert values["loss"] == pytest.approx((float(losses[0]) + float(losses[2])) / 2)  # the skipped one left out
    trainer.settle_nonfinite()
    assert trainer.state.nonfinite_steps == 1 and trainer.state.nonfinite_in_a_row == 0
    step(poisoned=True)
    step(poisoned=True)
    with pytest.raises(FloatingPointError, match="non-finite for 2 steps in a row, more than optim.max_nonfinite_steps=1"):
        trainer.settle_nonfinite()
    assert trainer.state.nonfinite_steps == 3
    trainer.close()


def _device_and_host_skip_under_fsdp(rank: int, world_size: int) -> list:
    import torch.distributed as dist

    from flip_scale.engine import build_engine
    from flip_scale.preflight import plan_run

    cfg = _engine_cfg(f"parallel.dp_shard={world_size}")
    host, device = (build_engine(cfg, plan_run(cfg, world_size), "cpu") for _ in range(2))
    device.skip_on_device = True
    generator = torch.Generator().manual_seed(rank)
    skipped, equal = [], []
    for poisoned in (False, True, False):
        for engine in (host, device):
            generator.manual_seed(100 * rank + len(skipped))
            for param in engine.parameters():
                local = param.to_local() if hasattr(param, "to_local") else param
                grad = torch.randn(local.shape, generator=generator)
                if poisoned and rank == 1 and local.numel():
                    grad.view(-1)[0] = float("nan")
                if hasattr(param, "to_local"):
                    from torch.distributed.tensor import DTensor

                    grad = DTensor.from_local(grad, param.device_mesh, param.placements, run_check=False)
                else:
                    dist.broadcast(grad, 0)  # replicated (the temperature): equal on every rank
                param.grad = grad
        results = [host.clip_and_step(), device.clip_and_step()]
        skipped.append((results[0].skipped, bool(results[1].skipped)))
        equal.append(all(torch.equal(a.to_local(), b.to_local()) if hasattr(a, "to_local") else torch.equal(a, b)
                         for a, b in zip(host.parameters(), device.parameters())))
    return [skipped, equal]


@pytest.mark.slow
def test_the_skip_on_the_device_under_fsdp_on_every_rank():
    # ZeRO-3 over 2 ranks (DTensor parameters, the fused kernel with a plain 0-dim found_inf); the NaN
    # sits on rank 1 only, and both ranks skip.
    for skipped, equal in run_distributed(_device_and_host_skip_under_fsdp, 2, timeout=120):
        assert skipped == [(False, False), (True, True), (False, False)] and all(equal), (skipped, equal)


def test_host_agreements_run_on_cpu_tensors_over_the_host_group(monkeypatch):
    # Under NCCL the preemption flag goes over the gloo host group on a CPU tensor: the hosts sync,
    # the GPU's queue is not drained (a CUDA flag tensor read back by .item() would drain it).
    import torch.distributed as dist

    seen = []
    monkeypatch.setattr(runtime, "_world_size", lambda group=None: 2)
    # Where NCCL would want the tensor (CUDA): asked for only when no host group takes it.
    monkeypatch.setattr(runtime, "collective_device", lambda: seen.append("collective_device") or torch.device("cpu"))
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op=None, group=None: seen.append((tensor.device, group)))
    monkeypatch.setattr(runtime, "host_group", lambda: "host")
    runtime.any_rank(True)
    assert seen == [(torch.device("cpu"), "host")]
    runtime.all_ranks(False, group="dp")  # a named group keeps the default group's device
    assert seen[1:] == ["collective_device", (torch.device("cpu"), "dp")]


def test_init_distributed_makes_a_gloo_host_group_beside_plain_nccl(monkeypatch):
    from flip_scale import distributed

    made, host = [], []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(distributed, "slurm_launch_env", lambda env: None)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: made.append(("init", kw["backend"])))
    monkeypatch.setattr(distributed.dist, "new_group", lambda **kw: made.append(("new_group", kw["backend"])) or "gloo")
    monkeypatch.setattr(distributed, "set_host_group", host.append)
    for offload in (False, True):
        monkeypatch.setattr(distributed, "pick_device", lambda setting, local: torch.device("cuda", 0))
        monkeypatch.setattr(distributed.torch.cuda, "set_device", lambda device: None)
        distributed.init_distributed("cuda", 1, cpu_collectives=offload)
    assert made == [("init", "nccl"), ("new_group", "gloo"), ("init", "cpu:gloo,cuda:nccl")]
    assert host[0] == "gloo" and host[1] is distributed.dist.group.WORLD  # the default group's gloo half


def test_the_loop_reads_nothing_back_from_the_device_between_log_steps(tmp_path, monkeypatch):
    # From step 1's log to step 5's (5 saves): no host read of a tensor in flip_scale's code but the
    # preemption agreement's after steps 1-4 (a CPU tensor over the host group, checked above); the
    # world is faked at 2 ranks so that agreement runs.
    import sys
    from pathlib import Path

    import torch.distributed as dist

    from flip_scale.distributed import ProcessInfo
    from flip_scale.train import Trainer

    package = str(Path(runtime.__file__).parent)
    cfg = _engine_cfg("train.log_every_steps=100", "train.max_steps=5", "checkpoint.every_steps=0",
                      "eval.at_end=false", "eval.every_steps=0")
    trainer = Trainer(cfg, tmp_path, ProcessInfo(0, 1, 0, torch.device("cpu")), with_data=False)
    trainer.engine.skip_on_device = True
    arch, generator = trainer.arch, torch.Generator().manual_seed(0)
    trainer.loader = [{"images": torch.randn(8, 3, arch.image_size, arch.image_size, generator=generator),
                       "tokens": torch.randint(4, arch.vocab_size, (8, arch.context_length), generator=generator)}
                      for _ in range(5)]
    armed, reads = [False], []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name):
            caller = sys._getframe(1).f_code
            if armed[0] and caller.co_filename.startswith(package):
                reads.append((_name, caller.co_name, Path(caller.co_filename).name))
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, spy)
    log_step, save = trainer.log_step, trainer.save

    def logged(*args, **kwargs):
        armed[0] = False
        result = log_step(*args, **kwargs)
        armed[0] = True
        return result

    def saved(*args, **kwargs):
        armed[0] = False
        return save(*args, **kwargs)

    monkeypatch.setattr(trainer, "log_step", logged)
    monkeypatch.setattr(trainer, "save", saved)
    monkeypatch.setattr(runtime, "_world_size", lambda group=None: 2)
    monkeypatch.setattr(runtime, "host_group", lambda: "host")
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op=None, group=None: None)
    assert trainer.fit()["step"] == 5
    assert reads == [("item", "_agree", "runtime.py")] * 4, reads
    trainer.close()


def test_fsdp_casts_weights_only_for_the_precision_the_step_resolves_to(monkeypatch):
    """train.precision=auto on a GPU without bf16 runs fp32 (no autocast): FSDP must not cast the weights to
    bf16 for it; with bf16 it takes parallel.param_dtype / reduce_dtype; the CPU is always fp32."""
    from flip_scale.config import load_config
    from flip_scale.parallel import mixed_precision_dtypes

    cuda = torch.device("cuda")
    auto = load_config("configs/tiny.yaml", ["train.precision=auto"])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert runtime.resolve_precision(auto, cuda) == "fp32"
    assert mixed_precision_dtypes(auto, cuda) == (torch.float32, torch.float32)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert mixed_precision_dtypes(auto, cuda)[0] == torch.bfloat16
    assert mixed_precision_dtypes(load_config("configs/tiny.yaml", ["train.precision=bf16"]), "cpu") == \
        (torch.float32, torch.float32)


def test_host_tensors_reach_cuda_through_pinned_memory_without_a_host_stall(monkeypatch):
    """The step's mask noise is made on the host (the same under every layout): it goes to a GPU through
    page-locked memory with non_blocking=True, since a copy from pageable memory waits for the GPU's queue
    (checked without a GPU: the calls are recorded); on the CPU it is a plain `.to`."""
    calls = []
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self, *a: False)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a: calls.append("pin") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: calls.append(("to", str(a[0]), k)) or self)
    runtime.host_to_device(torch.zeros(2), torch.device("cuda", 0))
    assert calls == ["pin", ("to", "cuda:0", {"non_blocking": True})]
    calls.clear()
    runtime.host_to_device(torch.zeros(2), "cpu")
    assert calls == [("to", "cpu", {})]
    calls.clear()  # a tensor already off the host (here: meta) cannot be page-locked: a plain `.to`
    runtime.host_to_device(torch.zeros(2, device="meta"), torch.device("cuda", 0))
    assert calls == [("to", "cuda:0", {})]


def test_the_trainer_sends_its_mask_noise_through_host_to_device(tmp_path, monkeypatch):
    from flip_scale import trainer as trainer_module
    from flip_scale.config import load_config
    from flip_scale.distributed import init_distributed, shutdown

    sent = []
    real = trainer_module.host_to_device
    monkeypatch.setattr(trainer_module, "host_to_device", lambda t, d: sent.append(tuple(t.shape)) or real(t, d))
    cfg = load_config("configs/tiny.yaml", ["train.device=cpu", "train.global_batch_size=4", "logging.tensorboard=false",
                                            "model.vocab_size=512"])
    proc = init_distributed("cpu")
    try:
        trainer = trainer_module.Trainer(cfg, tmp_path, proc, with_data=False)
        trainer.mask_noise(0, torch.arange(4))
    finally:
        shutdown()
    assert sent == [(4, trainer.arch.num_patches)]
