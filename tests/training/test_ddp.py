"""Multi-process training through torch.distributed: 2 CPU processes, gloo backend.

Each rank records its local gradient contributions (tensor hooks fire before DDP's all-reduce) and the gradients
the optimizer then used; the test checks that the used gradients are the average of the ranks' local ones, that
ranks drew different samples (per-rank seeds), that the replicas stay identical, and that only rank 0 writes.
"""
import os
import socket
import weakref

import pytest
import torch
import torch.distributed as dist

from utils import join_gloo_group, spawn_workers, torchrun

WORLD = 2


def _worker(rank, init_file, run_dir, out_dir):
    join_gloo_group(rank, WORLD, init_file)
    try:
        from nets import tiny_teacher
        from runs import quiet

        from sidfast.training.loop import distill

        teacher = tiny_teacher(num_classes=3)
        G, fake = tiny_teacher(num_classes=3), tiny_teacher(num_classes=3)
        local = {"G": [], "fake": []}
        for tag, net in (("G", G), ("fake", fake)):
            for i, p in enumerate(net.parameters()):
                p.register_hook(lambda g, tag=tag, i=i: local[tag].append((i, g.detach().clone())))
        used = []

        def grab(state):
            used.append({"G": [p.grad.clone() for p in state["generator"].parameters()],
                         "fake": [p.grad.clone() for p in state["fake"].parameters()],
                         "local": {k: sorted(v, key=lambda t: t[0]) for k, v in local.items()}})
            local["G"], local["fake"] = [], []

        cfg = quiet(run_dir=run_dir, iterations=3, batch=8, lr=1e-3, checkpoint_every=2, log_every=1)
        res = distill(cfg, teacher, generator=G, fake=fake, callbacks=[grab], log=None)
        # interrupted (a callback asks to stop at iteration 2: every rank stops) and resumed == uninterrupted
        part = distill(cfg.replace(run_dir=run_dir + "-part"), tiny_teacher(num_classes=3),
                       callbacks=[lambda s: s["iteration"] == 2], log=None)
        resumed = distill(cfg.replace(run_dir=run_dir + "-part", resume="auto"), tiny_teacher(num_classes=3),
                          log=None)
        bitwise = all(torch.equal(a, b) for x, y in ((res.generator, resumed.generator), (res.fake, resumed.fake),
                                                     (res.generator_ema, resumed.generator_ema))
                      for a, b in zip(x.state_dict().values(), y.state_dict().values()))
        torch.save({"used": used, "part": (part.interrupted, part.iteration), "bitwise": bitwise, "G": res.generator.state_dict(), "ema": res.generator_ema.state_dict(),
                    "fake": res.fake.state_dict(), "iteration": res.iteration, "nimg": res.nimg},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    spawn_workers(_worker, (str(tmp / "init"), str(tmp / "run"), str(tmp)), WORLD)
    return tmp, [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_gradients_are_averaged_over_ranks(ddp_run):
    _, ranks = ddp_run
    for it in range(3):
        for tag in ("G", "fake"):
            per_rank = [[g for _, g in r["used"][it]["local"][tag]] for r in ranks]
            assert all(len(p) == len(ranks[0]["used"][it][tag]) for p in per_rank)  # one local grad per param
            for j, g_used in enumerate(ranks[0]["used"][it][tag]):
                mean = sum(p[j] for p in per_rank) / WORLD
                torch.testing.assert_close(g_used, mean, rtol=1e-5, atol=1e-7)
                assert torch.equal(g_used, ranks[1]["used"][it][tag][j])
            # the ranks drew different samples (per-rank seeds), so their local gradients differ
            assert any(not torch.allclose(a, b) for a, b in zip(*per_rank))


def test_replicas_stay_identical_and_count_the_global_batch(ddp_run):
    _, (r0, r1) = ddp_run
    for key in ("G", "ema", "fake"):
        assert r0[key].keys() == r1[key].keys()
        for k in r0[key]:
            assert torch.equal(r0[key][k], r1[key][k]), (key, k)
    assert r0["iteration"] == r1["iteration"] == 3
    assert r0["nimg"] == 24  # global batch 8 per iteration


def test_interrupted_and_resumed_multi_process_run_is_bitwise_identical(ddp_run):
    _, ranks = ddp_run
    for r in ranks:
        assert r["part"] == ("callback", 2)
        assert r["bitwise"]


def test_torchrun_launch(tmp_path):
    """The path a user runs: torchrun sets the environment and distill() creates the process group itself."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # nets.py
    root = os.path.dirname(tests)  # this checkout, not an installed sidfast
    env.update(PYTHONPATH=os.pathsep.join([root, tests, env.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    run = tmp_path / "run"
    args = ["-m", "sidfast.cli", "distill", "--teacher", "nets:tiny_teacher", "--run-dir", str(run),
            "--iterations", "3", "--batch", "8", "--log-every", "1", "--grid-size", "4", "--teacher-steps", "2",
            "--no-progress", "--device", "cpu"]
    code, out, err = torchrun(args, env, timeout=180)
    assert code == 0, err[-3000:]
    assert out.count("SiD distillation") == 1  # rank 0 alone prints the summary
    data = torch.load(run / "checkpoint.pt", weights_only=True)
    assert (data["world_size"], data["iteration"], data["nimg"]) == (WORLD, 3, 24)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


def _owned_group_worker(rank, ports, run_dir, out_dir, real):
    # the group torchrun describes, made by each distill itself (which ends it too), on a port of its own: a
    # rank that starts the next run early must not meet the other rank's store of the last one
    os.environ.update(MASTER_ADDR="127.0.0.1", WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from nets import tiny_teacher
    from runs import LAYER, quiet

    from sidfast.training import loop
    from sidfast.utils import runtime

    wrappers, alive = [], []
    make_ddp, destroy = runtime.ddp, dist.destroy_process_group

    def ddp(module, device):
        wrapper = make_ddp(module, device)
        wrappers.append(weakref.ref(wrapper))
        return wrapper

    def destroy_process_group(*args, **kwargs):
        alive.append(sum(ref() is not None for ref in wrappers))
        return destroy(*args, **kwargs)

    runtime.ddp, dist.destroy_process_group = ddp, destroy_process_group
    options = [dict(), dict(fake_score="lora", generator="lora", gen_steps=4), dict(engine="fused"),
               dict(method="sida", data=real, disc_layer=LAYER, g_start_kimg=0, gan_start_kimg=0)]
    for i, kw in enumerate(options):
        os.environ["MASTER_PORT"] = str(ports[i])
        loop.distill(quiet(run_dir=f"{run_dir}{i}", iterations=2, batch=4, checkpoint_every=1, lora_rank=2,
                           **kw), tiny_teacher(), log=None)
    # the complete run resumed: nothing to train, the group ended all the same
    os.environ["MASTER_PORT"] = str(ports[-1])
    loop.distill(quiet(run_dir=f"{run_dir}0", iterations=2, batch=4, lora_rank=2, resume="auto"), tiny_teacher(),
                 log=None)
    torch.save({"alive": alive, "made": len(wrappers)}, os.path.join(out_dir, f"owned{rank}.pt"))


def test_ddp_wrappers_are_released_before_the_group_they_hold_ends(tmp_path):
    """A DDP reducer that outlives ``destroy_process_group`` is the last owner of the gloo group: freeing it
    destroys the group with the GIL held, waiting for gloo's worker threads, one of which may wait for the GIL
    to free a finished collective's tensors. One rank of a loaded machine hung there (the feature matrix's DDP
    launch with LoRA networks): every wrapper must be gone before the group ends."""
    from runs import real_images

    sockets = [socket.socket() for _ in range(5)]
    for s in sockets:  # free ports, held together so that they differ
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    real = real_images(tmp_path / "real.npz")
    spawn_workers(_owned_group_worker, (ports, str(tmp_path / "run"), str(tmp_path), real), WORLD)
    for rank in range(WORLD):
        data = torch.load(tmp_path / f"owned{rank}.pt", weights_only=True)
        assert data["made"] == 10  # generator and fake score of each run
        assert data["alive"] == [0] * 5, data


def test_only_rank0_writes_and_the_checkpoint_holds_every_rank_rng(ddp_run):
    tmp, _ = ddp_run
    run = tmp / "run"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3  # one writer, log_every=1
    data = torch.load(run / "checkpoint.pt", weights_only=True)
    assert data["world_size"] == WORLD and len(data["rng"]) == WORLD
    assert not torch.equal(data["rng"][0]["torch"], data["rng"][1]["torch"])
