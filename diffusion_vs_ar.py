"""
diffusion_vs_ar.py: double descent as a lens on the sample efficiency of autoregressive (AR) vs
masked-diffusion (MDLM) language models.

Reproduces, at CPU scale, Fraij & Dauncey, "Double Descent as a Lens for Sample Efficiency in
Autoregressive vs. Discrete Diffusion Models" (arXiv 2509.24974, 2025). Claim: on a small data set,
masked diffusion needs more width and more epochs than AR to reach the interpolation threshold (the
point where the model memorises its training set), AR reaches a lower best test loss, and far past the
threshold the two look alike, with no pronounced second descent.

One trunk, two objectives. Both models are train.py's TransformerLM at the same width, depth and
vocabulary (V real tokens + 1 extra id that is BOS for AR and MASK for diffusion), so their parameter
counts are identical; the only architectural difference is the attention mask (causal vs full).
  AR    next-token cross-entropy; exact NLL -log p(x) = sum_l -log p(x_l | BOS, x_<l).
  MDLM  masked diffusion with the linear schedule alpha_t = 1 - t (Sahoo et al., arXiv 2406.07524):
        mask every token independently with probability t; SUBS parameterisation (never predict MASK,
        unmasked tokens are copied and cost nothing); continuous-time NELBO
            L(x) = E_t [ (1/t) sum_{masked l} -log p_theta(x_l | z_t) ] >= -log p_theta(x),
        t drawn antithetically (stratified over the batch) and clipped at eps. No time conditioning.
        Test metric: the same NELBO in its "k-form" (RADD, arXiv 2406.03736): integrating t out gives
            L(x) / L = E_{k ~ U{1..L}} E_{|S| = k} [ (1/k) sum_{l in S} -log p_theta(x_l | x without S) ],
        exact in expectation with bounded weights, so its Monte-Carlo standard error is small.
Both are reported in bits per token (per character with the default char-level tokenizer).

The experiment: a width sweep x epochs on N fixed, distinct, non-overlapping training sequences of
length L. An epoch is one pass over the N sequences for both models (the authors' diffusion "epoch"
was ~16 passes), same optimiser and constant LR for both, raw weights evaluated after every epoch of a
single run per width. Memorising N sequences gives a train floor of log2(N)/L bits/token for both
models; the interpolation threshold of a model is the smallest width whose train loss reaches the
floor (within --tol bits), and the epoch at which it gets there. Optional token noise (--noise)
replaces a fraction of the training tokens once, the classic way to sharpen double descent.

Defaults run offline in a few minutes on 2 CPU cores: a character-level slice of English prose
shipped with Python. `--data=tinyshakespeare --tokenizer=gpt2 --gpu` is the paper's setup (12 layers,
12 heads, seq 512, 50 epochs). No hand-written Triton: on CUDA all fusion comes from torch.compile.
"""
import math, time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from train import (TrainConfig, parse_config, setup, die, fill_auto, TransformerLM, count_params, train,
                   save_results, save_figure, embedded_text, download, maybe_compile, cli, DataError)


@dataclass
class Config(TrainConfig):
    data: str = "auto"  # auto (prose on CPU, tinyshakespeare with --gpu) | prose | code (text shipped with Python) | tinyshakespeare (downloaded) | path to a UTF-8 text file (first 90 percent train)
    tokenizer: str = "auto"  # auto (char on CPU, gpt2 with --gpu) | char | gpt2 (tiktoken's GPT-2 BPE; needs the network once)
    models: str = "ar,mdlm"  # which objectives to train: ar, mdlm or both
    widths: str = ""  # comma-separated model widths (empty = 16,32,64,128 on CPU; 96,192,384,768 with --gpu)
    n_layer: int = 0  # Transformer blocks (0 = 2 on CPU, 12 with --gpu)
    n_head: int = 0  # attention heads, fixed across widths (0 = 2 on CPU, 12 with --gpu)
    seq_len: int = 0  # tokens per sequence L (0 = 32 on CPU, 512 with --gpu)
    n_train: int = 0  # training sequences N (0 = 128 on CPU, all the training text gives with --gpu)
    n_test: int = 128  # test sequences, at most (0 = all the test text gives)
    epochs: int = 0  # passes over the training set (0 = 150 on CPU, 50 with --gpu)
    batch_size: int = 0  # sequences per optimizer step (0 = 32 on CPU, 12 with --gpu)
    lr: float = 0.0  # peak learning rate, constant after warm-up (0 = 1e-3 on CPU, 6e-4 with --gpu)
    warmup: int = 10  # linear warm-up steps
    min_lr_ratio: float = 1.0  # cosine end point as a fraction of lr (1 = constant LR, as in the design)
    weight_decay: float = 0.0  # AdamW weight decay (0: nothing should stop memorisation)
    noise: float = 0.0  # fraction of training tokens replaced once by uniform random tokens (label noise)
    tol: float = 0.1  # a model interpolates when train bits/token <= floor + tol
    eps: float = 1e-3  # MDLM: smallest masking time t (the 1/t weight diverges at 0)
    eval_repeats: int = 1  # MDLM k-form samples per sequence at every epoch's evaluation
    final_repeats: int = 16  # MDLM k-form samples per sequence at the last evaluation (smaller error bar)
    eval_batch: int = 0  # sequences per forward pass during evaluation (0 = 512 on CPU, 16 with --gpu: 50k-vocab logits are big)
    sample_steps: int = 0  # MDLM ancestral sampling steps (0 = seq_len)
    n_samples: int = 3  # samples printed per model at the end
    bench: bool = False  # only measure training throughput (tokens/s) of both objectives and exit

    unused = ("max_steps", "eval_every", "log_every")  # set per run: epochs x steps per epoch, one eval per epoch
    resume_free = TrainConfig.resume_free + ("models", "widths", "bench", "n_samples", "sample_steps")

    def __post_init__(self):
        super().__post_init__()
        fill_auto(self, data=("prose", "tinyshakespeare"), tokenizer=("char", "gpt2"),  # CPU toy | paper scale
                  widths=("16,32,64,128", "96,192,384,768"), n_layer=(2, 12), n_head=(2, 12), seq_len=(32, 512),
                  n_train=(128, 0), epochs=(150, 50), batch_size=(32, 12), lr=(1e-3, 6e-4), eval_batch=(512, 16))
        self.sample_steps = self.sample_steps or self.seq_len
        if self.tokenizer not in ("char", "gpt2"):
            raise ValueError(f"--tokenizer must be auto|char|gpt2, got {self.tokenizer!r}")
        if not self.model_list or set(self.model_list) - {"ar", "mdlm"}:
            raise ValueError(f"--models must be a comma list of ar,mdlm, got {self.models!r}")
        try:
            widths = self.width_list
        except ValueError:
            raise ValueError(f"--widths must be comma-separated integers, got {self.widths!r}") from None
        for d in widths:  # RoPE rotates pairs, so every head needs an even size
            if d <= 0 or d % self.n_head or (d // self.n_head) % 2:
                raise ValueError(f"width {d} must be a positive multiple of 2 x n_head = {2 * self.n_head}")
        if not 0 <= self.noise < 1 or not 0 < self.eps < 1:
            raise ValueError("--noise must be in [0, 1) and --eps in (0, 1)")
        if self.seq_len < 2 or self.eval_repeats < 1 or self.final_repeats < 1:
            raise ValueError("--seq_len must be >= 2 and --eval_repeats/--final_repeats >= 1")

    @property
    def model_list(self):
        return [m.strip() for m in self.models.split(",") if m.strip()]

    @property
    def width_list(self):
        return sorted({int(w) for w in self.widths.split(",") if w.strip()})

# ----------------------------------------------------------------------------------------------
# data: N distinct training sequences and a held-out test set, as (N, L) token tensors


def load_text(cfg):
    """(train_text, test_text) as str. Real data sets keep the paper's split: first 90% / last 10%."""
    if cfg.data in ("prose", "code"):
        return (embedded_text(cfg.data, "train").decode("utf-8", "replace"),
                embedded_text(cfg.data, "val").decode("utf-8", "replace"))
    path = download(cfg.data, cfg.data_dir) if cfg.data == "tinyshakespeare" else Path(cfg.data)
    if not path.is_file():
        raise FileNotFoundError(f"--data: no such file {cfg.data!r} (or use prose, code, tinyshakespeare)")
    text = path.read_text(encoding="utf-8", errors="replace")
    cut = int(0.9 * len(text))
    return text[:cut], text[cut:]


def tokenize(cfg, train_text, test_text):
    """Token id lists, the vocabulary size V (ids 0..V-1; id V is kept for BOS/MASK) and a decoder."""
    if cfg.tokenizer == "char":  # every character seen in either split, so no test char is unknown
        chars = sorted(set(train_text) | set(test_text))
        index = {c: i for i, c in enumerate(chars)}
        return ([index[c] for c in train_text], [index[c] for c in test_text], len(chars),
                lambda ids: "".join(chars[i] for i in ids))
    import tiktoken
    try:  # never a silent stand-in: a 512-token BPE is a different experiment from GPT-2's 50k vocabulary
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise DataError(f"--tokenizer=gpt2: tiktoken could not load GPT-2's BPE ({type(e).__name__}; it is "
                        "downloaded once, then cached): connect once, or use --tokenizer=char") from None
    return enc.encode_ordinary(train_text), enc.encode_ordinary(test_text), enc.n_vocab, enc.decode


def make_sequences(ids, n, L, what, distinct=False):
    """The first n non-overlapping windows of length L (n = 0: all of them). distinct: skip windows
    seen before (documentation text repeats lines), so the training set is N *distinct* sequences."""
    windows = torch.tensor(ids[: len(ids) // L * L], dtype=torch.long).view(-1, L)  # (all, L)
    if distinct and n:
        seen, keep = set(), []
        for i, w in enumerate(map(tuple, windows.tolist())):
            if w not in seen and len(keep) < n:
                seen.add(w)
                keep.append(i)
        windows = windows[keep]
    if n > len(windows):
        raise ValueError(f"the {what} text has only {len(windows)} sequences of length {L}, asked for {n}")
    return windows[: n or len(windows)]  # (n, L)


def add_token_noise(x, p, V, seed):
    """Label noise for LMs: each training token is replaced, once and for good, with probability p
    by a uniformly random token. The model must then memorise the noise to interpolate."""
    g = torch.Generator().manual_seed(seed + 12345)
    flip = torch.rand(x.shape, generator=g) < p
    return torch.where(flip, torch.randint(0, V, x.shape, generator=g), x)


def memorisation_floor(x):
    """Bits/token of a model that has memorised the training set exactly: the entropy of the
    empirical distribution over its sequences, divided by L. With N distinct sequences: log2(N)/L."""
    _, counts = torch.unique(x, dim=0, return_counts=True)
    p = counts.double() / counts.sum()
    return float(-(p * p.log2()).sum()) / x.shape[1]

# ----------------------------------------------------------------------------------------------
# the two objectives. `model` is any callable (B, L) ids -> (B, L, V+1) logits; column V (the
# BOS/MASK id) is sliced off, so neither model can ever put probability on it (SUBS for MDLM).


def ar_nll(model, x, V):
    """Exact per-token NLL (nats) and top-1 correctness of the AR model. x: (B, L)."""
    bos = torch.full_like(x[:, :1], V)
    logits = model(torch.cat([bos, x[:, :-1]], 1))[..., :V].float()  # (B, L, V): position l predicts x_l
    nll = F.cross_entropy(logits.transpose(1, 2), x, reduction="none")  # (B, L)
    return nll, logits.argmax(-1) == x


def masked_nll(model, x, masked, V):
    """-log p_theta(x_l | z) at masked positions, exactly 0 (no gradient) elsewhere: SUBS's carry-over
    of unmasked tokens. x, masked: (B, L). Returns (nll (B, L) nats, correct (B, L) bool)."""
    z = torch.where(masked, V, x)  # (B, L) the partially masked input
    logits = model(z)[..., :V].float()  # (B, L, V) never predicts MASK
    nll = F.cross_entropy(logits.transpose(1, 2), x, reduction="none")
    return torch.where(masked, nll, 0.0), masked & (logits.argmax(-1) == x)


def mdlm_nelbo_at(model, x, V, t, u=None):
    """One-sample continuous-time NELBO per sequence, in nats per token, at masking times t (B,):
    (1/t) * sum of masked-token NLLs / L. Its expectation over t ~ U(0, 1) is L(x) / L.
    u (B, L): the uniforms that decide the masks (drawn here unless given)."""
    u = torch.rand(x.shape, device=x.device) if u is None else u
    masked = u < t[:, None]  # (B, L) each token masked w.p. t
    nll, _ = masked_nll(model, x, masked, V)
    return nll.sum(1) / t / x.shape[1]  # (B,)


def antithetic_times(B, eps, device):
    """t_i = (u + i/B) mod 1 for one u: the batch covers [0, 1) evenly (lower variance than iid),
    then squashed into [eps, 1] because the 1/t weight blows up near 0."""
    t = (torch.rand(1, device=device) + torch.arange(B, device=device) / B) % 1
    return (1 - eps) * t + eps


def nelbo_kform(model, x, V, repeats, gen, batch=512):
    """k-form NELBO estimate (nats/token) with its Monte-Carlo standard error, plus the matching
    1/k-weighted top-1 error. Each of `repeats` copies of each sequence gets its own k, stratified
    over the copies (k spread evenly over 1..L), and a uniformly random subset of k masked positions.
    Randomness comes from `gen`, so evaluation never disturbs the training RNG."""
    n, L = x.shape
    rows = x.repeat(repeats, 1)  # (R*n, L) copy r of sequence j at row r*n + j
    u = torch.rand(1, generator=gen)
    k = ((u + torch.arange(len(rows)) / len(rows)) % 1 * L).long() + 1  # (R*n,) marginally U{1..L}
    order = torch.rand(rows.shape, generator=gen).argsort(1).argsort(1)  # a random rank per position
    masked = order < k[:, None]  # (R*n, L) exactly k masked positions, chosen uniformly
    est, err = [], []
    for i in range(0, len(rows), batch):
        sl = slice(i, i + batch)
        dev = next(iter(model.parameters())).device if isinstance(model, torch.nn.Module) else x.device
        nll, correct = masked_nll(model, rows[sl].to(dev), masked[sl].to(dev), V)
        kk = k[sl].to(dev)
        est.append((nll.sum(1) / kk).double().cpu())
        err.append(((masked[sl].to(dev).sum(1) - correct.sum(1)) / kk).double().cpu())
    est, err = torch.cat(est).view(repeats, n), torch.cat(err).view(repeats, n)
    # MC error of the mean: from the spread across a sequence's copies (the test set itself is fixed);
    # with one copy per sequence only the spread across sequences is left, which overstates it
    var = est.var(0).mean() if repeats > 1 else est.var()
    return dict(mean=float(est.mean()), se=float((var / est.numel()).sqrt()), err=float(err.mean()))

# ----------------------------------------------------------------------------------------------
# samplers, in float64: float32 Gumbel noise lowers the effective temperature (arXiv 2409.02908)


def gumbel_argmax(logp, gen):
    """One draw from Categorical(exp(logp)) per row by the Gumbel-max trick, all in float64."""
    u = torch.rand(logp.shape, dtype=torch.float64, generator=gen).clamp_min(1e-300).to(logp.device)
    return (logp.double() - (-u.log()).log()).argmax(-1)


@torch.no_grad()
def sample_ar(model, V, n, L, gen):
    """Left-to-right ancestral sampling from BOS with the KV cache of train.py's TransformerLM."""
    device = next(model.parameters()).device
    caches, tok, out = model.new_caches(), torch.full((n, 1), V, device=device), []
    for _ in range(L):
        logp = model(tok, caches=caches)[:, -1, :V].double().log_softmax(-1)  # (n, V)
        tok = gumbel_argmax(logp, gen)[:, None]
        out.append(tok)
    return torch.cat(out, 1)  # (n, L)


@torch.no_grad()
def sample_mdlm(model, V, n, L, steps, gen, device="cpu"):
    """MDLM ancestral sampler: start all-MASK at t = 1 and walk t -> s on a uniform grid. A masked
    token becomes x_l ~ p_theta(. | z_t) with probability (t - s)/t and stays masked with s/t (the
    exact reverse posterior); unmasked tokens never change. At s = 0 everything is unmasked."""
    z = torch.full((n, L), V, dtype=torch.long, device=device)
    times = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    for t, s in zip(times[:-1].tolist(), times[1:].tolist()):
        masked = z == V
        if not masked.any():
            break
        logp = model(z)[..., :V].double().log_softmax(-1)  # (n, L, V)
        stay = torch.full_like(logp[..., :1], math.log(s / t) if s > 0 else -math.inf)
        logq = torch.cat([logp + math.log((t - s) / t), stay], -1)  # (n, L, V+1) over tokens and MASK
        z = torch.where(masked, gumbel_argmax(logq, gen), z)
    return z

# ----------------------------------------------------------------------------------------------
# one training run per (model, width), evaluated after every epoch


def bits(nats):  # everything is computed in nats and reported in bits
    return nats / math.log(2)


def build(kind, cfg, V, d):
    torch.manual_seed(cfg.seed)  # same init for AR and MDLM at each width: only the mask differs
    return TransformerLM(V + 1, cfg.n_layer, cfg.n_head, d, causal=(kind == "ar"))


def epoch_batches(cfg, N):
    """get_batch(i) for epochs: each epoch is a fresh permutation of the N sequences, cut into
    floor(N / B) full batches (train.py needs every batch whole; when B does not divide N, the
    N mod B sequences left over differ from epoch to epoch). Deterministic in i."""
    per_epoch = N // cfg.batch_size
    if per_epoch == 0:
        raise ValueError(f"--batch_size={cfg.batch_size} is larger than the {N} training sequences")

    def rows(i):
        epoch, j = divmod(i, per_epoch)
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
        return perm[j * cfg.batch_size:(j + 1) * cfg.batch_size]
    return per_epoch, rows


def loss_fn_for(kind, V, eps):
    # "items" lets train.py report tokens/s; both losses are per-token means over the whole batch
    def ar_loss(model, x):
        nll, _ = ar_nll(model, x, V)
        return nll.mean(), dict(items=x.numel())

    def mdlm_loss(model, x):  # x: (B, L) tokens, or dict(x, t, u) with the noise given
        if isinstance(x, dict):
            return mdlm_nelbo_at(model, x["x"], V, x["t"], x["u"]).mean(), dict(items=x["x"].numel())
        return mdlm_nelbo_at(model, x, V, antithetic_times(len(x), eps, x.device)).mean(), dict(items=x.numel())
    return ar_loss if kind == "ar" else mdlm_loss


def evaluate(kind, model, x, V, repeats, gen, batch):
    """(bits/token, MC standard error, top-1 error) of one data set: exact NLL for AR, k-form for MDLM."""
    if kind == "ar":
        dev = next(model.parameters()).device
        nll, correct = zip(*(ar_nll(model, x[i:i + batch].to(dev), V) for i in range(0, len(x), batch)))
        return bits(float(torch.cat(nll).mean())), 0.0, 1 - float(torch.cat(correct).float().mean())
    r = nelbo_kform(model, x, V, repeats, gen, batch)
    return bits(r["mean"]), bits(r["se"]), r["err"]


def run_one(kind, d, cfg, ctx, train_x, test_x, V):
    """Train one model for cfg.epochs true epochs; returns its per-epoch records and throughput."""
    model = build(kind, cfg, V, d)
    per_epoch, rows = epoch_batches(cfg, len(train_x))
    # train.py counts optimizer steps: the run length and the evaluation cadence are set in steps so
    # that an evaluation lands exactly on every epoch boundary (one run per width, no retraining)
    run_cfg = Config(**{**cfg.__dict__, "max_steps": per_epoch * cfg.epochs, "eval_every": per_epoch,
                        "log_every": per_epoch})
    eval_time, best = [0.0], {}

    def eval_fn(m, step):
        t0, epoch, last = time.time(), step // per_epoch, step >= run_cfg.max_steps
        # The same masks every epoch (common random numbers): epoch-to-epoch differences then reflect
        # the weights, not the MC draw, so the curves are smooth and the best epoch is picked fairly.
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + (1 if last else 0))
        reps = cfg.final_repeats if last else cfg.eval_repeats
        tr, _, tr_err = evaluate(kind, m, train_x, V, reps, gen, cfg.eval_batch)
        te, te_se, te_err = evaluate(kind, m, test_x, V, reps, gen, cfg.eval_batch)
        if te < best.get("bpt", math.inf):  # keep the best-so-far weights to re-score them at the end
            best.update(bpt=te, epoch=epoch, state={k: v.detach().clone() for k, v in m.state_dict().items()})
        eval_time[0] += time.time() - t0
        return dict(epoch=epoch, train_bpt=tr, train_err=tr_err, test_bpt=te, test_se=te_se, test_err=te_err)

    # one checkpoint per (model, width): --resume skips finished runs and continues a cut-off one
    summary = train(model, lambda i: train_x[rows(i)], loss_fn_for(kind, V, cfg.eps), run_cfg, ctx,
                    eval_fn=eval_fn, ckpt_path=Path(cfg.out) / f"ckpt_{kind}_d{d}.pt", desc=f"{kind} d={d}")
    by_epoch = {e["epoch"]: e for e in summary["evals"]}  # a resumed run re-evaluates its last epoch
    params = count_params(model)
    records = [dict(model=kind, width=d, params=params, **{k: v for k, v in e.items() if k != "step"})
               for _, e in sorted(by_epoch.items())]
    train_s = max(summary["seconds"] - eval_time[0], 1e-9)
    tok_s = summary["steps"] * cfg.batch_size * cfg.seq_len / train_s if eval_time[0] else summary["items_per_s"]
    # The minimum over epochs of noisy MDLM estimates is biased low (winner's curse), so the best
    # epoch's weights are scored again with fresh masks and --final_repeats samples per sequence.
    rescored = None
    if "state" in best:
        final = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(best["state"])
        model.eval()
        with torch.no_grad(), ctx.autocast():
            gen = torch.Generator().manual_seed(cfg.seed * 7919 + 10**6)
            bpt, se, err = evaluate(kind, model, test_x, V, cfg.final_repeats, gen, cfg.eval_batch)
        model.load_state_dict(final)
        rescored = dict(model=kind, width=d, params=params, epoch=best["epoch"], test_bpt=bpt, test_se=se, test_err=err)
    return model, records, tok_s, rescored

# ----------------------------------------------------------------------------------------------
# reading the sweep: thresholds, best test loss, second descent


def interpolation(records, floor, tol):
    """Per width, the first epoch with train bits/token <= floor + tol; the threshold is the smallest
    width that gets there (ties: the earlier epoch)."""
    first = {}
    for r in records:
        if r["train_bpt"] <= floor + tol and r["width"] not in first:
            first[r["width"]] = r
    if not first:
        return None, first
    d = min(first)
    return dict(width=d, params=first[d]["params"], epoch=first[d]["epoch"]), first


def frontier(records, floor, tol, budgets):
    """For each epoch budget: the smallest width that has interpolated by then (None: none has)."""
    reached = {}
    for r in records:
        if r["train_bpt"] <= floor + tol:
            reached[r["width"]] = min(reached.get(r["width"], 1e9), r["epoch"])
    return {e: min((d for d, e0 in reached.items() if e0 <= e), default=None) for e in budgets}


def second_descent(curve, margin, smooth=1):
    """The largest (rise, fall) in bits of a curve (test bits in order of width or epoch) that first
    rises by > margin above its running minimum and then falls by > margin from that peak; None if
    nothing does. smooth > 1 first averages over that many neighbours (epoch curves wiggle)."""
    if smooth > 1:
        h = smooth // 2
        curve = [sum(curve[max(0, i - h):i + h + 1]) / len(curve[max(0, i - h):i + h + 1]) for i in range(len(curve))]
    best = None
    for p in range(1, len(curve) - 1):
        rise, fall = curve[p] - min(curve[:p + 1]), curve[p] - min(curve[p:])
        if rise > margin and fall > margin and (best is None or fall > best[1]):
            best = (rise, fall)
    return best


def pronounced(descent):
    """A second descent counts as pronounced when it gives back at least a quarter of its rise."""
    return bool(descent) and descent[1] >= 0.25 * descent[0]


def log_spaced(epochs, n):
    """About n roughly log-spaced entries of a sorted list, always including the first and last."""
    idx = {round((len(epochs) - 1) * (i / (n - 1)) ** 2) for i in range(n)} if len(epochs) > 1 else {0}
    return [epochs[i] for i in sorted(idx)]

# ----------------------------------------------------------------------------------------------
# figures (matplotlib optional)


def plot(cfg, records, floor, kinds, widths):
    shown = log_spaced(sorted({r["epoch"] for r in records}), 7)

    def fig1(plt):  # the paper's Figure 1: test (top) and train (bottom) bits vs parameters, one curve per epoch
        fig, axes = plt.subplots(2, len(kinds), figsize=(5.5 * len(kinds), 8), squeeze=False, sharey="row")
        cmap = plt.get_cmap("viridis")
        for c, kind in enumerate(kinds):
            for row, key in enumerate(("test_bpt", "train_bpt")):
                ax = axes[row][c]
                for j, e in enumerate(shown):
                    pts = sorted((r["params"], r[key]) for r in records if r["model"] == kind and r["epoch"] == e)
                    ax.plot(*zip(*pts), "o-", color=cmap(j / max(1, len(shown) - 1)), label=f"epoch {e}", ms=3)
                if key == "train_bpt":
                    ax.axhline(floor, color="k", ls="--", lw=1, label="memorisation floor")
                ax.set_xscale("log")
                ax.set_title(f"{kind.upper()} {key.split('_')[0]}")
                ax.set_xlabel("parameters")
                ax.set_ylabel("bits/token")
            axes[0][c].legend(fontsize=7)
        fig.suptitle(f"{cfg.data}: N={cfg.n_train or 'all'} x L={cfg.seq_len}, noise={cfg.noise}")
        fig.tight_layout()
        return fig

    def by_epoch(plt):  # test (solid) and train (dashed) bits vs epoch, one colour per width
        fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False, sharey=True)
        for c, kind in enumerate(kinds):
            ax = axes[0][c]
            for d in widths:
                rs = [r for r in records if r["model"] == kind and r["width"] == d]
                line, = ax.plot([r["epoch"] for r in rs], [r["test_bpt"] for r in rs], label=f"d={d}")
                ax.plot([r["epoch"] for r in rs], [r["train_bpt"] for r in rs], "--", color=line.get_color(), lw=1)
            ax.axhline(floor, color="k", ls=":", lw=1)
            ax.set_title(f"{kind.upper()}: test (solid), train (dashed)")
            ax.set_xlabel("epoch")
            ax.set_ylabel("bits/token")
            ax.legend(fontsize=7)
        fig.tight_layout()
        return fig

    return [save_figure(Path(cfg.out) / "fig1_test_vs_params.png", fig1),
            save_figure(Path(cfg.out) / "loss_vs_epoch.png", by_epoch)]

# ----------------------------------------------------------------------------------------------
# throughput benchmark: training tokens/s of both objectives, same model, same batch


def bench(cfg, ctx, V):
    """Time fwd + bwd + AdamW of each objective on the widest model, after 3 untimed warm-up steps.
    The two objectives cost almost the same: one forward over L tokens each; MDLM only adds the mask
    draw, and its loss averages over the ~half of the positions that are masked."""
    d = cfg.width_list[-1]
    for kind in cfg.model_list:
        model = build(kind, cfg, V, d).to(ctx.device)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, cfg.beta2), fused=ctx.gpu)
        fast = maybe_compile(model, cfg)  # train.py's choice: inductor, or cudagraphs without Triton
        loss_fn = loss_fn_for(kind, V, cfg.eps)
        x = torch.randint(0, V, (cfg.batch_size, cfg.seq_len), device=ctx.device)  # (B, L) random tokens

        def step():
            with ctx.autocast():
                loss, _ = loss_fn(fast, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        for _ in range(3):  # warm-up: allocator, compile
            step()
        n, t0 = 30, time.time()
        for _ in range(n):
            step()
        if ctx.gpu:
            torch.cuda.synchronize()
        tok_s = n * x.numel() / (time.time() - t0)
        print(f"{kind:5s} d={d} {count_params(model):,} params, B={cfg.batch_size} x L={cfg.seq_len}: {tok_s:,.0f} tokens/s")

# ----------------------------------------------------------------------------------------------
# main


def main(argv=None):
    cfg = parse_config(Config, "diffusion_vs_ar", argv)
    ctx = setup(cfg)
    try:
        train_text, test_text = load_text(cfg)
        train_ids, test_ids, V, decode = tokenize(cfg, train_text, test_text)
        train_x = make_sequences(train_ids, cfg.n_train, cfg.seq_len, "training", distinct=True)
        test_x = make_sequences(test_ids, min(cfg.n_test, len(test_ids) // cfg.seq_len), cfg.seq_len, "test")
        epoch_batches(cfg, len(train_x))  # refuses a batch larger than the training set, before any work
    except (OSError, ValueError, RuntimeError) as e:  # missing file, failed download (DataError), too little text
        die(str(e))
    if cfg.bench:
        return bench(cfg, ctx, V)
    if cfg.noise:  # noise is drawn once, before training: both models see the same corrupted set
        train_x = add_token_noise(train_x, cfg.noise, V, cfg.seed)
    floor = memorisation_floor(train_x)  # what a perfect memoriser scores on train, for both models
    kinds, widths = cfg.model_list, cfg.width_list
    print(f"data {cfg.data} ({cfg.tokenizer}, V={V}): {len(train_x)} train x {cfg.seq_len} tokens, "
          f"{len(test_x)} test; floor log2(N)/L = {floor:.4f} bits/token; {cfg.epochs} epochs of "
          f"{len(train_x) // cfg.batch_size} steps; widths {widths}; {cfg.n_layer} layers, {cfg.n_head} heads")

    records, throughput, models, rescored, t_start = [], {}, {}, {}, time.time()
    for kind in kinds:
        for d in widths:
            models[kind, d], recs, throughput[f"{kind}_d{d}"], rescored[kind, d] = run_one(
                kind, d, cfg, ctx, train_x, test_x, V)
            records += recs

    # --- tables: test and train bits/token on a log-spaced set of epochs, widths as columns
    epochs = sorted({r["epoch"] for r in records})
    shown = log_spaced(epochs, 7)
    look = {(r["model"], r["width"], r["epoch"]): r for r in records}
    params = {d: next(r["params"] for r in records if r["width"] == d) for d in widths}
    print(f"\nbits/token (MDLM: k-form NELBO upper bound; AR: exact NLL). floor = {floor:.3f}")
    print("params: " + ", ".join(f"d={d}: {params[d]:,}" for d in widths) + " (identical for AR and MDLM)")
    head = "/".join(str(d) for d in widths)
    for key in ("test_bpt", "train_bpt"):
        print(f"\n{key.split('_')[0]:5s} | " + " | ".join(f"{k.upper():4s} d = {head}" for k in kinds))
        for e in shown:
            cells = ["/".join(f"{look[k, d, e][key]:.2f}" for d in widths) for k in kinds]
            print(f"{e:5d} | " + " | ".join(f"{c:>{8 + len(head)}s}" for c in cells))

    # --- the paper's claims, read off the numbers
    summary = {}
    budgets = [e for e in shown]
    for k in kinds:
        rs = [r for r in records if r["model"] == k]
        thr, first = interpolation(rs, floor, cfg.tol)
        # best test loss: the best epoch of each width, re-scored (a resumed run falls back to its log)
        best = min((rescored[k, d] or min((r for r in rs if r["width"] == d), key=lambda r: r["test_bpt"])
                    for d in widths), key=lambda r: r["test_bpt"])
        last = [look[k, d, epochs[-1]]["test_bpt"] for d in widths]
        # dips of a few hundredths of a bit are within run-to-run noise (and the paper's inset effects
        # are that size), so a rise or fall must exceed 0.1 bits plus twice the MC error to count
        margin = 0.1 + 2 * max(r["test_se"] for r in rs)
        summary[k] = dict(threshold=thr, first_interpolating_epoch={d: r["epoch"] for d, r in first.items()},
                          frontier=frontier(rs, floor, cfg.tol, budgets),
                          best_test=dict(bpt=best["test_bpt"], se=best["test_se"], width=best["width"],
                                         params=best["params"], epoch=best["epoch"]),
                          modelwise_second_descent_last_epoch=second_descent(last, margin),
                          epochwise_second_descent={d: second_descent([look[k, d, e]["test_bpt"] for e in epochs],
                                                                      margin, smooth=5) for d in widths},
                          best_test_per_width={d: rescored[k, d] for d in widths},
                          train_tokens_per_s={d: throughput[f"{k}_d{d}"] for d in widths})
    print(f"\ninterpolation (train <= floor + {cfg.tol}):")
    for k in kinds:
        s = summary[k]
        thr = s["threshold"]
        where = (f"threshold d={thr['width']} ({thr['params']:,} params) at epoch {thr['epoch']}" if thr
                 else f"not reached by any width within {cfg.epochs} epochs")
        print(f"  {k.upper():4s} {where}; first epoch per width: {s['first_interpolating_epoch'] or '-'}")
        print("       smallest interpolating width by epoch budget: " +
              ", ".join(f"{e}: {d or '-'}" for e, d in s["frontier"].items()))
        b = s["best_test"]
        print(f"       best test {b['bpt']:.3f}" + (f" +- {b['se']:.3f}" if b["se"] else "") +
              f" bits/token at d={b['width']}, epoch {b['epoch']} (best epoch per width, re-scored); per width: "
              + ", ".join(f"{r['test_bpt']:.2f}@{r['epoch']}" for r in s["best_test_per_width"].values() if r))
        fmt = lambda v: (f"{'PRONOUNCED' if pronounced(v) else 'weak'} (rise {v[0]:.2f}, fall {v[1]:.2f})"
                         if v else "no")
        print(f"       second descent (rise, then fall, each > 0.1 bits + 2 SE; pronounced if the fall is"
              f" >= 1/4 of the rise):\n         vs width at the last epoch: "
              f"{fmt(s['modelwise_second_descent_last_epoch'])}; vs epoch: "
              + "; ".join(f"d={d}: {fmt(v)}" for d, v in s["epochwise_second_descent"].items()) + " (5-epoch average)")
    verdicts = {}
    if {"ar", "mdlm"} <= set(kinds):
        a, m = summary["ar"], summary["mdlm"]
        key = lambda thr: (thr["width"], thr["epoch"]) if thr else (math.inf, math.inf)
        verdicts["ar_threshold_smaller_or_earlier"] = (key(a["threshold"]) < key(m["threshold"])
                                                       if a["threshold"] or m["threshold"] else None)
        # AR's NLL is exact; the MDLM number is an upper bound with MC error, hence the 2 SE margin
        verdicts["ar_best_test_lower"] = a["best_test"]["bpt"] + 2 * m["best_test"]["se"] < m["best_test"]["bpt"]
        verdicts["ar_frontier_never_larger"] = all(
            (a["frontier"][e] or math.inf) <= (m["frontier"][e] or math.inf) for e in budgets
        ) if a["threshold"] or m["threshold"] else None
        print("\nverdict (paper: AR interpolates at smaller width / fewer epochs and has lower best test loss):")
        yes_no = {True: "YES", False: "NO", None: "UNDETERMINED (neither model interpolated; train longer or wider)"}
        print(f"  AR reaches the interpolation threshold smaller or earlier than MDLM: "
              f"{yes_no[verdicts['ar_threshold_smaller_or_earlier']]}")
        print(f"  AR's smallest interpolating width <= MDLM's at every epoch budget: "
              f"{yes_no[verdicts['ar_frontier_never_larger']]}")
        print(f"  AR's best test loss is lower (by more than 2 SE): {'YES' if verdicts['ar_best_test_lower'] else 'NO'}"
              f" ({a['best_test']['bpt']:.3f} vs {m['best_test']['bpt']:.3f})")
        curves = [s[key] for s in (a, m) for key in ("modelwise_second_descent_last_epoch",)] + [
            v for s in (a, m) for v in s["epochwise_second_descent"].values()]
        verdicts["no_pronounced_second_descent"] = not any(pronounced(v) for v in curves)
        print(f"  No pronounced second descent in either model (paper: none): "
              f"{'YES' if verdicts['no_pronounced_second_descent'] else 'NO'}")
    print("\ntraining throughput, tokens/s (evaluation time excluded): " + "; ".join(
        f"{k.upper()} " + "/".join(f"{summary[k]['train_tokens_per_s'][d]:,.0f}" for d in widths) for k in kinds)
        + f" for d = {head}")

    # --- samples from the widest models (an AR model past interpolation mostly replays training text)
    gen, d = torch.Generator().manual_seed(cfg.seed), widths[-1]
    samples = {}
    for k in kinds:
        m = models[k, d].eval()
        out = (sample_ar(m, V, cfg.n_samples, cfg.seq_len, gen) if k == "ar" else
               sample_mdlm(m, V, cfg.n_samples, cfg.seq_len, cfg.sample_steps, gen, ctx.device))
        samples[k] = [decode(s.tolist()) for s in out.cpu()]
        print(f"\nsamples, {k.upper()} d={d}:")
        for s in samples[k]:
            print("  " + repr(s))

    path = save_results(cfg, ctx, dict(vocab=V, n_train=len(train_x), n_test=len(test_x), floor_bpt=floor,
                                       records=records, summary=summary, verdicts=verdicts, samples=samples,
                                       seconds=time.time() - t_start))
    figs = plot(cfg, records, floor, kinds, widths) if ctx.master else []
    print(f"\nwrote {path}" + "".join(f", {f}" for f in figs if f) + f" in {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    cli(main)
