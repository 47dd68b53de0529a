"""
diffusion_vs_ar.py: double descent as a lens on the sample efficiency of autoregressive (AR) vs
masked-diffusion (MDLM) language models.

Reproduces, at CPU scale, Fraij & Dauncey, "Double Descent as a Lens for Sample Efficiency in
Autoregressive vs. Discrete Diffusion Models" (arXiv 2509.24974, 2025). Claim: on a small data set,
masked diffusion needs more width and more epochs than AR to reach the interpolation threshold (the
point where the model memorises its training set), AR reaches a lower best test loss, and far past
the threshold the two look alike, with no pronounced second descent.

One trunk, two objectives. Both models are train.py's TransformerLM at the same width, depth and
vocabulary (V real tokens + 1 extra id that is BOS for AR and MASK for diffusion), so their
parameter counts are identical; the only architectural difference is the attention mask.
  AR    next-token cross-entropy; exact NLL -log p(x) = sum_l -log p(x_l | BOS, x_<l).
  MDLM  masked diffusion with the linear schedule alpha_t = 1 - t (Sahoo et al., arXiv 2406.07524):
        mask every token independently with probability t; SUBS parameterisation (never predict
        MASK, unmasked tokens are copied and cost nothing); continuous-time NELBO
            L(x) = E_t [ (1/t) sum_{masked l} -log p_theta(x_l | z_t) ] >= -log p_theta(x),
        t drawn antithetically (stratified over the batch) and clipped at eps. No time conditioning.
        Evaluation: the same NELBO in its "k-form" (RADD, arXiv 2406.03736): integrating t out gives
            L(x) / L = E_{k ~ U{1..L}} E_{|S| = k} [ (1/k) sum_{l in S} -log p(x_l | x without S) ],
        exact in expectation with bounded weights. It equals the expected NLL of the model read as
        an any-order AR model over a uniformly random order, so an importance-weighted average over
        K orders gives a tighter upper bound on -log p_theta(x) (computed at the selected epoch).
AR's number is an exact NLL, MDLM's an upper bound: a gap in AR's favour may partly be bound slack.
Both are reported in bits per token (per character with the default char-level tokenizer).

The experiment: a width sweep x epochs on N fixed, distinct, non-overlapping training sequences of
length L, repeated over --seeds. An epoch is one pass over the N sequences for both models, same
optimiser and constant LR for both, raw weights evaluated every --eval_epochs epochs. The best epoch
of each (model, width) is picked on a validation split and its test loss reported. Memorising N
sequences gives a train floor of log2(N)/L bits/token for both models; a model interpolates when its
train loss is <= floor + --tol, and its interpolation threshold is the smallest width of the sweep
that interpolates within the budget (located when a smaller width of the sweep does not).

Defaults run offline in about five minutes on 2 CPU cores: a character-level slice of English
prose shipped with Python. `--gpu` is the paper's setup (Tiny Shakespeare, GPT-2 BPE, 12 layers,
12 heads, seq 512, 50 epochs). No hand-written Triton: on CUDA all fusion comes from torch.compile.
"""
import dataclasses, math, time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from train import (TrainConfig, parse_config, setup, die, fill_auto, TransformerLM, count_params,
                   train, save_results, save_figure, embedded_text, download, maybe_compile, cli,
                   DataError, atomic_save, load_saved, mean_interval, to_host)


@dataclass
class Config(TrainConfig):
    data: str = "auto"  # prose | tinyshakespeare | a text file (auto: prose, --gpu tinyshakespeare)
    tokenizer: str = "auto"  # char | gpt2 (tiktoken's BPE) (auto: char; --gpu: gpt2)
    models: str = "ar,mdlm"  # which objectives to train: ar, mdlm or both
    widths: str = ""  # comma-separated model widths (empty: 2,4,16,64; --gpu: 96,192,384,768)
    n_layer: int = 0  # Transformer blocks (0: 2; --gpu: 12)
    n_head: int = 0  # attention heads, the same at every width (0: 1; --gpu: 12)
    seq_len: int = 0  # tokens per sequence L (0: 8; --gpu: 512)
    n_train: int = 0  # training sequences N (0: 16; --gpu: all the training text gives)
    n_val: int = 0  # validation sequences, to pick the best epoch (0: 128; --gpu: half held-out)
    n_test: int = 0  # test sequences, after the validation ones (0: 128; --gpu: the other half)
    epochs: int = 0  # passes over the training set (0: 4000; --gpu: 50)
    eval_epochs: int = 0  # epochs between evaluations (0: 50; --gpu: 1)
    seeds: int = 1  # independent runs of the whole sweep, seeds --seed .. --seed + seeds - 1
    batch_size: int = 0  # sequences per optimizer step (0: 16, the whole training set; --gpu: 12)
    lr: float = 0.0  # peak learning rate, constant after warm-up (0: 2e-3; --gpu: 6e-4)
    warmup: int = 10  # linear warm-up steps
    min_lr_ratio: float = 1.0  # cosine end point as a fraction of lr (1: constant, as designed)
    weight_decay: float = 0.0  # AdamW weight decay (0: nothing should stop memorisation)
    noise: float = 0.0  # fraction of training tokens replaced once by random ones (label noise)
    tol: float = 1.0  # a model interpolates at train bits/token <= floor + tol (also tol/2, 2 tol)
    eps: float = 1e-3  # MDLM: smallest masking time t (the 1/t weight diverges at 0)
    eval_repeats: int = 2  # MDLM k-form samples per sequence at every evaluation (same masks)
    final_repeats: int = 16  # MDLM k-form samples per test sequence at the selected epoch
    iw_orders: int = 0  # MDLM: orders of the importance-weighted bound (0: 16; --gpu: 4)
    eval_batch: int = 0  # sequences per forward pass in evaluation (0: 512; --gpu: 16)
    sample_steps: int = 0  # MDLM ancestral sampling steps (0 = seq_len)
    n_samples: int = 3  # samples printed per model at the end
    bench: bool = False  # only measure training throughput (tokens/s) of both objectives and exit

    unused = ("max_steps", "eval_every", "log_every")  # set per run from --epochs and --eval_epochs

    def __post_init__(self):
        super().__post_init__()
        fill_auto(self, data=("prose", "tinyshakespeare"), tokenizer=("char", "gpt2"),
                  widths=("2,4,16,64", "96,192,384,768"), n_layer=(2, 12), n_head=(1, 12),
                  seq_len=(8, 512), n_train=(16, 0), n_val=(128, 0), n_test=(128, 0),
                  epochs=(4000, 50), eval_epochs=(50, 1), iw_orders=(16, 4), batch_size=(16, 12),
                  lr=(2e-3, 6e-4), eval_batch=(512, 16))
        self.sample_steps = self.sample_steps or self.seq_len
        if self.tokenizer not in ("char", "gpt2"):
            raise ValueError(f"--tokenizer must be auto|char|gpt2, got {self.tokenizer!r}")
        if not self.model_list or set(self.model_list) - {"ar", "mdlm"}:
            raise ValueError(f"--models must be a comma list of ar,mdlm, got {self.models!r}")
        try:
            widths = self.width_list
        except ValueError:
            raise ValueError(f"--widths must be comma-separated integers: {self.widths}") from None
        for width in widths:  # RoPE rotates pairs, so every head needs an even size
            if width <= 0 or width % self.n_head or (width // self.n_head) % 2:
                raise ValueError(f"width {width} must be a positive multiple of 2 x n_head = "
                                 f"{2 * self.n_head}")
        if not 0 <= self.noise < 1 or not 0 < self.eps < 1 or self.tol <= 0:
            raise ValueError("--noise must be in [0, 1), --eps in (0, 1) and --tol > 0")
        if self.seq_len < 2 or min(self.eval_repeats, self.final_repeats, self.seeds) < 1:
            raise ValueError("--seq_len must be >= 2, --eval_repeats/--final_repeats/--seeds >= 1")

    @property
    def model_list(self):
        return [m.strip() for m in self.models.split(",") if m.strip()]

    @property
    def width_list(self):
        return sorted({int(w) for w in self.widths.split(",") if w.strip()})

# ----------------------------------------------------------------------------------------------
# data: N distinct training sequences, held-out validation and test sets, as (n, L) token tensors


def load_text(cfg):
    """(train_text, held_out_text). Real data sets keep the paper's split: first 90% / last 10%."""
    if cfg.data == "prose":
        return embedded_text("train").decode("utf-8"), embedded_text("val").decode("utf-8")
    path = download(cfg.data, cfg.data_dir) if cfg.data == "tinyshakespeare" else Path(cfg.data)
    if not path.is_file():
        raise ValueError(f"--data: no such file {cfg.data!r} (or use prose, tinyshakespeare)")
    raw = path.read_bytes()
    # a binary file would otherwise train on U+FFFD replacement characters without a word
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--data={cfg.data} is not UTF-8 text (byte {e.start}); give a text "
                         "file") from None
    if "\x00" in text:
        raise ValueError(f"--data={cfg.data} contains NUL bytes: a binary file, not text")
    cut = int(0.9 * len(text))
    return text[:cut], text[cut:]


def tokenize(cfg, train_text, test_text):
    """Token id lists, the vocabulary size V (ids 0..V-1; id V is BOS/MASK) and a decoder."""
    if cfg.tokenizer == "char":  # every character of either split, so no test char is unknown
        chars = sorted(set(train_text) | set(test_text))
        index = {c: i for i, c in enumerate(chars)}
        return ([index[c] for c in train_text], [index[c] for c in test_text], len(chars),
                lambda ids: "".join(chars[i] for i in ids))
    import tiktoken
    try:  # never a silent stand-in: a small BPE is another experiment than GPT-2's 50k vocabulary
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise DataError(f"--tokenizer=gpt2: tiktoken could not load GPT-2's BPE "
                        f"({type(e).__name__}; it is downloaded once, then cached): connect once, "
                        "or use --tokenizer=char") from None
    return enc.encode_ordinary(train_text), enc.encode_ordinary(test_text), enc.n_vocab, enc.decode


def make_sequences(ids, n, L, what, distinct=False):
    """The first n non-overlapping windows of length L (n = 0: all of them). distinct: skip windows
    seen before (documentation repeats lines), so the training set is N *distinct* sequences."""
    windows = torch.tensor(ids[: len(ids) // L * L], dtype=torch.long).view(-1, L)  # (all, L)
    if distinct and n:
        seen, keep = set(), []
        for i, w in enumerate(map(tuple, windows.tolist())):
            if w not in seen and len(keep) < n:
                seen.add(w)
                keep.append(i)
        windows = windows[keep]
    if n > len(windows):
        raise ValueError(f"the {what} text has only {len(windows)} sequences of length {L}, "
                         f"asked for {n}")
    return windows[: n or len(windows)]  # (n, L)


def add_token_noise(x, p, V, seed):
    """Label noise for LMs: each training token is replaced, once and for good, with probability p
    by a uniformly random token. The model must then memorise the noise to interpolate."""
    g = torch.Generator().manual_seed(seed + 12345)
    flip = torch.rand(x.shape, generator=g) < p
    return torch.where(flip, torch.randint(0, V, x.shape, generator=g), x)


def memorisation_floor(x):
    """Bits/token of a model that has memorised the training set exactly: the entropy of the
    empirical distribution over its sequences, divided by L; with N distinct ones log2(N)/L."""
    _, counts = torch.unique(x, dim=0, return_counts=True)
    p = counts.double() / counts.sum()
    return float(-(p * p.log2()).sum()) / x.shape[1]


def make_data(cfg):
    """dict(train, val, test) of (n, L) tensors, V and a decoder. Validation and test are
    consecutive windows of the held-out text (validation first): selection never sees a test one.
    The training set and its noise are the same for every seed: seeds vary init, order and masks."""
    train_text, held_text = load_text(cfg)
    train_ids, held_ids, V, decode = tokenize(cfg, train_text, held_text)
    train_x = make_sequences(train_ids, cfg.n_train, cfg.seq_len, "training", distinct=True)
    held = make_sequences(held_ids, 0, cfg.seq_len, "held-out")
    n_val, n_test = cfg.n_val or len(held) // 2, cfg.n_test or len(held) // 2
    if n_val + n_test > len(held) or min(n_val, n_test) < 1:
        raise ValueError(f"the held-out text has {len(held)} sequences of length {cfg.seq_len}; "
                         f"--n_val={n_val} + --n_test={n_test} do not fit")
    if cfg.noise:  # drawn once, before training: both models see the same corrupted set
        train_x = add_token_noise(train_x, cfg.noise, V, cfg.seed)
    return dict(train=train_x, val=held[:n_val], test=held[n_val:n_val + n_test]), V, decode

# ----------------------------------------------------------------------------------------------
# the two objectives. `model` is any callable (B, L) ids -> (B, L, rows) logits with rows > V; the
# columns from V on (BOS/MASK and any padding) are sliced off, so neither model can ever put
# probability on them (SUBS for MDLM). Evaluation stays on the model's device: results come back
# as device tensors, and the caller brings them to the host in one sync per evaluation.


def ar_nll(model, x, V):
    """Exact per-token NLL (nats) and top-1 correctness of the AR model. x: (B, L)."""
    bos = torch.full_like(x[:, :1], V)
    logits = model(torch.cat([bos, x[:, :-1]], 1))[..., :V].float()  # (B, L, V): l predicts x_l
    nll = F.cross_entropy(logits.transpose(1, 2), x, reduction="none")  # (B, L)
    return nll, logits.argmax(-1) == x


def masked_nll(model, x, masked, V):
    """-log p_theta(x_l | z) at masked positions, exactly 0 (no gradient) elsewhere: SUBS's
    carry-over of unmasked tokens. x, masked: (B, L). Returns nll (B, L) nats, correct (B, L)."""
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


def device_of(model, x):
    """Where the model computes: its parameters' device, or x's for a plain function."""
    if isinstance(model, torch.nn.Module):
        return next(iter(model.parameters())).device
    return x.device


def nelbo_kform(model, x, V, repeats, gen, batch=512):
    """k-form NELBO estimate (nats/token) with its Monte-Carlo standard error, the per-sequence
    estimates (n,) and the matching 1/k-weighted top-1 error, as device tensors. Each of `repeats`
    copies of each sequence gets its own k, stratified over the copies (k spread evenly over
    1..L), and a uniformly random subset of k masked positions. The masks come from `gen` on the
    CPU (the same on every device), so evaluation never disturbs the training RNG."""
    n, L = x.shape
    device = device_of(model, x)
    u = torch.rand(1, generator=gen)
    k = ((u + torch.arange(n * repeats) / (n * repeats)) % 1 * L).long() + 1  # (R*n,) U{1..L}
    order = torch.rand((n * repeats, L), generator=gen).argsort(1).argsort(1)  # a rank per position
    masked = (order < k[:, None]).to(device)  # (R*n, L) exactly k masked positions, uniformly
    rows, k = x.to(device).repeat(repeats, 1), k.to(device)  # copy r of sequence j: row r*n + j
    estimates, errors = [], []
    for i in range(0, len(rows), batch):
        part = slice(i, i + batch)
        nll, correct = masked_nll(model, rows[part], masked[part], V)
        estimates.append(nll.double().sum(1) / k[part])
        errors.append((masked[part].sum(1) - correct.sum(1)).double() / k[part])
    estimates = torch.cat(estimates).view(repeats, n)
    # MC error of the mean: from the spread across a sequence's copies (the set itself is fixed);
    # with one copy per sequence only the spread across sequences is left, which overstates it
    variance = estimates.var(0).mean() if repeats > 1 else estimates.var()
    return dict(mean=estimates.mean(), se=(variance / estimates.numel()).sqrt(),
                err=torch.cat(errors).mean(), per_seq=estimates.mean(0))


def order_bounds(model, x, V, orders, gen, batch=512):
    """Reading the denoiser as an any-order AR model: for K uniformly random orders sigma per
    sequence, log p_sigma(x) = sum_i log p_theta(x_sigma(i) | x_sigma(<i)) (L forwards each). Then
      -mean_K log p_sigma(x) / L  estimates the NELBO itself (its expectation is the k-form), and
      -log mean_K p_sigma(x) / L  is an importance-weighted bound, >= -log p_theta(x) / L in
    expectation and tighter as K grows (p_theta(x) = E_sigma p_sigma(x): the sampler's
    likelihood). Returns per-sequence (nelbo, iw) in nats/token, each (n,), on the device."""
    n, L = x.shape
    device = device_of(model, x)
    order = torch.rand((orders * n, L), generator=gen).argsort(1)  # sigma: positions, reveal order
    rank = order.argsort(1).to(device)  # (K*n, L) when each position is revealed
    order, rows = order.to(device), x.to(device).repeat(orders, 1)  # copy r of j: row r*n + j
    logp = torch.zeros(len(rows), dtype=torch.float64, device=device)
    for i in range(L):  # step i: the first i positions of sigma are visible, predict sigma(i)
        for j in range(0, len(rows), batch):
            part = slice(j, j + batch)
            nll, _ = masked_nll(model, rows[part], rank[part] >= i, V)  # (b, L)
            logp[part] -= nll.gather(1, order[part, i:i + 1])[:, 0].double()
    logp = logp.view(orders, n)  # (K, n)
    return -logp.mean(0) / L, -(logp.logsumexp(0) - math.log(orders)) / L

# ----------------------------------------------------------------------------------------------
# samplers, in float64 (float32 Gumbel noise lowers the effective temperature, arXiv 2409.02908);
# every random number is drawn on the model's device, and no step waits for the host


def gumbel_argmax(logp, gen):
    """One draw from Categorical(exp(logp)) per row by the Gumbel-max trick, all in float64."""
    u = torch.rand(logp.shape, dtype=torch.float64, generator=gen, device=logp.device)
    return (logp.double() - (-u.clamp_min(1e-300).log()).log()).argmax(-1)


@torch.no_grad()
def sample_ar(model, V, n, L, gen):
    """Left-to-right ancestral sampling from BOS with the KV cache of train.py's TransformerLM."""
    device = device_of(model, None)
    caches, token, out = [{} for _ in model.blocks], torch.full((n, 1), V, device=device), []
    for _ in range(L):
        logp = model(token, caches)[:, -1, :V].double().log_softmax(-1)  # (n, V)
        token = gumbel_argmax(logp, gen)[:, None]
        out.append(token)
    return torch.cat(out, 1)  # (n, L)


@torch.no_grad()
def sample_mdlm(model, V, n, L, steps, gen):
    """MDLM ancestral sampler: start all-MASK at t = 1 and walk t -> s on a uniform grid. Each
    masked token is revealed with probability (t - s)/t (the exact reverse posterior; at s = 0 all
    are) and drawn from p_theta(. | z_t); unmasked tokens never change. Every position draws a
    token at every step and only the revealed keep it: no data-dependent shapes, no host sync."""
    device = device_of(model, None)
    z = torch.full((n, L), V, dtype=torch.long, device=device)
    times = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
    for t, s in zip(times[:-1], times[1:]):
        chance = torch.rand(z.shape, dtype=torch.float64, generator=gen, device=device)
        reveal = (z == V) & (chance < (t - s) / t)
        logp = model(z)[..., :V].double().log_softmax(-1)  # (n, L, V)
        z = torch.where(reveal, gumbel_argmax(logp, gen), z)
    return z

# ----------------------------------------------------------------------------------------------
# one training run per (model, width, seed), evaluated every --eval_epochs epochs


def bits(nats):  # everything is computed in nats and reported in bits
    return nats / math.log(2)


def build(kind, cfg, V, width):
    torch.manual_seed(cfg.seed)  # same init for AR and MDLM at each width: only the mask differs
    rows = V + 1
    if cfg.gpu:  # GPT-2's 50257 + 1 rows padded to 50304 = 64 x 786 for tensor cores (unused)
        rows = -(-rows // 64) * 64
    return TransformerLM(rows, cfg.n_layer, cfg.n_head, width, causal=(kind == "ar"))


def epoch_batches(cfg, N):
    """get_batch(i) for epochs: each epoch is a fresh permutation of the N sequences, cut into
    floor(N / B) full batches (train.py needs every batch whole; when B does not divide N, the
    N mod B sequences left over differ from epoch to epoch). Deterministic in i."""
    per_epoch = N // cfg.batch_size
    if per_epoch == 0:
        raise ValueError(f"--batch_size={cfg.batch_size} is larger than the {N} training sequences")

    def rows(i):
        epoch, j = divmod(i, per_epoch)
        seed = cfg.seed * 100003 + epoch
        permutation = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
        return permutation[j * cfg.batch_size:(j + 1) * cfg.batch_size]
    return per_epoch, rows


def loss_fn_for(kind, V, eps):
    # "items" lets train.py report tokens/s; both losses are per-token means over the whole batch
    def ar_loss(model, x):
        nll, _ = ar_nll(model, x, V)
        return nll.mean(), dict(items=x.numel())

    def mdlm_loss(model, x):  # x: (B, L) tokens, or dict(x, t, u) with the noise given
        if isinstance(x, dict):
            loss = mdlm_nelbo_at(model, x["x"], V, x["t"], x["u"])
            return loss.mean(), dict(items=x["x"].numel())
        times = antithetic_times(len(x), eps, x.device)
        return mdlm_nelbo_at(model, x, V, times).mean(), dict(items=x.numel())
    return ar_loss if kind == "ar" else mdlm_loss


def evaluate(kind, model, x, V, repeats, gen, batch):
    """dict(bpt, se, err, per_seq) of one data set in bits/token, as device tensors: the exact NLL
    for AR (se = 0), the k-form NELBO for MDLM (se: its Monte-Carlo error on this fixed set)."""
    if kind == "mdlm":
        r = nelbo_kform(model, x, V, repeats, gen, batch)
        return dict(bpt=bits(r["mean"]), se=bits(r["se"]), err=r["err"], per_seq=bits(r["per_seq"]))
    device = device_of(model, x)
    nll, correct = zip(*(ar_nll(model, x[i:i + batch].to(device), V)
                         for i in range(0, len(x), batch)))
    per_seq = bits(torch.cat(nll).double().mean(1))  # (n,)
    return dict(bpt=per_seq.mean(), se=torch.zeros_like(per_seq[0]),
                err=1 - torch.cat(correct).double().mean(), per_seq=per_seq)


def run_one(kind, width, cfg, ctx, data, V):
    """Train one model for cfg.epochs true epochs (cfg.seed is this run's seed). Returns its records
    (one per evaluated epoch), the epoch selected on validation with its test loss re-scored, the
    weights of that epoch, the final model and the training throughput."""
    model = build(kind, cfg, V, width)
    per_epoch, rows = epoch_batches(cfg, len(data["train"]))
    # train.py counts optimizer steps: the run length and the evaluation cadence are set in steps
    # so that evaluations land exactly on epoch boundaries (one run per width, no retraining)
    run_cfg = dataclasses.replace(cfg, max_steps=per_epoch * cfg.epochs, log_every=per_epoch,
                                  eval_every=per_epoch * cfg.eval_epochs)
    tag = f"{kind}_d{width}_s{cfg.seed}"
    ckpt, best_path = Path(cfg.out) / f"ckpt_{tag}.pt", Path(cfg.out) / f"best_{tag}.pt"
    # The selected epoch's weights live in their own file, written whenever validation improves
    # (always before the checkpoint that records that evaluation), so a resumed run selects and
    # re-scores exactly what the uninterrupted one would have.
    resumed = cfg.resume and ckpt.exists() and best_path.exists()
    best, eval_time = load_saved(best_path) if resumed else {}, [0.0]

    def eval_fn(model, step):
        t0, scores = time.time(), {}
        for i, split in enumerate(("train", "val", "test")):
            # the same masks at every evaluation (common random numbers): epoch-to-epoch changes
            # then come from the weights, not the MC draw, and the best epoch is picked fairly
            gen = torch.Generator().manual_seed(cfg.seed * 7919 + i)
            r = evaluate(kind, model, data[split], V, cfg.eval_repeats, gen, cfg.eval_batch)
            scores.update({f"{split}_{key}": r[key] for key in ("bpt", "se", "err")})
        row = dict(epoch=step // per_epoch, **to_host(scores))  # one device sync per evaluation
        if row["val_bpt"] < best.get("val_bpt", math.inf):
            state = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
            best.update(epoch=row["epoch"], val_bpt=row["val_bpt"], state=state)
            if ctx.master:
                atomic_save(best, best_path)
        eval_time[0] += time.time() - t0
        return row

    summary = train(model, lambda i: data["train"][rows(i)], loss_fn_for(kind, V, cfg.eps),
                    run_cfg, ctx, eval_fn=eval_fn, ckpt_path=ckpt,
                    desc=f"{kind} d={width} seed {cfg.seed}")
    return finish_run(kind, width, cfg, ctx, data, V, model, summary, best, eval_time[0])


def finish_run(kind, width, cfg, ctx, data, V, model, summary, best, eval_seconds):
    """run_one's result: the records, and the validation-selected epoch re-scored on test."""
    by_epoch = {e["epoch"]: e for e in summary["evals"]}  # a resumed run re-evaluates its last one
    params = count_params(model)
    records = [dict(model=kind, width=width, seed=cfg.seed, params=params,
                    **{key: value for key, value in e.items() if key != "step"})
               for _, e in sorted(by_epoch.items())]
    chosen = min(records, key=lambda r: r["val_bpt"])  # the first epoch with the lowest val loss
    if best.get("epoch") != chosen["epoch"]:
        raise DataError(f"the best-epoch file of {kind} d={width} seed {cfg.seed} in {cfg.out} "
                        f"does not hold epoch {chosen['epoch']}, the best on validation; delete "
                        "it and its checkpoint to train this run again")
    # tokens trained in this process (none if --resume found the run finished), evaluation excluded
    trained = summary["items_per_s"] * summary["seconds"]
    tokens_per_s = trained / max(summary["seconds"] - eval_seconds, 1e-9) if trained else None
    # The test loss at the selected epoch is scored again with --final_repeats fresh k-form samples
    # per sequence (AR: the same exact NLL), for a small Monte-Carlo error and per-sequence values.
    selected = build(kind, cfg, V, width).to(ctx.device)
    selected.load_state_dict(best["state"])
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + 10**6)
    with torch.no_grad(), ctx.autocast():
        r = evaluate(kind, selected.eval(), data["test"], V, cfg.final_repeats, gen, cfg.eval_batch)
    scalars = torch.stack([r["bpt"], r["se"], r["err"]])
    test_bpt, test_se, test_err, *per_seq = torch.cat([scalars, r["per_seq"]]).tolist()  # one sync
    pick = dict(model=kind, width=width, seed=cfg.seed, params=params, epoch=chosen["epoch"],
                val_bpt=chosen["val_bpt"], test_bpt=test_bpt, test_se=test_se, test_err=test_err,
                per_seq=per_seq)
    # kept for the bound at the selected point and for samples, off the GPU until then
    return dict(records=records, pick=pick, selected=selected.cpu(), final=model.eval().cpu(),
                tokens_per_s=tokens_per_s)


def sweep(cfg, ctx, data, V):
    """Every (seed, model, width) run; one checkpoint each, so --resume skips finished runs and
    continues a cut-off one."""
    return {(seed, kind, width): run_one(kind, width, dataclasses.replace(cfg, seed=seed), ctx,
                                         data, V)
            for seed in range(cfg.seed, cfg.seed + cfg.seeds)
            for kind in cfg.model_list for width in cfg.width_list}

# ----------------------------------------------------------------------------------------------
# reading the sweep: thresholds, best test loss with its interval, bound slack, second descent


def interpolation(records, floor, tol, widths):
    """The rule: a (model, width) interpolates at the first evaluated epoch whose train bits/token
    are <= floor + tol; the threshold is the smallest width of the sweep that interpolates (with
    the epoch it got there), and it is *located* when a smaller width of the sweep does not
    (otherwise it is only bounded: at or below the smallest width tried). None: no width did."""
    first = {}
    for r in sorted(records, key=lambda r: r["epoch"]):
        if r["train_bpt"] <= floor + tol and r["width"] not in first:
            first[r["width"]] = r
    if not first:
        return None, first
    width = min(first)
    return dict(width=width, params=first[width]["params"], epoch=first[width]["epoch"],
                located=width > min(widths)), first


def ar_first(ar, mdlm):
    """Does AR reach its threshold at a smaller width, or at the same width in fewer epochs?
    None when neither model interpolated."""
    if ar is None and mdlm is None:
        return None
    key = lambda found: (found["width"], found["epoch"]) if found else (math.inf, math.inf)
    return key(ar) < key(mdlm)


def second_descent(curve, margin, smooth=1):
    """The largest (rise, fall) in bits of a curve (test bits in order of width or epoch) that
    first rises by > margin above its running minimum and then falls by > margin from that peak;
    None if nothing does. smooth > 1 first averages over that many neighbours (epoch curves
    wiggle)."""
    if smooth > 1:
        half = smooth // 2
        windows = [curve[max(0, i - half):i + half + 1] for i in range(len(curve))]
        curve = [sum(window) / len(window) for window in windows]
    best = None
    for peak in range(1, len(curve) - 1):
        rise = curve[peak] - min(curve[:peak + 1])
        fall = curve[peak] - min(curve[peak:])
        if rise > margin and fall > margin and (best is None or fall > best[1]):
            best = (rise, fall)
    return best


def pronounced(descent):
    """A second descent counts as pronounced when it gives back at least a quarter of its rise."""
    return bool(descent) and descent[1] >= 0.25 * descent[0]


def seeds_interval(values, per_seq):
    """Mean over seeds of a test loss (or a difference of two) and its 95% interval. The test set
    is the same for every seed, so its sampling error does not average out: the standard error
    of the seed-averaged per-sequence values enters mean_interval as the error all seeds share."""
    sequences = torch.tensor(per_seq, dtype=torch.float64).mean(0)  # (n,)
    test_se = math.sqrt(float(sequences.var()) / len(sequences))
    mean, half = mean_interval(values, shared_se=test_se)
    return dict(mean=mean, half=half, test_se=test_se, seeds=len(values))


def pick_model(runs, seed, kind, widths):
    """The selected point of one model in one seed: the width (and its epoch) with the lowest
    validation loss; its test loss is what gets reported."""
    return min((runs[seed, kind, width]["pick"] for width in widths), key=lambda p: p["val_bpt"])


def bound_slack(cfg, ctx, runs, data, V, seed, width):
    """At MDLM's selected (width, epoch) of one seed: the NELBO and the importance-weighted bound
    over --iw_orders random orders, on the same orders, per test sequence in bits/token. Their
    difference is a lower bound on the NELBO's slack (the true NLL is lower than both)."""
    model = runs[seed, "mdlm", width]["selected"].to(ctx.device)
    gen = torch.Generator().manual_seed(seed * 7919 + 2 * 10**6)
    with torch.no_grad(), ctx.autocast():
        nelbo, iw = order_bounds(model, data["test"], V, cfg.iw_orders, gen, cfg.eval_batch)
    nelbo, iw = bits(nelbo).tolist(), bits(iw).tolist()  # one sync
    model.cpu()
    gaps = torch.tensor(nelbo) - torch.tensor(iw)
    return dict(nelbo=sum(nelbo) / len(nelbo), iw=sum(iw) / len(iw), slack=float(gaps.mean()),
                slack_se=float(gaps.std() / math.sqrt(len(gaps))), iw_per_seq=iw)


def model_summary(cfg, runs, records, seeds, kind, tols, floor):
    """One model's thresholds, selected points, best test loss and second descents."""
    widths = cfg.width_list
    picks = [pick_model(runs, seed, kind, widths) for seed in seeds]
    epochs = sorted({r["epoch"] for r in records[seeds[0]]})
    last = {width: [next(r["test_bpt"] for r in records[seed]
                         if r["width"] == width and r["epoch"] == epochs[-1]) for seed in seeds]
            for width in widths}
    # dips of a few hundredths of a bit are within run-to-run noise (and the paper's inset
    # effects are that size), so a rise or fall must exceed 0.1 bits plus twice the MC error
    margin = 0.1 + 2 * max(r["test_se"] for seed in seeds for r in records[seed])
    by_width = lambda seed, width: [r["test_bpt"] for r in records[seed] if r["width"] == width]
    return dict(
        thresholds={tol: [interpolation(records[seed], floor, tol, widths)[0] for seed in seeds]
                    for tol in tols},
        first_epoch=[{width: r["epoch"] for width, r in
                      interpolation(records[seed], floor, cfg.tol, widths)[1].items()}
                     for seed in seeds],
        picks=[{key: value for key, value in p.items() if key != "per_seq"} for p in picks],
        best=seeds_interval([p["test_bpt"] for p in picks], [p["per_seq"] for p in picks]),
        per_width={width: [runs[seed, kind, width]["pick"]["test_bpt"] for seed in seeds]
                   for width in widths},
        last_epoch=last,
        modelwise=[second_descent([last[width][i] for width in widths], margin)
                   for i in range(len(seeds))],
        epochwise=[{width: second_descent(by_width(seed, width), margin, smooth=5)
                    for width in widths} for seed in seeds],
        tokens_per_s={width: runs[seeds[0], kind, width]["tokens_per_s"] for width in widths},
        per_seq=[p["per_seq"] for p in picks])


def summarise(cfg, ctx, runs, data, V, floor):
    """Everything the report prints and results.json keeps, computed from the runs."""
    kinds, widths = cfg.model_list, cfg.width_list
    seeds = list(range(cfg.seed, cfg.seed + cfg.seeds))
    tols = (cfg.tol / 2, cfg.tol, 2 * cfg.tol)
    out = dict(seeds=seeds, tols=tols, models={})
    for kind in kinds:
        records = {seed: [r for width in widths for r in runs[seed, kind, width]["records"]]
                   for seed in seeds}
        out["models"][kind] = model_summary(cfg, runs, records, seeds, kind, tols, floor)
    per_seq = {kind: out["models"][kind].pop("per_seq") for kind in kinds}
    if {"ar", "mdlm"} <= set(kinds):
        compare(cfg, ctx, runs, data, V, out, per_seq)
    return out


def compare(cfg, ctx, runs, data, V, out, per_seq):
    """AR against MDLM: thresholds per seed, AR - MDLM against the NELBO and the tighter bound,
    and the second-descent verdict over both models' curves."""
    ar, mdlm, tols = out["models"]["ar"], out["models"]["mdlm"], out["tols"]
    pairs = lambda tol: zip(ar["thresholds"][tol], mdlm["thresholds"][tol])
    out["threshold_verdicts"] = {tol: [ar_first(a, m) for a, m in pairs(tol)] for tol in tols}
    out["both_located"] = {tol: [bool(a and m and a["located"] and m["located"])
                                 for a, m in pairs(tol)] for tol in tols}
    differences = lambda other: [[x - y for x, y in zip(p, q)]
                                 for p, q in zip(per_seq["ar"], other)]
    out["difference"] = seeds_interval(
        [p["test_bpt"] - q["test_bpt"] for p, q in zip(ar["picks"], mdlm["picks"])],
        differences(per_seq["mdlm"]))
    slack = [bound_slack(cfg, ctx, runs, data, V, p["seed"], p["width"]) for p in mdlm["picks"]]
    mean = lambda key: sum(s[key] for s in slack) / len(slack)
    out["slack"] = dict(nelbo=mean("nelbo"), iw=mean("iw"), slack=mean("slack"),
                        per_seed=[s["slack"] for s in slack],
                        slack_se=max(s["slack_se"] for s in slack), orders=cfg.iw_orders)
    out["difference_iw"] = seeds_interval(
        [p["test_bpt"] - s["iw"] for p, s in zip(ar["picks"], slack)],
        differences([s["iw_per_seq"] for s in slack]))
    curves = [curve for model in (ar, mdlm) for curve in model["modelwise"]]
    curves += [curve for model in (ar, mdlm) for per_width in model["epochwise"]
               for curve in per_width.values()]
    out["no_pronounced_second_descent"] = not any(pronounced(curve) for curve in curves)


def lower_verdict(interval):
    """AR minus MDLM with its 95% interval: a test that can say yes, no, or not resolved."""
    if interval["mean"] + interval["half"] < 0:
        return "YES"
    if interval["mean"] - interval["half"] > 0:
        return "NO (MDLM lower)"
    return "NOT RESOLVED (interval spans 0)"


def log_spaced(epochs, n):
    """About n roughly log-spaced entries of a sorted list, always including the first and last."""
    if len(epochs) < 2:
        return epochs[:1]
    indices = {round((len(epochs) - 1) * (i / (n - 1)) ** 2) for i in range(n)}
    return [epochs[i] for i in sorted(indices)]

# ----------------------------------------------------------------------------------------------
# report: tables of the first seed, thresholds of every seed, the headline with its interval


def threshold_text(threshold, epochs):
    if threshold is None:
        return f"none within {epochs} epochs"
    located = "" if threshold["located"] else " (smallest width tried: not located)"
    return f"d={threshold['width']}@{threshold['epoch']}{located}"


def print_tables(cfg, runs, floor):
    kinds, widths, seed = cfg.model_list, cfg.width_list, cfg.seed
    by_key = {(r["model"], r["width"], r["epoch"]): r for kind in kinds for width in widths
              for r in runs[seed, kind, width]["records"]}
    shown = log_spaced(sorted({epoch for _, _, epoch in by_key}), 8)
    print(f"\nbits/token, seed {seed} (MDLM: k-form NELBO, an upper bound; AR: exact NLL). "
          f"floor = {floor:.3f}")
    print("params: " + ", ".join(f"d={width}: {by_key[kinds[0], width, shown[0]]['params']:,}"
                                 for width in widths) + " (identical for AR and MDLM)")
    head = "/".join(str(width) for width in widths)
    for key in ("test_bpt", "train_bpt"):
        print(f"\n{key.split('_')[0]:5s} | "
              + " | ".join(f"{kind.upper():4s} d = {head}" for kind in kinds))
        for epoch in shown:
            cells = ["/".join(f"{by_key[kind, width, epoch][key]:.2f}" for width in widths)
                     for kind in kinds]
            print(f"{epoch:5d} | " + " | ".join(f"{cell:>{8 + len(head)}s}" for cell in cells))


def descent_text(descent):
    if not descent:
        return "no"
    strength = "PRONOUNCED" if pronounced(descent) else "weak"
    return f"{strength} ({descent[0]:.2f} up, {descent[1]:.2f} down)"


def report_models(cfg, summary, floor):
    """Thresholds, best test loss and last-epoch curves of each model."""
    kinds, seeds, models = cfg.model_list, summary["seeds"], summary["models"]
    print(f"\ninterpolation: train <= floor + tol = {floor:.3f} + {cfg.tol} bits/token; threshold "
          f"= the smallest width that interpolates within {cfg.epochs} epochs, 'width@epoch', per "
          f"seed {seeds}:")
    for tol in summary["tols"]:
        print(f"  tol {tol:<6g} " + " | ".join(
            f"{kind.upper():4s} " + ", ".join(threshold_text(threshold, cfg.epochs)
                                              for threshold in models[kind]["thresholds"][tol])
            for kind in kinds))
    for kind in kinds:
        print(f"  {kind.upper():4s} first interpolating epoch per width (tol {cfg.tol}): "
              + "; ".join(f"seed {seed}: " + (", ".join(f"d={width}@{epoch}" for width, epoch
                                                        in sorted(first.items())) or "-")
                          for seed, first in zip(seeds, models[kind]["first_epoch"])))
    rescored = f", MDLM with {cfg.final_repeats} k-form samples per sequence"
    print(f"\nbest test loss (epoch and width picked on {cfg.n_val or 'half the'} validation "
          f"sequences; test re-scored at that epoch{rescored if 'mdlm' in kinds else ''}):")
    for kind in kinds:
        best = models[kind]["best"]
        bound = " [upper bound: NELBO]" if kind == "mdlm" else " [exact NLL]"
        print(f"  {kind.upper():4s} {best['mean']:.3f} +- {best['half']:.3f} (95%: {best['seeds']} "
              f"seed(s), test-set SE {best['test_se']:.3f}){bound}; per seed: "
              + ", ".join(f"{p['test_bpt']:.3f} (d={p['width']}@{p['epoch']})"
                          for p in models[kind]["picks"]))
        print("       per width (selected epoch, mean over seeds): " + ", ".join(
            f"d={width}: {sum(v) / len(v):.3f}" for width, v in models[kind]["per_width"].items()))
    for kind in kinds:
        last = [sum(v) / len(v) for v in models[kind]["last_epoch"].values()]
        epochwise = "; ".join(f"d={width}: " + ", ".join(descent_text(e[width])
                                                        for e in models[kind]["epochwise"])
                              for width in cfg.width_list)
        print(f"  {kind.upper():4s} at the last epoch, test per width: "
              + "/".join(f"{v:.2f}" for v in last) + "; second descent vs width (last epoch): "
              + ", ".join(descent_text(v) for v in models[kind]["modelwise"])
              + f"; vs epoch: {epochwise}")


def report(cfg, summary, floor):
    """The paper's claims, each read off the numbers, with every comparison's caveat."""
    report_models(cfg, summary, floor)
    models = summary["models"]
    if "difference" in summary:
        print(f"\nverdict (paper: AR interpolates at a smaller width / fewer epochs and has the "
              f"lower best test loss), over {len(summary['seeds'])} seed(s):")
        count_true = lambda values: sum(1 for value in values if value)
        for tol in summary["tols"]:
            verdicts, located = summary["threshold_verdicts"][tol], summary["both_located"][tol]
            print(f"  tol {tol:<6g} AR's threshold at a smaller width or earlier: "
                  f"{count_true(verdicts)}/{len(verdicts)} seeds (both thresholds located in "
                  f"{count_true(located)}/{len(located)})")
        difference, slack = summary["difference"], summary["slack"]
        difference_iw = summary["difference_iw"]
        print(f"  AR's best test loss lower: {lower_verdict(difference)}: AR - MDLM = "
              f"{difference['mean']:+.3f} +- {difference['half']:.3f} bits/token (95%, paired over "
              "test sequences and seeds; MDLM's number is an upper bound)")
        print(f"  MDLM bound at its selected point, {slack['orders']} random orders: NELBO "
              f"{slack['nelbo']:.3f}, importance-weighted {slack['iw']:.3f}; slack >= "
              f"{slack['slack']:.3f} +- {2 * slack['slack_se']:.3f} bits/token (the true NLL is "
              "lower still)")
        print(f"  against the tighter bound: AR - MDLM(IW) = {difference_iw['mean']:+.3f} +- "
              f"{difference_iw['half']:.3f}: {lower_verdict(difference_iw)}")
        print("  No pronounced second descent in either model (paper: none): "
              f"{'YES' if summary['no_pronounced_second_descent'] else 'NO'}")
    print("\ntraining throughput, tokens/s (evaluation time excluded): " + "; ".join(
        f"{kind.upper()} " + "/".join(f"{v:,.0f}" if v else "-"
                                      for v in models[kind]["tokens_per_s"].values())
        for kind in cfg.model_list) + " for d = " + "/".join(map(str, cfg.width_list)))


def draw_samples(cfg, ctx, runs, V, decode):
    """A few samples of each widest final model (an AR model past interpolation mostly replays
    training text); the noise comes from a generator on the model's device."""
    width, samples = cfg.width_list[-1], {}
    for kind in cfg.model_list:
        model = runs[cfg.seed, kind, width]["final"].to(ctx.device)
        gen = torch.Generator(device=ctx.device).manual_seed(cfg.seed)
        if kind == "ar":
            out = sample_ar(model, V, cfg.n_samples, cfg.seq_len, gen)
        else:
            out = sample_mdlm(model, V, cfg.n_samples, cfg.seq_len, cfg.sample_steps, gen)
        samples[kind] = [decode(sample) for sample in out.tolist()]
        print(f"\nsamples, {kind.upper()} d={width}:")
        for sample in samples[kind]:
            print("  " + repr(sample))
    return samples

# ----------------------------------------------------------------------------------------------
# figures (matplotlib optional), of the first seed


def figure_by_params(plt, cfg, records, floor, shown):
    """The paper's Figure 1: test (top) and train (bottom) bits vs parameters, a curve per epoch."""
    kinds = cfg.model_list
    fig, axes = plt.subplots(2, len(kinds), figsize=(5.5 * len(kinds), 8), squeeze=False,
                             sharey="row")
    colours = plt.get_cmap("viridis")
    for column, kind in enumerate(kinds):
        for row, key in enumerate(("test_bpt", "train_bpt")):
            ax = axes[row][column]
            for j, epoch in enumerate(shown):
                points = sorted((r["params"], r[key]) for r in records
                                if r["model"] == kind and r["epoch"] == epoch)
                ax.plot(*zip(*points), "o-", color=colours(j / max(1, len(shown) - 1)),
                        label=f"epoch {epoch}", ms=3)
            if key == "train_bpt":
                ax.axhline(floor, color="k", ls="--", lw=1, label="memorisation floor")
            ax.set_xscale("log")
            ax.set_title(f"{kind.upper()} {key.split('_')[0]}")
            ax.set_xlabel("parameters")
            ax.set_ylabel("bits/token")
        axes[0][column].legend(fontsize=7)
    fig.suptitle(f"{cfg.data}: N={cfg.n_train or 'all'} x L={cfg.seq_len}, noise={cfg.noise}, "
                 f"seed {cfg.seed}")
    fig.tight_layout()
    return fig


def figure_by_epoch(plt, cfg, records, floor):
    """Test (solid) and train (dashed) bits vs epoch, one colour per width."""
    kinds = cfg.model_list
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False,
                             sharey=True)
    for column, kind in enumerate(kinds):
        ax = axes[0][column]
        for width in cfg.width_list:
            rs = [r for r in records if r["model"] == kind and r["width"] == width]
            epochs = [r["epoch"] for r in rs]
            line, = ax.plot(epochs, [r["test_bpt"] for r in rs], label=f"d={width}")
            ax.plot(epochs, [r["train_bpt"] for r in rs], "--", color=line.get_color(), lw=1)
        ax.axhline(floor, color="k", ls=":", lw=1)
        ax.set_title(f"{kind.upper()}: test (solid), train (dashed)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("bits/token")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot(cfg, records, floor):
    records = [r for r in records if r["seed"] == cfg.seed]
    shown = log_spaced(sorted({r["epoch"] for r in records}), 7)
    out = Path(cfg.out)
    return [save_figure(out / "fig1_test_vs_params.png",
                        lambda plt: figure_by_params(plt, cfg, records, floor, shown)),
            save_figure(out / "loss_vs_epoch.png",
                        lambda plt: figure_by_epoch(plt, cfg, records, floor))]

# ----------------------------------------------------------------------------------------------
# throughput benchmark: training tokens/s of both objectives, same model, same batch


def bench(cfg, ctx, V):
    """Time fwd + bwd + AdamW of each objective on the widest model, after 3 untimed warm-up steps.
    The two objectives cost almost the same: one forward over L tokens each; MDLM only adds the
    mask draw, and its loss averages over the ~half of the positions that are masked."""
    width = cfg.width_list[-1]
    for kind in cfg.model_list:
        model = build(kind, cfg, V, width).to(ctx.device)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, cfg.beta2),
                                fused=ctx.gpu)
        fast = maybe_compile(model, cfg)  # train.py's choice: inductor, or cudagraphs
        loss_fn = loss_fn_for(kind, V, cfg.eps)
        x = torch.randint(0, V, (cfg.batch_size, cfg.seq_len), device=ctx.device)  # random tokens

        def step():
            with ctx.autocast():
                loss, _ = loss_fn(fast, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        for _ in range(3):  # warm-up: allocator, compile
            step()
        if ctx.gpu:
            torch.cuda.synchronize()
        n, t0 = 30, time.time()
        for _ in range(n):
            step()
        if ctx.gpu:
            torch.cuda.synchronize()
        tokens_per_s = n * x.numel() / (time.time() - t0)
        print(f"{kind:5s} d={width} {count_params(model):,} params, B={cfg.batch_size} x "
              f"L={cfg.seq_len}: {tokens_per_s:,.0f} tokens/s")

# ----------------------------------------------------------------------------------------------
# main


def main(argv=None):
    cfg = parse_config(Config, "diffusion_vs_ar", argv)
    ctx = setup(cfg)
    try:
        data, V, decode = make_data(cfg)
        epoch_batches(cfg, len(data["train"]))  # refuses a batch larger than the training set
    except ValueError as e:  # the user's flags or file: too little text, not text, no such file
        die(str(e), 2)
    except (OSError, RuntimeError) as e:  # a failed download or tokenizer (DataError)
        die(str(e))
    if cfg.bench:
        return bench(cfg, ctx, V)
    floor = memorisation_floor(data["train"])  # what a perfect memoriser scores on train
    print(f"data {cfg.data} ({cfg.tokenizer}, V={V}): {len(data['train'])} train x {cfg.seq_len} "
          f"tokens, {len(data['val'])} validation, {len(data['test'])} test; floor log2(N)/L = "
          f"{floor:.4f} bits/token; {cfg.epochs} epochs of {len(data['train']) // cfg.batch_size} "
          f"steps; widths {cfg.width_list}; {cfg.n_layer} layers, {cfg.n_head} heads; seeds "
          f"{cfg.seed}..{cfg.seed + cfg.seeds - 1}")
    t_start = time.time()
    runs = sweep(cfg, ctx, data, V)
    summary = summarise(cfg, ctx, runs, data, V, floor)
    print_tables(cfg, runs, floor)
    report(cfg, summary, floor)
    samples = draw_samples(cfg, ctx, runs, V, decode)
    records = [r for run in runs.values() for r in run["records"]]
    path = save_results(cfg, ctx, dict(vocab=V, n_train=len(data["train"]), n_val=len(data["val"]),
                                       n_test=len(data["test"]), floor_bpt=floor, records=records,
                                       summary=summary, samples=samples,
                                       seconds=time.time() - t_start))
    figures = plot(cfg, records, floor) if ctx.master else []
    print(f"\nwrote {path}" + "".join(f", {f}" for f in figures if f)
          + f" in {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    cli(main)
