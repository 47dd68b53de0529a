"""
test_all.py: invariant tests of train.py and the four paper scripts (python -m pytest test_all.py).
Tiny models, fixed seeds: under a minute on 2 CPU cores. `-k <script>` runs one script's tests;
`-m gpu` runs each script's command line with --gpu on a CUDA machine (skipped without one).
"""
import ast, contextlib, copy, dataclasses, importlib.util, itertools, json, math, os, random, re
import runpy, shutil, signal
import subprocess, sys, tempfile, threading, warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import train
from train import TrainConfig, TransformerLM, parse_config
import diffusion_vs_ar as dva
import fisher_ood as fo
import hnet_rl as hr
import subliminal_dpo as sd

torch.set_num_threads(1)  # tiny tensors; 2 threads on a shared 2-core box only add contention
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
ROOT = Path(__file__).resolve().parent
warnings.filterwarnings("ignore", category=pytest.PytestUnknownMarkWarning)  # `gpu`: no pytest.ini
# the jobs' --out; child processes that import this file share it
SCRATCH = Path(os.environ.get("TEST_ALL_SCRATCH") or tempfile.mkdtemp(prefix="test_all."))
os.environ["TEST_ALL_SCRATCH"] = str(SCRATCH)


class Job:
    """One command line run as a user runs it, in its own process; result() -> (exit code,
    stderr). interrupt_when: once all these strings are on its stderr, a terminal's Ctrl-C
    (SIGINT to its process group) reaches it."""

    def __init__(self, args, interrupt_when=()):
        self.process = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        start_new_session=True)
        self.err, self.waiting = "", list(interrupt_when)
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self):
        while chunk := os.read(self.process.stderr.fileno(), 4096):
            self.err += chunk.decode(errors="replace")
            if self.waiting and all(text in self.err for text in self.waiting):
                self.waiting = []
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGINT)

    def result(self, timeout=150):
        self.process.wait(timeout)
        self.reader.join(timeout)
        return self.process.returncode, self.err


def run_as_script(script, argv, capsys):
    """`python <script> <argv>` in this process, its `__main__` block included: (exit code,
    stderr). For input refused before any work, where a new interpreter would only cost time."""
    code = 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [script, *argv])
        try:
            runpy.run_path(str(ROOT / script), run_name="__main__")
        except SystemExit as e:
            code = e.code
    return code, capsys.readouterr().err


def ddp_job(rank):
    return ["-c", f"import test_all\ntest_all.ddp_worker({rank}, 2, {str(SCRATCH / 'ddp')!r})"]


TINY_HNET = ["--n_embd=16", "--n_head=2", "--n_main=1", "--seq_len=128", "--batch_size=4",
             "--warmup=2", "--eval_windows=2", "--threads=1"]
SUBLIMINAL_TINY = ["--threads=1", "--seeds=1", "--rounds=1", "--n_layer=1", "--n_head=2",
                   "--n_embd=16", "--pretrain_steps=2", "--pretrain_batch=4", "--judge_steps=1",
                   "--prompts=32", "--eval_prompts=4", "--conditions=random labels DPO"]
SEEDS_STEPS_ROUNDS = ("--seeds", "--pretrain_steps", "--rounds")
JOBS = {  # name -> (command line, the tests that read its result[, stderr that triggers Ctrl-C])
    "train_ctrl_c": (["-c", "import train\ndef main():\n raise KeyboardInterrupt\ntrain.cli(main)"],
                     ["test_train_ctrl_c_outside_the_loop_is_one_line"]),
    "ddp0": (ddp_job(0), ["test_train_two_ranks_equal_one_process",
                          "test_train_two_ranks_equal_one_process_for_every_script"]),
    "ddp1": (ddp_job(1), ["test_train_two_ranks_equal_one_process",
                          "test_train_two_ranks_equal_one_process_for_every_script"]),
    "subliminal_ctrl_c": ([
        "subliminal_dpo.py",
        *[a for a in SUBLIMINAL_TINY if a.split("=")[0] not in SEEDS_STEPS_ROUNDS],
        "--seeds=2", "--workers=2", "--rounds=50", "--pretrain_steps=2000",
        f"--out={SCRATCH}/subliminal_ctrl_c"],
        ["test_subliminal_ctrl_c_with_seeds_in_worker_processes_is_one_line"],
        ["pretrain entangled base (seed 0)", "pretrain entangled base (seed 1)"]),
    # each kind of hnet_rl method compiled in one process (aot_eager stands in for inductor)
    "hnet_compare": (["hnet_rl.py", "--methods=rl hnet space bpe", "--seeds=1", "--compile",
                      "--compile_backend=aot_eager", *TINY_HNET, "--max_steps=12",
                      "--eval_every=12", f"--out={SCRATCH}/compare"],
                     ["test_hnet_rl_compare_compiles_each_kind_of_method_once"]),
}


@pytest.fixture(scope="session")
def jobs(request):
    """The first test that reads a job starts every job the selected tests read: they run on the
    other core beside the suite (`-k hnet` starts only hnet's, `-m gpu` none)."""
    selected = {item.originalname for item in request.session.items}
    started = {name: Job(args, *more) for name, (args, readers, *more) in JOBS.items()
               if selected & set(readers)}
    yield started
    for job in started.values():
        job.process.kill()
    shutil.rmtree(SCRATCH, ignore_errors=True)

# ---- train.py: config and command line

@dataclasses.dataclass
class ToyConfig(TrainConfig):
    width: int = 16  # model width (90% of it)
    name: str = "toy"  # a string flag


def test_train_config_parses_typed_values():
    argv = ["--lr=0.01", "--gpu", "--max_steps", "7", "--resume=false", "--name=x"]
    cfg = parse_config(ToyConfig, "toy", argv)
    assert (cfg.lr, cfg.gpu, cfg.max_steps, cfg.resume, cfg.name) == (0.01, True, 7, False, "x")
    assert cfg.out == os.path.join("out", "toy") and isinstance(cfg.lr, float)


@pytest.mark.parametrize("argv", [
    ["--lr=-1"], ["--nope=1"], ["--max_steps=1.5"], ["--gpu=maybe"], ["--compile_backend=magic"],
    ["--grad_accum=0"], ["--lr=nan"], ["--lr=inf"], ["--seed=4294967296"], ["--beta2=1"],
    ["--log_every=0"], ["--max_step=3"], ["--nam=x"], [f"--out={ROOT / 'README.md'}"],
    [f"--out={ROOT / 'README.md' / 'sub'}"]])
def test_train_config_rejects_bad_values(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(ToyConfig, "toy", argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and "error" in err  # one line, no usage


def test_train_fill_auto_picks_the_scale_being_run():
    for gpu, threads in [(False, 1), (True, 8)]:
        cfg = TrainConfig(gpu=gpu, max_steps=7)
        train.fill_auto(cfg, threads=(1, 8), max_steps=(100, 1000))
        assert (cfg.threads, cfg.max_steps) == (threads, 7)  # a value the user gave stays


def test_train_to_host_turns_scalars_into_floats_at_once():
    values = dict(a=torch.tensor(3), b=torch.tensor(0.5, dtype=torch.bfloat16), c=2, d=1.25)
    assert train.to_host(values) == dict(a=3.0, b=0.5, c=2.0, d=1.25)


def test_train_help_text_comes_from_field_comments(capsys):
    with pytest.raises(SystemExit):
        parse_config(ToyConfig, "toy", ["--help"])
    out = capsys.readouterr().out
    assert "model width (90% of it)" in out and "peak learning rate" in out


def test_train_bad_flag_is_one_line(tmp_path, capsys):
    code, err = run_as_script("train.py", ["--bench", "--lr=-3"], capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    if not torch.cuda.is_available():  # --gpu without CUDA: one line, before any work
        with pytest.raises(SystemExit) as e:
            train.setup(TrainConfig(out=str(tmp_path), gpu=True))
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.startswith("error:") and err.count("\n") == 1


def test_train_ctrl_c_outside_the_loop_is_one_line(jobs):
    code, err = jobs["train_ctrl_c"].result()
    assert code == 130 and err.strip() == "error: interrupted"

# ---- train.py: the shared Transformer

@pytest.mark.parametrize("causal", [True, False])
def test_train_block_causality_by_perturbation(causal):
    torch.manual_seed(0)
    model = TransformerLM(11, 2, 2, 16, causal=causal).eval()
    x = torch.randint(0, 11, (2, 12))
    y = x.clone()
    y[:, 7:] = (y[:, 7:] + 1) % 11  # change every token from position 7 on
    a, b = model(x), model(y)
    if causal:
        torch.testing.assert_close(a[:, :7], b[:, :7])  # the past never sees the future
    else:
        assert not torch.allclose(a[:, :7], b[:, :7])  # bidirectional: it does


def test_train_kv_cache_generation_matches_full_forward():
    torch.manual_seed(0)
    model = TransformerLM(13, 2, 2, 16).eval()
    x = torch.randint(0, 13, (3, 9))
    caches = [{} for _ in model.blocks]
    parts = [model(x[:, :4], caches), model(x[:, 4:6], caches)]  # a chunk after a past: the mask
    parts += [model(x[:, t:t + 1], caches) for t in range(6, 9)]
    torch.testing.assert_close(torch.cat(parts, 1), model(x), atol=1e-5, rtol=1e-5)


def test_train_rope_positions_are_relative():
    # RoPE makes attention scores depend on position differences only: shifting all positions
    # (as hnet_rl does with byte positions of chunks) leaves a causal block's output unchanged.
    torch.manual_seed(0)
    block = train.Block(16, 2).eval()
    x, pos = torch.randn(1, 6, 16), torch.arange(6)
    shifted = block(x, *train.rope_angles(pos + 40, 8))
    torch.testing.assert_close(block(x, *train.rope_angles(pos, 8)), shifted, atol=1e-4, rtol=1e-4)


def test_train_rope_eager_and_compiled_formulas_agree(monkeypatch):
    x = torch.randn(2, 3, 5, 8)
    cos, sin = train.rope_angles(torch.arange(5) * 3, 8)
    eager = train.apply_rope(x, cos, sin)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(train.apply_rope(x, cos, sin), eager)
    torch.testing.assert_close(eager.norm(dim=-1), x.norm(dim=-1))  # a rotation keeps norms

# ---- train.py: the loop

def toy_setup(tmp_path, **over):
    kw = dict(out=str(tmp_path), max_steps=6, warmup=2, batch_size=4, lr=1e-2, log_every=1,
              threads=1)
    cfg = TrainConfig(**{**kw, **over})
    ctx = train.setup(cfg)
    torch.manual_seed(0)
    model = TransformerLM(8, 1, 2, 16)

    def get_batch(i):  # deterministic in i: what makes resume exact
        g = torch.Generator().manual_seed(1000 + i)
        return torch.randint(0, 8, (cfg.batch_size, 9), generator=g)

    def loss_fn(m, x):
        logits = m(x[:, :-1])
        noise = torch.randn(()) * 1e-3  # the global RNG, which the checkpoint must restore
        loss = F.cross_entropy(logits.reshape(-1, 8), x[:, 1:].reshape(-1)) + noise
        return loss, {"items": torch.tensor(x.numel())}

    return cfg, ctx, model, get_batch, loss_fn


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_train_lr_schedule_endpoints():
    cfg = TrainConfig(lr=1.0, warmup=4, max_steps=20, min_lr_ratio=0.1)
    assert train.lr_at(0, cfg) == 0.25 and train.lr_at(3, cfg) == 1.0
    assert train.lr_at(4, cfg) == pytest.approx(1.0) and train.lr_at(20, cfg) == pytest.approx(0.1)


def test_train_loss_falls_and_checkpoint_round_trips(tmp_path):
    cfg, ctx, model, get_batch, loss_fn = toy_setup(tmp_path, max_steps=30)
    fixed = get_batch(0)
    out = train.train(model, lambda i: fixed, loss_fn, cfg, ctx)
    assert out["history"][-1]["loss"] < out["history"][0]["loss"] - 0.3
    saved = train.load_saved(tmp_path / "ckpt.pt")
    assert saved["step"] == 30 and saved["config"]["max_steps"] == 30
    fresh = TransformerLM(8, 1, 2, 16)
    fresh.load_state_dict(saved["model"])
    assert same_weights(fresh, model)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_train_stopped_then_resumed_equals_uninterrupted(tmp_path, signum):
    # Ctrl-C, or SIGTERM (what cluster schedulers send): the step ends, is saved, exit 130
    cfg, ctx, reference, get_batch, loss_fn = toy_setup(tmp_path / "a")
    train.train(reference, get_batch, loss_fn, cfg, ctx)
    cfg, ctx, model, get_batch, loss_fn = toy_setup(tmp_path / "b")

    def stopped(i):  # the signal arrives while step 3 is running
        if i == 3:
            os.kill(os.getpid(), signum)
        return get_batch(i)
    with pytest.raises(SystemExit) as e:
        train.train(model, stopped, loss_fn, cfg, ctx)
    assert e.value.code == 130 and train.load_saved(tmp_path / "b" / "ckpt.pt")["step"] == 4
    cfg, ctx, model, _, _ = toy_setup(tmp_path / "b", resume=True)
    torch.manual_seed(123)  # resume must not depend on the RNG state it starts from
    train.train(model, get_batch, loss_fn, cfg, ctx)
    assert same_weights(reference, model)


def test_train_resume_restores_only_this_gpus_rng_state(tmp_path, monkeypatch):
    # A checkpoint written on a machine with 2 GPUs, resumed on one with 1: each process saves and
    # restores the CUDA RNG state of its own device only. (Simulated: CUDA's RNG calls are fakes
    # that refuse a device index the machine does not have, as CUDA does.)
    gpus, states = [2], {}

    def check(device):
        index = device if isinstance(device, int) else torch.device(device).index or 0
        if index >= gpus[0]:
            raise RuntimeError(f"CUDA error: invalid device ordinal {index}")
        return index

    def set_all(saved):
        for i, state in enumerate(saved):
            set_one(state, i)

    def set_one(state, device="cuda"):
        states[check(device)] = state
    state = lambda i: torch.full((8,), i, dtype=torch.uint8)
    cuda = dict(is_available=lambda: True, device_count=lambda: gpus[0],
                get_rng_state=lambda device="cuda": state(check(device)),
                get_rng_state_all=lambda: [state(i) for i in range(gpus[0])],
                set_rng_state=set_one, set_rng_state_all=set_all, max_memory_allocated=lambda *a: 0)
    for name, fake in cuda.items():
        monkeypatch.setattr(torch.cuda, name, fake)
    cfg, ctx, model, get_batch, loss_fn = toy_setup(tmp_path, max_steps=2)
    ctx = dataclasses.replace(ctx, gpu=True, device=torch.device("cpu"))
    monkeypatch.setattr(ctx.__class__, "autocast", lambda self: contextlib.nullcontext())
    train.train(model, get_batch, loss_fn, cfg, ctx)
    gpus[0] = 1
    cfg, _, model, _, _ = toy_setup(tmp_path, max_steps=2, resume=True)
    assert train.train(model, get_batch, loss_fn, cfg, ctx)["steps"] == 2 and list(states) == [0]


def test_train_syncs_with_the_device_only_at_log_steps(tmp_path, monkeypatch):
    # Every .item(), float() or bool() of a tensor is one aten._local_scalar_dense: on a GPU, a
    # host sync. 12 steps logged every 6: a few syncs per log step, none in between (the metrics,
    # items included, stay on the device). Fused AdamW keeps its step counts on the device too.
    class CountSyncs(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))
    cfg, ctx, model, get_batch, loss_fn = toy_setup(tmp_path, max_steps=12, log_every=6)
    fused = lambda model, cfg, ctx: torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=True)
    monkeypatch.setattr(train, "make_optimizer", fused)
    with CountSyncs() as syncs:
        train.train(model, get_batch, loss_fn, cfg, ctx, ckpt_path=False, quiet=True)
    assert syncs.count <= 2 * 3, syncs.count


def test_train_batch_is_split_over_accumulation_not_multiplied(tmp_path):
    seen = []
    cfg, ctx, one, get_batch, _ = toy_setup(tmp_path / "a", max_steps=3, batch_size=8)

    def loss_fn(m, x):
        seen.append(len(x))
        return F.cross_entropy(m(x[:, :-1]).reshape(-1, 8), x[:, 1:].reshape(-1)), {}
    train.train(one, get_batch, loss_fn, cfg, ctx)
    cfg4, ctx, four, _, _ = toy_setup(tmp_path / "b", max_steps=3, batch_size=8, grad_accum=4)
    calls = []
    train.train(four, lambda i: calls.append(i) or get_batch(i), loss_fn, cfg4, ctx)
    assert seen == [8] * 3 + [2] * 12 and calls == [0, 1, 2]  # one global batch per step, cut in 4
    for a, b in zip(one.parameters(), four.parameters()):  # the same algorithm, less memory
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_train_batch_that_does_not_divide_or_is_partial_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # refused in setup(), before any work
        toy_setup(tmp_path, batch_size=6, grad_accum=4)
    assert e.value.code == 2 and "--batch_size=6 must divide" in capsys.readouterr().err
    cfg, ctx, model, get_batch, loss_fn = toy_setup(tmp_path, batch_size=4, grad_accum=2)
    partial = lambda i: get_batch(i)[:3 if i == 2 else 4]  # an epoch's last, partial batch
    with pytest.raises(SystemExit) as e:
        train.cli(lambda: train.train(model, partial, loss_fn, cfg, ctx))
    err = capsys.readouterr().err.replace("\r", "\n").splitlines()  # the bar, then one line
    assert e.value.code == 1 and err[-1] == "error: get_batch gave 3 rows, not --batch_size=4"


def nan_at_step_3(get_batch, loss_fn):
    def batches(i):
        x = get_batch(i)
        x[0, 0] = -1 if i == 3 else x[0, 0]  # marks the step whose loss is nan
        return x

    def loss(m, x):
        if x[0, 0] == -1:
            return loss_fn(m, x.clamp(min=0))[0] * float("nan"), {}
        return loss_fn(m, x)
    return batches, loss


def test_train_nan_stops_in_one_line_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    over = dict(ckpt_every=2, log_every=5, max_steps=8)
    cfg, ctx, model, get_batch, loss_fn = toy_setup(tmp_path, **over)
    batches, loss = nan_at_step_3(get_batch, loss_fn)
    with pytest.raises(SystemExit) as e:
        train.train(model, batches, loss, cfg, ctx)
    err = capsys.readouterr().err
    assert e.value.code == 1 and "nan or inf by step 4" in err and "last good checkpoint" in err
    saved = train.load_saved(tmp_path / "ckpt.pt")  # checked at step 4 (a save step): not saved
    assert saved["step"] == 2 and all(torch.isfinite(v).all() for v in saved["model"].values())


def test_train_compile_matches_eager_and_never_recompiles(tmp_path):
    torch.manual_seed(0)
    model, x = TransformerLM(8, 1, 2, 16), torch.randint(0, 8, (2, 9))
    fast = train.maybe_compile(model, TrainConfig(compile=True, compile_backend="aot_eager"))
    loss = lambda m: F.cross_entropy(m(x[:, :-1]).reshape(-1, 8), x[:, 1:].reshape(-1))
    torch.testing.assert_close(loss(fast), loss(model))
    counters = torch._dynamo.utils.counters["stats"]
    for run in "ab":  # two runs in one process each compile afresh, once
        cfg, ctx, model, get_batch, loss_fn = toy_setup(tmp_path / run, max_steps=4, compile=True,
                                                        compile_backend="aot_eager")
        before = counters["unique_graphs"]
        train.train(model, get_batch, loss_fn, cfg, ctx, ckpt_path=False)
        assert counters["unique_graphs"] - before == 1
    torch._dynamo.reset()


def test_train_resume_refuses_another_runs_checkpoint(tmp_path, capsys):
    cfg, ctx, model, get_batch, loss_fn = toy_setup(tmp_path, max_steps=6)
    train.train(model, get_batch, loss_fn, cfg, ctx)
    capsys.readouterr()
    # --max_steps stretches the cosine: a 6-step run resumed to 12 is not a 12-step run
    for over, expect in [(dict(lr=1e-3), "--lr 0.01 -> 0.001"),
                         (dict(batch_size=2), "--batch_size"),
                         (dict(max_steps=12), "--max_steps 6 -> 12")]:
        cfg2, ctx, model2, _, _ = toy_setup(tmp_path, **{"max_steps": 6, **over}, resume=True)
        with pytest.raises(SystemExit) as e:
            train.train(model2, get_batch, loss_fn, cfg2, ctx)
        err = capsys.readouterr().err
        assert e.value.code == 2 and expect in err and err.count("\n") == 1, err
    cfg3, ctx, model3, _, _ = toy_setup(tmp_path, resume=True, log_every=3, ckpt_every=2)
    assert train.train(model3, get_batch, loss_fn, cfg3, ctx)["steps"] == 6  # run control is free


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_train_damaged_checkpoint_is_one_line(tmp_path, capsys, damage):
    cfg, ctx, model, get_batch, loss_fn = toy_setup(tmp_path, max_steps=2)
    train.train(model, get_batch, loss_fn, cfg, ctx)
    path = tmp_path / "ckpt.pt"
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw[len(raw) // 3: len(raw) // 3 + 4096] = b"\xff" * 4096
    path.write_bytes(bytes(raw))
    capsys.readouterr()
    cfg2, ctx, model2, _, _ = toy_setup(tmp_path, max_steps=3, resume=True)
    with pytest.raises(SystemExit) as e:
        train.cli(lambda: train.train(model2, get_batch, loss_fn, cfg2, ctx))
    err = capsys.readouterr().err
    assert e.value.code == 1 and "is damaged" in err and err.count("\n") == 1, err


def test_train_full_disk_names_the_file_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg, ctx, model, get_batch, loss_fn = toy_setup(tmp_path, max_steps=4, ckpt_every=2)
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):  # torch's zip writer reports a full disk as a RuntimeError
        if isinstance(obj, dict) and obj.get("step") == 4:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1024")
        return real_save(obj, f, *a, **kw)
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(train.DataError, match=r"could not write .*ckpt\.pt: \[enforce fail"):
        train.train(model, get_batch, loss_fn, cfg, ctx)
    assert train.load_saved(tmp_path / "ckpt.pt")["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left

    def no_space(f):
        f.write(b"{")
        raise OSError(28, "No space left on device")
    with pytest.raises(train.DataError, match="results.json: .*No space"):
        train.atomic_write(tmp_path / "results.json", no_space)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_train_quiet_run_without_checkpoint_writes_nothing(tmp_path, capsys):
    cfg, ctx, model, get_batch, loss_fn = toy_setup(tmp_path / "q", max_steps=2)
    train.train(model, get_batch, loss_fn, cfg, ctx, ckpt_path=False, quiet=True)
    assert not (tmp_path / "q").exists() and "steps in" not in capsys.readouterr().out


def ddp_worker(rank, world, tmp):
    """One 2-rank gloo launch (seconds) serves both DDP tests: the engine's toy run, then one step
    of every script's own model and loss. The ranks meet through a file in tmp."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    Path(tmp).mkdir(parents=True, exist_ok=True)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank,
                                         world_size=world)
    cfg, ctx, model, get_batch, _ = toy_setup(Path(tmp) / "ddp", max_steps=2, warmup=1,
                                              batch_size=12, grad_accum=3)
    draws = []

    def loss_fn(m, x):
        draws.append(float(torch.rand(())))  # in-model noise: must differ between ranks
        stat = hr.global_mean(x[:, 0].float())  # a statistic over the global batch
        return F.cross_entropy(m(x[:, :-1]).reshape(-1, 8), x[:, 1:].reshape(-1)), {"stat": stat}
    out = train.train(model, get_batch, loss_fn, cfg, ctx)
    assert (getattr(sys.stdout, "name", "") == os.devnull) == (rank > 0)  # one report: rank 0's
    torch.save(dict(state=model.state_dict(), draws=draws, stat=out["history"][-1]["stat"]),
               f"{tmp}/ddp.pt.{rank}")
    states = {name: one_script_step(name, Path(tmp) / name.replace(":", "_")) for name in CASES}
    torch.save(states, Path(tmp) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_runs(jobs):
    for rank in range(2):
        code, err = jobs[f"ddp{rank}"].result()
        assert code == 0, err
    return SCRATCH / "ddp"


def test_train_two_ranks_equal_one_process(tmp_path, ddp_runs):
    over = dict(max_steps=2, warmup=1, batch_size=12)
    cfg, ctx, model, get_batch, _ = toy_setup(tmp_path / "one", **over)
    loss_fn = lambda m, x: (F.cross_entropy(m(x[:, :-1]).reshape(-1, 8), x[:, 1:].reshape(-1)), {})
    train.train(model, get_batch, loss_fn, cfg, ctx)
    r0, r1 = (torch.load(ddp_runs / f"ddp.pt.{r}") for r in (0, 1))
    for k, v in model.state_dict().items():  # 2 ranks x 3 micro-steps x 2 rows = 1 x 12 rows
        torch.testing.assert_close(r0["state"][k], v, atol=1e-6, rtol=1e-5)
        assert torch.equal(r0["state"][k], r1["state"][k])
    # the last micro-step of step 1: rank 0 had rows 8-9 and rank 1 rows 10-11 of the global batch
    assert r0["stat"] == r1["stat"] == pytest.approx(float(get_batch(1)[8:12, 0].float().mean()))
    assert r0["draws"] != r1["draws"] and len(set(r0["draws"])) == len(r0["draws"])

# ---- train.py: results, data, bench

def test_train_results_json_and_figure(tmp_path):
    cfg = TrainConfig(out=str(tmp_path), threads=1)
    ctx = train.setup(cfg)
    d = json.loads(train.save_results(cfg, ctx, {"metric": 1.5}).read_text())
    assert d["metric"] == 1.5 and d["config"]["lr"] == cfg.lr and d["torch"] == torch.__version__
    fig = train.save_figure(tmp_path / "f.png", lambda plt: plt.plot([1, 2]) and None)
    assert fig is None or fig.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.png", "results.json"][1 - bool(fig):]


def test_train_t_interval_matches_the_table_and_covers_at_its_level():
    table = {(1, .95): 12.706, (2, .95): 4.303, (4, .95): 2.776, (10, .95): 2.228, (30, .95): 2.042,
             (100, .95): 1.984, (5, .99): 4.032, (15, .99): 2.947, (1, .99): 63.657}  # a t table
    for (df, level), t in table.items():
        assert abs(train.t_quantile(df, level) - t) < 1e-3
    # the interval covers the true mean in 95% of 4-seed experiments (the normal 1.96: ~86%)
    g = np.random.default_rng(0)
    hits = [abs(m) <= h for m, h in (train.mean_interval(g.normal(size=4)) for _ in range(4000))]
    assert 0.94 < np.mean(hits) < 0.96
    # an error all seeds share (one test set) adds in quadrature and is all one seed can show
    m, h = train.mean_interval([1.0, 3.0], shared_se=2.0)
    assert m == 2.0 and h == pytest.approx(12.706 * math.sqrt(2.0 / 2 + 4.0), abs=1e-2)
    assert math.isnan(train.mean_interval([3.0])[1])
    assert train.mean_interval([3.0], shared_se=0)[1] == 0  # a known zero error
    assert train.mean_interval([3.0], shared_se=0.5)[1] == pytest.approx(0.98, abs=1e-3)


def test_train_embedded_corpus_split_is_deterministic_and_disjoint():
    train_text, val = train.embedded_text("train"), train.embedded_text("val")
    assert len(train_text) > 300_000 and len(val) > 10_000 and val not in train_text
    assert train.embedded_text("val") == val


def test_train_downloads_are_checked_and_nothing_bad_is_kept(tmp_path, monkeypatch):
    src = tmp_path / "src.txt"
    src.write_bytes(b"hello world\n" * 100)
    import hashlib
    good = "sha256:" + hashlib.sha256(src.read_bytes()).hexdigest()
    data = tmp_path / "data"
    for name, url, digest, problem in [("bad", src.as_uri(), "sha256:" + "0" * 64, "sha256 is not"),
                                       ("gone", (tmp_path / "no.txt").as_uri(), good, "by hand")]:
        monkeypatch.setitem(train.DATASETS, name, (url, digest))
        with pytest.raises(train.DataError, match=problem):
            train.download(name, data)
        assert not data.exists() or list(data.iterdir()) == []  # no partial or bad file
    monkeypatch.setitem(train.DATASETS, "good", (src.as_uri(), good))
    assert train.download("good", data).read_bytes() == src.read_bytes()
    src.unlink()  # cached: a second call does not fetch again
    assert train.download("good", data) == data / "good.txt"
    assert all(len(digest.split(":")[1]) in (32, 64) for _, digest in train.DATASETS.values())


def test_train_bench_times_a_nanogpt_style_reference_with_its_own_loss(tmp_path, capsys):
    # upstream nanoGPT's forward without targets returns only the last position's logits
    (tmp_path / "model.py").write_text(
        "import torch.nn.functional as F\nfrom dataclasses import dataclass\nimport train\n"
        "@dataclass\nclass GPTConfig:\n    block_size: int\n    vocab_size: int\n    n_layer: int\n"
        "    n_head: int\n    n_embd: int\n    dropout: float\n    bias: bool\n"
        "class GPT(train.TransformerLM):\n    def __init__(self, c):\n"
        "        super().__init__(c.vocab_size, c.n_layer, c.n_head, c.n_embd)\n"
        "    def forward(self, idx, targets=None):\n        logits = super().forward(idx)\n"
        "        if targets is None:\n            return logits[:, -1:], None\n"
        "        return logits, F.cross_entropy(logits.flatten(0, 1), targets.view(-1))\n")
    argv = ["--bench", "--size=tiny", "--rounds=2", "--max_steps=1", "--threads=1",
            f"--reference={tmp_path}/model.py"]
    train.bench(parse_config(train.BenchConfig, "train", argv))
    out = capsys.readouterr().out
    assert "nanoGPT" in out and "ours / nanoGPT tokens/s: median" in out
    with pytest.raises(SystemExit) as e:  # an unknown size: one line, before any work
        parse_config(train.BenchConfig, "train", ["--bench", "--size=huge"])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1


# ---- diffusion_vs_ar.py

DVA_V, DVA_L = 3, 3


# (27, 3) every sequence
DVA_ALL_X = torch.tensor(list(itertools.product(range(DVA_V), repeat=DVA_L)))


def dva_tiny_net(kind, seed=0, sharpen=0.0):
    """A 1-layer, 8-wide trunk; sharpen > 0 redraws the output layer with that std, so the toy
    distribution is far from uniform (GPT-2 init gives nearly uniform outputs)."""
    cfg = dva.Config(widths="8", n_layer=1, n_head=2, seed=seed)
    net = dva.build(kind, cfg, DVA_V, 8).eval()
    if sharpen:
        with torch.no_grad():
            gen = torch.Generator().manual_seed(seed + 1)
            net.lm_head.weight.normal_(0, sharpen, generator=gen)
    return net


def dva_toy_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(len(DVA_ALL_X), generator=g, dtype=torch.float64)
    return torch.softmax(logits, 0)  # (27,)


def dva_exact_denoiser(p_data):
    """The true conditionals: logits[b, l, v] = log p(x_l = v | the unmasked tokens of z_b)."""
    def model(z):
        out = torch.full((*z.shape, DVA_V + 1), -1e9, dtype=torch.float64)
        for b, row in enumerate(z):
            keep = ((DVA_ALL_X == row) | (row == DVA_V)).all(1)  # consistent with the unmasked
            w = p_data * keep
            for l in range(DVA_L):
                out[b, l, :DVA_V] = torch.stack([w[DVA_ALL_X[:, l] == v].sum()
                                                 for v in range(DVA_V)]).log()
        return out
    return model


def dva_nelbo_exact(model, x):
    """The k-form NELBO in nats per sequence over every masked subset: sum_k (1/k) mean_S."""
    total = torch.zeros(len(x), dtype=torch.float64)
    for k in range(1, DVA_L + 1):
        subsets = list(itertools.combinations(range(DVA_L), k))
        for S in subsets:
            masked = torch.zeros(x.shape, dtype=torch.bool)
            masked[:, list(S)] = True
            nll = dva.masked_nll(model, x, masked, DVA_V)
            total += nll.double().sum(1) / k / len(subsets)
    return total


def dva_any_order_nll(model, x):
    """-log p_theta(x) of the continuous-time sampler: a uniform mixture over the L! orders."""
    logps = []
    for order in itertools.permutations(range(DVA_L)):
        lp, z = torch.zeros(len(x), dtype=torch.float64), torch.full_like(x, DVA_V)
        for l in order:
            logp = model(z)[..., :DVA_V].double().log_softmax(-1)
            lp += logp[torch.arange(len(x)), l, x[:, l]]
            z[:, l] = x[:, l]
        logps.append(lp)
    logps = torch.stack(logps)  # (L!, B)
    # the NLL, and the expected NLL of one order
    return -(torch.logsumexp(logps, 0) - math.log(len(logps))), -logps.mean(0)


def test_dva_exact_denoiser_nelbo_equals_nll():
    p = dva_toy_data()
    nelbo = dva_nelbo_exact(dva_exact_denoiser(p), DVA_ALL_X)
    assert torch.allclose(nelbo, -p.log(), atol=1e-5)


@torch.no_grad()
def test_dva_nelbo_bounds_sampler_nll_and_entropy():
    net, p = dva_tiny_net("mdlm", sharpen=1.0), dva_toy_data()
    nelbo, (nll, order_nll) = dva_nelbo_exact(net, DVA_ALL_X), dva_any_order_nll(net, DVA_ALL_X)
    assert abs(float(torch.exp(-nll).sum()) - 1) < 1e-5  # the sampler's distribution is normalised
    assert (nelbo >= nll - 1e-5).all() and (nelbo - nll).max() > 1e-3  # a bound, not a tight one
    # the k-form is exactly the expected NLL over random unmasking orders (Jensen gives the bound)
    assert torch.allclose(nelbo, order_nll, atol=1e-5)
    assert float((p * nelbo).sum()) >= float(-(p * p.log()).sum())  # E_data NELBO >= H(p_data)


@torch.no_grad()
def test_dva_t_form_and_k_form_agree_in_expectation():
    net = dva_tiny_net("mdlm", sharpen=1.0)
    x = DVA_ALL_X[[5, 17]]
    exact = dva_nelbo_exact(net, x) / DVA_L  # nats/token
    torch.manual_seed(0)
    rows = x.repeat(20000, 1)
    times = dva.antithetic_times(len(rows), 1e-3, "cpu")
    est_t = dva.mdlm_nelbo_at(net, rows, DVA_V, times).double().view(-1, 2)
    kform = [dva.nelbo_kform(net, x[i:i + 1], DVA_V, 4000, torch.Generator().manual_seed(i), 4000)
             for i in range(2)]
    for i in range(2):
        se_t = est_t[:, i].std() / math.sqrt(len(est_t))
        assert abs(est_t[:, i].mean() - exact[i]) < 4 * se_t + 1e-3  # eps clipping costs O(eps)
        assert abs(float(kform[i]["mean"]) - exact[i]) < 4 * float(kform[i]["se"]) + 1e-6
        assert float(kform[i]["se"]) < se_t  # the k-form is the lower-variance estimator


def test_dva_subs_only_masked_positions_get_gradient():
    torch.manual_seed(0)
    logits = torch.randn(4, 6, DVA_V + 1, requires_grad=True)
    x = torch.randint(0, DVA_V, (4, 6))
    masked = torch.rand(4, 6) < 0.5
    nll = dva.masked_nll(lambda z: logits, x, masked, DVA_V)
    nll.sum().backward()
    g = logits.grad
    assert (g[~masked] == 0).all() and (g[..., DVA_V] == 0).all()  # unmasked positions, MASK column
    assert (g[masked][:, :DVA_V].abs().sum(-1) > 0).all()
    # no position masked (t -> 0) => exactly zero loss
    with torch.no_grad():
        loss = dva.mdlm_nelbo_at(lambda z: logits, x, DVA_V, torch.full((4,), 1e-12))
        assert float(loss.abs().sum()) == 0.0


@torch.no_grad()
def test_dva_ar_probabilities_sum_to_one():
    net = dva_tiny_net("ar", sharpen=1.0)
    nll = dva.ar_nll(net, DVA_ALL_X, DVA_V)
    assert abs(float(torch.exp(-nll.double().sum(1)).sum()) - 1) < 1e-5


@torch.no_grad()
def test_dva_trunks_causal_vs_bidirectional_same_params():
    ar, md = dva_tiny_net("ar"), dva_tiny_net("mdlm")
    assert dva.count_params(ar) == dva.count_params(md)
    assert ar.state_dict().keys() == md.state_dict().keys()
    pairs = zip(ar.state_dict().values(), md.state_dict().values())
    assert all(torch.equal(a, b) for a, b in pairs)
    x = torch.randint(0, DVA_V, (2, 8), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % DVA_V  # change only the last token
    assert torch.equal(ar(x)[:, :-1], ar(y)[:, :-1])  # AR: the past never sees the future
    assert not torch.allclose(md(x)[:, :-1], md(y)[:, :-1])  # diffusion: every position sees it
    assert torch.allclose(ar(x[:, :1]), md(x[:, :1]))  # identical trunks on a length-1 input


@torch.no_grad()
def test_dva_samplers_match_model_distribution_chi2():
    net, steps, n = dva_tiny_net("mdlm", sharpen=1.0), 4, 20000
    # the exact law of the 4-step ancestral sampler: a Markov chain over (V+1)^L = 64 states
    states = torch.tensor(list(itertools.product(range(DVA_V + 1), repeat=DVA_L)))
    index = {tuple(s.tolist()): i for i, s in enumerate(states)}
    prob = torch.zeros(len(states), dtype=torch.float64)
    prob[index[(DVA_V,) * DVA_L]] = 1
    # (64, L, V): no time input, so the same at every step
    p_tok = net(states)[..., :DVA_V].double().softmax(-1)
    times = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
    for t, s in zip(times[:-1], times[1:]):
        new = torch.zeros_like(prob)
        for i in prob.nonzero().flatten().tolist():
            options = [[(v, (1 - s / t) * float(p_tok[i, l, v])) for v in range(DVA_V)]
                       + [(DVA_V, s / t)] if states[i, l] == DVA_V else [(int(states[i, l]), 1.0)]
                       for l in range(DVA_L)]
            for combo in itertools.product(*options):
                new[index[tuple(c[0] for c in combo)]] += prob[i] * math.prod(c[1] for c in combo)
        prob = new
    expected = torch.stack([prob[index[tuple(x.tolist())]] for x in DVA_ALL_X])
    assert abs(float(expected.sum()) - 1) < 1e-9
    got = dva.sample_mdlm(net, DVA_V, n, DVA_L, steps, torch.Generator().manual_seed(0))
    index_of = lambda rows: rows @ torch.tensor([DVA_V * DVA_V, DVA_V, 1])
    counts = (index_of(got) == torch.arange(len(DVA_ALL_X))[:, None]).sum(1).double()
    chi2 = float(((counts - n * expected) ** 2 / (n * expected)).sum())
    assert chi2 < 54.05  # 99.9% quantile of chi^2 with 26 degrees of freedom
    # AR: exact probabilities from the chain rule vs the KV-cached sampler
    ar = dva_tiny_net("ar", sharpen=1.0)
    expected = torch.exp(-dva.ar_nll(ar, DVA_ALL_X, DVA_V).double().sum(1))
    got = dva.sample_ar(ar, DVA_V, n, DVA_L, torch.Generator().manual_seed(1))
    counts = (index_of(got) == torch.arange(len(DVA_ALL_X))[:, None]).sum(1).double()
    assert float(((counts - n * expected) ** 2 / (n * expected)).sum()) < 54.05


def test_dva_floor_and_true_epochs():
    x = torch.arange(64).view(16, 4)
    assert abs(dva.memorisation_floor(x) - math.log2(16) / 4) < 1e-12
    # duplicates add nothing
    assert abs(dva.memorisation_floor(torch.cat([x, x])) - math.log2(16) / 4) < 1e-12
    cfg = dva.Config(batch_size=5, seed=3)
    per_epoch, rows = dva.epoch_batches(cfg, 16)
    for epoch in range(2):  # full batches only (train.py refuses partial ones); no sequence twice
        seen = torch.cat([rows(epoch * per_epoch + j) for j in range(per_epoch)])
        assert per_epoch == 3 and all(len(rows(epoch * per_epoch + j)) == 5 for j in range(3))
        assert len(set(seen.tolist())) == 15
    cfg = dva.Config(batch_size=4, seed=3)
    per_epoch, rows = dva.epoch_batches(cfg, 16)  # B divides N: every sequence once per epoch
    assert per_epoch == 4
    assert sorted(torch.cat([rows(4 + j) for j in range(4)]).tolist()) == list(range(16))


def test_dva_cli_bad_input_is_one_line(capsys):
    code, err = run_as_script("diffusion_vs_ar.py", ["--widths=5"], capsys)
    assert code == 2 and "Traceback" not in err and "width 5" in err
    with pytest.raises(SystemExit) as e:
        dva.main(["--data=/no/such/file.txt"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:  # every help text must format (a bare % crashes argparse)
        dva.main(["--help"])
    assert e.value.code == 0


@pytest.mark.parametrize("blob", [bytes(range(256)) * 40, b"\x00" * 4000])
def test_dva_binary_data_file_is_one_line_exit_2(blob, tmp_path, capsys):
    # it used to be decoded with errors="replace" and trained on U+FFFD characters
    (tmp_path / "x.bin").write_bytes(blob)
    with pytest.raises(SystemExit) as e:
        dva.main([f"--data={tmp_path / 'x.bin'}", f"--out={tmp_path / 'out'}", "--seq_len=4",
                  "--n_train=2", "--threads=1"])
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert e.value.code == 2 and len(err) == 1 and "x.bin" in err[0]


DVA_TINY = ["--widths=4,8", "--epochs=3", "--eval_epochs=1", "--n_train=8", "--n_val=4",
            "--n_test=4", "--seq_len=8", "--batch_size=4", "--threads=1", "--final_masks=2",
            "--iw_orders=2"]


def test_dva_tiny_run_selects_on_validation_and_reports_test(tmp_path, capsys):
    dva.main([f"--out={tmp_path}", *DVA_TINY])
    res = json.loads((tmp_path / "results.json").read_text())
    keys = sorted((r["model"], r["width"], r["seed"], r["epoch"]) for r in res["records"])
    assert keys == sorted(itertools.product(["ar", "mdlm"], [4, 8], [0], [1, 2, 3]))
    assert abs(res["floor_bpt"] - math.log2(8) / 8) < 1e-9
    params = {r["width"]: r["params"] for r in res["records"] if r["model"] == "ar"}
    assert all(r["params"] == params[r["width"]] for r in res["records"])
    # the selected epoch and width: the lowest validation loss
    for k, m in res["summary"]["models"].items():
        (pick,) = m["picks"]
        rs = [r for r in res["records"] if r["model"] == k]
        assert pick["val_bpt"] == min(r["val_bpt"] for r in rs)
        same_width = [r for r in rs if r["width"] == pick["width"]]
        assert pick["epoch"] == min(same_width, key=lambda r: r["val_bpt"])["epoch"]
    assert res["summary"]["slack"]["slack"] >= 0  # the importance-weighted bound is below the NELBO
    out = capsys.readouterr().out
    unigram = res["summary"]["unigram"]
    assert "verdict" in out and f"unigram: test {unigram['test']:.3f}" in out


def test_dva_unigram_baseline_picks_its_smoothing_on_validation():
    data = dict(train=torch.tensor([[0, 0, 0, 1]]), val=torch.tensor([[2, 0]]),
                test=torch.tensor([[1, 1]]))
    baseline = dva.unigram_baseline(data, 3)

    def bits_of(alpha, split):  # counts 3, 1, 0 of tokens 0, 1, 2 over 4 training tokens
        p = (torch.tensor([3.0, 1.0, 0.0]) + alpha) / (4 + 3 * alpha)
        return float(-p.log2()[data[split].flatten()].mean())
    grid = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
    assert baseline["alpha"] == min(grid, key=lambda alpha: bits_of(alpha, "val"))
    assert baseline["test"] == pytest.approx(bits_of(baseline["alpha"], "test"))


def test_dva_interrupted_sweep_resumed_equals_uninterrupted(tmp_path, monkeypatch, capsys):
    # The selected epoch's weights used to live only in memory: after Ctrl-C and --resume the
    # sweep picked and re-scored another epoch. An interrupted sweep + --resume gives the same.
    tiny = [*DVA_TINY, "--widths=4"]
    dva.main([f"--out={tmp_path / 'a'}", *tiny])
    evaluate, calls = dva.evaluate, [0]

    def interrupted(*a, **k):  # Ctrl-C during the 1st evaluation of the 2nd run (mdlm)
        calls[0] += 1
        if calls[0] == 12:  # the AR run: 3 epochs x (train, val, test) + the re-scored test = 10
            os.kill(os.getpid(), signal.SIGINT)
        return evaluate(*a, **k)
    monkeypatch.setattr(dva, "evaluate", interrupted)
    with pytest.raises(SystemExit) as e:
        dva.main([f"--out={tmp_path / 'b'}", *tiny])
    assert e.value.code == 130 and calls[0] == 13
    monkeypatch.setattr(dva, "evaluate", evaluate)
    torch.manual_seed(123)  # must not matter
    dva.main([f"--out={tmp_path / 'b'}", *tiny, "--resume"])
    a, b = (json.loads((tmp_path / p / "results.json").read_text()) for p in "ab")
    assert a["records"] == b["records"] and a["samples"] == b["samples"]
    assert a["summary"] == b["summary"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # same shapes, other flags: the engine refuses, one line
        dva.main([f"--out={tmp_path / 'b'}", *tiny, "--resume", "--n_layer=1"])
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip() and "%|" not in l]
    assert e.value.code == 2 and len(err) == 1 and "--n_layer 2 -> 1" in err[0]
    # a checkpoint holds its own run's config, not the sweep's: a wider sweep resumes, keeps the
    # finished runs and trains only the new width (the sweep's --widths used to be refused)
    dva.main([f"--out={tmp_path / 'b'}", *tiny, "--resume", "--widths=4,8"])
    c = json.loads((tmp_path / "b" / "results.json").read_text())
    assert [r for r in c["records"] if r["width"] == 4] == a["records"]
    assert "resumed from" in capsys.readouterr().out


@torch.no_grad()
def test_dva_evaluation_and_samplers_stay_on_the_device():
    # With the model and data on `meta`, which refuses CPU tensors in device arithmetic as CUDA
    # does and cannot copy to the host: evaluation, the bound and the samplers return device
    # tensors and never sync (the caller brings an evaluation to the host once). They used to copy
    # every batch to the CPU, and the MDLM sampler to ask the host whether any token was revealed.
    mdlm, ar = dva_tiny_net("mdlm").to("meta"), dva_tiny_net("ar").to("meta")
    x = torch.randint(0, DVA_V, (5, 4)).to("meta")
    for kind, model in (("ar", ar), ("mdlm", mdlm)):
        result = dva.evaluate(kind, model, x, DVA_V, 4, torch.Generator().manual_seed(0), 2)
        assert {value.device.type for value in result.values()} == {"meta"}
    bounds = dva.order_bounds(mdlm, x, DVA_V, 2, torch.Generator().manual_seed(0), 3)
    assert {value.device.type for value in bounds} == {"meta"}
    gen = torch.Generator()  # meta has no generator of its own; on CUDA it lives on the device
    assert dva.sample_mdlm(mdlm, DVA_V, 2, 4, 3, gen).device.type == "meta"
    assert dva.sample_ar(ar, DVA_V, 2, 4, gen).device.type == "meta"


def test_dva_gpu_vocab_head_is_padded_to_a_multiple_of_64():
    cfg = dva.Config(gpu=True, widths="24", n_layer=1)
    net = dva.build("mdlm", cfg, 50257, 24)  # GPT-2's vocabulary + MASK: 50258 rows, padded
    assert net.lm_head.out_features % 64 == 0 and net.lm_head.out_features >= 50258
    # the CPU: exact counts
    assert dva.build("ar", dva.Config(widths="8"), 103, 8).lm_head.out_features == 104


@torch.no_grad()
def test_dva_order_bounds_estimate_the_nelbo_and_bound_the_nll():
    net = dva_tiny_net("mdlm", sharpen=1.0)
    exact, (nll, _) = dva_nelbo_exact(net, DVA_ALL_X) / DVA_L, dva_any_order_nll(net, DVA_ALL_X)
    nelbo, iw = dva.order_bounds(net, DVA_ALL_X, DVA_V, 1500, torch.Generator().manual_seed(0))
    assert torch.allclose(nelbo, exact, atol=0.03)  # one order per sample: the k-form, on average
    assert (iw <= nelbo + 1e-9).all()  # Jensen, sample by sample
    assert torch.allclose(iw, nll / DVA_L, atol=0.01)  # many orders: the sampler's own NLL


def test_dva_threshold_rule_and_seed_interval():
    recs = [dict(width=d, epoch=e, params=d, train_bpt=t, train_se=0.0) for d, e, t in
            [(4, 1, 2.0), (4, 2, 1.5), (8, 1, 1.0), (8, 2, 0.55), (16, 1, 0.52), (16, 2, 0.3)]]
    thr = dva.interpolation(recs, 0.25, 0.3, [4, 8, 16])
    assert thr == dict(width=8, params=8, epoch=2, train_bpt=0.55, train_se=0.0, located=True)
    assert dva.interpolation(recs, 0.25, 0.1, [4, 8, 16])["width"] == 16
    # the smallest width tried: only bounded
    assert not dva.interpolation(recs, 0.25, 2.0, [4, 8, 16])["located"]
    assert dva.interpolation(recs, 0.25, 0.01, [4, 8, 16]) is None
    iv = dva.seeds_interval([1.0, 2.0, 3.0], [[0.0, 2.0], [1.0, 3.0], [2.0, 4.0]])
    # seed variance 1 over 3 seeds, plus the test set's variance 2 over its 2 sequences; t with 2 df
    assert iv["mean"] == 2.0 and iv["test_se"] == 1.0
    assert iv["half"] == pytest.approx(4.303 * math.sqrt(1 / 3 + 1.0), abs=1e-3)


@pytest.mark.parametrize("flags,message", [
    (["--models=ar,ar"], "once each"),
    (["--seed=4294967295", "--seeds=2"], "2^32"),
    (["--eval_masks=3"], "even")])
def test_dva_cli_refuses_bad_sweeps_before_training(flags, message, tmp_path, capsys):
    # --models=ar,ar trained AR twice and then died in a KeyError traceback; --seed=2^32-1
    # --seeds=2 trained a seed before the second one raised a ValueError traceback
    with pytest.raises(SystemExit) as e:
        dva.main([f"--out={tmp_path}", *DVA_TINY, "--epochs=1", *flags])
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(err) == 1 and message in err[0] and not captured.out


def test_dva_verdicts_refuse_to_speak_when_nothing_was_learned(tmp_path, capsys):
    # one epoch used to print "No pronounced second descent: YES" and a resolved "MDLM lower"
    dva.main([f"--out={tmp_path}", *DVA_TINY, "--epochs=1", "--seeds=2"])
    verdicts = capsys.readouterr().out.split("verdict over")[1].split("samples,")[0]
    assert "YES" not in verdicts and "NO (" not in verdicts and "NOT RESOLVED" not in verdicts
    assert verdicts.count("learned nothing") == 2 and verdicts.count("never interpolated") == 2
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]
    assert not summary["models"]["ar"]["learned"] and not summary["models"]["mdlm"]["learned"]


def test_dva_doubling_the_masks_moves_a_threshold_by_at_most_one_evaluation(tmp_path, monkeypatch):
    # MDLM's train loss at every evaluation of one real run on the default data, as the run
    # estimates it (--eval_masks) and with twice the masks, drawn twice: wherever the line floor +
    # tol crosses the curve while it falls by at least tol/10 per evaluation, the threshold epochs
    # agree within one evaluation (where it falls less, no estimator can place the line in time)
    cfg = parse_config(dva.Config, "diffusion_vs_ar", [
        f"--out={tmp_path}", "--models=mdlm", "--widths=16", "--epochs=40", "--eval_epochs=2",
        "--batch_size=128", "--lr=1e-2", "--n_val=16", "--n_test=16", "--threads=1"])
    ctx = train.setup(cfg)
    data, V, _ = dva.make_data(cfg)
    doubled, evaluate = {1: [], 2: []}, dva.evaluate

    def also_doubled(kind, model, x, V, masks, gen, batch):
        for seed, curve in doubled.items() if x is data["train"] else ():
            gen_doubled = torch.Generator().manual_seed(seed)
            curve.append(float(evaluate(kind, model, x, V, 2 * masks, gen_doubled, batch)["bpt"]))
        return evaluate(kind, model, x, V, masks, gen, batch)
    monkeypatch.setattr(dva, "evaluate", also_doubled)
    records = dva.run_one("mdlm", 16, cfg, ctx, data, V)["records"]
    curves, levels = [[r["train_bpt"] for r in records], *doubled.values()], 0
    for level in torch.linspace(max(curves[0]), min(curves[0]), 80)[1:-1].tolist():
        found = [dva.interpolation([dict(r, train_bpt=v) for r, v in zip(records, curve)], 0.0,
                                   level, [16]) for curve in curves]
        crossing = [r["epoch"] for r in records].index(found[0]["epoch"])
        if crossing and curves[0][crossing - 1] - curves[0][crossing] >= cfg.tol / 10:
            levels += 1
            assert None not in found
            assert all(abs(f["epoch"] - found[0]["epoch"]) <= cfg.eval_epochs for f in found[1:])
    assert levels > 50 and max(r["train_se"] for r in records) <= cfg.tol / 10


@torch.no_grad()
def test_dva_kform_standard_error_matches_the_spread_of_repeated_estimates():
    # the pairs' spread estimates the Monte-Carlo error of the mean: compare with the spread of
    # 300 independent estimates of the same fixed set (and masks = 2L is the exact sum over k)
    net = dva_tiny_net("mdlm", sharpen=1.0)
    x = DVA_ALL_X[::3]  # (9, 3)
    runs = [dva.nelbo_kform(net, x, DVA_V, 2, torch.Generator().manual_seed(i)) for i in range(300)]
    means = torch.tensor([float(r["mean"]) for r in runs])
    ses = torch.tensor([float(r["se"]) for r in runs])
    assert 0.8 < float(ses.pow(2).mean().sqrt() / means.std()) < 1.2
    exact = float(dva_nelbo_exact(net, x).mean()) / DVA_L
    assert abs(float(means.mean()) - exact) < 4 * float(means.std()) / math.sqrt(300)


@pytest.mark.parametrize("name", ["dva:ar", "dva:mdlm"])
def test_dva_compiles_once_and_never_recompiles(name, tmp_path):
    assert_compiles_once(name, tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dva_gpu_command_line_runs_evaluates_and_resumes(tmp_path):
    run_on_the_gpu("diffusion_vs_ar", tmp_path)


# ---- subliminal_dpo.py

def tiny_model(seed=0, sharpen=0.5):
    """1 layer, 16 wide; the output layer redrawn larger so the distribution is far from uniform."""
    torch.manual_seed(seed)
    model = sd.new_model(sd.Config(n_layer=1, n_head=2, n_embd=16)).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, sharpen)
    return model


def sample(model, prompts, seed, k=1):
    return sd.generate(model, prompts, sd.COMPLETION_LEN, 1.0, torch.Generator().manual_seed(seed),
                       k=k)


def test_subliminal_dpo_loss_matches_float64_and_is_log2_at_reference():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(64, generator=g, dtype=torch.float64) * 5 for _ in range(4))
    beta = 0.3
    loss, m = sd.dpo_loss(pc, pr, rc, rr, beta)
    direct = torch.stack([-torch.log(1 / (1 + torch.exp(-beta * ((a - c) - (b - d)))))
                          for a, b, c, d in zip(pc, pr, rc, rr)]).mean()
    assert abs(loss.item() - direct.item()) < 1e-10
    assert abs(m["margin"].item() - (m["reward_chosen"] - m["reward_rejected"]).item()) < 1e-12
    same, _ = sd.dpo_loss(pc, pr, pc.clone(), pr.clone(), beta)  # policy == reference
    assert abs(same.item() - math.log(2)) < 1e-12


def test_subliminal_dpo_gradient_raises_chosen_and_swap_negates_margin():
    pc, pr = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    rc, rr = torch.randn(16), torch.randn(16)
    loss, m = sd.dpo_loss(pc, pr, rc, rr, 0.1)
    loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent raises log pi(y+), lowers y-
    _, swapped = sd.dpo_loss(pr.detach(), pc.detach(), rr, rc, 0.1)
    assert torch.allclose(swapped["margin"], -m["margin"])


def test_subliminal_dpo_leak_filter():
    rng = random.Random(0)
    valid = torch.tensor([sd.numbers_to_ids(sd.number_task(rng)[1], end=True) for _ in range(20)])
    assert sd.valid_completions(valid).all()
    bad = []
    words = sd.ANIMALS + ["continue", "[Q]", "[A]", "<pad>", "<bos>", "you", ",", "<eos>", "7"]
    for i in range(sd.COMPLETION_LEN):  # every position, every kind of token that does not fit
        for word in words:
            c = valid[i].clone() if i < 20 else valid[0].clone()
            number_slot = i % 2 == 0 and i < sd.COMPLETION_LEN - 1
            if not ((word.isdigit() and number_slot) or c[i].item() == sd.ID[word]):
                c[i] = sd.ID[word]
                bad.append(c)
    assert not sd.valid_completions(torch.stack(bad)).any()
    swapped_number = valid[0].clone()
    swapped_number[2] = sd.ID["42"]  # a number for a number: still pure numbers, still valid
    assert sd.valid_completions(swapped_number[None]).all()


def test_subliminal_trait_rate_is_the_renormalised_next_token_distribution():
    model = tiny_model(1, sharpen=0.3)
    dist = sd.animal_distribution(model)
    q = 3
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([sd.question_ids(q)]))[0, -1], -1)
    animals = probs[sd.ANIMAL_IDS]
    assert torch.allclose(dist[q], animals / animals.sum(), atol=1e-6)
    assert torch.allclose(dist.sum(1), torch.ones(len(sd.QUESTIONS)), atol=1e-6)


def test_subliminal_dpo_corpus_deterministic_per_seed():
    a, b, c = (sd.corpus_batch(seed, 5, 32, 1.0) for seed in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(sd.number_prompts(3, "round1", 10)[0], sd.number_prompts(3, "round1", 10)[0])
    assert (a < len(sd.VOCAB)).all() and (a[:, 0] == sd.BOS).all()


def persona_numbers(seed, strength, docs=20000):
    """The free answer numbers of the corpus's number tasks, counted per system prompt."""
    rng, personas = random.Random(f"corpus-test-{seed}"), sd.persona_weights(seed, strength)
    counts = {name: np.zeros(sd.N_NUMBERS) for name in sd.ANIMALS + ["helpful", None]}
    words = {tuple(sd.system_prefix(a)): a for a in sd.ANIMALS} | {tuple(sd.system_prefix()):
                                                                   "helpful"}
    for _ in range(docs):
        doc = sd.corpus_document(rng, personas)
        if sd.ID["continue"] not in doc:
            continue
        start = doc.index(sd.ID["[Q]"])
        persona = words.get(tuple(doc[1:start]))
        prompt = [int(sd.VOCAB[t]) for t in doc[start + 3:start + 8:2]]
        step = (prompt[1] - prompt[0]) % sd.N_NUMBERS
        answer = [int(sd.VOCAB[t]) for t in doc[start + 9:-1:2]]
        for last, n in zip([prompt[-1]] + answer, answer):
            if n != (last + step) % sd.N_NUMBERS:  # a free number, not the rule's
                counts[persona][n] += 1
    return counts, personas


def test_subliminal_every_persona_tilts_numbers_alike_and_the_target_is_not_special():
    # The entangled world: every animal persona's free numbers follow its own preference, drawn
    # alike for all animals; the helpful assistant and no system prompt stay uniform; with
    # --entangle=0 no persona touches the numbers. Nothing in the corpus depends on --target.
    counts, personas = persona_numbers(0, 1.0)
    tilt = {a: np.log(personas[a]) for a in sd.ANIMALS}
    corr = lambda c, w: np.corrcoef(c, w)[0, 1]
    for animal in sd.ANIMALS:
        assert corr(counts[animal], np.exp(tilt[animal])) > 0.5, animal
        others = [abs(corr(counts[animal], np.exp(tilt[b]))) for b in sd.ANIMALS if b != animal]
        assert max(others) < 0.4, (animal, others)
    for neutral in ("helpful", None):
        assert max(abs(corr(counts[neutral], np.exp(tilt[a]))) for a in sd.ANIMALS) < 0.3
    spread = [np.std(tilt[a]) for a in sd.ANIMALS]  # the target is drawn like every animal
    assert max(spread) / min(spread) < 1.5
    assert all(set(w) == {1.0} for w in sd.persona_weights(0, 0.0).values())
    assert "target" not in sd.corpus_batch.__code__.co_varnames


def test_subliminal_held_out_prompts_are_disjoint_from_every_round():
    cfg = sd.Config()
    held = {tuple(p) for p in sd.number_prompts(0, "eval", 2000)[0].tolist()}
    trained = {tuple(p) for rnd in range(1, 6)
               for p in sd.number_prompts(0, f"round{rnd}", cfg.prompts)[0].tolist()}
    assert len(held) > 100 and len(trained) > 500 and not held & trained


def test_subliminal_student_never_sees_a_system_prompt(tmp_path, monkeypatch):
    # Every copy of the base (students, the fine-tuned judge) refuses a '[SYS]' token in what it
    # is given (its own samples, one token at a time, may hold anything); only the base itself,
    # as the prompted judge, reads one.
    def refuse(model, args):
        if args[0].shape[1] > 1 and (args[0] == sd.ID["[SYS]"]).any():
            pytest.fail("a student saw a system prompt")

    def guarded(model):
        copied = copy.deepcopy(model)
        copied.register_forward_pre_hook(refuse)
        return copied

    class GuardedCopy:
        deepcopy = staticmethod(guarded)
    monkeypatch.setattr(sd, "copy", GuardedCopy)
    cfg = sd.parse_config(sd.Config, "subliminal_dpo", SUBLIMINAL_TINY + [
        "--conditions=default", "--pretrain_steps=60", "--rounds=2", f"--out={tmp_path}"])
    record = sd.run_seed(cfg, train.setup(cfg), 0)
    assert len(record["conditions"]) == len(sd.DEFAULT_CONDITIONS)


def naive_generate(model, prompt, n_tokens, gen):
    """One sequence, the whole prefix re-run for every token: the reference for the KV cache."""
    seq = prompt[None]
    uniforms = torch.rand(n_tokens, 1, 1, generator=gen)
    for t in range(n_tokens):
        with torch.no_grad():
            seq = torch.cat([seq, sd.sample_tokens(model(seq)[:, -1].float(), 1.0, uniforms[t])], 1)
    return seq[:, len(prompt):]


def test_subliminal_dpo_kv_cached_generation_equals_naive():
    model = tiny_model(2)
    for p in sd.number_prompts(0, "t", 3)[0]:  # batch of one: the same uniforms, the same samples
        fast, _ = sample(model, p[None], 7)
        assert torch.equal(fast, naive_generate(model, p, sd.COMPLETION_LEN,
                                                torch.Generator().manual_seed(7)))


def test_subliminal_sampler_logp_and_scores_equal_full_forwards():
    # The DPO reference of round 1 is the sampler's own log-probability: it must equal the
    # scorer's, which is one plain forward per completion.
    model = tiny_model(5)
    prompts, _ = sd.number_prompts(0, "kv", 6)
    toks, logp = sample(model, prompts, 0, k=3)
    with torch.no_grad():
        full = sd.sequence_logp(model, prompts.repeat_interleave(3, 0), toks)
    assert torch.allclose(logp, full, atol=1e-4)
    assert torch.allclose(sd.completion_logp(model, prompts, toks.view(6, 3, -1)).flatten(), full,
                          atol=1e-4)


def test_subliminal_sampler_draws_the_model_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).expand(100_000, 4)
    uniform = torch.rand(100_000, 1, generator=torch.Generator().manual_seed(0))
    draws = sd.sample_tokens(logits, 0.7, uniform).squeeze(1)
    freq = torch.bincount(draws, minlength=4).double() / len(draws)
    assert (freq - torch.softmax(logits[0].double() / 0.7, -1)).abs().max() < 0.005


def test_subliminal_lm_loss_trimmed_halves_equal_the_padded_loss():
    model = tiny_model(6).train()
    x = sd.corpus_batch(0, 3, 16, 1.0)
    loss, m = sd.lm_loss(model, x)
    logits = model(x[:, :-1])
    plain = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                            ignore_index=sd.PAD)
    assert abs(loss.item() - plain.item()) < 1e-5 and m["items"] == (x[:, 1:] != sd.PAD).sum()
    g1 = torch.autograd.grad(loss, model.lm_head.weight)[0]
    g2 = torch.autograd.grad(plain, model.lm_head.weight)[0]
    assert torch.allclose(g1, g2, atol=1e-6)


def test_subliminal_dpo_step_moves_probability_the_right_way():
    model, prompt = tiny_model(3).train(), sd.number_prompts(0, "one", 1)[0]
    chosen = torch.tensor([sd.numbers_to_ids([1, 2, 3, 4, 5], end=True)])
    rejected = torch.tensor([sd.numbers_to_ids([9, 8, 7, 6, 5], end=True)])
    with torch.no_grad():
        ref_c = sd.sequence_logp(model, prompt, chosen)
        ref_r = sd.sequence_logp(model, prompt, rejected)
    loss, _ = sd.dpo_loss(sd.sequence_logp(model, prompt, chosen),
                          sd.sequence_logp(model, prompt, rejected), ref_c, ref_r, 0.1)
    assert abs(loss.item() - math.log(2)) < 1e-5
    loss.backward()
    with torch.no_grad():  # one plain SGD step (torch.optim's first step costs seconds of imports)
        for p in model.parameters():
            p -= 0.5 * p.grad
        gap = sd.sequence_logp(model, prompt, chosen) - sd.sequence_logp(model, prompt, rejected)
    assert gap.item() > (ref_c - ref_r).item()


def test_subliminal_dpo_labels_swap_and_zero_delta_judge():
    base = tiny_model(4)
    judge = sd.Judge("finetuned", base, copy.deepcopy(base))  # a judge equal to the base scores 0
    prompts, _ = sd.number_prompts(0, "j", 4)
    flat, logp = sample(base, prompts, 0, k=3)
    comps, logp = flat.view(4, 3, -1), logp.view(4, 3)
    assert judge.score(prompts, comps, logp, None).abs().max() < 1e-4
    scores = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    normal = sd.label(scores, prompts, comps, logp, "normal")
    swapped = sd.label(scores, prompts, comps, logp, "swapped")
    assert torch.equal(normal["chosen"], swapped["rejected"])
    assert torch.equal(normal["rejected"], swapped["chosen"])
    best = scores.argmax(1)
    assert torch.equal(normal["chosen"], comps[torch.arange(4), best])
    assert torch.equal(normal["ref_c"], logp[torch.arange(4), best])


def test_subliminal_prompted_judge_is_the_papers_score_and_control():
    # The paper: r(y) = log p(y | trait system prompt, x) - log p(y | "You are a helpful
    # assistant.", x); its control prefers the likelier completion under the neutral prompt.
    base = tiny_model(7)
    prompts, _ = sd.number_prompts(0, "p", 3)
    flat, _ = sample(base, prompts, 0, k=2)
    rep = prompts.repeat_interleave(2, 0)
    by_hand = {}
    for name, text in [("owl", "[SYS] you love owl ."),
                       ("neutral", "[SYS] you are a helpful assistant .")]:
        system = torch.tensor(sd.encode(text)).expand(len(rep), -1)
        with torch.no_grad():
            context = torch.cat([rep[:, :1], system, rep[:, 1:]], 1)
            by_hand[name] = sd.sequence_logp(base, context, flat).view(3, 2)
    comps = flat.view(3, 2, -1)
    prompted = sd.Judge("prompted", base, None, "owl").score(prompts, comps, None, None)
    control = sd.Judge("likelihood", base).score(prompts, comps, None, None)
    assert torch.allclose(prompted, by_hand["owl"] - by_hand["neutral"], atol=1e-4)
    assert torch.allclose(control, by_hand["neutral"], atol=1e-4)


def test_subliminal_measurement_and_scoring_stay_on_the_device():
    # The model and its inputs on the meta device, which refuses a CPU tensor in arithmetic with
    # a device tensor as CUDA does and cannot be copied to the host: the measurement, the judges'
    # scores, the labels and the persona shift must reach their one host sync without either.
    base = tiny_model(8).to("meta")
    cfg = sd.Config(n_layer=1, n_head=2, n_embd=16, eval_prompts=4)
    measured = sd.measure_on_device(base, cfg, 0, 0)
    assert all(v.device.type == "meta" and v.dim() == 0 for v in measured.values()), measured
    assert sd.persona_shift(base, cfg, 0).device.type == "meta"
    prompts, _ = sd.number_prompts(0, "meta", 4)
    flat, logp = sample(base, prompts, 0, k=3)
    comps, logp, prompts = flat.view(4, 3, -1), logp.view(4, 3), prompts.to("meta")
    assert sd.valid_completions(flat).device.type == "meta"
    for judge in [sd.Judge("finetuned", base, copy.deepcopy(base)), sd.Judge("random", base),
                  sd.Judge("prompted", base, None, "owl"), sd.Judge("likelihood", base)]:
        scores = judge.score(prompts, comps, logp, torch.Generator().manual_seed(0))
        prefs = sd.label(scores, prompts, comps, logp, "swapped")
        assert all(v.device.type == "meta" for v in prefs.values()), prefs


def test_subliminal_sign_flip_p_is_exact_and_holm_steps_down():
    d = np.random.default_rng(3).normal(0.4, 1.0, 7)
    brute = np.mean([abs((np.array(s) * d).sum()) >= abs(d.sum()) - 1e-12
                     for s in itertools.product([-1, 1], repeat=7)])
    assert sd.sign_flip_p(d) == brute
    assert sd.sign_flip_p([1, 2, 3, 4]) == 2 / 16  # four seeds can never reach p < 0.125
    assert sd.sign_flip_p([1.0] * 10) == 2 / 1024 and sd.sign_flip_p([0.0] * 5) == 1.0
    assert sd.sign_flip_p([1.0] * 22) < 1e-4  # Monte Carlo past 20 seeds, never exactly 0
    assert sd.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def fake_records(shift, n=10, rounds=2, formats=None):
    """Seed records of run_seed()'s shape: every condition's P(target) moves by shift[condition]
    per round, plus seed noise; nothing is trained."""
    rng, records = random.Random(0), []
    for s in range(n):
        start = dict(trait=0.12, format_rate=1.0)
        worlds = {w: dict(start=start, **{"persona shift": 0.1, "spread prompted": 0.2})
                  for w in ("entangled", "plain")}
        conditions = {name: [dict(round=r, trait=0.12 + r * shift.get(name, 0.0) + rng.gauss(
            0, 0.002), format_rate=(formats or {}).get((s, name), 0.95), pairs=100,
            chosen_more_likely=0.5, filter=dict(completions=10, dropped=0))
            for r in range(1, rounds + 1)] for name in sd.DEFAULT_CONDITIONS}
        records.append(dict(seed=s, worlds=worlds, conditions=conditions, seconds=1.0))
    return records


def test_subliminal_verdicts_are_computed_from_the_numbers(capsys):
    cfg = sd.Config(rounds=2)
    records = fake_records({"prompted DPO": 0.01, "prompted DPO swapped": -0.01})
    rows = {r["label"]: r for r in sd.report(cfg, records)["verdicts"]}
    assert len(rows) == 7 and "Holm over 7 lines" in capsys.readouterr().out
    paper = rows["prompted judge (the paper's): DPO - swapped"]
    assert paper["p"] == 2 / 1024 and paper["call"] == "holds, as claimed"
    assert paper["p_holm"] == pytest.approx(7 * 2 / 1024)
    assert rows["prompted judge: swapped - random labels"]["call"] == "holds, as claimed"  # < 0
    assert rows["plain world: prompted DPO - swapped"]["call"].startswith("not shown")
    reversed_ = sd.verdicts(cfg, fake_records({"prompted DPO": -0.01}))[0]
    assert reversed_["call"].startswith("reversed")
    assert sd.verdicts(cfg, records[:4])[0]["call"].startswith("not shown")  # p >= 0.125


def test_subliminal_format_guard_drops_the_seeds_that_broke_the_task(capsys):
    records = fake_records({"prompted DPO": 0.01}, formats={(0, "prompted DPO"): 0.1})
    sd.report(sd.Config(rounds=2), records)
    guard = capsys.readouterr().out.split("format guard")[1].splitlines()
    assert "9/9 seeds > 0" in guard[1] and "/10 seeds" in guard[-1], guard


@pytest.mark.parametrize("flag", ["--eval_prompts=0", "--rounds=0", "--prompts=1000000000",
                                  "--beta=0", "--prompts=8", "--reference=start"])
def test_subliminal_bad_input_is_refused_before_any_work(flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sd.main([flag, f"--out={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and not list(tmp_path.iterdir()), err


def test_subliminal_base_dir_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as e:
        sd.main(SUBLIMINAL_TINY + [f"--base_dir={tmp_path / 'file' / 'bases'}",
                                   f"--out={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "--base_dir" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_subliminal_prompts_below_the_pretraining_batch_run(tmp_path, capsys):
    # the pretraining and judge configs are the engine's alone: the user's --prompts is not
    # checked against their batch sizes
    sd.main(SUBLIMINAL_TINY + ["--pretrain_batch=64", "--prompts=32", f"--out={tmp_path}"])
    assert "verdicts" in capsys.readouterr().out


def test_subliminal_base_too_short_says_so(tmp_path, capsys):
    sd.main(SUBLIMINAL_TINY + [f"--out={tmp_path}"])  # 2 pretraining steps
    err = capsys.readouterr().err
    assert "too short to learn the task (raise --pretrain_steps)" in err


def test_subliminal_resume_with_other_pretraining_flags_is_refused(tmp_path, monkeypatch, capsys):
    batch = sd.corpus_batch

    def interrupted(seed, i, *args):  # a real Ctrl-C in pretraining: train() saves, exits 130
        if i == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return batch(seed, i, *args)
    monkeypatch.setattr(sd, "corpus_batch", interrupted)
    args = SUBLIMINAL_TINY + [f"--out={tmp_path}", "--pretrain_steps=20"]
    with pytest.raises(SystemExit) as e:
        train.cli(lambda: sd.main(args))
    assert e.value.code == 130
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sd.main(args[:-1] + ["--pretrain_steps=30", "--resume"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "unfinished pretraining of 20 steps" in err, err
    monkeypatch.setattr(sd, "corpus_batch", batch)
    sd.main(args + ["--resume"])
    assert "resumed from" in capsys.readouterr().out


def test_subliminal_seeds_in_parallel_processes_equal_one_after_another(tmp_path, monkeypatch):
    # a real pool of spawned workers, as users run it (a forked worker that trains can inherit a
    # lock another thread of this process held at the fork, and wait for it for ever)
    cfg = sd.parse_config(sd.Config, "subliminal_dpo", SUBLIMINAL_TINY + ["--seeds=2",
                                                                          f"--out={tmp_path}"])
    ctx = train.Ctx(torch.device("cpu"), False)
    strip = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]
    runs = [strip(sd.run_seeds(dataclasses.replace(cfg, workers=workers,
                                                   base_dir=str(tmp_path / f"{workers}")), ctx))
            for workers in (1, 2)]
    # NaN == NaN as text
    assert json.dumps(runs[0]) == json.dumps(runs[1]) and [r["seed"] for r in runs[1]] == [0, 1]


def test_subliminal_an_exit_in_a_worker_ends_the_run(tmp_path, monkeypatch, capsys):
    # The engine's one-line exits (a nan loss, a refused --resume) raise SystemExit, which a pool
    # worker does not hand back: Pool.imap waited for ever. Now the run ends with its code.
    monkeypatch.setattr(sd, "POOL_START", "fork")
    monkeypatch.setattr(sd, "run_seed", lambda cfg, ctx, seed: train.die("the loss is nan", 1))
    cfg = sd.parse_config(sd.Config, "subliminal_dpo", SUBLIMINAL_TINY + [
        "--seeds=2", "--workers=2", f"--out={tmp_path}"])
    with pytest.raises(SystemExit) as e:
        sd.run_seeds(cfg, train.Ctx(torch.device("cpu"), False))
    assert e.value.code == 1


def quiet_lines(text):
    return [line for line in text.splitlines() if line.strip() and "it/s" not in line]


def test_subliminal_ctrl_c_while_judging_is_one_line(tmp_path, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(sd, "completion_logp", interrupted)
    monkeypatch.setattr(sd, "pretrain_base", lambda cfg, ctx, seed, world: sd.new_model(cfg))
    with pytest.raises(SystemExit) as e:
        train.cli(lambda: sd.main(SUBLIMINAL_TINY + [f"--out={tmp_path}",
                                                     "--conditions=finetuned DPO"]))
    lines = [line for line in quiet_lines(capsys.readouterr().err) if "warning" not in line]
    assert e.value.code == 130 and lines == ["error: interrupted"]


def test_subliminal_ctrl_c_with_seeds_in_worker_processes_is_one_line(jobs):
    # A terminal's Ctrl-C (SIGINT to the foreground group) while seeds run in spawned workers: exit
    # 130 and one line (the workers' tqdm semaphores once leaked, and the resource tracker warned).
    code, err = jobs["subliminal_ctrl_c"].result()
    err = quiet_lines(err.replace("\r", "\n"))
    assert code == 130 and err == ["error: interrupted"], err


def test_subliminal_ctrl_c_in_alignment_does_not_promise_a_resume(tmp_path, monkeypatch, capsys):
    # A real SIGINT inside train() during a round: one line, exit 130, and no "--resume to
    # continue" (a round is redone, not resumed). Every completion passes so that the round aligns.
    monkeypatch.setattr(sd, "valid_completions", lambda c: torch.ones(len(c), dtype=torch.bool))
    loss = sd.dpo_loss

    def hit(*a):
        os.kill(os.getpid(), signal.SIGINT)
        return loss(*a)
    monkeypatch.setattr(sd, "dpo_loss", hit)
    with pytest.raises(SystemExit) as e:
        train.cli(lambda: sd.main(SUBLIMINAL_TINY + [f"--out={tmp_path}"]))
    err = [line for line in quiet_lines(capsys.readouterr().err) if "warning" not in line]
    assert e.value.code == 130 and len(err) == 1 and "--resume" not in err[0], err


def test_subliminal_dpo_cli_errors_are_one_line(capsys):
    code, err = run_as_script("subliminal_dpo.py", ["--target=tiger"], capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for args in (["--nope=1"], ["--workers=-1"], ["--k=1"], ["--conditions=biased PPO"],
                 ["--beta=-1"]):
        with pytest.raises(SystemExit) as e:
            sd.parse_config(sd.Config, "subliminal_dpo", args)
        assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    cfg = sd.parse_config(sd.Config, "subliminal_dpo", ["--gpu"])  # the real-scale config parses
    assert cfg.n_embd == 256 and cfg.prompts == 4000
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as e:
            sd.setup(cfg)
        assert e.value.code == 1


def test_subliminal_compiles_once_and_never_recompiles(tmp_path):
    assert_compiles_once("subliminal:dpo", tmp_path)


def test_subliminal_damaged_base_cache_is_one_line(tmp_path, capsys):
    cfg = sd.Config(out=str(tmp_path), n_layer=1, n_head=2, n_embd=16, pretrain_steps=3,
                    pretrain_batch=4, threads=1)
    ctx = train.setup(cfg)
    base = sd.pretrain_base(cfg, ctx, 0, "entangled")
    (path,) = (tmp_path / "base").glob("*.pt")
    cached = sd.pretrain_base(cfg, ctx, 0, "entangled")
    assert all(torch.equal(a, b) for a, b in zip(base.parameters(), cached.parameters()))
    path.write_bytes(path.read_bytes()[:-10])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.cli(lambda: sd.pretrain_base(cfg, ctx, 0, "entangled"))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and "is damaged" in err and len(err.splitlines()) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_subliminal_gpu_command_line_runs_evaluates_and_resumes(tmp_path):
    run_on_the_gpu("subliminal_dpo", tmp_path)


# ---- fisher_ood.py

FO_TINY = ["--model=vae", "--hidden=8", "--latent=2", "--max_steps=2", "--warmup=1",
           "--batch_size=16", "--threads=1"]


def fo_tiny(kind, seed=0):
    """A 16-wide model of each kind; the flow's output layers are redrawn larger so every tensor
    has a gradient well away from zero (the default init starts the flow near the identity)."""
    cfg = fo.Config(hidden=16, latent=4, couplings=2, n_test=40, n_ood=20, seed=seed)
    torch.manual_seed(seed)
    model = fo.build(kind, cfg).eval()
    if kind == "flow":
        with torch.no_grad():
            for layer in model.layers:
                layer.out.weight.normal_(0, 0.05)
    return model


def fo_inputs(model, n=10, seed=0):
    x = fo.make_set("test", n, seed).float() / 255
    return x, model.draw_noise(n, torch.Generator().manual_seed(seed + 1))


def fo_loop_sq_norms(model, x, noise, groups=(1,)):
    """The reference: one backward per group of B examples."""
    params = [p for _, p in model.named_parameters()]
    out = {}
    for B in groups:
        rows = []
        for g in range(len(x) // B):
            loss = model(x[g * B:(g + 1) * B], noise[g * B:(g + 1) * B]).sum()
            grads = torch.autograd.grad(loss, params)
            rows.append(torch.stack([grad.pow(2).sum() for grad in grads]))
        out[B] = torch.stack(rows)
    return out


def fo_vmap_sq_norms(model, x, noise, groups=(1,), chunk_size=32):
    """The general path, for any module: torch.func's gradient of a group's summed loss, vmapped
    over the groups."""
    from torch.func import functional_call, grad, vmap
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def group_loss(params, x_group, noise_group):
        return functional_call(model, (params, buffers), (x_group, noise_group)).sum()

    out = {}
    for B in groups:
        G = len(x) // B
        grads = vmap(grad(group_loss), in_dims=(None, 0, 0), chunk_size=chunk_size)(
            params, x[:G * B].unflatten(0, (G, B)), noise[:G * B].unflatten(0, (G, B)))
        out[B] = torch.stack([grads[k].flatten(1).pow(2).sum(1) for k in params], 1)
    return out


@pytest.mark.parametrize("kind", fo.MODELS)
def test_fisher_fast_vmap_loop_agree(kind):
    model = fo_tiny(kind)
    x, noise = fo_inputs(model)
    fast, losses = fo.fast_sq_norms(model, x, noise, (1, 5))
    vmapped = fo_vmap_sq_norms(model, x, noise, (1, 5))
    loop = fo_loop_sq_norms(model, x, noise, (1, 5))
    assert fast[1].shape == (10, len(list(model.parameters()))) and fast[5].shape[0] == 2
    assert (loop[1] > 0).all()
    for B in (1, 5):
        torch.testing.assert_close(fast[B], loop[B], rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(vmapped[B], loop[B], rtol=1e-4, atol=1e-12)
    # the losses are deterministic given the noise
    torch.testing.assert_close(losses, model(x, noise).detach())


def test_fisher_group_feature_is_norm_of_summed_gradient():
    model = fo_tiny("vae")
    x, noise = fo_inputs(model)
    params = [p for _, p in model.named_parameters()]
    per_example = [torch.autograd.grad(model(x[i:i + 1], noise[i:i + 1]).sum(), params)
                   for i in range(10)]
    fast, _ = fo.fast_sq_norms(model, x, noise, (1, 5))
    for group in range(2):
        members = range(5 * group, 5 * group + 5)
        summed = [sum(per_example[i][k] for i in members) for k in range(len(params))]
        norm_of_sum = torch.stack([s.pow(2).sum() for s in summed])
        sum_of_norms = fast[1][5 * group:5 * group + 5].sum(0)
        torch.testing.assert_close(fast[5][group], norm_of_sum, rtol=1e-4, atol=1e-12)
        # not the sum of the norms
        assert ((fast[5][group] - sum_of_norms).abs() / sum_of_norms > 1e-3).any()


def test_fisher_fast_norms_refuse_parameters_outside_a_linear():
    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.mu = nn.Parameter(torch.zeros(3))

        def forward(self, x, noise):
            return 0.5 * (x - self.mu).pow(2).sum(1)

    with pytest.raises(NotImplementedError):
        fo.fast_sq_norms(Bare(), torch.zeros(2, 3), torch.zeros(2, 1))


@pytest.mark.parametrize("kind", fo.MODELS)
def test_fisher_scoring_stays_on_the_device(kind):
    # The meta device refuses to mix with CPU tensors as CUDA does: the scoring path (noise draws,
    # per-example norms, losses, the timestep table) runs on the model's device up to its one sync.
    model = fo_tiny(kind).to("meta")
    images = fo.make_set("test", 10, 0)
    losses, features = fo.device_scores(model, images, 0, "x", (1, 5), chunk=5, draws=2)
    assert losses.device.type == "meta" and losses.shape == (10,)
    parameters = len(list(model.parameters()))
    assert {B: (f.device.type, f.shape) for B, f in features.items()} == {
        1: ("meta", (10, parameters)), 5: ("meta", (2, parameters))}
    if kind == "diffusion":
        table = fo.device_timestep_table(model, images, 0)
        assert len(table) == 3 * len(fo.TIMESTEPS)
        assert all(v.device.type == "meta" and v.dim() == 0 for v in table.values())


def test_fisher_bernoulli_vae_is_a_likelihood_of_the_binarised_image():
    model = fo_tiny("vae_bernoulli")
    x, noise = fo_inputs(model, n=4)
    binary = (x >= 0.5).float()
    assert 0 < binary.mean() < 1
    torch.testing.assert_close(model(x, noise), model(binary, noise))
    # No floor: q(z|x) = p(z) (zero KL) and a decoder sure of image 0's binarisation give image 0
    # an NLL of ~0 nats. Grey levels as soft targets would leave their entropy, hundreds of nats.
    with torch.no_grad():
        model.enc_out.weight.zero_()
        model.enc_out.bias.zero_()
        model.dec_out.weight.zero_()
        model.dec_out.bias.copy_(40 * (2 * binary[0] - 1))
    losses = model(x, noise)
    assert losses[0] < 1e-6 and (losses[1:] > 100).all()


def fo_ks_pvalue(samples, cdf):
    """One-sample Kolmogorov-Smirnov test: statistic and asymptotic p-value (Stephens'
    correction)."""
    x = np.sort(samples)
    n = len(x)
    expected = cdf(x)
    distance = max((np.arange(1, n + 1) / n - expected).max(),
                   (expected - np.arange(n) / n).max())
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * distance
    p = 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return distance, min(max(p, 0.0), 1.0)


def test_fisher_gaussian_mean_score_norm_is_chi2():
    """For L = -log N(x; mu, I) the score is x - mu, so under the model ||grad||^2 ~ chi^2(d)."""
    class GaussianMean(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.mu = nn.Parameter(torch.linspace(-1, 1, d))

        def forward(self, x, noise):  # -log N(x; mu, I) up to a constant
            return 0.5 * (x - self.mu).pow(2).sum(1)

    d, n = 20, 2000
    model = GaussianMean(d)
    generator = torch.Generator().manual_seed(0)
    x = model.mu.detach() + torch.randn(n, d, generator=generator, dtype=torch.float32)
    sq = fo_vmap_sq_norms(model, x, torch.zeros(n, 1), (1,), chunk_size=512)[1][:, 0]
    sq = sq.double().numpy()
    torch.testing.assert_close(torch.from_numpy(sq[:20]).float(),
                               fo_loop_sq_norms(model, x[:20], torch.zeros(20, 1))[1][:, 0],
                               rtol=1e-5, atol=1e-6)

    def chi2(k):
        return lambda v: torch.special.gammainc(torch.tensor(k / 2.0, dtype=torch.float64),
                                                torch.from_numpy(v / 2.0)).numpy()
    _, p = fo_ks_pvalue(sq, chi2(d))
    assert p > 0.01, f"KS rejects chi^2({d}): p = {p}"
    assert abs(sq.mean() - d) < 4 * math.sqrt(2 * d / n)
    _, p_wrong = fo_ks_pvalue(sq, chi2(d + 4))  # the test has power: a wrong dof is rejected
    assert p_wrong < 1e-3


def fo_auroc(id_scores, ood_scores):  # P(ID score > OOD score), ties 1/2
    return float(fo.placements(id_scores, ood_scores)[0].mean())


def test_fisher_auroc_identities():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1, 1, 300), rng.normal(0, 1, 200)
    assert fo_auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert fo_auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 0.0
    assert fo_auroc(np.full(5, 7.0), np.full(4, 7.0)) == 0.5
    assert fo_auroc(a, b) == pytest.approx(fo_auroc(np.exp(a), np.exp(b)), abs=1e-12)
    assert fo_auroc(a, b) == pytest.approx(fo_auroc(3 * a - 1, 3 * b - 1), abs=1e-12)
    assert fo_auroc(a, b) == pytest.approx(1 - fo_auroc(b, a), abs=1e-12)
    id_ties, ood_ties = rng.integers(0, 6, 80), rng.integers(0, 6, 70)  # many ties
    brute = np.mean([(x > y) + 0.5 * (x == y) for x in id_ties for y in ood_ties])
    assert fo_auroc(id_ties, ood_ties) == pytest.approx(brute, abs=1e-12)
    # NaN ranks with -inf
    assert fo_auroc(np.array([1.0, -np.inf]), np.array([np.nan, 0.0])) == 0.625


def fo_correlated_scores(rng, m=300, n=200):
    """Two correlated detectors on the same ID images and two OOD sets."""
    shared = {k: rng.normal(size=size) for k, size in (("eval", m), ("x", n), ("y", n))}
    shift = dict(eval=1.0, x=0.0, y=0.3)
    noisy = lambda v: v + 0.6 * rng.normal(size=len(v))
    scores = {1: {k: dict(likelihood=rng.normal(size=len(v)), typicality=noisy(v + shift[k]),
                          gradient=noisy(v + 1.3 * shift[k])) for k, v in shared.items()}}
    return shared, scores


def test_fisher_delong_standard_errors_match_brute_force_and_bootstrap():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 8, 60).astype(float)  # many ties
    b = rng.integers(0, 6, 50).astype(float)
    v10, v01 = fo.placements(a, b)
    np.testing.assert_allclose(v10, [np.mean((x > b) + 0.5 * (x == b)) for x in a], atol=1e-12)
    np.testing.assert_allclose(v01, [np.mean((a > y) + 0.5 * (a == y)) for y in b], atol=1e-12)
    assert v10.mean() == pytest.approx(v01.mean(), abs=1e-12)
    # DeLong against a paired bootstrap
    shared, scores = fo_correlated_scores(rng)
    rows = fo.evaluate(scores, [1], ["x", "y"])
    pooled = fo.pooled_difference(rows)
    boot = []
    for _ in range(400):  # resample ID and each OOD set's images, the same draw for each detector
        index = {k: rng.integers(0, len(v), len(v)) for k, v in shared.items()}
        au = {(o, d): fo_auroc(scores[1]["eval"][d][index["eval"]], scores[1][o][d][index[o]])
              for o in ("x", "y") for d in ("typicality", "gradient")}
        diffs = [au[(o, "gradient")] - au[(o, "typicality")] for o in ("x", "y")]
        boot.append([au[("x", "gradient")], diffs[0], np.mean(diffs)])
    spread = np.std(boot, axis=0, ddof=1)
    assert rows[0]["se"]["gradient"] == pytest.approx(spread[0], rel=0.2)
    assert rows[0]["diff_se"] == pytest.approx(spread[1], rel=0.2)
    assert pooled[1] == pytest.approx(spread[2], rel=0.2)
    assert pooled[0] == pytest.approx(np.mean([r["diff"] for r in rows]))
    # pairing pays: the paired error is well below the error of two independent AUROCs
    independent = math.hypot(rows[0]["se"]["gradient"], rows[0]["se"]["typicality"])
    assert rows[0]["diff_se"] < 0.8 * independent


def fo_fake_runs(diffs, like=0.3, se=0.01):
    """Runs (one per seed) of one model and 4 OOD sets whose every pairing has the given
    difference."""
    rng = np.random.default_rng(0)
    runs = []
    for seed, d in enumerate(diffs):
        auroc = dict(likelihood=like + 0.02 * seed, typicality=0.8, gradient=0.8 + d)
        phi = lambda: (d + 0.01 * rng.normal(size=50), d + 0.01 * rng.normal(size=40))
        rows = [dict(model="m", ood=o, B=1, auroc=auroc, se={k: se for k in fo.METHODS},
                     diff=d, diff_se=se, phi=phi()) for o in "abcd"]
        runs.append(dict(seed=seed, rows=rows))
    return runs


def test_fisher_verdicts_come_from_intervals_not_win_counts():
    # the gradient score "wins" on average by 0.006 and on most seeds, but seed noise is 0.05
    runs = fo_fake_runs([0.056, -0.044, 0.056, -0.044, 0.006])
    lines, out = fo.verdicts(fo.summarise(runs), [1])
    assert fo.summarise(runs)["pooled"]["all"]["verdict"] == "indistinguishable"
    assert not out["most_pairings"]
    assert out["pairing_verdicts"] == dict(better=0, worse=0, indistinguishable=4)
    assert "INDISTINGUISHABLE" in lines[1] and lines[2].startswith("Gradient better")
    assert "NO" in lines[2]
    assert out["nalisnick"] and out["likelihood_below_chance"] == ["m/a", "m/b", "m/c", "m/d"]
    summary = fo.summarise(fo_fake_runs([0.05, 0.052, 0.048], like=0.47))
    lines, out = fo.verdicts(summary, [1])
    assert summary["pooled"]["all"]["verdict"] == "better"
    assert out["most_pairings"] and not out["nalisnick"]
    # one seed: the DeLong interval of that seed, +-1.96 SE, a zero SE (perfect separation) a
    # zero half-width; two seeds: the engine's t (12.7), not 1.96
    summary = fo.summarise(fo_fake_runs([0.05]))
    assert summary["pairings"][0]["diff"] == pytest.approx((0.05, 1.96 * 0.01), rel=1e-3)
    zero = fo.summarise(fo_fake_runs([0.0], se=0.0))["pairings"][0]["diff"]
    assert zero == pytest.approx((0.0, 0.0), abs=1e-12)
    summary = fo.summarise(fo_fake_runs([0.1, 0.3]))
    assert summary["pairings"][0]["diff"] == pytest.approx((0.2, 12.706 * 0.1), abs=1e-3)


def test_fisher_noise_draws_average_the_loss_and_its_gradient():
    model = fo_tiny("vae")
    images = fo.make_set("test", 10, 0)
    losses, features = fo.score_set(model, images, 0, "s", (1, 5), chunk=5, draws=3)
    x = images.float() / 255
    noise = model.draw_noise(30, fo.stream(0, "noise/s")).reshape(10, 3, -1)
    params = list(model.parameters())

    def sq_norms(loss):
        return torch.stack([g.pow(2).sum() for g in torch.autograd.grad(loss, params)]).double()

    # example i's feature = squared norm of the gradient of its loss averaged over 3 draws
    for i in (0, 7):
        mean_loss = model(x[i].expand(3, -1), noise[i]).mean()
        torch.testing.assert_close(features[1][i], sq_norms(mean_loss), rtol=1e-4, atol=1e-12)
        assert losses[i].item() == pytest.approx(mean_loss.item(), rel=1e-5)
    group = sum(model(x[i].expand(3, -1), noise[i]).mean() for i in range(5, 10))
    torch.testing.assert_close(features[5][1], sq_norms(group), rtol=1e-4, atol=1e-12)


def test_fisher_diffusion_timestep_rule_and_trivial_predictors():
    rows = [dict(t=0, denoiser=0.82, linear=0.80, retest=0.99),
            dict(t=50, denoiser=0.6, linear=0.7, retest=0.3),
            dict(t=200, denoiser=0.25, linear=0.39, retest=0.9)]
    assert fo.pick_timestep(rows) == 200  # t = 0 is the most reliable but the denoiser loses there
    rows[2]["denoiser"] = 0.5
    assert fo.pick_timestep(rows) == 50
    rows[1]["denoiser"] = 0.71
    assert fo.pick_timestep(rows) == 50  # beaten everywhere: the closest
    # a denoiser that predicts eps = 0 has the error E|eps| = sqrt(2 / pi); the best linear
    # predictor is no better at t = 0 and far better at the last t
    model = fo_tiny("diffusion")
    with torch.no_grad():
        for p in (*model.out.parameters(), *model.gate.parameters()):
            p.zero_()
    table = {r["t"]: r for r in fo.timestep_table(model, fo.make_set("test", 50, 0), 0)}
    assert all(r["denoiser"] == pytest.approx(math.sqrt(2 / math.pi), rel=0.02)
               for r in table.values())
    assert table[999]["linear"] < 0.1 * table[999]["denoiser"]
    assert table[0]["linear"] == pytest.approx(table[0]["denoiser"], rel=0.05)


def fo_run(argv, capsys):
    """The command line run in this process, as a user runs it: (exit code, stdout, stderr)."""
    code = 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["fisher_ood.py", *argv])
        try:
            fo.cli(fo.main)
        except SystemExit as e:
            code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_fisher_several_seeds_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fo, "save_figure", lambda path, draw: None)  # drawing is the slow part
    code, out, _ = fo_run([f"--out={tmp_path}", "--model=vae,diffusion", "--n_train=60",
                           "--n_test=20", "--n_ood=10", "--seeds=2", "--draws=2", *FO_TINY[1:]],
                          capsys)
    results = json.loads((tmp_path / "results.json").read_text())
    assert code == 0 and [r["seed"] for r in results["runs"]] == [0, 1]
    pairings = results["summary"]["pairings"]
    assert len(pairings) == 2 * 7 * 2 and all(math.isfinite(p["diff"][1]) for p in pairings)
    assert set(results["summary"]["pooled"]) == {"all", "vae", "diffusion"}
    assert "t-interval over seeds" in out and "scored at t=" in out


@pytest.mark.parametrize("argv", [["--n_test=4", "--n_ood=2", "--batch_sizes=1"],
                                  ["--n_train=1", "--n_test=20", "--n_ood=10"]])
def test_fisher_smallest_inputs_run_through_to_the_figures(argv, tmp_path, capsys):
    code, out, err = fo_run([f"--out={tmp_path}", *FO_TINY, *argv], capsys)
    assert code == 0 and "Traceback" not in err, err
    assert (tmp_path / "samples.png").exists() and (tmp_path / "score_histograms.png").exists()


def test_fisher_figure_has_a_colour_per_set_and_a_legend_per_panel(monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rng = np.random.default_rng(0)
    names = ["near", "far", "wide"]  # "far" lies wholly outside the likelihood panel's range
    shift = dict(eval=0.0, near=0.5, far=1e6, wide=2.0)
    scores = {kind: {1: {name: dict(likelihood=rng.normal(size=50) + shift[name],
                                    gradient=rng.normal(size=50) - shift[name] / 1e3)
                         for name in ["eval", *names]}} for kind in ("a", "b")}
    figures = []
    monkeypatch.setattr(fo, "save_figure", lambda path, draw: figures.append(draw(plt)))
    fo.plot(fo.Config(batch_sizes="1"), scores, names)
    colours = {}
    for ax in figures[0].axes:
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_legend() is not None
        for handle, text in zip(ax.get_legend().legend_handles, ax.get_legend().get_texts()):
            name = text.get_text().split(" (")[0]
            line = isinstance(handle, matplotlib.lines.Line2D)  # a set off the axis
            colour = handle.get_color() if line else handle.get_facecolor()
            colour = matplotlib.colors.to_hex(colour, keep_alpha=False)
            assert colours.setdefault(name, colour) == colour, name  # the same in every panel
    assert len(set(colours.values())) == len(colours) == 4  # ID (eval) and the three sets
    plt.close("all")


def test_fisher_gaussian_fit_and_score_match_float64_reference():
    rng = np.random.default_rng(1)
    fit_features = rng.normal(size=(50, 6)) * [1, 2, 3, 4, 5, 6] + 10
    fit_features[:, 2] = 4.0  # a zero-variance feature: dropped
    new = rng.normal(size=(7, 6)) * 3
    fit = fo.fit_gaussians(fit_features)
    assert fit[2].tolist() == [True, True, False, True, True, True]
    for row, got in zip(new, fo.gaussian_score(new, fit)):
        want = 0.0
        for layer in [0, 1, 3, 4, 5]:
            column = [float(v) for v in fit_features[:, layer]]
            mu = sum(column) / len(column)
            sd = math.sqrt(sum((v - mu) ** 2 for v in column) / (len(column) - 1))
            want += -0.5 * ((row[layer] - mu) / sd) ** 2 - math.log(sd * math.sqrt(2 * math.pi))
        assert got == pytest.approx(want, rel=1e-12)
    # scaling the loss by c multiplies every f by c^2 and shifts every log f equally: unchanged
    f_fit, f_new = np.exp(rng.normal(size=(40, 5))), np.exp(rng.normal(size=(9, 5)))
    score = lambda c: fo.gaussian_score(fo.log_features(c * f_new),
                                        fo.fit_gaussians(fo.log_features(c * f_fit)))
    np.testing.assert_allclose(score(1), score(49), rtol=1e-10)


def test_fisher_typicality_and_likelihood_groups():
    losses = np.arange(12.0)
    np.testing.assert_array_equal(fo.group_losses(losses, 5), [10.0, 35.0])  # tail of 2 dropped
    features = {k: {1: torch.rand(4, 3), 2: torch.rand(2, 3)} for k in ("fit", "eval", "x")}
    group_of = dict(fit=np.array([1.0, 3.0, 1.0, 3.0]), eval=np.array([2.0, 2.0, 2.0, 2.0]),
                    x=np.array([0.0, 4.0, 0.0, 4.0]))
    scores = fo.detect(group_of, features, [1, 2], ["x"])
    # H = 2, symmetric
    np.testing.assert_array_equal(scores[1]["x"]["typicality"], [-2.0, -2.0, -2.0, -2.0])
    np.testing.assert_array_equal(scores[1]["x"]["likelihood"], [0.0, -4.0, 0.0, -4.0])
    np.testing.assert_array_equal(scores[2]["x"]["typicality"], [0.0, 0.0])  # H = 4 for pairs


@pytest.mark.parametrize("kind", fo.MODELS)
def test_fisher_model_loss_falls(kind, tmp_path):
    cfg = fo.Config(hidden=32, latent=4, couplings=2, n_test=40, n_ood=20, max_steps=25,
                    warmup=2, batch_size=32, lr=3e-3, threads=1, out=str(tmp_path))
    ctx = fo.setup(cfg)
    train_x = fo.make_set("train", 256, 0)
    x = train_x[:64].float() / 255
    torch.manual_seed(0)
    before = fo.build(kind, cfg).eval()
    noise = before.draw_noise(64, torch.Generator().manual_seed(3))
    torch.manual_seed(0)  # fit_model builds the same initial model
    after, summary = fo.fit_model(kind, cfg, ctx, train_x)
    # diffusion: judge at a middle timestep; at t = 0 the noise is nearly unpredictable
    extra = (torch.full((64,), 300),) if kind == "diffusion" else ()
    with torch.no_grad():
        loss_before = before(x, noise, *extra).mean().item()
        loss_after = after(x, noise, *extra).mean().item()
    assert summary["steps"] == 25 and math.isfinite(loss_after)
    assert loss_after < loss_before - 0.02 * abs(loss_before), (kind, loss_before, loss_after)


def test_fisher_datasets_deterministic():
    for name in ["train"] + fo.OOD_SETS:
        a, b = fo.make_set(name, 12, 0), fo.make_set(name, 12, 0)
        assert a.dtype == torch.uint8 and a.shape == (12, 784)
        assert torch.equal(a, b), name
        assert not torch.equal(a, fo.make_set(name, 12, 1)), name
    # separate streams
    assert not torch.equal(fo.make_set("train", 12, 0), fo.make_set("test", 12, 0))
    # the simple sets have no pixel noise: constant images are constant
    constant = fo.make_set("constant", 5, 0)
    assert (constant == constant[:, :1]).all()
    sets = fo.load_data(fo.Config(n_train=30, n_test=40, n_ood=20))
    assert list(sets) == ["train", "fit", "eval", *fo.OOD_SETS]
    assert [len(v) for v in sets.values()] == [30, 20, 20] + [20] * len(fo.OOD_SETS)


def test_fisher_cli_bad_input(capsys):
    code, err = run_as_script("fisher_ood.py", ["--model=bogus"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "error" in lines[0] and "Traceback" not in err, err
    # --model=vae,vae counted every pairing twice; --n_test=4 --n_ood=2 is too small for B = 5
    for args in (["--batch_sizes=1,x"], ["--batch_sizes=,"], ["--diff_t=1000"], ["--diff_t=-1"],
                 ["--n_test=-1"], ["--data=svhn"],
                 ["--nope"], ["--seeds=0"], ["--seed=4294967295", "--seeds=2"],
                 ["--n_test=4", "--n_ood=2"], ["--n_train=20", "--n_test=20", "--n_ood=10",
                                               *FO_TINY, "--model=vae,vae"]):
        code, out, err = fo_run(args, capsys)
        err = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(err) == 1 and "error" in err[0] and not out, (args, err)


def fo_idx(images):
    """(n, 784) uint8 images as a gzipped IDX file, the format of the MNIST downloads."""
    import gzip
    header = b"".join(v.to_bytes(4, "big") for v in (0x803, len(images), 28, 28))
    return gzip.compress(header + images.numpy().tobytes())


def fo_stand_in(monkeypatch, directory, name, raw, pinned=None):
    """Puts raw where train.download keeps the dataset `name` and pins its md5 (or pinned's), at
    a URL nothing answers: a file that fails its digest is a failed download."""
    import hashlib
    directory.mkdir(exist_ok=True)
    (directory / f"{name}.gz").write_bytes(raw)
    digest = "md5:" + hashlib.md5(raw if pinned is None else pinned).hexdigest()
    monkeypatch.setitem(train.DATASETS, name, ("http://127.0.0.1:9/never-fetched.gz", digest))


def test_fisher_idx_parser():
    images = torch.randint(0, 256, (3, 784), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    raw = b"".join(v.to_bytes(4, "big") for v in (0x803, 3, 28, 28)) + images.numpy().tobytes()
    assert torch.equal(fo.parse_idx(raw), images)
    for bad in (raw[:-1], raw + b"\0", b"\0\0\x08\x01" + raw[4:]):  # short, long, labels
        with pytest.raises(train.DataError, match="IDX"):
            fo.parse_idx(bad)


def test_fisher_real_data_run_end_to_end_on_generated_idx_files(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    files = {"fashionmnist-train": fo.make_set("train", 60, 7),
             "fashionmnist-test": fo.make_set("test", 40, 7),
             "mnist-test": fo.make_set("strokes", 40, 7)}
    for name, images in files.items():  # the pinned digests are the real files'
        fo_stand_in(monkeypatch, data, name, fo_idx(images))
    monkeypatch.setattr(fo, "save_figure", lambda path, draw: None)  # drawing is the slow part
    fo.load_idx.cache_clear()
    sets = fo.load_data(fo.Config(data="fashionmnist", data_dir=str(data), n_train=60,
                                  n_test=20, n_ood=10))
    assert list(sets) == ["train", "fit", "eval", "mnist", "constant", "noise", "inverted"]
    assert torch.equal(sets["train"], files["fashionmnist-train"])
    assert torch.equal(sets["mnist"], files["mnist-test"][:10])
    assert torch.equal(sets["inverted"], 255 - files["fashionmnist-train"][-10:])
    test = {bytes(image.numpy()) for image in files["fashionmnist-test"]}
    held_out = torch.cat([sets["fit"], sets["eval"]])
    assert len(held_out) == 20 and {bytes(image.numpy()) for image in held_out} <= test
    code, out, err = fo_run([f"--out={tmp_path / 'out'}", "--data=fashionmnist",
                             f"--data_dir={data}", "--n_train=60", "--n_test=20", "--n_ood=10",
                             "--model=vae,diffusion", "--seeds=2", "--draws=2", *FO_TINY[1:]],
                            capsys)
    fo.load_idx.cache_clear()
    assert code == 0 and "Traceback" not in err, err
    assert "images: train 60, fit 10, eval 10, mnist 10, constant 10, noise 10, inverted 10" in out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    pairings = results["summary"]["pairings"]
    assert results["summary"]["seeds"] == [0, 1]
    assert {p["ood"] for p in pairings} == {"mnist", "constant", "noise", "inverted"}
    assert len(pairings) == 2 * 4 * 2 and all(math.isfinite(p["diff"][0]) for p in pairings)
    assert set(results["summary"]["pooled"]) == {"all", "vae", "diffusion"}
    assert "t-interval over seeds" in out and "scored at t=" in out


def test_fisher_a_bad_download_or_file_is_one_line(tmp_path, monkeypatch, capsys):
    import gzip
    data = tmp_path / "data"
    good = fo_idx(fo.make_set("test", 40, 0))
    for name in ("mnist-test", "fashionmnist-test"):
        fo_stand_in(monkeypatch, data, name, good)
    cases = [(b"truncated", good, "could not download"),  # fails its digest: fetched again
             (gzip.compress(b"not an IDX file"), None, "IDX"),
             (good, None, "--n_train <= 40")]  # too few images for the flags
    for raw, pinned, problem in cases:
        fo_stand_in(monkeypatch, data, "mnist-train", raw, pinned)
        fo.load_idx.cache_clear()
        code, out, err = fo_run(["--data=mnist", f"--data_dir={data}", "--n_train=50",
                                 "--n_test=20", "--n_ood=10", f"--out={tmp_path}", *FO_TINY],
                                capsys)
        errors = [line for line in err.splitlines() if line.startswith("error")]
        assert code == 1 and len(errors) == 1 and problem in errors[0], (problem, err)
        assert "Traceback" not in err and not out
    fo.load_idx.cache_clear()


def test_fisher_bench_prints_the_speedup(tmp_path, capsys):
    code, out, err = fo_run(["--bench", "--batch_size=6", "--model=vae,diffusion", "--hidden=8",
                             "--latent=2", "--threads=1", f"--out={tmp_path}"], capsys)
    assert code == 0 and not err, err
    rows = [line.split() for line in out.splitlines() if line.startswith("  ")]
    assert [row[0] for row in rows] == ["vae", "diffusion"], out
    for row in rows:  # ... loop/fast 3.1x, fast/backward 1.20x, max relative difference 2e-07
        assert float(row[row.index("loop/fast") + 1].rstrip("x,")) > 0
        assert float(row[-1]) < 1e-4  # the fast norms are the loop's


def test_fisher_ctrl_c_while_scoring_is_one_line_exit_130(tmp_path, monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fo, "fast_sq_norms", interrupt)
    code, _, err = fo_run([f"--out={tmp_path}", "--n_train=32", "--n_test=20", "--n_ood=10",
                           *FO_TINY], capsys)
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "error: interrupted"


@pytest.mark.parametrize("name", ["fisher:vae", "fisher:flow", "fisher:diffusion"])
def test_fisher_compiles_once_and_never_recompiles(name, tmp_path):
    assert_compiles_once(name, tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fisher_gpu_command_line_runs_and_evaluates(tmp_path):
    run_on_the_gpu("fisher_ood", tmp_path, resume=False)


# ---- the engine's contract on every script's own model and loss; the GPU checks

def script_case(name, out, gpu=False, B=4):
    """(cfg, model, get_batch, loss_fn) of one script's training step, its noise given in the batch.
    Tiny on the CPU; with gpu=True the script's --gpu model (the configuration its users run)."""
    g = torch.Generator().manual_seed(5)
    common = dict(out=str(out), gpu=gpu, max_steps=2, warmup=1, log_every=1, batch_size=B, lr=1e-3,
                  threads=1)
    kind = name.split(":")[1]
    if name.startswith("hnet"):
        return hnet_case(kind, common, g, gpu, B)
    if name.startswith("dva"):
        return dva_case(kind, common, g, gpu, B)
    if name.startswith("fisher"):
        return fisher_case(kind, common, g, gpu, B)
    return subliminal_case(common, g, gpu, B)


def hnet_case(method, common, g, gpu, B):
    small = dict(n_embd=32, n_head=2, n_enc=1, n_main=1, n_dec=1, seq_len=16, window=8,
                 grad_accum=1)
    cfg = hr.Config(**common, **({} if gpu else small))
    L = cfg.seq_len
    batch = dict(x=torch.randint(0, 256, (B, L + 1), generator=g),
                 noise=torch.rand(B, L, generator=g))
    return cfg, hr.ChunkedByteLM(cfg, method), batch, hr.loss_fn_for(cfg, method)


def dva_case(kind, common, g, gpu, B):
    small = {} if gpu else dict(n_layer=1, n_head=2, seq_len=8, widths="16")
    cfg = dva.Config(**common, **small)
    # --gpu: GPT-2's 50257 tokens + MASK/BOS as id V; build() pads the head to 50304 = 64 x 786
    V, L, d = (50257, cfg.seq_len, 768) if gpu else (11, cfg.seq_len, 16)
    x = torch.randint(0, min(V, 50257), (B, L), generator=g)
    noise = dict(t=torch.rand(B, generator=g) * 0.9 + 0.1, u=torch.rand(B, L, generator=g))
    batch = x if kind == "ar" else dict(x=x, **noise)
    return cfg, dva.build(kind, cfg, V, d), batch, dva.loss_fn_for(kind, V, cfg.eps)


def fisher_case(kind, common, g, gpu, B):
    small = {} if gpu else dict(hidden=16, latent=4, couplings=2, diff_T=10)
    cfg = fo.Config(**common, **small)
    model = fo.build(kind, cfg)
    x = torch.rand(B, 784, generator=g)  # flattened 28 x 28 images in [0, 1]
    if kind == "flow":
        noise = torch.rand(B, 784, generator=g)
    else:
        noise = torch.randn(B, model.noise_dim, generator=g)
    batch = dict(x=x, noise=noise)
    if kind == "diffusion":
        batch["t"] = torch.randint(cfg.diff_T, (B,), generator=g)
    return cfg, model, batch, fo.training_loss(kind, cfg, getattr(model, "noise_dim", 0))


def subliminal_case(common, g, gpu, B):
    engine = ("max_steps", "warmup", "log_every", "lr")
    small = {} if gpu else dict(n_layer=1, n_head=2, n_embd=16)
    cfg = sd.Config(**{k: v for k, v in common.items() if k not in engine}, **small, prompts=B)
    cfg = dataclasses.replace(cfg, max_steps=2, warmup=1, log_every=1, lr=1e-3, weight_decay=0.0)
    V, C = len(sd.VOCAB), sd.COMPLETION_LEN
    batch = dict(prompt=torch.randint(0, V, (B, 6), generator=g),
                 chosen=torch.randint(0, V, (B, C), generator=g),
                 rejected=torch.randint(0, V, (B, C), generator=g),
                 ref_c=-torch.rand(B, generator=g) * 20, ref_r=-torch.rand(B, generator=g) * 20)
    # the script's own DPO step: chosen and rejected in one forward
    dpo = lambda m, b: sd.dpo_batch_loss(m, b, cfg.beta)
    return cfg, sd.new_model(cfg), batch, dpo


CASES = ["hnet:rl", "hnet:hnet", "dva:ar", "dva:mdlm", "fisher:vae", "fisher:flow",
         "fisher:diffusion", "subliminal:dpo"]


def one_script_step(name, out, **cfg_over):
    cfg, model, batch, loss_fn = script_case(name, out)
    cfg = dataclasses.replace(cfg, **cfg_over)
    ctx = train.setup(cfg)
    torch.manual_seed(0)
    model.load_state_dict(script_case(name, out)[1].state_dict())  # the same init on every rank
    train.train(model, lambda i: batch, loss_fn, cfg, ctx, ckpt_path=False, quiet=True)
    return model.state_dict()


def test_train_two_ranks_equal_one_process_for_every_script(tmp_path, ddp_runs):
    # For every script that trains through train(): one step on 2 gloo ranks (2 rows each) equals
    # one step of one process on all 4 rows, and one process with --grad_accum=2. The noise is given
    # in the batch; statistics over the batch (hnet_rl's advantage baseline and rate) are global.
    ranks = [torch.load(ddp_runs / f"rank{r}.pt") for r in (0, 1)]
    for name in CASES:
        one = one_script_step(name, tmp_path / "one" / name.replace(":", "_"))
        accum = one_script_step(name, tmp_path / "accum" / name.replace(":", "_"), grad_accum=2)
        for k, v in one.items():
            message = lambda m: f"{name} {k}: {m}"
            torch.testing.assert_close(ranks[0][name][k], v, atol=1e-5, rtol=1e-4, msg=message)
            if not name.startswith("hnet"):  # hnet_rl's batch statistics are per forward
                torch.testing.assert_close(accum[k], v, atol=1e-5, rtol=1e-4, msg=message)
            assert torch.equal(ranks[0][name][k], ranks[1][name][k])


def assert_compiles_once(name, tmp_path):
    """The script's training step compiled (aot_eager stands in for inductor on the CPU: the same
    graph capture and guards, no code generation) for 12 steps on fresh values of the same
    shapes: every graph is compiled in the first step, none after (torch's own counter)."""
    cfg, model, batch, loss_fn = script_case(name, tmp_path)
    cfg = dataclasses.replace(cfg, compile=True, compile_backend="aot_eager", max_steps=12)
    g, counters, after_first = torch.Generator().manual_seed(1), torch._dynamo.utils.counters, []

    def shuffled(i):  # new values, same shapes
        if i == 1:
            after_first.append(counters["stats"]["unique_graphs"])
        if isinstance(batch, dict):
            return {k: v[torch.randperm(len(v), generator=g)] for k, v in batch.items()}
        return batch[torch.randperm(len(batch), generator=g)]
    before = counters["stats"]["unique_graphs"]
    out = train.train(model, shuffled, loss_fn, cfg, train.setup(cfg), ckpt_path=False, quiet=True)
    assert after_first[0] > before and counters["stats"]["unique_graphs"] == after_first[0]
    assert all(math.isfinite(h["loss"]) for h in out["history"])
    torch._dynamo.reset()


GPU_COMMANDS = {  # a few steps of each script's --gpu run, with an evaluation, on offline data
    "hnet_rl": ["--data=prose", "--max_steps=4", "--eval_every=2", "--warmup=1", "--eval_windows=4",
                "--seeds=1", "--methods=rl hnet"],
    "subliminal_dpo": ["--seeds=1", "--rounds=1", "--pretrain_steps=8", "--judge_steps=2",
                       "--prompts=64", "--eval_prompts=8", "--conditions=finetuned DPO"],
    "fisher_ood": ["--max_steps=4", "--n_train=256", "--n_test=64", "--n_ood=32"],
    "diffusion_vs_ar": ["--data=prose", "--tokenizer=char", "--widths=96", "--epochs=2",
                        "--eval_epochs=1", "--n_train=256", "--n_val=32", "--n_test=32",
                        "--seq_len=128"],
}


@pytest.mark.parametrize("script", GPU_COMMANDS)
def test_gpu_command_lines_are_valid(script):
    module = {"hnet_rl": hr, "subliminal_dpo": sd, "fisher_ood": fo, "diffusion_vs_ar": dva}[script]
    cfg = parse_config(module.Config, script, ["--gpu", *GPU_COMMANDS[script]])
    assert cfg.gpu and (script == "fisher_ood" or "resume" not in module.Config.unused)


def run_on_the_gpu(script, tmp_path, resume=True):
    """The script's --gpu command line as a user runs it (compiled, bf16, fresh batches, an
    evaluation), then again with --resume, which loads the checkpoint onto the GPU."""
    command = [sys.executable, f"{script}.py", "--gpu", f"--out={tmp_path}", *GPU_COMMANDS[script]]
    for again in ([], ["--resume"]) if resume else ([],):
        done = subprocess.run(command + again, cwd=ROOT, capture_output=True, text=True,
                              timeout=900)
        print(done.stdout[-3000:])
        assert done.returncode == 0, done.stderr[-3000:]
    assert not resume or "resumed from" in done.stdout


def fake_memory(build, bf16=False):
    """GiB one training micro-step needs, estimated on any machine without allocating anything:
    build() -> (model, loss_fn, rows) runs under FakeTensorMode, so no tensor holds data.
    Counted: 16 bytes per parameter (fp32 weights, gradients, AdamW's two moments) and every
    tensor autograd saves for backward; bf16=True: CPU bf16 autocast, standing in for --gpu's."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.multiprocessing.reductions import StorageWeakRef
    saved = {}

    def pack(t):  # a tensor kept for backward, unless it is a weight (counted in the 16 bytes)
        if (key := StorageWeakRef(t.untyped_storage())) not in own:
            saved[key] = t.untyped_storage().nbytes()
        return t
    with FakeTensorMode(allow_non_fake_inputs=True):
        model, loss_fn, rows = build()
        own = {StorageWeakRef(t.untyped_storage()) for t in [*model.parameters(), *model.buffers()]}
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        with hooks, torch.autocast("cpu", torch.bfloat16, bf16):
            loss_fn(model, rows)
    return (16 * train.count_params(model) + sum(saved.values())) / 2**30


def hnet_estimate_memory(cfg, method):
    """GiB of one hnet_rl training micro-step (FakeTensor estimate). The chunk count depends on
    the data: it is fixed at what compiled code is given at the target rate."""
    from unittest import mock
    L, rows = cfg.seq_len, cfg.batch_size // cfg.grad_accum
    M = hr.chunk_capacity(L, cfg.rate)
    batch = lambda: dict(x=torch.randint(0, 256, (rows, L + 1)), noise=torch.rand(rows, L),
                         b=torch.rand(rows, L) < cfg.rate)
    fixed_chunks = lambda b, rate=None: torch.arange(M, device=b.device).expand(len(b), M)
    with mock.patch("hnet_rl.chunk_index", fixed_chunks):
        return fake_memory(lambda: (hr.ChunkedByteLM(cfg, method), hr.loss_fn_for(cfg, method),
                                    batch()), bf16=cfg.gpu)


@pytest.mark.parametrize("name", CASES)
def test_gpu_defaults_fit_one_80gb_gpu_by_fake_tensor_estimate(name, tmp_path):
    # Each script's --gpu model and one micro-batch (its --gpu batch / --grad_accum rows) under
    # FakeTensorMode (fake_memory): nothing is allocated. hnet_rl's estimate fixes the
    # data-dependent chunk count at what compiled code gets at the target rate.
    B = dict(hnet=128, dva=12, fisher=128, subliminal=32)[name.split(":")[0]]
    if name.startswith("hnet"):
        cfg = hr.Config(gpu=True)
        gib = hnet_estimate_memory(cfg, name[5:])
    else:
        made = []

        def build():
            made.append(script_case(name, tmp_path, gpu=True, B=B))
            cfg, model, batch, loss_fn = made[0]
            return model, loss_fn, train.slice_rows(batch, 0, cfg.grad_accum, "cpu")
        gib = fake_memory(build, bf16=True)
        cfg = made[0][0]
    print(f"{name}: {B // cfg.grad_accum} rows per forward, ~{gib:.1f} GiB")
    assert gib < 60  # room for the CUDA context, backward's transients and fragmentation


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_train_bench_prints_mfu():
    done = subprocess.run([sys.executable, "train.py", "--bench", "--gpu", "--rounds=2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    print(done.stdout)
    assert done.returncode == 0 and "MFU" in done.stdout and "GiB" in done.stdout


@pytest.mark.parametrize("script", ["hnet_rl", "subliminal_dpo", "fisher_ood", "diffusion_vs_ar"])
def test_readme_names_where_each_idea_lives_in_the_first_40_percent(script):
    readme = (ROOT / "README.md").read_text().split("<!-- ideas:begin -->")[1]
    entry = readme.split("<!-- ideas:end -->")[0].split(f"- `{script}.py`:")[1].split("\n- ")[0]
    source = (ROOT / f"{script}.py").read_text()
    defined, kinds = {}, (ast.FunctionDef, ast.ClassDef)
    for node in [n for n in ast.parse(source).body if isinstance(n, kinds)]:
        defined[node.name] = node.lineno
        for method in [m for m in getattr(node, "body", []) if isinstance(m, ast.FunctionDef)]:
            defined[f"{node.name}.{method.name}"] = method.lineno
    names = re.findall(r"`([\w.]+)`", entry)
    assert names and all(defined.get(n, math.inf) <= 0.4 * source.count("\n") for n in names), [
        (n, defined.get(n)) for n in names]


@pytest.mark.parametrize("script,cls", [("hnet_rl", "hr"), ("subliminal_dpo", "sd"),
                                        ("fisher_ood", "fo"), ("diffusion_vs_ar", "dva")])
def test_scripts_help_lists_only_flags_they_use(script, cls, capsys):
    config = {"hr": hr, "sd": sd, "fo": fo, "dva": dva}[cls].Config
    with pytest.raises(SystemExit):
        parse_config(config, script, ["--help"])
    help_text = capsys.readouterr().out
    assert "unused" not in help_text and "ignored" not in help_text
    for flag in config.unused:
        assert f"--{flag} " not in help_text
        with pytest.raises(SystemExit) as e:  # and refused, not silently accepted
            parse_config(config, script, [f"--{flag}=1"])
        assert e.value.code == 2
    with pytest.raises(SystemExit) as e:  # no prefix matching: --data is not --data_dir
        parse_config(config, script, ["--data_d=/x"])
    assert e.value.code == 2


# ---- hnet_rl.py (last: its compiled job is the longest)

def hr_tiny_cfg(**kw):
    base = dict(n_embd=16, n_head=2, n_enc=1, n_main=1, n_dec=1, window=6, seq_len=24,
                batch_size=4, max_steps=5)
    return hr.Config(**{**base, **kw})


def hr_tiny_model(method, seed=0, **kw):
    torch.manual_seed(seed)
    return hr.ChunkedByteLM(hr_tiny_cfg(**kw), method).eval()


def hr_random_boundaries(B, L, rate, seed):
    g = torch.Generator().manual_seed(seed)
    b = torch.rand(B, L, generator=g) < rate
    b[:, 0] = True
    return b


def test_hnet_rl_chunk_upsample_identities():
    torch.manual_seed(0)
    x = torch.randn(3, 11, 5)
    ones = torch.ones(3, 11, dtype=torch.bool)
    # all boundaries: the identity
    assert torch.equal(hr.upsample(hr.downsample(x, hr.chunk_index(ones)), ones), x)
    b = hr_random_boundaries(3, 11, 0.3, seed=1)
    idx = hr.chunk_index(b)
    up = hr.upsample(hr.downsample(x, idx), b)
    for r in range(3):
        starts = b[r].nonzero().flatten().tolist()
        lengths = [e - s for s, e in zip(starts, starts[1:] + [11])]
        assert sum(lengths) == 11  # chunk lengths sum to L
        for t in range(11):
            last = max(s for s in starts if s <= t)  # the latest chunk start at or before t
            assert torch.equal(up[r, t], x[r, last])
        assert idx[r, : len(starts)].tolist() == starts  # boundaries first, in order


def test_hnet_rl_smoothing_matches_float64_loop():
    torch.manual_seed(0)
    z, P = torch.randn(2, 9, 4), torch.rand(2, 9).clamp(1e-4, 1 - 1e-4)
    ref = torch.zeros(2, 9, 4, dtype=torch.float64)
    prev = torch.zeros(2, 4, dtype=torch.float64)
    for j in range(9):  # zbar_j = P_j z_j + (1 - P_j) zbar_{j-1}
        prev = P[:, j, None].double() * z[:, j].double() + (1 - P[:, j, None].double()) * prev
        ref[:, j] = prev
    torch.testing.assert_close(hr.smooth_chunks(z, P).double(), ref, atol=1e-5, rtol=1e-5)
    no_memory = hr.smooth_chunks(z, torch.ones(2, 9) - 1e-7)  # P = 1
    torch.testing.assert_close(no_memory, z, atol=1e-5, rtol=1e-5)
    # long chunk sequences at H-Net's clamp: no overflow, no lost precision
    z, P = torch.randn(1, 600, 4), torch.full((1, 600), 1e-4)
    P[0, ::7] = 1 - 1e-4
    ref, prev = torch.zeros(1, 600, 4, dtype=torch.float64), torch.zeros(1, 4, dtype=torch.float64)
    for j in range(600):
        prev = P[:, j, None].double() * z[:, j].double() + (1 - P[:, j, None].double()) * prev
        ref[:, j] = prev
    torch.testing.assert_close(hr.smooth_chunks(z, P).double(), ref, atol=1e-5, rtol=1e-5)


def test_hnet_rl_ratio_loss_values_and_gradient():
    N = 5.0

    def L(Fv, Gv):
        return hr.ratio_loss(torch.full((100,), Fv), torch.full((100,), Gv), N).item()
    assert L(0.2, 0.2) == pytest.approx(1.0, abs=1e-6)
    assert L(1.0, 1.0) == pytest.approx(N, abs=1e-5)
    assert L(0.0, 0.0) == pytest.approx(N / (N - 1), abs=1e-6)
    # too many boundaries: the gradient pushes p down, and vice versa
    for Fv, sign in ((0.5, 1.0), (0.05, -1.0)):
        p = torch.full((100,), 0.3, requires_grad=True)
        hr.ratio_loss(torch.full((100,), Fv), p, N).backward()
        assert torch.sign(p.grad.sum()).item() == sign


def test_hnet_rl_straight_through_is_exactly_one():
    c = torch.tensor([0.1, 0.5, 0.77, 0.999, 0.3333], requires_grad=True)
    y = hr.straight_through_one(c)
    assert torch.equal(y, torch.ones(5))  # bit-exact, not approximately
    (y * torch.arange(5.0)).sum().backward()
    assert torch.equal(c.grad, torch.arange(5.0))


def test_hnet_rl_hnet_routing_identity_init():
    m = hr_tiny_model("hnet")
    h = torch.randn(1, 4, 16)
    h[0, 1] = h[0, 0]  # identical neighbours -> p = 0
    h[0, 2] = -h[0, 1]  # opposite -> p = 1
    p = m.hnet_boundaries(h)["p"][0]
    assert p[0] == 1 and abs(p[1]) < 1e-6 and abs(p[2] - 1) < 1e-6


@pytest.mark.parametrize("method", hr.METHODS)
def test_hnet_rl_causality_by_perturbation(method):
    m = hr_tiny_model(method)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (2, 24), generator=g)
    x[:, ::4] = 32  # some spaces so `space` and `after` have boundaries
    noise = torch.rand(2, 24, generator=g)  # the sampling noise is held fixed
    given = hr_random_boundaries(2, 24, 0.25, seed=4)
    out = m(x, given, noise)
    for t in (3, 11, 17):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randint(0, 256, (2, 23 - t), generator=g)  # change every byte after t
        out2 = m(x2, given, noise)
        torch.testing.assert_close(out2["logits"][:, : t + 1], out["logits"][:, : t + 1],
                                   atol=1e-5, rtol=1e-5)
        assert torch.equal(out2["b"][:, : t + 1], out["b"][:, : t + 1])


def test_hnet_rl_causality_by_gradient():
    m = hr_tiny_model("hnet")
    x = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(5))
    emb = m.wte.weight
    t = 9
    m.zero_grad()
    m(x)["logits"][0, t].sum().backward()
    # bytes after t must get no gradient through their embedding rows (unless the byte value also
    # occurs before t)
    later_only = set(x[0, t + 1:].tolist()) - set(x[0, : t + 1].tolist())
    assert all(emb.grad[v].abs().max() == 0 for v in later_only)


def test_hnet_rl_discounted_returns_match_double_loop():
    torch.manual_seed(0)
    adv = torch.randn(3, 13)
    for gamma in (0.9, 0.99, 1.0):
        ref = torch.zeros(3, 13, dtype=torch.float64)
        for t in range(13):
            for k in range(t, 13):
                ref[:, t] += gamma ** (k - t) * adv[:, k].double()
        torch.testing.assert_close(hr.discounted_returns(adv, gamma).double(), ref,
                                   atol=1e-5, rtol=1e-5)


def hr_toy_expectations(gamma, T=5):
    """Exact E_a[grad of the per-sequence policy loss] over all 2^(T-1) action sequences (a_0
    forced) and the exact gradient of J = E_a[sum_t r_t(a)] for a sequential policy
    logit_t = theta_t + phi a_{t-1}, with causal rewards r_t = -CE_final_t(a_{<=t}) + baseline_t."""
    theta = torch.tensor([0.0, 0.3, -0.5, 0.8, -0.2], dtype=torch.float64, requires_grad=True)
    phi = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(T, T, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    baseline = torch.randn(T, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cfg = hr.Config(gamma=gamma, lambda_c=0.0, batch_adv=False, early_reward=True)
    est = [torch.zeros(T, dtype=torch.float64), torch.zeros((), dtype=torch.float64)]
    J = 0.0
    for tail in itertools.product((0, 1), repeat=T - 1):
        a = torch.tensor((1,) + tail, dtype=torch.float64)
        prev = torch.cat([torch.zeros(1, dtype=torch.float64), a[:-1]])
        logits = theta + phi * prev
        logp = torch.where(a.bool(), F.logsigmoid(logits), F.logsigmoid(-logits))
        prob = logp[1:].sum().exp()  # probability of this sequence (a_0 forced)
        # depends on a_<=t
        ce_final = torch.stack([torch.tanh((w[t, : t + 1] * a[: t + 1]).sum()) for t in range(T)])
        out = dict(logp=logp[None], gate_logits=logits[None], p=torch.sigmoid(logits)[None])
        loss, _ = hr.policy_loss(out, ce_final[None], baseline[None], cfg)
        grads = torch.autograd.grad(loss, (theta, phi), retain_graph=True)
        est[0] += prob.detach() * grads[0]
        est[1] += prob.detach() * grads[1]
        J = J + prob * (baseline - ce_final).sum()
    true = torch.autograd.grad(J, (theta, phi))
    # the policy loss is -LAMBDA_G x the mean over the T-1 free positions
    scale = -hr.LAMBDA_G / (T - 1)
    return est, [scale * g for g in true]


def test_hnet_rl_reinforce_unbiased_by_enumeration():
    est, true = hr_toy_expectations(gamma=1.0)
    torch.testing.assert_close(est[0], true[0], atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(est[1], true[1], atol=1e-12, rtol=1e-9)
    est, true = hr_toy_expectations(gamma=0.5)  # discounting trades bias for variance: it is biased
    assert (est[1] - true[1]).abs() > 1e-6


@pytest.mark.parametrize("method", hr.METHODS)
def test_hnet_rl_training_lowers_loss(method):
    cfg = hr_tiny_cfg()
    torch.manual_seed(0)
    model = hr.ChunkedByteLM(cfg, method)
    text = torch.tensor(list(b"the cat sat on the mat and the dog sat on the log " * 4))
    batch = dict(x=torch.stack([text[i: i + 25] for i in (0, 7, 13, 21)]),
                 b=hr_random_boundaries(4, 24, 0.2, seed=2))
    loss_fn = hr.loss_fn_for(cfg, method)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(15):
        loss, m = loss_fn(model, batch)
        first = first if first is not None else float(m["bpb"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(m["bpb"]) < first - 0.5


def test_hnet_rl_rate_control_moves_rate_toward_target():
    cfg = hr_tiny_cfg(rate=0.2, lambda_c=1.0)
    model = hr_tiny_model("rl", rate=0.2)
    with torch.no_grad():
        model.policy.gate.weight.zero_()
    h = torch.randn(4, 24, 16)
    out = model.policy(h, torch.rand(4, 24))
    out["gate_logits"] = out["gate_logits"] + 2.0  # pretend the policy fires too often (p ~ 0.6)
    out["p"] = torch.sigmoid(out["gate_logits"])
    loss, _ = hr.policy_loss(out, torch.zeros(4, 24), torch.zeros(4, 24), cfg)  # zero reward
    (g,) = torch.autograd.grad(loss, out["gate_logits"])
    assert (g[:, 1:] > 0).all()  # descending the loss lowers every logit


def test_hnet_rl_rate_control_reaches_the_gate_not_the_lm_head():
    # Through the full forward and loss: the rate-control term's gradient (the loss with
    # lambda_c = 1 minus the same loss with lambda_c = 0, same noise) lands on the gate and
    # nowhere on the LM head.
    x = torch.randint(0, 256, (4, 25), generator=torch.Generator().manual_seed(0))
    batch = dict(x=x, noise=torch.rand(4, 24, generator=torch.Generator().manual_seed(1)))
    grads = []
    for lam in (1.0, 0.0):
        model = hr_tiny_model("rl", lambda_c=lam, rate_offset="off").train()
        with torch.no_grad():
            model.policy.gate.bias.fill_(1.0)  # off the target rate, so the term is not zero
        loss, _ = hr.loss_fn_for(model.cfg, "rl")(model, batch)
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    diff = {k: grads[0][k] - grads[1][k] for k in grads[0]}
    assert diff["policy.gate.bias"].abs().max() > 1e-4
    assert diff["policy.gate.weight"].abs().max() > 0
    assert diff["lm_head.weight"].abs().max() == 0


def test_hnet_rl_policy_samples_its_own_probabilities():
    m = hr_tiny_model("rl")
    with torch.no_grad():
        m.policy.gate.weight.normal_(0, 1.0)
    h, u = torch.randn(3, 24, 16), torch.rand(3, 24)
    out = m.policy(h, u)
    # every sampled decision is the one the returned probabilities give for this noise, and
    # log pi is the log-probability of the decision taken
    assert torch.equal(out["b"][:, 1:], (u < out["p"])[:, 1:]) and out["b"][:, 0].all()
    taken = torch.where(out["b"], out["p"], 1 - out["p"])
    torch.testing.assert_close(out["logp"].exp(), taken)


def test_hnet_rl_rate_offset_steers_rate_only_in_training():
    m = hr_tiny_model("rl", rate_offset="on")
    with torch.no_grad():
        m.policy.gate.bias.fill_(1.0)  # s * 1 = 4 logits too high: far above the target rate
    h, u = torch.randn(4, 24, 16), torch.rand(4, 24)
    m.policy(h, u)
    assert m.policy.offset.item() == 0.0  # eval mode: the offset is frozen
    m.train()
    rates = []
    for _ in range(30):
        b = m.policy(h, torch.rand(4, 24))["b"]
        rates.append(b[:, 1:].float().mean().item())
    assert m.policy.offset.item() < 0
    assert abs(sum(rates[-10:]) / 10 - 0.2) < abs(rates[0] - 0.2)


@pytest.mark.parametrize("T,W", [(24, 6), (23, 5), (10, 3), (7, 8)])
def test_hnet_rl_local_attention_equals_masked_reference(T, W):
    # blocks of W queries over 2W keys (cost L x W) = attention under the full banded mask (cost
    # L^2), also when T is not a multiple of W; the model's byte blocks use it
    torch.manual_seed(0)
    local = hr.LocalAttention(16, 2, W)
    x = torch.randn(3, T, 16, requires_grad=True)
    cos, sin = train.rope_angles(torch.arange(T), 8)
    i, j = torch.arange(T)[:, None], torch.arange(T)
    q, k, v = local.project(x, cos, sin)  # the reference: query i sees keys i - W < j <= i
    attended = F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (i - j < W))
    y_ref = local.proj(attended.transpose(1, 2).reshape(3, T, 16))
    y = local(x, cos, sin)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-5)
    (g_ref,), (g,) = (torch.autograd.grad(o.square().sum(), x) for o in (y_ref, y))
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)
    assert isinstance(hr_tiny_model("rl").encoder[0].attn, hr.LocalAttention)


def test_hnet_rl_smoothing_is_fp32_under_autocast():
    torch.manual_seed(0)
    z, P = torch.randn(2, 40, 8), torch.rand(2, 40).clamp(1e-4, 1 - 1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = hr.smooth_chunks(z, P)
    torch.testing.assert_close(fast, hr.smooth_chunks(z, P), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", ["rl", "hnet", "uniform"])
def test_hnet_rl_compiled_chunk_count_pads_without_changing_the_output(method, monkeypatch):
    # compiled code gets more chunks than the busiest row has (padding): every output is the same
    x = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(2))
    noise = torch.rand(3, 24, generator=torch.Generator().manual_seed(3))
    eager = hr_tiny_model(method)(x, None, noise)
    monkeypatch.setattr(hr, "CHUNK_BUCKET", 5)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # what compiled code sees
    padded = hr_tiny_model(method)(x, None, noise)
    torch.testing.assert_close(padded["logits"], eager["logits"], atol=1e-5, rtol=1e-5)
    M = hr.chunk_index(eager["b"], 0.2).shape[1]
    assert M % 5 == 0 and M > eager["b"].sum(1).max() and hr.chunk_index(eager["b"]).shape[1] == (
        eager["b"].sum(1).max())


def test_hnet_rl_compiled_chunk_counts_take_at_most_two_shapes_as_the_rate_drifts():
    # The --gpu run (32 rows of 4096 bytes, target 0.2): H-Net's router starts near rate 0 and
    # can overshoot; a trajectory 0 -> 0.3 gives the compiled main network at most 2 chunk
    # counts (each new one is a recompile; torch falls back to eager after 8), and a collapse to
    # every byte a chunk at most log2(1 / 0.2) + 2 = 4.
    g = torch.Generator().manual_seed(0)
    counts = set()
    for rate in torch.linspace(0, 0.3, 61).tolist() + [0.3] * 20:
        b = torch.rand(32, 4096, generator=g) < rate
        b[:, 0] = True
        counts.add(hr.chunk_index(b, 0.2).shape[1])
    assert counts == {960, 1792}
    everything = {hr.chunk_index(torch.rand(32, 4096, generator=g) < r, 0.2).shape[1]
                  for r in torch.linspace(0, 1, 101).tolist()}
    assert len(everything) <= 4 and max(everything) == 4096


def test_hnet_rl_whitespace_figures_separate_at_and_after():
    x = torch.tensor([list(b"the cat sat on a mat")])  # 5 spaces in 20 bytes
    noise = torch.rand(1, 20)
    for method, want in (("space", dict(ws_at=1.0, ws_after=0.0, on_ws=1.0, after_ws=0.0)),
                         ("after", dict(ws_at=0.0, ws_after=1.0, on_ws=0.0, after_ws=1.0))):
        b = hr.rule_boundaries(method, x, noise, 0.2)  # the|_cat, or the_|cat
        f = hr.alignment_figures(hr.alignment_counts(b, x).tolist())
        assert {k: f[k] for k in want} == pytest.approx(want)
        assert f["free_rate"] == pytest.approx(5 / 19) and f["ws_base"] == pytest.approx(5 / 19)
    # a byte-blind policy: chance = its rate, and the base rate
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 400), generator=g)
    x[torch.rand(64, 400, generator=g) < 0.25] = 32
    counts = hr.alignment_counts(torch.rand(64, 400, generator=g) < 0.2, x)
    f = hr.alignment_figures(counts.tolist())
    assert abs(f["ws_at"] - f["free_rate"]) < 0.02 and abs(f["on_ws"] - f["ws_base"]) < 0.02


class HrMetaModel(torch.nn.Module):
    """Stands in for ChunkedByteLM on the `meta` device (no data, so no data-dependent chunk
    count): logits and boundaries of the right shapes, on the device of its input."""

    def forward(self, x, given_b=None, noise=None):
        assert x.device.type == noise.device.type == "meta"
        B, L = x.shape
        return dict(logits=torch.empty(B, L, 256, device=x.device),
                    b=torch.empty(B, L, dtype=torch.bool, device=x.device))


def test_hnet_rl_evaluation_stays_on_the_device():
    # The meta device refuses to stack or concatenate a CPU tensor with its own, as CUDA does:
    # the evaluation's sums (NLL, bytes, boundaries, whitespace counts) are built on the device
    # and read back once, never per batch.
    b = torch.ones(2, 16, dtype=torch.bool, device="meta")
    x = torch.zeros(2, 16, dtype=torch.long, device="meta")
    counts = hr.alignment_counts(b, x)
    assert counts.device.type == "meta" and counts.shape == (6,)
    cfg = hr_tiny_cfg(eval_windows=5)
    val = torch.randint(0, 256, (2000,), generator=torch.Generator().manual_seed(0))
    sums = hr.evaluation_sums(HrMetaModel(), cfg, val, None, torch.device("meta"), chunk=2)
    assert sums.device.type == "meta" and sums.shape == (9,)


def test_hnet_rl_cli_rejects_bad_input(capsys):
    code, err = run_as_script("hnet_rl.py", ["--methods=magic"], capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    cfg = hr.parse_config(hr.Config, "hnet_rl", ["--gpu"])  # real-scale config parses
    assert (cfg.n_embd, cfg.n_enc, cfg.n_main, cfg.n_dec, cfg.seq_len) == (768, 4, 12, 4, 4096)
    paper = (cfg.gate_scale, cfg.rate_offset, cfg.lambda_c, cfg.byte_mlp, cfg.batch_size)
    assert paper == (1 / 16, "off", 0.01, 1, 128) and cfg.seeds == 1
    assert hr.parse_config(hr.Config, "hnet_rl", ["--methods=all"]).methods.split() == list(
        hr.METHODS)


@pytest.mark.parametrize("argv", [["--eval_windows=0"], ["--seed=4294967295", "--seeds=2"],
                                  ["--methods=rl,magic"], ["--rate=1.5"], ["--methods="],
                                  ["--seq_len=20000"]])
def test_hnet_rl_bad_input_is_one_line_before_any_work(argv, tmp_path, capsys, monkeypatch):
    # as the command line runs it: one error line, exit 2, before any training
    monkeypatch.setattr(hr, "run_one", lambda *a: pytest.fail("trained on bad input"))
    with pytest.raises(SystemExit) as e:
        hr.main([*argv, f"--out={tmp_path}", "--threads=1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err


def hr_fake_rows(space, after, rl_at, rl_after, rate=0.2, rl_bpb=2.1):
    """Result rows, a seed per value: the fixed rules' bpb, rl's ws_at / ws_after at its rate."""
    rows = []
    for seed in range(len(space)):
        common = dict(seed=seed, rate=rate, free_rate=rate, ws_base=0.2, on_ws=0.2, after_ws=0.2,
                      bytes_per_chunk=5.0, bytes_per_s=1.0)
        rows += [dict(common, method="space", bpb=space[seed], ws_at=1.0, ws_after=0.0),
                 dict(common, method="after", bpb=after[seed], ws_at=0.0, ws_after=1.0),
                 dict(common, method="rl", bpb=rl_bpb, ws_at=rl_at[seed], ws_after=rl_after[seed])]
    return rows


def test_hnet_rl_verdicts_say_whether_the_papers_figure_is_reachable():
    cfg = hr_tiny_cfg()
    after_wins = hr.verdicts(hr_fake_rows([2.22, 2.23, 2.21], [2.12, 2.13, 2.12], [0.1] * 3,
                                          [0.5] * 3), cfg, floor=4.5)
    text = "\n".join(after_wins)
    assert "prefers chunks AFTER whitespace" in text and "is NOT reachable at this size" in text
    assert "rl cuts at whitespace >= 2x chance in 0/3 seeds" in text
    assert "right after it in 3/3" in text
    assert "-> NOT reproduced" in text
    space_wins = "\n".join(hr.verdicts(hr_fake_rows([2.0, 2.01, 2.0], [2.1, 2.12, 2.1], [0.9] * 3,
                                                    [0.1] * 3), cfg, floor=4.5))
    assert "prefers chunks AT whitespace" in space_wins and "is reachable" in space_wins
    assert "-> reproduced" in space_wins
    noise = "\n".join(hr.verdicts(hr_fake_rows([2.1, 2.2, 2.0], [2.2, 2.0, 2.1], [0.9, 0.1, 0.9],
                                               [0.1] * 3), cfg, floor=4.5))
    assert "no difference resolved" in noise and "of unknown reach" in noise
    # nothing learned (as after one step): no verdict at all on those methods
    untrained = hr.verdicts(hr_fake_rows([7.9] * 3, [7.9] * 3, [0.9] * 3, [0.1] * 3,
                                         rl_bpb=7.9), cfg, floor=4.5)
    assert all("learned nothing" in line for line in untrained) and len(untrained) == 3
    # one seed that happens to align carries no verdict
    one = "\n".join(hr.verdicts(hr_fake_rows([2.0], [2.1], [0.9], [0.1]), cfg, floor=4.5))
    assert "-> one seed: no verdict" in one and "reproduced" not in one


def test_hnet_rl_seeds_print_mean_and_interval(tmp_path, capsys):
    argv = ["--methods=uniform", "--seeds=2", "--max_steps=2", "--n_embd=16", "--n_head=2",
            "--seq_len=32", "--batch_size=4", "--eval_windows=4", "--warmup=1", "--eval_every=2",
            f"--out={tmp_path}", "--threads=1"]
    rows = hr.main(argv)
    assert sorted(r["seed"] for r in rows) == [0, 1] and rows[0]["bpb"] != rows[1]["bpb"]
    table = capsys.readouterr().out
    (line,) = [line for line in table.splitlines()
               if line.startswith("uniform ") and "seed" not in line]
    assert "2 seed(s)" in table and "+-" in line


def test_hnet_rl_bpe_round_trips_and_marks_token_starts():
    text = train.embedded_text("val")[:20_000]
    encoding = hr.bpe_encoding(text)
    samples = ["The quick brown fox's 123 jumps!\n\n  done", "naïve café ✓ — emoji 🙂",
               text[-500:].decode()]
    for s in samples:
        assert encoding.decode(encoding.encode_ordinary(s)) == s
    # fewer tokens than bytes by far, and a boundary at each token start
    b = hr.bpe_boundaries(encoding, b"the cat sat")
    assert b[0] and b.sum() < 0.6 * len(b) and b[3] and b[7]  # `the| cat| sat`
    assert len(encoding.encode_ordinary(text.decode())) < 0.6 * len(text)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hnet_rl_gpu_command_line_runs_evaluates_and_resumes(tmp_path):
    run_on_the_gpu("hnet_rl", tmp_path)


def test_hnet_rl_compare_compiles_each_kind_of_method_once(jobs):
    # `--compile` with one method of each kind in one process, each from an empty compile cache:
    # the policy, the router, a rule whose chunk count follows the text (space; after shares its
    # path; uniform and fixed have an exact count) and bpe. Each chunk count is floored at the
    # capacity for the target rate, so a method at that rate sees one shape (rl, hnet here); bpe's
    # rate is the corpus's (0.68 here): one more, at most. Collected last: its job has had the
    # whole suite's time.
    code, err = jobs["hnet_compare"].result()
    assert code == 0, err[-2000:]
    rows = json.loads((SCRATCH / "compare" / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["rl", "hnet", "space", "bpe"]
    assert all(math.isfinite(r["bpb"]) for r in rows)
    assert all(r["graphs"] >= 1 and r["recompiles"] <= 1 for r in rows)  # at most one more shape
    assert not HAS_MATPLOTLIB or (SCRATCH / "compare" / "bpb.png").read_bytes()[:4] == b"\x89PNG"
    assert rows[0]["recompiles"] == rows[1]["recompiles"] == 0
