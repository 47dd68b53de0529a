"""
train.py: the small engine under the four paper scripts.

A script supplies a Config (a dataclass subclassing TrainConfig; a field's trailing comment is its
--help), a model, and two functions:
  get_batch(step) -> the global batch of one optimizer step: exactly --batch_size rows (a tensor
                     or a dict/tuple of tensors with rows in dim 0), deterministic in step
  loss_fn(model, rows) -> (loss, metrics), the loss a mean over the rows it is given
train() cuts each batch into --grad_accum x processes equal slices, so a step is one mean over
--batch_size rows however few fit in memory; a statistic over the whole batch is the script's to
all-reduce. --gpu is the fused CUDA path: bf16 autocast, TF32, fused AdamW, SDPA, torch.compile.
"""
import argparse, contextlib, dataclasses, functools, hashlib, importlib.util, inspect, json, math
import multiprocessing, os, random, re, shutil, signal, statistics, sys, threading, time, zlib
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# ---- config and command line

@dataclass
class TrainConfig:
    out: str = ""  # directory of results, figures and checkpoints (default out/<script>)
    seed: int = 0  # random seed (data order, initialisation, sampling)
    gpu: bool = False  # the fused CUDA path: bf16, TF32, fused AdamW, torch.compile
    compile: bool = False  # torch.compile on the CPU too (always on with --gpu)
    compile_backend: str = "auto"  # auto | inductor | cudagraphs | aot_eager | eager | none
    threads: int = 0  # CPU threads (0 = all cores)
    lr: float = 3e-3  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    warmup: int = 20  # linear warm-up steps
    max_steps: int = 200  # optimizer steps
    batch_size: int = 16  # rows per optimizer step, over all processes and micro-steps
    grad_accum: int = 1  # micro-steps per optimizer step: fewer rows per forward
    grad_clip: float = 1.0  # clip the gradient norm to this (0 = off)
    weight_decay: float = 0.1  # AdamW decay of matrices (not norms, biases, embeddings)
    beta2: float = 0.95  # AdamW second-moment decay (beta1 is 0.9)
    log_every: int = 10  # steps between loss checks and progress updates
    eval_every: int = 0  # steps between evaluations (0 = only at the end)
    ckpt_every: int = 0  # steps between checkpoints (0 = at the end and when stopped)
    resume: bool = False  # continue from the checkpoint in --out
    data_dir: str = "data"  # where downloaded datasets are kept
    unused: ClassVar[tuple] = ()  # inherited flags a script ignores: hidden and refused

    def __post_init__(self):
        if self.compile_backend not in "auto inductor cudagraphs aot_eager eager none".split():
            raise ValueError(f"unknown --compile_backend={self.compile_backend}")
        if self.seed >= 2**32 or self.beta2 >= 1 or self.grad_accum < 1 or self.log_every < 1:
            raise ValueError("--seed must be < 2^32, --beta2 < 1, --grad_accum, --log_every >= 1")

# the flags that may differ between a checkpoint and its --resume: they change nothing computed
RUN_CONTROL = ("out", "resume", "threads", "log_every", "ckpt_every", "data_dir")
BOOLEANS = {"true": True, "yes": True, "on": True, "1": True,
            "false": False, "no": False, "off": False, "0": False}

def parse_bool(text):
    if text.lower() not in BOOLEANS:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return BOOLEANS[text.lower()]

def parse_config(cls, script, argv=None):
    """argv -> a Config. Bad input (an unknown or abbreviated flag, a wrong type, a negative or
    non-finite number, a failed check, an unusable --out) is one error line and exit 2."""
    parser = argparse.ArgumentParser(f"{script}.py", allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.error = lambda message: die(f"{message} (see --help)", 2, f"{script}.py: error: ")
    helps = {}  # a field's help is the `# comment` on its line; a subclass's overrides its parent's
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        source = inspect.getsource(klass)
        helps.update(re.findall(r"^ +(\w+):[^=#\n]+=[^#\n]*# (.+)$", source, re.M))
    for field in dataclasses.fields(cls):
        kind = dict(bool=parse_bool, int=int, float=float, str=str)[
            getattr(field.type, "__name__", field.type)]
        bare = dict(nargs="?", const=True) if kind is parse_bool else {}  # `--gpu` is --gpu=true
        if field.name not in cls.unused:
            parser.add_argument(f"--{field.name}", type=kind, default=field.default, **bare,
                                help=helps.get(field.name, " ").replace("%", "%%"))
    args = vars(parser.parse_args(argv))
    for key, value in args.items():
        if type(value) in (int, float) and not 0 <= value < math.inf:
            parser.error(f"--{key} must be a finite number >= 0, got {value}")
    try:
        cfg = cls(**args)
    except ValueError as e:
        parser.error(str(e))
    cfg.out = cfg.out or os.path.join("out", script)
    existing = Path(cfg.out).absolute()  # --out must be a directory we can create
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        parser.error(f"--out={cfg.out}: {existing} is not a writable directory")
    return cfg

def fill_auto(cfg, **defaults):
    """Each keyword maps a field to (CPU value, --gpu value): a field left at 0, "" or "auto"
    takes the value of the scale being run, so one flag picks toy or real scale."""
    for name, (cpu, gpu) in defaults.items():
        if getattr(cfg, name) in (0, "", "auto"):
            setattr(cfg, name, gpu if cfg.gpu else cpu)

class DataError(RuntimeError):
    """A problem with the user's files, data or disk: one line, never a traceback."""

def die(message, code=1, prefix="error: "):
    print(f"{prefix}{message}", file=sys.stderr)
    sys.exit(code)

def cli(main):
    """Run main(): Ctrl-C or SIGTERM is one line and exit 130, a DataError or OSError one line."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # what schedulers send: as Ctrl-C
    try:
        main()
    except KeyboardInterrupt:
        die("interrupted", 130)
    except (DataError, OSError) as e:
        die(e)

# ---- device, precision, compile, several processes

@dataclass
class Ctx:
    device: torch.device
    gpu: bool
    rank: int = 0
    world: int = 1

    @property
    def master(self):  # only rank 0 prints and writes files
        return self.rank == 0

    def autocast(self):  # the CPU stays fp32: bf16 is slower on most laptop CPUs
        return torch.autocast("cuda", torch.bfloat16) if self.gpu else contextlib.nullcontext()

def setup(cfg):
    if cfg.gpu and not torch.cuda.is_available():
        die("--gpu was given but CUDA is not available here (drop --gpu to run on the CPU)")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if cfg.batch_size % (cfg.grad_accum * world):
        die(f"--batch_size={cfg.batch_size} must divide into --grad_accum={cfg.grad_accum} x "
            f"{world} processes", 2)
    if world > 1 and not dist.is_initialized():  # launched by torchrun
        dist.init_process_group("nccl" if cfg.gpu else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cfg.gpu else "cpu"
    if cfg.gpu:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 matmuls outside autocast
    else:
        torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    if rank > 0:  # one report per run: the other ranks print nothing but errors
        sys.stdout = open(os.devnull, "w")
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    return Ctx(torch.device(device), cfg.gpu, rank, world)

def maybe_compile(model, cfg):
    """torch.compile with --gpu or --compile, from an empty cache: runs in one process never
    share graphs or a recompile limit. On CUDA without Triton: cudagraphs (no fusion)."""
    if not (cfg.gpu or cfg.compile) or cfg.compile_backend == "none":
        return model
    backend = cfg.compile_backend
    if backend == "auto":  # on the CPU inductor needs only a C++ compiler
        triton = importlib.util.find_spec("triton") is not None
        backend = "inductor" if triton or not cfg.gpu else "cudagraphs"
    torch._dynamo.reset()
    return torch.compile(model, backend=backend, dynamic=False)

# ---- the shared Transformer

def rope_angles(pos, head_dim, base=10000.0):
    """cos and sin of the rotary angles pos * base^(-2i / head_dim); pos (T,) or (B, T)."""
    i = torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32)
    angle = pos.float()[..., None] * base ** (-i / head_dim)  # (..., T, hs/2)
    return angle.cos(), angle.sin()

def apply_rope(x, cos, sin):  # x (..., hs); cos, sin broadcast to (..., hs/2)
    """Rotate each pair (x[2i], x[2i+1]) by its angle."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (..., hs/2, 2)
    if torch.compiler.is_compiling():  # real arithmetic: what inductor fuses best
        a, b = pairs.unbind(-1)
        return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2).type_as(x)
    # eager: one complex multiply is 2.4x faster on the CPU than the four real ones above
    rotated = torch.view_as_complex(pairs) * torch.complex(cos, sin)
    return torch.view_as_real(rotated).flatten(-2).type_as(x)

class Attention(nn.Module):
    def __init__(self, n_embd, n_head, causal=True):
        super().__init__()
        assert n_embd % n_head == 0 and n_embd // n_head % 2 == 0, "RoPE needs an even head size"
        self.n_head, self.causal = n_head, causal
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)

    def project(self, x, cos, sin):  # x (B, T, C) -> rotated q, k and v, each (B, nh, T, hs)
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3 * self.n_head, C // self.n_head).split(self.n_head, 2)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # the same angles in every head
        # rotated in the (B, T, nh, hs) layout the projection wrote: backward then needs no copy
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, cos, sin, cache=None):
        B, T, C = x.shape
        q, k, v = self.project(x, cos, sin)
        mask = None
        if cache is not None:  # generation: the keys and values so far; query i sits at past + i
            if cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
                i = torch.arange(k.shape[2], device=x.device)
                mask = i <= i[-T:, None]
            cache["k"], cache["v"] = k, v
        causal = self.causal and mask is None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, nh, T, hs) -> (B, T, C)

class MLP(nn.Module):
    def __init__(self, n_embd, ratio=4):
        super().__init__()
        self.fc = nn.Linear(n_embd, ratio * n_embd, bias=False)
        self.proj = nn.Linear(ratio * n_embd, n_embd, bias=False)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))

class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x)). LayerNorm, not RMSNorm: on the CPU
    F.layer_norm is one fused kernel, F.rms_norm several (4.6x slower in eager)."""

    def __init__(self, n_embd, n_head, causal=True, mlp_ratio=4):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(n_embd, bias=False), nn.LayerNorm(n_embd, bias=False)
        self.attn, self.mlp = Attention(n_embd, n_head, causal), MLP(n_embd, mlp_ratio)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.attn(self.norm1(x), cos, sin, cache)
        return x + self.mlp(self.norm2(x))

def init_weights(model, n_layer):
    """GPT-2's: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer) so that the
    residual stream's variance does not grow with depth."""
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            residual = name.endswith("proj.weight")
            nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer) if residual else 0.02)

class TransformerLM(nn.Module):
    """Token embedding -> blocks -> norm -> untied LM head; positions only through RoPE."""

    def __init__(self, vocab_size, n_layer, n_head, n_embd, causal=True):
        super().__init__()
        self.n_head = n_head
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, causal) for _ in range(n_layer))
        self.norm = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        init_weights(self, n_layer)

    def forward(self, idx, caches=None):  # idx (B, T) -> logits (B, T, V)
        """caches: one dict per block, for generation, which continues at position `past`."""
        past = caches[0]["k"].shape[2] if caches and caches[0] else 0
        pos = torch.arange(past, past + idx.shape[1], device=idx.device)
        cos, sin = rope_angles(pos, self.wte.embedding_dim // self.n_head)
        x = self.wte(idx)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, caches[i] if caches else None)
        return self.lm_head(self.norm(x))

def count_params(module):
    return sum(p.numel() for p in module.parameters())

# ---- files, written whole or not at all

def atomic_write(path, write):
    """write(file) into a temporary file, then rename it to `path`: a crash or a full disk never
    leaves half a file there."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # RuntimeError: torch.save's writer on a full disk
        raise DataError(f"could not write {path}: {str(e).splitlines()[0]}") from None
    finally:  # also after Ctrl-C
        tmp.unlink(missing_ok=True)
    return path

def atomic_save(obj, path):
    return atomic_write(path, lambda f: torch.save(obj, f))

def load_saved(path):
    """What atomic_save wrote, onto the CPU (RNG states must stay CPU tensors)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or garbled: the zip reader or the unpickler fails
        raise DataError(f"{path} is damaged ({type(e).__name__}); delete it to start afresh")

# ---- the training loop

def lr_at(step, cfg):
    """Linear warm-up to cfg.lr, then a cosine to cfg.lr * cfg.min_lr_ratio at max_steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = min((step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup), 1.0)
    cosine = 0.5 * (1 + math.cos(math.pi * frac))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)

def make_optimizer(model, cfg, ctx):
    decays = {p: p.dim() >= 2 and "wte" not in n for n, p in model.named_parameters()
              if p.requires_grad}
    groups = [dict(params=[p for p, d in decays.items() if d == want],
                   weight_decay=cfg.weight_decay * want) for want in (True, False)]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), fused=ctx.gpu)

def slice_rows(batch, part, parts, device, rows=None):
    """Rows [part * n, (part + 1) * n) of each tensor in a (nested) batch, n = rows / parts."""
    if isinstance(batch, dict):
        return {k: slice_rows(v, part, parts, device, rows) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(slice_rows(v, part, parts, device, rows) for v in batch)
    if not isinstance(batch, torch.Tensor):
        return batch
    if rows is not None and len(batch) != rows:
        raise DataError(f"get_batch gave {len(batch)} rows, not --batch_size={rows}")
    n = len(batch) // parts
    return batch[part * n:(part + 1) * n].to(device, non_blocking=True)

def to_host(values):
    """A dict of scalars (tensors on any device, or numbers) as floats in one device sync, for
    code that sums on the device instead of calling .item() per batch."""
    tensors = [torch.as_tensor(v).detach().double() for v in values.values()]
    device = next((t.device for t in tensors if t.device.type != "cpu"), "cpu")
    return dict(zip(values, torch.stack([t.to(device) for t in tensors]).tolist()))

def one_step(fast, opt, batch, loss_fn, cfg, ctx):
    """One optimizer step -> loss, gradient norm, metrics, items: tensors left on the device."""
    total, items = 0.0, 0
    for micro in range(cfg.grad_accum):  # DDP all-reduces on the last micro-step only
        part, parts = micro * ctx.world + ctx.rank, cfg.grad_accum * ctx.world
        rows = slice_rows(batch, part, parts, ctx.device, cfg.batch_size)
        quiet = ctx.world > 1 and micro < cfg.grad_accum - 1
        with fast.no_sync() if quiet else contextlib.nullcontext(), ctx.autocast():
            loss, metrics = loss_fn(fast, rows)
        (loss / cfg.grad_accum).backward()
        total, metrics = total + loss.detach() / cfg.grad_accum, dict(metrics)
        items = items + metrics.pop("items", 0)
    norm = nn.utils.clip_grad_norm_(fast.parameters(), cfg.grad_clip or math.inf)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total, norm, metrics, items

def save_checkpoint(path, raw, opt, run, cfg, ctx):
    if ctx.master and path:
        rng = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(),
                   python=random.getstate(),  # of the GPUs, only this process's own:
                   cuda=torch.cuda.get_rng_state(ctx.device) if ctx.gpu else None)
        atomic_save(dict(run, model=raw.state_dict(), optimizer=opt.state_dict(), rng=rng,
                         config=dataclasses.asdict(cfg)), path)

def resume(path, raw, opt, cfg, ctx):
    """Continue the run saved at path; a checkpoint of another run is refused in one line."""
    saved, now = load_saved(path), dataclasses.asdict(cfg)
    changed = [f"--{k} {v} -> {now.get(k)}" for k, v in saved["config"].items()
               if k not in RUN_CONTROL and now.get(k) != v]
    if changed:
        die(f"--resume: {path} is another run's ({', '.join(changed)}); use its flags, or "
            "another --out", 2)
    raw.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"]["torch"])
    np.random.set_state(saved["rng"]["numpy"])
    random.setstate(saved["rng"]["python"])
    if ctx.gpu and saved["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(saved["rng"]["cuda"], ctx.device)
    print(f"resumed from {path} at step {saved['step']}")
    return {k: saved[k] for k in ("step", "history", "evals")}

def checked(loss, norm, metrics, step, path):
    """The step's numbers in one device sync; a nan or inf in the loss or gradient ends the run
    in one line before anything is saved, so the last good checkpoint stays."""
    numbers = to_host(dict(loss=loss, norm=norm, **metrics))
    if not (math.isfinite(numbers["loss"]) and math.isfinite(numbers.pop("norm"))):
        kept = f"; the last good checkpoint is {path}" if path and path.exists() else ""
        die(f"the loss or gradient is nan or inf by step {step}{kept}; try a lower --lr")
    return numbers

def evaluate(run, raw, eval_fn, ctx):
    if eval_fn is not None:
        raw.eval()
        with torch.no_grad(), ctx.autocast():
            run["evals"].append(dict(step=run["step"], **eval_fn(raw, run["step"])))
        raw.train()

def catch_stop_signals(stop):
    """Ctrl-C or SIGTERM (what schedulers send) appends to `stop`: the loop ends its step, saves
    and exits 130; a second one interrupts at once. Only a program's main process and thread
    take signals (a worker process is stopped by its parent). Returns the old handlers."""
    if threading.current_thread() is not threading.main_thread() or \
            multiprocessing.parent_process():
        return {}
    handler = lambda *frame: stop.append(1) if not stop else signal.default_int_handler(*frame)
    return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

def train(model, get_batch, loss_fn, cfg, ctx, eval_fn=None, ckpt_path=None, desc="train",
          quiet=False):
    """Train to cfg.max_steps, with eval_fn(model, step) -> dict at every --eval_every and at the
    end. ckpt_path None: cfg.out/ckpt.pt; False: none. quiet: a transient bar, no summary line.
    Host and device meet only at steps that log, evaluate or save. Ctrl-C or SIGTERM ends the
    step, saves and exits 130. Returns history, evals, steps, seconds, items_per_s."""
    raw = model.to(ctx.device)  # the uncompiled, unwrapped module: what is saved and evaluated
    path = None if ckpt_path is False else Path(ckpt_path or Path(cfg.out) / "ckpt.pt")
    opt, run = make_optimizer(raw, cfg, ctx), dict(step=0, history=[], evals=[])
    if cfg.resume and path and path.exists():
        run = resume(path, raw, opt, cfg, ctx)
    if ctx.world > 1:
        ids = [ctx.device.index] if ctx.gpu else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    fast, items, t0, stop = maybe_compile(model, cfg), 0, time.time(), []
    old = catch_stop_signals(stop)
    bar = tqdm(total=cfg.max_steps, initial=run["step"], desc=desc, disable=not ctx.master,
               leave=not quiet)
    try:
        while run["step"] < cfg.max_steps:
            if ctx.world > 1:  # noise drawn inside the model: different per rank, reproducible
                torch.manual_seed((cfg.seed * 1_000_003 + run["step"]) * 4099 + ctx.rank)
            for group in opt.param_groups:
                group["lr"] = lr = lr_at(run["step"], cfg)
            loss, norm, metrics, n = one_step(fast, opt, get_batch(run["step"]), loss_fn, cfg, ctx)
            items, run["step"], step = items + n, run["step"] + 1, run["step"] + 1
            bar.update()
            logs = step % cfg.log_every == 0 or step == cfg.max_steps
            evals = cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps
            saves = stop or cfg.ckpt_every and step % cfg.ckpt_every == 0
            numbers = checked(loss, norm, metrics, step, path) if logs or evals or saves else {}
            if logs:
                run["history"].append(dict(step=step, loss=numbers.pop("loss"), lr=lr, **numbers))
                bar.set_postfix(loss=f"{run['history'][-1]['loss']:.4f}")
            if evals:
                evaluate(run, raw, eval_fn, ctx)
            if saves:
                save_checkpoint(path, raw, opt, run, cfg, ctx)
            if stop:
                bar.close()
                again = f"; saved to {path}: add --resume to continue" if path else ""
                die(f"interrupted at step {step}{again}", 130, prefix="")
    finally:
        bar.close()
        for signum, handler in old.items():
            signal.signal(signum, handler)
    evaluate(run, raw, eval_fn, ctx)
    save_checkpoint(path, raw, opt, run, cfg, ctx)
    seconds = time.time() - t0
    if not quiet:
        loss = run["history"][-1]["loss"] if run["history"] else math.nan
        print(f"{desc}: {run['step']} steps in {seconds:.1f}s, final loss {loss:.4f}")
    return dict(run, steps=run["step"], seconds=seconds, items_per_s=float(items) / seconds)

# ---- results: intervals over seeds, results.json and figures (rank 0 only)

@functools.lru_cache(maxsize=None)
def t_quantile(df, level=0.95):
    """The t with P(|T| <= t) = level for Student's t with df degrees of freedom (no scipy here):
    bisection on the density integrated by Simpson's rule."""
    scale = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def mass(x):  # P(|T| <= x)
        f = scale * (1 + np.linspace(0.0, x, 4001) ** 2 / df) ** (-(df + 1) / 2)
        return 2 * x / 12000 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    low, high = 0.0, 1e3
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if mass(middle) < level else (low, middle)
    return (low + high) / 2

def mean_interval(values, level=0.95, shared_se=None):
    """(mean, half-width) of the `level` interval for the mean of independent values, one per
    seed: Student's t with n - 1 degrees of freedom (1.96 is far too narrow for 3 seeds).
    shared_se: the standard error of an error every value shares, which averaging over seeds
    cannot remove (one test set that every seed scores), added in quadrature. With one value it
    is the only error known (a normal interval); without it (None) the half-width is nan."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        z = statistics.NormalDist().inv_cdf(0.5 + level / 2)
        return float(x.mean()), math.nan if shared_se is None else z * shared_se
    if shared_se:
        spread = math.sqrt(x.var(ddof=1) / len(x) + shared_se**2)
    else:
        spread = float(x.std(ddof=1)) / math.sqrt(len(x))
    return float(x.mean()), t_quantile(len(x) - 1, level) * spread

def device_name(ctx):
    if ctx.gpu:
        return torch.cuda.get_device_name(ctx.device)
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"

def save_results(cfg, ctx, results, name="results.json"):
    if ctx.master:
        text = json.dumps(dict(config=dataclasses.asdict(cfg), torch=torch.__version__,
                               device=device_name(ctx), time=time.strftime("%Y-%m-%d %H:%M:%S"),
                               **results), indent=1, default=float)
        return atomic_write(Path(cfg.out) / name, lambda f: f.write(text.encode()))

def save_figure(path, draw):
    """draw(plt) builds a figure, saved as a PNG. Figures are optional: no matplotlib, none."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if dist.is_initialized() and dist.get_rank() > 0:
        return None
    figure = draw(plt) or plt.gcf()
    try:
        return atomic_write(path, lambda f: figure.savefig(f, dpi=120, bbox_inches="tight"))
    finally:
        plt.close(figure)

# ---- data: an offline corpus and checked downloads

def embedded_text(split="train"):
    """The English help topics that ship with Python (pydoc_data, ~460 KB), so default runs need
    no network. A topic is in `val` when the CRC32 of its name is 0 mod 10."""
    import pydoc_data.topics
    topics = sorted(pydoc_data.topics.topics.items())
    keep = [text for name, text in topics
            if (zlib.crc32(name.encode()) % 10 == 0) == (split == "val")]
    return "\n\n".join(keep).encode("utf-8")

MNIST = "https://ossci-datasets.s3.amazonaws.com/mnist/"
FASHION = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DATASETS = {  # name -> url, digest of a good copy (md5 where that is what the authors publish)
    "tinyshakespeare": (
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "sha256:86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
    "enwik8": ("http://mattmahoney.net/dc/enwik8.zip",
               "sha256:547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc"),
    "mnist-train": (MNIST + "train-images-idx3-ubyte.gz", "md5:f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "mnist-test": (MNIST + "t10k-images-idx3-ubyte.gz", "md5:9fb629c4189551a2d022fa330f9573f3"),
    "fashionmnist-train": (FASHION + "train-images-idx3-ubyte.gz",
                           "md5:8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    "fashionmnist-test": (FASHION + "t10k-images-idx3-ubyte.gz",
                          "md5:bef4ecab320f06d8554ea6380940ec79"),
}

def download(name, data_dir="data"):
    """A named dataset's file, fetched once into data_dir (as name + the url's suffix) and checked
    against its pinned digest: kept whole and good, or not at all."""
    url, digest = DATASETS[name]
    path, (algorithm, expected) = Path(data_dir) / (name + Path(url).suffix), digest.split(":")
    good = lambda: hashlib.new(algorithm, path.read_bytes()).hexdigest() == expected
    if path.exists() and good():
        return path
    by_hand = f"download it by hand and place it at {path}"
    print(f"downloading {url}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            atomic_write(path, lambda f: shutil.copyfileobj(response, f))
    except (OSError, DataError) as e:  # an unreachable host, a timeout or a full disk
        raise DataError(f"could not download {url} ({e}); {by_hand}") from None
    if not good():
        path.unlink()
        raise DataError(f"{url} gave a file whose {algorithm} is not {expected}; {by_hand}")
    return path

# ---- benchmark: `python train.py --bench [--gpu] [--reference=nanoGPT/model.py]`

@dataclass
class BenchConfig(TrainConfig):
    bench: bool = False  # run the benchmark (the only thing `python train.py` does)
    size: str = "auto"  # small (nanoGPT's shakespeare-char, CPU) | gpt2 (--gpu) | tiny
    batch_size: int = 0  # sequences per step (0 = 12 for small, 16 for gpt2)
    max_steps: int = 3  # timed steps per model in each round
    rounds: int = 12  # timed rounds; the models alternate so that load hits both alike
    reference: str = ""  # nanoGPT's model.py: time its GPT too, with its own loss
    unused = ("out", "min_lr_ratio", "warmup", "grad_accum", "grad_clip", "log_every",
              "eval_every", "ckpt_every", "resume", "data_dir")

    def __post_init__(self):
        super().__post_init__()
        if self.size not in ("auto", *SIZES):
            raise ValueError(f"--size must be auto, {', '.join(SIZES)}; got {self.size!r}")

SIZES = dict(tiny=(1, 2, 16, 16, 65, 2), small=(6, 6, 384, 256, 65, 12),
             gpt2=(12, 12, 768, 1024, 50304, 16))  # layers, heads, width, context, vocab, batch

def bench(cfg):
    """Training tokens/s (fwd + bwd + AdamW), medians over rounds in alternating order."""
    ctx, size = setup(cfg), cfg.size if cfg.size != "auto" else "gpt2" if cfg.gpu else "small"
    L, H, C, T, V, B = SIZES[size]
    data = torch.randint(0, V, (cfg.batch_size or B, T + 1), device=ctx.device)
    x, y = data[:, :-1], data[:, 1:].contiguous()
    models = {"train.py": (TransformerLM(V, L, H, C), lambda m: F.cross_entropy(
        m(x).flatten(0, 1), y.flatten()))}
    if cfg.reference:  # nanoGPT's GPT, bias off and dropout 0 as ours
        spec = importlib.util.spec_from_file_location("nanogpt", cfg.reference)
        spec.loader.exec_module(nanogpt := importlib.util.module_from_spec(spec))
        config = nanogpt.GPTConfig(T, V, L, H, C, dropout=0.0, bias=False)
        models["nanoGPT"] = (nanogpt.GPT(config), lambda m: m(x, y)[1])
    print(f"bench {size}: {L}L/{H}H/{C}, T={T}, vocab={V}, batch={len(x)} on {device_name(ctx)}")
    steps = {name: functools.partial(bench_step, maybe_compile(model, cfg), loss_of, ctx,
                                     make_optimizer(model.to(ctx.device), cfg, ctx))
             for name, (model, loss_of) in models.items()}
    speed = {name: [] for name in models}
    for r in range(cfg.rounds + 1):  # round 0 warms up (compilation, allocator) untimed
        for name in list(steps)[::-1 if r % 2 else 1]:
            t0 = time.perf_counter()
            for _ in range(cfg.max_steps):
                steps[name]()
            speed[name] += [y.numel() * cfg.max_steps / (time.perf_counter() - t0)] * (r > 0)
    peak = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s, data sheets
    peak = next((v for k, v in peak.items() if ctx.gpu and k in device_name(ctx)), None)
    for name, (model, _) in models.items():
        # FLOPs per token (PaLM appendix B): 6 per weight of every matmul + attention's 12 L C T
        weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
        flops = (6 * weights + 12 * L * C * T) * np.median(speed[name])
        print(f"{name:9s} {np.median(speed[name]):9,.0f} tokens/s (rounds {min(speed[name]):,.0f}"
              f"-{max(speed[name]):,.0f})" + (f", MFU {flops / peak:.1%}" if peak else "")
              + (f", {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB peak" if ctx.gpu else ""))
    if len(speed) == 2:
        ratio = [a / b for a, b in zip(*speed.values())]  # per round: both timed moments apart
        print(f"ours / nanoGPT tokens/s: median {np.median(ratio):.3f} over {len(ratio)} rounds "
              f"(quartiles {np.percentile(ratio, 25):.3f}-{np.percentile(ratio, 75):.3f})")

def bench_step(model, loss_of, ctx, opt):
    with ctx.autocast():
        loss = loss_of(model)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if ctx.gpu:  # a step is done when the device is done with it
        torch.cuda.synchronize()

if __name__ == "__main__":
    bench_config = parse_config(BenchConfig, "train")
    if not bench_config.bench:
        die("train.py is the shared engine; as a script it only runs --bench (see --help)", 2)
    cli(lambda: bench(bench_config))
