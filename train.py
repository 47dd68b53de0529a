"""
train.py: the small shared engine under the four paper scripts.

What a script supplies:
  Config     a @dataclass subclassing TrainConfig; its fields become `--key=value` flags
  a model    an nn.Module (the shared Block / TransformerLM below, or its own)
  get_batch  get_batch(step) -> the GLOBAL batch of one optimizer step: exactly --batch_size rows
             (a tensor, or a dict/tuple of tensors with rows in dim 0), deterministic in step
  loss_fn    loss_fn(model, rows) -> (loss, metrics): loss is a MEAN over the rows it is given
What the engine does with them: it cuts the batch into --grad_accum x ranks equal slices, so the
algorithm (one step = one mean over --batch_size rows) is the same whatever the memory per forward;
a statistic a loss needs over the whole batch must be all-reduced by the script (hnet_rl.py's
global_mean shows how). Under torchrun, torch's RNG
is reseeded every step from (seed, rank, step): in-model noise differs per rank and is reproducible.

Sections: config/CLI, device (CPU fp32 eager; `--gpu` = CUDA, bf16 autocast, TF32, fused AdamW,
torch.compile), the shared Transformer block, checkpoints, the loop (warm-up + cosine, clipping,
accumulation, eval callback, tqdm, exact resume, Ctrl-C, NaN guard, DDP), results, data (offline
corpora, a checked downloader), and `python train.py --bench [--gpu]`.
No hand-written Triton anywhere: on CUDA all fusion comes from torch.compile.
"""
import argparse, contextlib, dataclasses, fcntl, functools, hashlib, importlib.util, inspect, io, json, math, os, random, re
import signal, sys, sysconfig, tempfile, threading, time, urllib.request, zlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------
# config and command line
@dataclass
class TrainConfig:
    out: str = ""  # output directory for results.json, figures and checkpoints (default out/<script>)
    seed: int = 0  # random seed (data order, init, sampling)
    gpu: bool = False  # fused CUDA path: bf16 autocast, TF32, fused AdamW, torch.compile
    compile: bool = False  # torch.compile on CPU too (opt-in; always on with --gpu)
    compile_backend: str = "auto"  # auto (inductor if Triton imports, else cudagraphs) | inductor | cudagraphs | aot_eager | eager | none
    threads: int = 0  # CPU threads for torch (0 = all cores)
    lr: float = 3e-3  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 20  # linear warm-up steps
    max_steps: int = 200  # optimizer steps
    batch_size: int = 16  # rows per optimizer step, in total over all processes and accumulation micro-steps
    grad_accum: int = 1  # micro-steps per optimizer step: each forward sees batch_size / (grad_accum x processes) rows
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    weight_decay: float = 0.1  # AdamW weight decay on matrices (not on norms, biases, embeddings)
    beta2: float = 0.95  # AdamW second-moment decay (beta1 is 0.9)
    log_every: int = 10  # steps between progress-bar/loss-history updates
    eval_every: int = 0  # steps between eval callbacks (0 = only at the end)
    ckpt_every: int = 0  # steps between checkpoints (0 = only at the end and on Ctrl-C)
    resume: bool = False  # continue from the checkpoint in --out if there is one
    force_resume: bool = False  # with --resume: accept a checkpoint made with other optimisation/data flags
    data_dir: str = "data"  # where downloaded datasets are cached
    # flags a script does not use (hidden from its --help and refused), and flags that may change
    # between a checkpoint and its resume because they do not change what is computed
    unused: ClassVar[tuple] = ()
    resume_free: ClassVar[tuple] = ("out", "threads", "max_steps", "log_every", "eval_every", "ckpt_every",
                                    "resume", "force_resume", "data_dir", "compile", "compile_backend")

    def __post_init__(self):
        for ok, message in [
                (self.compile_backend in ("auto", "inductor", "cudagraphs", "aot_eager", "eager", "none"),
                 "--compile_backend must be auto|inductor|cudagraphs|aot_eager|eager|none"),
                (0 <= self.seed < 2**32, "--seed must be in [0, 2^32)"), (0 <= self.beta2 < 1, "--beta2 must be in [0, 1)"),
                (self.lr <= 10, "--lr above 10 is not a learning rate"),
                (self.grad_accum >= 1 and self.log_every >= 1, "--grad_accum and --log_every must be at least 1")]:
            if not ok:
                raise ValueError(message)

def _field_help(cls):
    """Help text for each field, read from the trailing `# comment` on its line in the source."""
    helps = {}
    for klass in reversed(cls.__mro__):  # subclasses override their parents' comments
        for line in inspect.getsource(klass).splitlines() if dataclasses.is_dataclass(klass) else ():
            if m := re.match(r"\s*(\w+)\s*:[^=#]+=[^#]*#\s*(.+)$", line):
                helps[m.group(1)] = m.group(2).strip().replace("%", "%%")  # argparse %-formats help
    return helps

def _parse_bool(s):
    if s.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")
    return s.lower() in ("1", "true", "yes", "on")

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage block: the user sees what is wrong
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)

def parse_config(cls, script, argv=None):
    """Parse argv into a Config. Every bad input (unknown or abbreviated flag, wrong type, negative
    or non-finite number, failed __post_init__ check, unusable --out) is one error line, exit 2."""
    doc = (sys.modules[cls.__module__].__doc__ or "").strip()
    parser = _Parser(prog=f"{script}.py", description=doc.split("\n\n")[0], allow_abbrev=False,
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    helps = _field_help(cls)
    for f in dataclasses.fields(cls):
        kind = {"bool": bool, "int": int, "float": float, "str": str}[getattr(f.type, "__name__", f.type)]
        kw = dict(type=_parse_bool, nargs="?", const=True, metavar="BOOL") if kind is bool else {}  # `--gpu` = true
        if f.name not in cls.unused:
            parser.add_argument(f"--{f.name}", **{**dict(type=kind, metavar=kind.__name__.upper()), **kw},
                                default=f.default, help=helps.get(f.name, " "))
    args = vars(parser.parse_args(argv))
    for k, v in args.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not 0 <= v < math.inf:
            parser.error(f"--{k} must be a finite number >= 0, got {v}")
    try:
        cfg = cls(**args)
    except ValueError as e:
        parser.error(str(e))
    cfg.out = cfg.out or os.path.join("out", script)
    p = Path(cfg.out).absolute()  # --out: a directory we can create and write, checked before any work
    while not p.exists():
        p = p.parent
    if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
        parser.error(f"--out={cfg.out}: {p} is {'not a directory' if not p.is_dir() else 'not writable'}")
    return cfg

def fill_auto(cfg, **defaults):
    """Resolve "auto" fields: each keyword maps a field to (CPU value, --gpu value); a field left at
    0, "" or "auto" takes the value for the scale being run, so one flag picks toy or real scale."""
    for name, (cpu, gpu) in defaults.items():
        if getattr(cfg, name) in (0, "", "auto"):
            setattr(cfg, name, gpu if cfg.gpu else cpu)

class DataError(RuntimeError):
    """A problem with the user's files, data or disk: reported as one line, never a traceback."""

def die(msg, code=1):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)

def cli(main):
    """Run a script's main(): Ctrl-C anywhere (judging, scoring, sampling) and data/disk errors end
    with one line and exit 130 / 1 instead of a traceback."""
    try:
        main()
    except KeyboardInterrupt:
        die("interrupted", 130)
    except (DataError, OSError) as e:
        die(str(e))

# ----------------------------------------------------------------------------------------------
# device, precision, compile, several processes
@dataclass
class Ctx:
    device: torch.device
    gpu: bool
    rank: int = 0
    world: int = 1
    lazy_guard: bool = False  # check for NaN on the device (no host sync per step): on with --gpu

    @property
    def master(self):  # only rank 0 writes files and shows progress
        return self.rank == 0

    def autocast(self):  # CPU stays fp32: bf16 is slower on most laptop CPUs
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.gpu else contextlib.nullcontext()

_LOCKS = {}  # --out directory -> its open .lock file, held until this process ends

def _lock(out):
    """One run per --out: a second one refuses instead of racing for the same files. The kernel
    drops an flock when its process dies, however it dies, so a killed run never leaves it stale."""
    path = (Path(out) / ".lock").resolve()
    if path not in _LOCKS:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            die(f"another run is writing to {out}; wait for it or choose another --out", 2)
        _LOCKS[path] = f

def setup(cfg):
    if cfg.gpu and not torch.cuda.is_available():
        die("--gpu was given but CUDA is not available on this machine (drop --gpu to run on the CPU)")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if cfg.batch_size % (cfg.grad_accum * world):
        die(f"--batch_size={cfg.batch_size} must divide into --grad_accum={cfg.grad_accum} x {world} processes", 2)
    if world > 1 and not dist.is_initialized():  # launched by torchrun
        dist.init_process_group("nccl" if cfg.gpu else "gloo")
    if cfg.gpu:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 left outside autocast
    else:
        device = torch.device("cpu")
        torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    if rank == 0:
        _lock(cfg.out)
    else:  # one report per run: only rank 0 prints (errors still reach stderr) and writes files
        sys.stdout = open(os.devnull, "w")
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    return Ctx(device, cfg.gpu, rank, world, lazy_guard=cfg.gpu)

COMPILES = [0]  # graphs handed to the compiler backend in this process (first compile + recompiles)

def maybe_compile(model, cfg):
    """torch.compile on --gpu (or --compile); inductor needs Triton on CUDA, else `cudagraphs`
    (no fusion, no Python overhead). Each call starts from an empty compile cache, so runs in one
    process (--compare, sweeps) never inherit each other's graphs or hit the recompile limit."""
    if not (cfg.gpu or cfg.compile) or cfg.compile_backend == "none":
        return model
    backend = cfg.compile_backend
    if backend == "auto":  # CPU inductor needs only a C++ compiler
        backend = "inductor" if importlib.util.find_spec("triton") or not cfg.gpu else "cudagraphs"
    torch._dynamo.reset()
    compiler = torch._dynamo.lookup_backend(backend)

    def counted(gm, example_inputs):
        COMPILES[0] += 1
        return compiler(gm, example_inputs)
    return torch.compile(model, backend=counted, dynamic=False)

# ----------------------------------------------------------------------------------------------
# the shared Transformer block
def rope_angles(pos, head_dim, base=10000.0):
    """cos/sin tables for rotary embeddings at arbitrary positions pos: (T,) or (B, T)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    ang = pos.float()[..., None] * inv_freq  # (..., T, hs/2)
    return ang.cos(), ang.sin()

def apply_rope(x, cos, sin):  # x: (..., hs); cos/sin: broadcastable to (..., hs/2)
    """Rotate each pair (x[2i], x[2i+1]) by the angle pos * freq[i]."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (..., hs/2, 2)
    if torch.compiler.is_compiling():  # real arithmetic: what inductor fuses best
        a, b = pairs.unbind(-1)
        return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2).type_as(x)
    # eager: one complex multiply is 2.4x faster on CPU than the four real ones above
    return torch.view_as_real(torch.view_as_complex(pairs) * torch.complex(cos, sin)).flatten(-2).type_as(x)

class Attention(nn.Module):
    def __init__(self, n_embd, n_head, causal=True):
        super().__init__()
        assert n_embd % n_head == 0 and (n_embd // n_head) % 2 == 0, "head size must be even for RoPE"
        self.n_head, self.causal = n_head, causal
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)

    def project(self, x, cos, sin):  # x (B, T, C) -> rotated q, k and v, each (B, nh, T, hs)
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3 * self.n_head, C // self.n_head).split(self.n_head, 2)  # (B, T, nh, hs)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (T, 1, hs/2) or (B, T, 1, hs/2): same angle in every head
        # rotate in the (B, T, nh, hs) layout the projection wrote: then no backward step needs a copy
        return apply_rope(q, cos, sin).transpose(1, 2), apply_rope(k, cos, sin).transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, cos, sin, cache=None):
        B, T, C = x.shape
        q, k, v = self.project(x, cos, sin)
        mask = None
        if cache is not None:  # generation: append this call's keys and values; query i sits at past + i
            if cache:
                past = cache["k"].shape[2]
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
                mask = torch.arange(past + T, device=x.device) <= torch.arange(past, past + T, device=x.device)[:, None]
            cache["k"], cache["v"] = k, v
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and mask is None)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, nh, T, hs) -> (B, T, C)

class MLP(nn.Module):
    def __init__(self, n_embd, ratio=4):
        super().__init__()
        self.fc = nn.Linear(n_embd, ratio * n_embd, bias=False)
        self.proj = nn.Linear(ratio * n_embd, n_embd, bias=False)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))

class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x)).
    LayerNorm without bias rather than RMSNorm: on CPU, F.layer_norm is one fused kernel while
    F.rms_norm is composed of several (4.6x slower in eager at 384 wide); on GPU compile fuses both."""

    def __init__(self, n_embd, n_head, causal=True, mlp_ratio=4):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(n_embd, bias=False), nn.LayerNorm(n_embd, bias=False)
        self.attn, self.mlp = Attention(n_embd, n_head, causal), MLP(n_embd, mlp_ratio)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.attn(self.norm1(x), cos, sin, cache)
        return x + self.mlp(self.norm2(x))

def init_weights(model, n_layer):
    """GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer) so the residual
    stream's variance does not grow with depth."""
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02)

class TransformerLM(nn.Module):
    """Token embedding -> blocks -> norm -> untied LM head. No learned positions: RoPE only."""

    def __init__(self, vocab_size, n_layer, n_head, n_embd, causal=True):
        super().__init__()
        self.n_head = n_head
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, causal) for _ in range(n_layer))
        self.norm = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        init_weights(self, n_layer)

    def forward(self, idx, caches=None):  # idx (B, T) -> logits (B, T, V); caches: one {} per block, for generation
        past = caches[0]["k"].shape[2] if caches and caches[0] else 0  # generation continues at position past
        pos = torch.arange(past, past + idx.shape[1], device=idx.device)
        cos, sin = rope_angles(pos, self.wte.embedding_dim // self.n_head)
        x = self.wte(idx)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, caches[i] if caches else None)
        return self.lm_head(self.norm(x))

def count_params(module):
    return sum(p.numel() for p in module.parameters())

# ----------------------------------------------------------------------------------------------
# checkpoints and caches: atomic, checksummed files
def atomic_write(path, write):
    """write(file) into a uniquely named temporary file beside `path`, then rename: a crash, a full
    disk or a second writer never leaves half a file under `path`, and no temporary file stays."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o644)  # mkstemp makes it private; results and checkpoints are ordinary files
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except (OSError, RuntimeError) as e:  # RuntimeError: torch.save's own writer on a full disk
        raise DataError(f"could not write {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return path

MAGIC = b"\ntrain.py checkpoint sha256 "  # + 64 hex digits: the trailer after torch.save's bytes

def atomic_save(obj, path):
    """torch.save(obj) with a sha256 trailer, so load_checked() can tell a good file from a bad one."""
    def write(f):
        buf = io.BytesIO()
        torch.save(obj, buf)
        f.write(buf.getbuffer())
        f.write(MAGIC + hashlib.sha256(buf.getbuffer()).hexdigest().encode())
    return atomic_write(path, write)

def load_checked(path):
    """Load what atomic_save wrote, always onto the CPU (the RNG states inside must stay CPU
    tensors; load_state_dict moves weights to the model's device). Raises DataError when the
    file is truncated, garbled or not ours."""
    raw = Path(path).read_bytes()
    data, tail = raw[:-len(MAGIC) - 64], raw[-len(MAGIC) - 64:]
    if tail != MAGIC + hashlib.sha256(data).hexdigest().encode():
        raise DataError(f"{path} is damaged, incomplete or from an older train.py (checksum mismatch); delete it to start afresh")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)

# ----------------------------------------------------------------------------------------------
# the training loop
def lr_at(step, cfg):
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at max_steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = min((step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup), 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))

def make_optimizer(model, cfg, ctx):
    decays = {p: p.dim() >= 2 and "wte" not in n for n, p in model.named_parameters() if p.requires_grad}
    groups = [dict(params=[p for p, d in decays.items() if d == want], weight_decay=cfg.weight_decay * want)
              for want in (True, False)]
    lr = torch.tensor(cfg.lr, device=ctx.device) if ctx.lazy_guard else cfg.lr  # a tensor lr can be zeroed on device
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, cfg.beta2), fused=ctx.gpu or ctx.lazy_guard)

def slice_rows(batch, part, parts, device):
    """Rows [part * n, (part + 1) * n) of every tensor in a (nested) batch, n = rows / parts."""
    if isinstance(batch, torch.Tensor):
        n = len(batch) // parts
        return batch[part * n:(part + 1) * n].to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: slice_rows(v, part, parts, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(slice_rows(v, part, parts, device) for v in batch)
    return batch

def _rows(batch):  # the set of row counts of the tensors in a batch
    if isinstance(batch, torch.Tensor):
        return {len(batch)}
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    return set().union(*map(_rows, items))

def _resume(path, raw, opt, cfg):
    """Load a checkpoint for --resume, refusing one that belongs to another run."""
    ck, now = load_checked(path), dataclasses.asdict(cfg)
    changed = [f"--{k} {v} -> {now.get(k)}" for k, v in ck["config"].items() if k not in cfg.resume_free and now.get(k) != v]
    if {k: v.shape for k, v in ck["model"].items()} != {k: v.shape for k, v in raw.state_dict().items()}:
        die(f"--resume: {path} holds a model of other shapes ({', '.join(changed) or 'other code'}); "
            "use another --out or delete it", 2)
    if changed and not cfg.force_resume:
        die(f"--resume: {path} was made with other flags ({', '.join(changed)}); add --force_resume to "
            "continue it anyway, or use another --out", 2)
    raw.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    torch.set_rng_state(ck["rng"]["torch"])
    np.random.set_state(ck["rng"]["numpy"])
    random.setstate(ck["rng"]["python"])
    if ck["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
    return ck

def train(model, get_batch, loss_fn, cfg, ctx, eval_fn=None, ckpt_path=None, desc="train", quiet=False):
    """ckpt_path=None -> cfg.out/ckpt.pt; ckpt_path=False -> no checkpoints (short inner-loop runs).
    quiet=True: a transient progress bar and no summary line (for scripts that call train() often).
    Returns a summary: history, evals, steps, seconds, items_per_s, recompiles, peak_gib."""
    parts = cfg.grad_accum * ctx.world
    if cfg.batch_size % parts:
        die(f"--batch_size={cfg.batch_size} must divide into --grad_accum={cfg.grad_accum} x {ctx.world} processes", 2)
    raw = model.to(ctx.device)  # the uncompiled, unwrapped module: what we checkpoint and return
    opt = make_optimizer(raw, cfg, ctx)
    ckpt_path = None if ckpt_path is False else Path(ckpt_path or os.path.join(cfg.out, "ckpt.pt"))
    step, history, evals = 0, [], []
    if cfg.resume and ckpt_path and ckpt_path.exists():
        try:
            ck = _resume(ckpt_path, raw, opt, cfg)
        except DataError as e:
            die(f"--resume: {e}", 2)
        step, history, evals = ck["step"], ck["history"], ck["evals"]
        for g in opt.param_groups if ctx.lazy_guard else ():  # the checkpoint's lr tensors were loaded on the CPU
            g["lr"] = torch.tensor(float(g["lr"]), device=ctx.device)
        print(f"resumed from {ckpt_path} at step {step}")
    if ctx.world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.gpu else None)
    fast, compiles = maybe_compile(model, cfg), COMPILES[0]
    bad_step = torch.full((), -1, device=ctx.device)  # first step whose loss or gradient was not finite
    bar = tqdm(total=cfg.max_steps, initial=step, desc=desc, disable=not ctx.master, dynamic_ncols=True, leave=not quiet)

    def save():
        if ctx.master and ckpt_path:
            rng = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                       cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
            atomic_save(dict(model=raw.state_dict(), optimizer=opt.state_dict(), step=step, history=history,
                             evals=evals, rng=rng, config=dataclasses.asdict(cfg)), ckpt_path)

    def run_eval():
        if eval_fn is not None:
            raw.eval()
            with torch.no_grad(), ctx.autocast():
                evals.append(dict(step=step, **eval_fn(raw, step)))
            raw.train()

    def fail(msg):  # close the bar first, so the one error line is not glued to it
        bar.close()
        die(msg)

    def check_finite():
        if bad_step.item() >= 0:
            fail(f"loss became nan at step {bad_step.item()}; stopping. That update was skipped and the last "
                 f"good checkpoint (if any) is kept at {ckpt_path}. Try a lower --lr.")

    # Ctrl-C sets a flag; the loop finishes the step it is in, saves, and exits. A second Ctrl-C
    # interrupts at once. (Only the main thread may install signal handlers.)
    stop = []

    def on_sigint(*_):
        stop.append(1)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    main_thread = threading.current_thread() is threading.main_thread()
    old_handler = signal.signal(signal.SIGINT, on_sigint) if main_thread else None
    t0, items, last, first_step = time.time(), 0.0, (history[-1] if history else {}), step
    try:
        raw.train()
        while step < cfg.max_steps:
            lr = lr_at(step, cfg)
            if ctx.world > 1:  # noise drawn inside the model: different on each rank, reproducible
                torch.manual_seed((cfg.seed * 1_000_003 + step) * 4099 + ctx.rank)
            batch = get_batch(step)
            if _rows(batch) != {cfg.batch_size}:
                fail(f"get_batch({step}) gave {sorted(_rows(batch))} rows; every step needs exactly "
                     f"--batch_size={cfg.batch_size} (drop or pad partial batches)")
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for micro in range(cfg.grad_accum):  # DDP all-reduces the gradients on the last micro-step only
                rows = slice_rows(batch, micro * ctx.world + ctx.rank, parts, ctx.device)
                quiet_sync = ctx.world > 1 and micro < cfg.grad_accum - 1
                with (model.no_sync() if quiet_sync else contextlib.nullcontext()), ctx.autocast():
                    loss, metrics = loss_fn(fast, rows)
                (loss / cfg.grad_accum).backward()
                total = total + loss.detach() / cfg.grad_accum
                items += float(metrics.get("items", 0))
            norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            ok = torch.isfinite(total) & torch.isfinite(norm)  # the norm is over all ranks' averaged gradients
            bad_step.copy_(torch.where(~ok & (bad_step < 0), step, bad_step))
            if ctx.lazy_guard:  # no host sync: a bad step gets zero gradients and lr 0, reported below
                for p in raw.parameters():
                    if p.grad is not None:
                        p.grad.masked_fill_(~ok, 0.0)
                for g in opt.param_groups:
                    g["lr"].fill_(lr).mul_(ok)
            else:  # on the CPU a sync is free: stop before the update
                check_finite()
                for g in opt.param_groups:
                    g["lr"] = lr
            opt.step()
            step += 1
            bar.update(1)
            compiles = COMPILES[0] if step == first_step + 1 else compiles  # later compiles are recompiles
            logs = step % cfg.log_every == 0 or step == cfg.max_steps
            saves = cfg.ckpt_every and step % cfg.ckpt_every == 0
            if logs or saves or stop:
                check_finite()  # never log, save or evaluate past a non-finite step
            if logs:
                last = dict(step=step, loss=total.item(), lr=lr, **{k: float(v) for k, v in metrics.items() if k != "items"})
                history.append(last)
                rate = items / max(time.time() - t0, 1e-9)
                bar.set_postfix(loss=f"{last['loss']:.4f}", **({"items/s": f"{rate:,.0f}"} if items else {}))
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                run_eval()
            if stop or saves:
                save()
            if stop:
                bar.close()
                if ctx.master:
                    print(f"interrupted at step {step}" + (f"; checkpoint saved to {ckpt_path}. Run again with "
                          "--resume to continue." if ckpt_path else ""), file=sys.stderr)
                sys.exit(130)
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, old_handler)
        bar.close()
    run_eval()
    save()
    seconds = time.time() - t0
    summary = dict(history=history, evals=evals, steps=step, seconds=seconds, items_per_s=items / max(seconds, 1e-9),
                   recompiles=COMPILES[0] - compiles, peak_gib=torch.cuda.max_memory_allocated() / 2**30 if ctx.gpu else 0)
    if not quiet:
        print(f"{desc}: {step} steps in {seconds:.1f}s, final loss {last.get('loss', float('nan')):.4f}"
              + (f", {summary['items_per_s']:,.0f} items/s" if items else "")
              + (f", peak GPU memory {summary['peak_gib']:.1f} GiB" if ctx.gpu else ""))
    if fast is not model and summary["recompiles"] > 0 and ctx.master:
        print(f"warning: {desc} recompiled {summary['recompiles']} time(s) after its first step", file=sys.stderr)
    return summary

# ----------------------------------------------------------------------------------------------
# results: intervals over seeds, results.json and figures under --out (rank 0 only)
@functools.lru_cache(maxsize=None)
def t_quantile(df, level=0.95):
    """The t with P(|T| <= t) = level for Student's t with df degrees of freedom (there is no scipy
    here): bisection on P(|T| <= x), the density integrated by Simpson's rule."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def mass(x):
        f = c * (1 + np.linspace(0.0, x, 4001) ** 2 / df) ** (-(df + 1) / 2)
        return 2 * x / 12000 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    lo, hi = 0.0, 1e3
    for _ in range(60):
        lo, hi = ((lo + hi) / 2, hi) if mass((lo + hi) / 2) < level else (lo, (lo + hi) / 2)
    return (lo + hi) / 2

def mean_interval(xs, level=0.95):
    """(mean, half-width of the two-sided t-interval) of independent values, e.g. one per seed: with
    few seeds the normal 1.96 would be far too narrow. The half-width is nan for a single value."""
    x = np.asarray(xs, dtype=np.float64)
    if len(x) < 2:
        return float(x.mean()), math.nan
    return float(x.mean()), t_quantile(len(x) - 1, level) * float(x.std(ddof=1)) / math.sqrt(len(x))

def device_name(ctx):
    return torch.cuda.get_device_name(ctx.device) if ctx.gpu else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"

def save_results(cfg, ctx, results, name="results.json"):
    if ctx.master:
        text = json.dumps(dict(config=dataclasses.asdict(cfg), torch=torch.__version__, device=device_name(ctx),
                               time=time.strftime("%Y-%m-%d %H:%M:%S"), **results), indent=1, default=float)
        return atomic_write(Path(cfg.out) / name, lambda f: f.write(text.encode()))

def save_figure(path, draw):
    """draw(plt) builds a figure; saved as PNG. Figures are optional: no matplotlib, no figure."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if dist.is_initialized() and dist.get_rank() > 0:
        return None
    fig = draw(plt) or plt.gcf()
    try:
        return atomic_write(path, lambda f: fig.savefig(f, dpi=120, bbox_inches="tight", format="png"))
    finally:
        plt.close(fig)

# ----------------------------------------------------------------------------------------------
# data: offline corpora and a checked downloader
def embedded_text(kind="prose", split="train"):
    """Text that ships with Python itself, so default runs need no network.
    prose: the English help topics of pydoc_data (~460 KB); code: the standard library's .py
    source (first 16 MB, tests and vendored packages skipped). A document goes to `val` when the
    CRC32 of its name is 0 mod 10: the split never depends on file order or Python's hash seed."""
    if kind == "prose":
        import pydoc_data.topics
        docs = sorted(pydoc_data.topics.topics.items())
    elif kind == "code":
        root, docs, total = Path(sysconfig.get_paths()["stdlib"]), [], 0
        skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip"}
        for p in sorted(root.rglob("*.py")):
            if total < 16e6 and not skip & set(p.relative_to(root).parts):
                docs.append((str(p.relative_to(root)), p.read_text(encoding="utf-8", errors="replace")))
                total += len(docs[-1][1])
    else:
        raise ValueError(f"unknown corpus {kind!r} (prose or code)")
    keep = [text for name, text in docs if (zlib.crc32(name.encode()) % 10 == 0) == (split == "val")]
    return "\n\n".join(keep).encode("utf-8")

DATASETS = {  # name -> where it lives and how to recognise a good copy
    "tinyshakespeare": dict(url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                            file="tinyshakespeare.txt", size=1115394,
                            sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
    "enwik8": dict(url="http://mattmahoney.net/dc/enwik8.zip", file="enwik8.zip", size=36445475,
                   sha256="547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc"),
}

def _check(path, size, sha256):
    if size is not None and path.stat().st_size != size:
        return f"size {path.stat().st_size} bytes, expected {size}"
    if sha256 is not None and (digest := hashlib.sha256(path.read_bytes()).hexdigest()) != sha256:
        return f"sha256 {digest[:16]}..., expected {sha256[:16]}..."

def download_url(url, dest, size=None, sha256=None):
    """Fetch url to dest once (cached), verify size/sha256, write via a temporary file + rename."""
    dest = Path(dest)
    if dest.exists() and _check(dest, size, sha256) is None:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f, tqdm(
                total=int(r.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                desc=f"download {dest.name}") as bar:
            while chunk := r.read(1 << 20):
                bar.update(f.write(chunk))
        if problem := _check(tmp, size, sha256):
            raise DataError(f"{url} gave a bad file ({problem}); nothing was kept. Download it by hand and place it at {dest}")
        os.replace(tmp, dest)
    except OSError as e:  # URLError, timeouts and disk errors are all OSErrors
        raise DataError(f"could not download {url} ({e}). Check the network, or download it by hand "
                        f"and place it at {dest}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest

def download(name, data_dir="data"):
    """A named real dataset's file on disk (enwik8: the zip; hnet_rl.py unpacks it)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    d = DATASETS[name]
    return download_url(d["url"], Path(data_dir) / d["file"], d["size"], d["sha256"])

# ----------------------------------------------------------------------------------------------
# benchmark: `python train.py --bench [--gpu]`
@dataclass
class BenchConfig(TrainConfig):
    bench: bool = False  # run the throughput benchmark (the only thing `python train.py` does)
    size: str = "auto"  # auto (small on CPU, gpt2 on --gpu) | small (nanoGPT shakespeare-char: 6L/6H/384, T 256, vocab 65) | gpt2 (12L/12H/768, T 1024, vocab 50304) | tiny (tests)
    batch_size: int = 0  # sequences per step (0 = 12 for small, 16 for gpt2)
    max_steps: int = 3  # timed steps per model per round (after 3 untimed warm-up steps)
    rounds: int = 12  # timed rounds, the models' order alternating (A B, B A, ...) so that load hits both alike
    reference: str = ""  # path to nanoGPT's model.py: also time its GPT, trained with its own loss
    unused = ("out", "min_lr_ratio", "warmup", "grad_accum", "grad_clip", "log_every", "eval_every", "ckpt_every",
              "resume", "force_resume", "data_dir")

PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
                   "4090": 165.2e12}  # dense bf16 tensor-core peaks from the vendors' data sheets

def bench(cfg):
    ctx = setup(cfg)
    size = cfg.size if cfg.size != "auto" else ("gpt2" if cfg.gpu else "small")
    L, H, C, T, V, B = dict(tiny=(1, 2, 16, 16, 65, 2), small=(6, 6, 384, 256, 65, 12), gpt2=(12, 12, 768, 1024, 50304, 16))[size]
    B = cfg.batch_size or B
    x = torch.randint(0, V, (B, T + 1), device=ctx.device)
    inp, tgt = x[:, :-1], x[:, 1:].contiguous()
    runs = {"train.py TransformerLM": (TransformerLM(V, L, H, C), lambda m: F.cross_entropy(m(inp).float().view(-1, V), tgt.view(-1)))}
    if cfg.reference:  # nanoGPT's GPT (bias off, dropout 0 like ours) from a file the user has; its own loss
        spec = importlib.util.spec_from_file_location("nanogpt_model", cfg.reference)
        ng = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ng)
        runs["nanoGPT GPT"] = (ng.GPT(ng.GPTConfig(block_size=T, vocab_size=V, n_layer=L, n_head=H, n_embd=C,
                                                   dropout=0.0, bias=False)), lambda m: m(inp, tgt)[1])  # all T logits
    print(f"bench {size}: {L}L/{H}H/{C}, T={T}, vocab={V}, batch={B} on {device_name(ctx)}")
    steps, speed = {}, {name: [] for name in runs}
    for name, (model, loss_of) in runs.items():
        opt, fast = make_optimizer(model.to(ctx.device), cfg, ctx), maybe_compile(model, cfg)

        def step(fast=fast, opt=opt, loss_of=loss_of):
            with ctx.autocast():
                loss = loss_of(fast)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        steps[name] = step
        for _ in range(3):  # warm-up: compilation, allocator, caches
            step()
    sync = torch.cuda.synchronize if ctx.gpu else (lambda: None)
    for r in range(cfg.rounds):
        for name in list(steps)[::-1 if r % 2 else 1]:
            sync()
            t0 = time.perf_counter()
            for _ in range(cfg.max_steps):
                steps[name]()
            sync()
            speed[name].append(B * T * cfg.max_steps / (time.perf_counter() - t0))
    for name, (model, _) in runs.items():
        # FLOPs per token (PaLM appendix B, as nanoGPT): 6 per weight of every matmul (each nn.Linear,
        # the LM head too, tied or not; not the embedding lookups) + attention's 12 * L * H * Q * T
        n = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
        tflops = (6 * n + 12 * L * C * T) * np.median(speed[name]) / 1e12
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if ctx.gpu and k in device_name(ctx)), None)
        print(f"{name:24s} {count_params(model) / 1e6:6.2f}M params {np.median(speed[name]):11,.0f} tokens/s "
              f"(rounds {min(speed[name]):,.0f}-{max(speed[name]):,.0f})  {tflops:6.2f} TFLOP/s"
              + (f"  MFU {tflops * 1e12 / peak:.1%}" if peak else "")
              + (f"  peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if ctx.gpu else ""))
    if len(speed) == 2:
        ratio = [a / b for a, b in zip(*speed.values())]  # per round: both timed moments apart
        print(f"ours / nanoGPT tokens/s: median {np.median(ratio):.3f} over {len(ratio)} rounds "
              f"(quartiles {np.percentile(ratio, 25):.3f}-{np.percentile(ratio, 75):.3f})")

if __name__ == "__main__":
    bench_cfg = parse_config(BenchConfig, "train")
    if not bench_cfg.bench:
        die("train.py is the shared engine; as a script it only runs `--bench` (see --help)", 2)
    cli(lambda: bench(bench_cfg))
