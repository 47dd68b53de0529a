"""
train.py: the small shared engine under the four paper scripts.

Read it top to bottom; each section is one idea:
  config/CLI    a @dataclass per script becomes an argparse parser (`--key=value`)
  device        CPU fp32 eager by default; `--gpu` = CUDA, bf16 autocast, TF32, fused AdamW,
                torch.compile (inductor if Triton imports, else the Triton-free `cudagraphs`)
  model         the shared pre-norm Transformer block (LayerNorm, RoPE, SDPA attention with a
                causal flag and an optional sliding window, GELU MLP) and a plain LM built from it
  loop          train(model, get_batch, loss_fn, cfg, ctx): warm-up + cosine LR, clipping,
                accumulation, eval callback, tqdm, atomic checkpoints, exact resume, Ctrl-C, NaN guard,
                DDP under torchrun
  results       results.json and optional matplotlib figures under out/<script>/
  data          offline corpora shipped with Python, a checked downloader, a BPE tokenizer fallback
  bench         `python train.py --bench [--gpu]`: tokens/s and MFU of the shared Transformer

What a script supplies: a Config (subclass of TrainConfig), a model, get_batch(i) -> global batch
for micro-step i (deterministic in i), and loss_fn(model, batch) -> (loss, metrics).
There is no hand-written Triton anywhere: on CUDA all fusion comes from torch.compile.
"""
import argparse, base64, collections, contextlib, dataclasses, hashlib, inspect, json, math, os
import random, re, signal, sys, sysconfig, threading, time, urllib.request, zipfile, zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# API-READY
# ----------------------------------------------------------------------------------------------
# config and command line


@dataclass
class TrainConfig:
    out: str = ""  # output directory for results.json, figures and checkpoints (default out/<script>)
    seed: int = 0  # random seed (data order, init, sampling)
    gpu: bool = False  # fused CUDA path: bf16 autocast, TF32, fused AdamW, torch.compile
    compile: bool = False  # torch.compile on CPU too (opt-in; always on with --gpu)
    compile_backend: str = "auto"  # auto (inductor if Triton imports, else cudagraphs) | inductor | cudagraphs | aot_eager | eager
    threads: int = 0  # CPU threads for torch (0 = all cores)
    lr: float = 3e-3  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 20  # linear warm-up steps
    max_steps: int = 200  # optimizer steps
    batch_size: int = 16  # sequences per optimizer step (summed over processes and accumulation)
    grad_accum: int = 1  # micro-steps per optimizer step
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    weight_decay: float = 0.1  # AdamW weight decay on matrices (not on norms, biases, embeddings)
    beta2: float = 0.95  # AdamW second-moment decay (beta1 is 0.9)
    log_every: int = 10  # steps between progress-bar/loss-history updates
    eval_every: int = 0  # steps between eval callbacks (0 = only at the end)
    ckpt_every: int = 0  # steps between checkpoints (0 = only at the end and on Ctrl-C)
    resume: bool = False  # continue from the checkpoint in --out if there is one
    data_dir: str = "data"  # where downloaded datasets are cached

    def __post_init__(self):
        if self.compile_backend not in ("auto", "inductor", "cudagraphs", "aot_eager", "eager", "none"):
            raise ValueError(f"--compile_backend must be auto|inductor|cudagraphs|aot_eager|eager|none")
        if self.grad_accum < 1:
            raise ValueError("--grad_accum must be at least 1")


def _field_help(cls):
    """Help text for each field, read from the trailing `# comment` on its line in the source."""
    helps = {}
    for klass in reversed(cls.__mro__):  # subclasses override their parents' comments
        if not dataclasses.is_dataclass(klass):
            continue
        for line in inspect.getsource(klass).splitlines():
            m = re.match(r"\s*(\w+)\s*:[^=#]+=[^#]*#\s*(.+)$", line)
            if m:
                helps[m.group(1)] = m.group(2).strip().replace("%", "%%")  # argparse %-formats help
    return helps


def _parse_bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage block: the user sees what is wrong
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_config(cls, script, argv=None):
    """Build an argparse parser from a Config dataclass, parse argv, return the Config.
    Every bad input (unknown flag, wrong type, negative number, failed __post_init__ check) ends
    as one argparse error line and exit code 2."""
    doc = (sys.modules[cls.__module__].__doc__ or "").strip()
    parser = _Parser(prog=f"{script}.py", description=doc.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    helps = _field_help(cls)
    for f in dataclasses.fields(cls):
        kind = {"bool": bool, "int": int, "float": float, "str": str}[getattr(f.type, "__name__", f.type)]
        kw = dict(default=f.default, help=helps.get(f.name, " "), metavar=kind.__name__.upper())
        if kind is bool:  # `--gpu` alone means true; `--gpu=false` also works
            kw.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
        else:
            kw["type"] = kind
        parser.add_argument(f"--{f.name}", **kw)
    args = parser.parse_args(argv)
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and (v < 0 or v != v):
            parser.error(f"--{f.name} must be >= 0, got {v}")
    try:
        cfg = cls(**vars(args))
    except ValueError as e:
        parser.error(str(e))
    cfg.out = cfg.out or os.path.join("out", script)
    return cfg


def fill_auto(cfg, **defaults):
    """Resolve "auto" fields: each keyword maps a field to (CPU value, --gpu value); a field left at
    0, "" or "auto" takes the value for the scale being run, so one flag picks toy or real scale."""
    for name, (cpu, gpu) in defaults.items():
        if getattr(cfg, name) in (0, "", "auto"):
            setattr(cfg, name, gpu if cfg.gpu else cpu)


def die(msg, code=1):
    """One-line error for the user: no traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)

# ----------------------------------------------------------------------------------------------
# device, precision, compile, several processes


@dataclass
class Ctx:
    device: torch.device
    gpu: bool
    rank: int = 0
    world: int = 1

    @property
    def master(self):  # only rank 0 writes files and shows progress
        return self.rank == 0

    def autocast(self):
        if self.gpu:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()  # CPU stays fp32: bf16 is slower on most laptop CPUs


def setup(cfg):
    if cfg.gpu and not torch.cuda.is_available():
        die("--gpu was given but CUDA is not available on this machine (drop --gpu to run on the CPU)")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not torch.distributed.is_initialized():  # launched by torchrun
        torch.distributed.init_process_group("nccl" if cfg.gpu else "gloo")
    if cfg.gpu:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul left outside autocast
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
        torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    return Ctx(device, cfg.gpu, rank, world)


def maybe_compile(model, cfg):
    """torch.compile on --gpu (or --compile). Inductor generates Triton on CUDA; without Triton we
    use `cudagraphs`, which replays ATen kernels with no fusion but no Python overhead either."""
    if not (cfg.gpu or cfg.compile) or cfg.compile_backend == "none":
        return model
    backend = cfg.compile_backend
    if backend == "auto":
        try:
            import triton  # noqa: F401
            backend = "inductor"
        except ImportError:
            backend = "cudagraphs" if cfg.gpu else "inductor"  # CPU inductor needs only a C++ compiler
    return torch.compile(model, backend=backend, dynamic=False)

# ----------------------------------------------------------------------------------------------
# the shared Transformer block


def rope_angles(pos, head_dim, base=10000.0):
    """cos/sin tables for rotary embeddings at arbitrary positions pos: (T,) or (B, T)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    ang = pos.float()[..., None] * inv_freq  # (..., T, hs/2)
    return ang.cos(), ang.sin()


def apply_rope(x, cos, sin):  # x: (..., B, nh, T, hs); cos/sin: (T, hs/2) or (B, T, hs/2)
    """Rotate each pair (x[2i], x[2i+1]) by the angle pos * freq[i]."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    pairs = x.float().unflatten(-1, (-1, 2))  # (..., hs/2, 2)
    if torch.compiler.is_compiling():  # real arithmetic: what inductor fuses best
        a, b = pairs.unbind(-1)
        return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2).type_as(x)
    # eager: one complex multiply is 2.4x faster on CPU than the four real ones above
    return torch.view_as_real(torch.view_as_complex(pairs) * torch.complex(cos, sin)).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, n_embd, n_head, causal=True, window=0):
        super().__init__()
        assert n_embd % n_head == 0 and (n_embd // n_head) % 2 == 0, "head size must be even for RoPE"
        self.n_head, self.causal, self.window = n_head, causal, window
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)

    def forward(self, x, cos, sin, cache=None, attn_mask=None):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
        (q, k), v = apply_rope(qkv[:2], cos, sin), qkv[2]  # one rotation call for q and k together
        past = 0
        if cache is not None:  # KV cache for generation: append this call's keys and values
            if "k" in cache:
                past = cache["k"].shape[2]
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        is_causal = self.causal and attn_mask is None
        if is_causal and (past > 0 or self.window):  # explicit mask: query i sits at position past+i
            i = torch.arange(T, device=x.device)[:, None] + past
            j = torch.arange(past + T, device=x.device)[None, :]
            attn_mask = (j <= i) & ((i - j < self.window) if self.window else True)
            is_causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


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

    def __init__(self, n_embd, n_head, causal=True, window=0, mlp_ratio=4):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(n_embd, bias=False), nn.LayerNorm(n_embd, bias=False)
        self.attn = Attention(n_embd, n_head, causal, window)
        self.mlp = MLP(n_embd, mlp_ratio)

    def forward(self, x, cos, sin, cache=None, attn_mask=None):
        x = x + self.attn(self.norm1(x), cos, sin, cache, attn_mask)
        return x + self.mlp(self.norm2(x))


def init_weights(model, n_layer):
    """GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer) so the residual
    stream's variance does not grow with depth."""
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
            nn.init.normal_(p, 0.0, std)


class TransformerLM(nn.Module):
    """Token embedding -> blocks -> norm -> untied LM head. No learned positions: RoPE only."""

    def __init__(self, vocab_size, n_layer, n_head, n_embd, causal=True, window=0):
        super().__init__()
        self.n_head = n_head
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, causal, window) for _ in range(n_layer))
        self.norm = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        init_weights(self, n_layer)

    def new_caches(self):
        return [{} for _ in self.blocks]

    def forward(self, idx, pos=None, caches=None):  # idx (B, T) -> logits (B, T, V)
        if pos is None:
            start = caches[0]["k"].shape[2] if caches and "k" in caches[0] else 0
            pos = torch.arange(start, start + idx.shape[1], device=idx.device)
        cos, sin = rope_angles(pos, self.wte.embedding_dim // self.n_head)
        x = self.wte(idx)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, caches[i] if caches is not None else None)
        return self.lm_head(self.norm(x))


def count_params(module):
    return sum(p.numel() for p in module.parameters())

# ----------------------------------------------------------------------------------------------
# the training loop


def lr_at(step, cfg):
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at max_steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def make_optimizer(model, cfg, ctx):
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2 and "wte" not in n]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not (p.dim() >= 2 and "wte" not in n)]
    groups = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=rest, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), fused=ctx.gpu)


def _to(batch, device, rank=0, world=1):
    """Move a (nested) batch to the device, keeping this process's rows rank::world."""
    if isinstance(batch, torch.Tensor):
        return batch[rank::world].to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to(v, device, rank, world) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(v, device, rank, world) for v in batch)
    return batch


def _rng_state():
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _set_rng_state(s):
    torch.set_rng_state(s["torch"]); np.random.set_state(s["numpy"]); random.setstate(s["python"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def atomic_save(obj, path):
    """Write to a temporary file beside `path`, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def train(model, get_batch, loss_fn, cfg, ctx, eval_fn=None, ckpt_path=None, desc="train", quiet=False):
    """ckpt_path=None -> cfg.out/ckpt.pt; ckpt_path=False -> no checkpoints (short inner-loop runs).
    quiet=True: a transient progress bar and no summary line (for scripts that call train() often)."""
    model.to(ctx.device)
    raw = model  # the uncompiled, unwrapped module: what we checkpoint and return
    opt = make_optimizer(raw, cfg, ctx)
    ckpt_path = None if ckpt_path is False else Path(ckpt_path or os.path.join(cfg.out, "ckpt.pt"))
    step, history, evals = 0, [], []
    if cfg.resume and ckpt_path and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=ctx.device, weights_only=False)
        raw.load_state_dict(ck["model"]); opt.load_state_dict(ck["optimizer"])
        step, history, evals = ck["step"], ck["history"], ck["evals"]
        _set_rng_state(ck["rng"])
        if ctx.master:
            print(f"resumed from {ckpt_path} at step {step}")
    if ctx.world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.gpu else None)
    fast = maybe_compile(model, cfg)

    def save():
        if ctx.master and ckpt_path:
            atomic_save(dict(model=raw.state_dict(), optimizer=opt.state_dict(), step=step, history=history,
                             evals=evals, rng=_rng_state(), config=dataclasses.asdict(cfg)), ckpt_path)

    def run_eval():
        if eval_fn is not None:
            raw.eval()
            with torch.no_grad(), ctx.autocast():
                evals.append(dict(step=step, **eval_fn(raw, step)))
            raw.train()

    # Ctrl-C sets a flag; the loop finishes the step it is in, saves, and exits. A second Ctrl-C
    # interrupts at once. (Only the main thread may install signal handlers.)
    stop = []
    handler = lambda *_: (stop.append(1), signal.signal(signal.SIGINT, signal.default_int_handler))
    main_thread = threading.current_thread() is threading.main_thread()
    old_handler = signal.signal(signal.SIGINT, handler) if main_thread else None

    bar = tqdm(total=cfg.max_steps, initial=step, desc=desc, disable=not ctx.master, dynamic_ncols=True, leave=not quiet)
    t0, items, last, first_step = time.time(), 0.0, (history[-1] if history else {}), step
    try:
        raw.train()
        while step < cfg.max_steps:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            for attempt in range(2):  # the second attempt only if the first compiled step failed
                try:
                    opt.zero_grad(set_to_none=True)
                    for micro in range(cfg.grad_accum):
                        batch = _to(get_batch(step * cfg.grad_accum + micro), ctx.device, ctx.rank, ctx.world)
                        sync = micro == cfg.grad_accum - 1 or ctx.world == 1
                        with (contextlib.nullcontext() if sync else model.no_sync()), ctx.autocast():
                            loss, metrics = loss_fn(fast, batch)
                        (loss / cfg.grad_accum).backward()
                        items += float(metrics.get("items", 0))
                    break
                except Exception as e:
                    if fast is model or attempt or step != first_step:
                        raise
                    print(f"warning: compiled step failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                          "falling back to eager", file=sys.stderr)
                    fast = model
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
            # The NaN guard needs a GPU->CPU sync, so on GPU it runs only on steps that log or save;
            # either way a non-finite loss is caught before anything is written to disk.
            logs = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps
            saves = cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0
            if (not ctx.gpu or logs or saves or stop) and not torch.isfinite(loss.detach()):
                bar.close()
                die(f"loss became {loss.item()} at step {step}; stopping. The last good checkpoint "
                    f"(if any) is kept at {ckpt_path}. Try a lower --lr.")
            opt.step()
            step += 1
            bar.update(1)
            if logs:
                last = dict(step=step, loss=loss.item(), lr=lr_at(step - 1, cfg),
                            **{k: float(v) for k, v in metrics.items() if k != "items"})
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
    summary = dict(history=history, evals=evals, steps=step, seconds=seconds, items_per_s=items / max(seconds, 1e-9))
    if ctx.master and not quiet:
        print(f"{desc}: {step} steps in {seconds:.1f}s, final loss {last.get('loss', float('nan')):.4f}"
              + (f", {summary['items_per_s']:,.0f} items/s" if items else ""))
    return summary

# ----------------------------------------------------------------------------------------------
# results: results.json and figures under --out (rank 0 only)


def device_name(ctx):
    if ctx.gpu:
        return torch.cuda.get_device_name(ctx.device)
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def save_results(cfg, ctx, results, name="results.json"):
    if not ctx.master:
        return None
    path = Path(cfg.out) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(config=dataclasses.asdict(cfg), torch=torch.__version__, device=device_name(ctx),
                   time=time.strftime("%Y-%m-%d %H:%M:%S"), **results)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=float))
    os.replace(tmp, path)
    return path


def save_figure(path, draw):
    """draw(plt) builds a figure; saved as PNG. Figures are optional: no matplotlib, no figure."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = draw(plt) or plt.gcf()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    os.replace(tmp, path)
    plt.close(fig)
    return path

# ----------------------------------------------------------------------------------------------
# data: offline corpora, a checked downloader, a tokenizer


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
            rel = p.relative_to(root)
            if total < 16e6 and not skip & set(rel.parts):
                docs.append((str(rel), p.read_text(encoding="utf-8", errors="replace")))
                total += len(docs[-1][1])
    else:
        raise ValueError(f"unknown corpus {kind!r} (prose or code)")
    keep = [text for name, text in docs if (zlib.crc32(name.encode()) % 10 == 0) == (split == "val")]
    return "\n\n".join(keep).encode("utf-8")


class DataError(RuntimeError):
    pass


DATASETS = {  # name -> where it lives and how to recognise a good copy
    "tinyshakespeare": dict(url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                            file="tinyshakespeare.txt", size=1115394),
    "enwik8": dict(url="http://mattmahoney.net/dc/enwik8.zip", file="enwik8.zip", size=36445475),
}


def _check(path, size, sha256):
    if size is not None and path.stat().st_size != size:
        return f"size {path.stat().st_size} bytes, expected {size}"
    if sha256 is not None:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != sha256:
            return f"sha256 {digest[:16]}..., expected {sha256[:16]}..."
    return None


def download_url(url, dest, size=None, sha256=None):
    """Fetch url to dest once (cached), verify size/sha256, write via a .part file + rename."""
    dest = Path(dest)
    if dest.exists() and _check(dest, size, sha256) is None:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            with tqdm(total=int(r.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                      desc=f"download {dest.name}") as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        problem = _check(tmp, size, sha256)
        if problem:
            raise DataError(f"{url} gave a bad file ({problem}); nothing was kept. Download it by hand "
                            f"and place it at {dest}")
        os.replace(tmp, dest)
    except OSError as e:  # URLError, timeouts and disk errors are all OSErrors
        raise DataError(f"could not download {url} ({e}). Check the network, or download it by hand "
                        f"and place it at {dest}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def download(name, data_dir="data"):
    """A named real dataset as raw bytes on disk (enwik8: the 10^8-byte unzipped file)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    d = DATASETS[name]
    path = download_url(d["url"], Path(data_dir) / d["file"], d.get("size"), d.get("sha256"))
    if name == "enwik8":
        out = Path(data_dir) / "enwik8"
        if not (out.exists() and out.stat().st_size == 10**8):
            with zipfile.ZipFile(path) as z:
                tmp = out.with_name("enwik8.part")
                tmp.write_bytes(z.read("enwik8"))
                os.replace(tmp, out)
        path = out
    return path


# GPT-2's pre-tokenizer split, restricted to ASCII classes so Python's `re` can run it in training
# and tiktoken's Rust regex agrees with it when encoding: words, numbers, punctuation, spaces.
SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"""


def train_bpe(text, vocab_size):
    """Byte-level BPE: start from the 256 bytes, repeatedly merge the most frequent adjacent pair.
    Words (pre-tokenized chunks) are counted once with their frequency, and pair counts are
    updated only for the words a merge touches, so this takes seconds, not minutes."""
    words = collections.Counter(re.findall(SPLIT_PATTERN, text.decode("utf-8", errors="replace")))
    seqs = [[bytes([b]) for b in w.encode("utf-8")] for w in words]
    freq = list(words.values())
    pairs, where = collections.Counter(), collections.defaultdict(set)
    for wi, seq in enumerate(seqs):
        for pair in zip(seq, seq[1:]):
            pairs[pair] += freq[wi]
            where[pair].add(wi)
    heap = [(-n, pair) for pair, n in pairs.items()]
    import heapq
    heapq.heapify(heap)
    ranks = {bytes([i]): i for i in range(256)}
    while len(ranks) < vocab_size and heap:
        n, pair = heapq.heappop(heap)
        if -n != pairs.get(pair, 0) or n == 0:  # stale heap entry: this pair's count changed since
            continue
        merged = pair[0] + pair[1]
        if merged not in ranks:
            ranks[merged] = len(ranks)
        for wi in list(where[pair]):
            old, new, i = seqs[wi], [], 0
            while i < len(old):
                if i + 1 < len(old) and (old[i], old[i + 1]) == pair:
                    new.append(merged); i += 2
                else:
                    new.append(old[i]); i += 1
            for p in zip(old, old[1:]):
                pairs[p] -= freq[wi]; where[p].discard(wi)
            for p in zip(new, new[1:]):
                pairs[p] += freq[wi]; where[p].add(wi)
            for p in set(zip(old, old[1:])) | set(zip(new, new[1:])):
                if pairs[p] > 0:
                    heapq.heappush(heap, (-pairs[p], p))
            seqs[wi] = new
    return ranks


def get_tokenizer(kind="gpt2", text=b"", vocab_size=512, cache_dir="out/tokenizer"):
    """tiktoken's GPT-2 encoding when it can be fetched; otherwise (or with kind="bpe") a byte-level
    BPE trained on `text`, wrapped in tiktoken.Encoding and cached as `base64(token) rank` lines."""
    import tiktoken
    if kind == "gpt2":
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:
            print(f"note: GPT-2 BPE unavailable ({type(e).__name__}, offline?); training a {vocab_size}-token "
                  "BPE on the training text instead", file=sys.stderr)
    elif kind != "bpe":
        raise ValueError(f"unknown tokenizer {kind!r} (gpt2 or bpe)")
    path = Path(cache_dir) / f"bpe{vocab_size}-{hashlib.sha1(text).hexdigest()[:12]}.tiktoken"
    if path.exists():
        ranks = {base64.b64decode(tok): int(r) for tok, r in (l.split() for l in path.read_text().splitlines())}
    else:
        ranks = train_bpe(text, vocab_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
        os.replace(tmp, path)
    return tiktoken.Encoding(f"bpe{vocab_size}", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks)})

# ----------------------------------------------------------------------------------------------
# benchmark: `python train.py --bench [--gpu]`


@dataclass
class BenchConfig(TrainConfig):
    bench: bool = False  # run the throughput benchmark (the only thing `python train.py` does)
    size: str = "auto"  # auto (small on CPU, gpt2 on --gpu) | small (nanoGPT shakespeare-char: 6L/6H/384, T 256, vocab 65) | gpt2 (12L/12H/768, T 1024, vocab 50304)
    batch_size: int = 0  # sequences per step (0 = 12 for small, 16 for gpt2)
    max_steps: int = 12  # timed steps (after 3 untimed warm-up steps)
    reference: str = ""  # path to nanoGPT's model.py: also time its GPT, same config and loop, for comparison


PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
                   "4090": 165.2e12}  # dense bf16 tensor-core peaks from the vendors' data sheets


def bench(cfg):
    ctx = setup(cfg)
    size = cfg.size if cfg.size != "auto" else ("gpt2" if cfg.gpu else "small")
    L, H, C, T, V, B = dict(small=(6, 6, 384, 256, 65, 12), gpt2=(12, 12, 768, 1024, 50304, 16))[size]
    B = cfg.batch_size or B
    models = {"train.py TransformerLM": lambda: TransformerLM(V, L, H, C)}
    if cfg.reference:  # nanoGPT's GPT, bias off and dropout 0 like ours, imported from a file the user has
        import importlib.util
        spec = importlib.util.spec_from_file_location("nanogpt_model", cfg.reference)
        ng = importlib.util.module_from_spec(spec); spec.loader.exec_module(ng)
        models["nanoGPT GPT"] = lambda: ng.GPT(ng.GPTConfig(block_size=T, vocab_size=V, n_layer=L, n_head=H,
                                                            n_embd=C, dropout=0.0, bias=False))
    print(f"bench {size}: {L}L/{H}H/{C}, T={T}, vocab={V}, batch={B} on {device_name(ctx)}")
    for name, build in models.items():
        torch.manual_seed(0)
        model = build().to(ctx.device)
        opt, fast = make_optimizer(model, cfg, ctx), maybe_compile(model, cfg)
        x = torch.randint(0, V, (B, T + 1), device=ctx.device)

        def step():
            with ctx.autocast():
                out = fast(x[:, :-1])
                logits = out[0] if isinstance(out, tuple) else out  # nanoGPT returns (logits, loss)
                loss = F.cross_entropy(logits.float().view(-1, V), x[:, 1:].reshape(-1))
            loss.backward()
            opt.step(); opt.zero_grad(set_to_none=True)

        for _ in range(3):  # warm-up: compilation, allocator, caches
            step()
        if ctx.gpu:
            torch.cuda.synchronize()
        t0 = time.time()
        for _ in tqdm(range(cfg.max_steps), desc=name, leave=False):
            step()
        if ctx.gpu:
            torch.cuda.synchronize()
        tok_s = B * T * cfg.max_steps / (time.time() - t0)
        # FLOPs per token (PaLM appendix B, as nanoGPT): 6 per matmul weight + attention's 12*L*H*Q*T
        n = count_params(model) - V * C * (1 if name.startswith("nanoGPT") else 1)  # minus the embedding lookup
        flops = 6 * n + 12 * L * H * (C // H) * T
        line = f"{name:24s} {count_params(model) / 1e6:7.2f}M params  {tok_s:12,.0f} tokens/s"
        if ctx.gpu:
            gpu = torch.cuda.get_device_name(ctx.device)
            peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu), None)
            line += f"  {flops * tok_s / 1e12:7.1f} TFLOP/s" + (f"  MFU {flops * tok_s / peak:.1%}" if peak else "")
        print(line)


if __name__ == "__main__":
    bench_cfg = parse_config(BenchConfig, "train")
    if not bench_cfg.bench:
        die("train.py is the shared engine; as a script it only runs `--bench` (see --help)", 2)
    bench(bench_cfg)
