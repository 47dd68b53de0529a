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
        Evaluation: the same NELBO in its "k-form" (RADD, arXiv 2406.03736): integrating t out gives
            L(x) / L = E_{k ~ U{1..L}} E_{|S| = k} [ (1/k) sum_{l in S} -log p_theta(x_l | x without S) ],
        exact in expectation with bounded weights. It equals the expected NLL of the model read as an
        any-order AR model over a uniformly random order, so an importance-weighted average over K
        orders gives a tighter upper bound on -log p_theta(x) (computed at the selected epoch).
AR's number is an exact NLL, MDLM's an upper bound: a gap in AR's favour may partly be bound slack.
Both are reported in bits per token (per character with the default char-level tokenizer).

The experiment: a width sweep x epochs on N fixed, distinct, non-overlapping training sequences of
length L, repeated over --seeds. An epoch is one pass over the N sequences for both models, same
optimiser and constant LR for both, raw weights evaluated every --eval_epochs epochs. The best epoch of
each (model, width) is picked on a validation split and its test loss reported. Memorising N sequences
gives a train floor of log2(N)/L bits/token for both models; a model interpolates when its train loss
is <= floor + --tol, and a model's interpolation threshold is the smallest width of the sweep that
interpolates within the budget (located when a smaller width of the sweep does not).

Defaults run offline in about five minutes on 2 CPU cores: a character-level slice of English prose
shipped with Python. `--data=tinyshakespeare --tokenizer=gpt2 --gpu` is the paper's setup (12 layers,
12 heads, seq 512, 50 epochs). No hand-written Triton: on CUDA all fusion comes from torch.compile.
"""
import dataclasses, math, time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from train import (TrainConfig, parse_config, setup, die, fill_auto, TransformerLM, count_params, train,
                   save_results, save_figure, embedded_text, download, maybe_compile, cli, DataError,
                   atomic_save, load_saved, mean_interval)


@dataclass
class Config(TrainConfig):
    data: str = "auto"  # auto (prose on CPU, tinyshakespeare with --gpu) | prose (text shipped with Python) | tinyshakespeare (downloaded) | path to a UTF-8 text file (first 90 percent train)
    tokenizer: str = "auto"  # auto (char on CPU, gpt2 with --gpu) | char | gpt2 (tiktoken's GPT-2 BPE; needs the network once)
    models: str = "ar,mdlm"  # which objectives to train: ar, mdlm or both
    widths: str = ""  # comma-separated model widths (empty = 2,4,16,64 on CPU; 96,192,384,768 with --gpu)
    n_layer: int = 0  # Transformer blocks (0 = 2 on CPU, 12 with --gpu)
    n_head: int = 0  # attention heads, fixed across widths (0 = 1 on CPU, 12 with --gpu)
    seq_len: int = 0  # tokens per sequence L (0 = 8 on CPU, 512 with --gpu)
    n_train: int = 0  # training sequences N (0 = 16 on CPU, all the training text gives with --gpu)
    n_val: int = 0  # validation sequences, for picking the best epoch (0 = 128 on CPU, half the held-out text with --gpu)
    n_test: int = 0  # test sequences, after the validation ones (0 = 128 on CPU, the other half with --gpu)
    epochs: int = 0  # passes over the training set (0 = 4000 on CPU, 50 with --gpu)
    eval_epochs: int = 0  # epochs between evaluations (0 = 50 on CPU, 1 with --gpu)
    seeds: int = 1  # independent runs of the whole sweep, seeds --seed .. --seed + seeds - 1
    batch_size: int = 0  # sequences per optimizer step (0 = 16 on CPU: the whole training set, 12 with --gpu)
    lr: float = 0.0  # peak learning rate, constant after warm-up (0 = 2e-3 on CPU, 6e-4 with --gpu)
    warmup: int = 10  # linear warm-up steps
    min_lr_ratio: float = 1.0  # cosine end point as a fraction of lr (1 = constant LR, as in the design)
    weight_decay: float = 0.0  # AdamW weight decay (0: nothing should stop memorisation)
    noise: float = 0.0  # fraction of training tokens replaced once by uniform random tokens (label noise)
    tol: float = 1.0  # a model interpolates when train bits/token <= floor + tol (the verdict is also shown at tol/2 and 2 tol)
    eps: float = 1e-3  # MDLM: smallest masking time t (the 1/t weight diverges at 0)
    eval_repeats: int = 2  # MDLM k-form samples per sequence at every evaluation (the same masks every time)
    final_repeats: int = 16  # MDLM k-form samples per test sequence at the selected epoch
    iw_orders: int = 0  # MDLM: random orders of the importance-weighted bound at the selected epoch, L forwards each (0 = 16 on CPU, 4 with --gpu; 1 = no tightening)
    eval_batch: int = 0  # sequences per forward pass during evaluation (0 = 512 on CPU, 16 with --gpu: 50k-vocab logits are big)
    sample_steps: int = 0  # MDLM ancestral sampling steps (0 = seq_len)
    n_samples: int = 3  # samples printed per model at the end
    bench: bool = False  # only measure training throughput (tokens/s) of both objectives and exit

    unused = ("max_steps", "eval_every", "log_every")  # set per run from --epochs and --eval_epochs

    def __post_init__(self):
        super().__post_init__()
        fill_auto(self, data=("prose", "tinyshakespeare"), tokenizer=("char", "gpt2"),  # CPU toy | paper scale
                  widths=("2,4,16,64", "96,192,384,768"), n_layer=(2, 12), n_head=(1, 12), seq_len=(8, 512),
                  n_train=(16, 0), n_val=(128, 0), n_test=(128, 0), epochs=(4000, 50), eval_epochs=(50, 1), iw_orders=(16, 4),
                  batch_size=(16, 12), lr=(2e-3, 6e-4), eval_batch=(512, 16))
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
        if not 0 <= self.noise < 1 or not 0 < self.eps < 1 or self.tol <= 0:
            raise ValueError("--noise must be in [0, 1), --eps in (0, 1) and --tol > 0")
        if self.seq_len < 2 or self.eval_repeats < 1 or self.final_repeats < 1 or self.seeds < 1:
            raise ValueError("--seq_len must be >= 2 and --eval_repeats/--final_repeats/--seeds >= 1")

    @property
    def model_list(self):
        return [m.strip() for m in self.models.split(",") if m.strip()]

    @property
    def width_list(self):
        return sorted({int(w) for w in self.widths.split(",") if w.strip()})

# ----------------------------------------------------------------------------------------------
# data: N distinct training sequences, and held-out validation and test sets, as (n, L) token tensors


def load_text(cfg):
    """(train_text, held_out_text) as str. Real data sets keep the paper's split: first 90% / last 10%."""
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
        raise ValueError(f"--data={cfg.data} is not UTF-8 text (byte {e.start}); give a text file") from None
    if "\x00" in text:
        raise ValueError(f"--data={cfg.data} contains NUL bytes: a binary file, not text")
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


def make_data(cfg):
    """dict(train, val, test) of (n, L) tensors, V and a decoder. Validation and test are consecutive
    windows of the held-out text (validation first), so selection never sees a test sequence. The
    training set and its noise are the same for every seed: seeds vary init, order and masks only."""
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
# probability on them (SUBS for MDLM).


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


def device_of(model, x):
    return next(iter(model.parameters())).device if isinstance(model, torch.nn.Module) else x.device


def nelbo_kform(model, x, V, repeats, gen, batch=512):
    """k-form NELBO estimate (nats/token) with its Monte-Carlo standard error, the per-sequence
    estimates (n,) and the matching 1/k-weighted top-1 error. Each of `repeats` copies of each
    sequence gets its own k, stratified over the copies (k spread evenly over 1..L), and a uniformly
    random subset of k masked positions. Randomness comes from `gen`, so evaluation never disturbs
    the training RNG."""
    n, L = x.shape
    rows = x.repeat(repeats, 1)  # (R*n, L) copy r of sequence j at row r*n + j
    u = torch.rand(1, generator=gen)
    k = ((u + torch.arange(len(rows)) / len(rows)) % 1 * L).long() + 1  # (R*n,) marginally U{1..L}
    order = torch.rand(rows.shape, generator=gen).argsort(1).argsort(1)  # a random rank per position
    masked = order < k[:, None]  # (R*n, L) exactly k masked positions, chosen uniformly
    est, err, dev = [], [], device_of(model, x)
    for i in range(0, len(rows), batch):
        sl = slice(i, i + batch)
        nll, correct = masked_nll(model, rows[sl].to(dev), masked[sl].to(dev), V)
        kk = k[sl].to(dev)
        est.append((nll.sum(1) / kk).double().cpu())
        err.append(((masked[sl].to(dev).sum(1) - correct.sum(1)) / kk).double().cpu())
    est, err = torch.cat(est).view(repeats, n), torch.cat(err).view(repeats, n)
    # MC error of the mean: from the spread across a sequence's copies (the test set itself is fixed);
    # with one copy per sequence only the spread across sequences is left, which overstates it
    var = est.var(0).mean() if repeats > 1 else est.var()
    return dict(mean=float(est.mean()), se=float((var / est.numel()).sqrt()), err=float(err.mean()),
                per_seq=est.mean(0))


def order_bounds(model, x, V, orders, gen, batch=512):
    """Reading the denoiser as an any-order AR model: for K uniformly random orders sigma per
    sequence, log p_sigma(x) = sum_i log p_theta(x_sigma(i) | x_sigma(<i)) (L forwards each). Then
      -mean_K log p_sigma(x) / L  estimates the NELBO itself (its expectation is the k-form), and
      -log mean_K p_sigma(x) / L  is an importance-weighted bound, >= -log p_theta(x) / L in
    expectation and tighter as K grows (p_theta(x) = E_sigma p_sigma(x): the sampler's likelihood).
    Returns per-sequence (nelbo, iw) in nats/token, each (n,)."""
    n, L = x.shape
    rows = x.repeat(orders, 1)  # (K*n, L) copy r of sequence j at row r*n + j
    order = torch.rand(rows.shape, generator=gen).argsort(1)  # (K*n, L) sigma: positions in reveal order
    rank = order.argsort(1)  # (K*n, L) when each position is revealed
    logp, dev = torch.zeros(len(rows), dtype=torch.float64), device_of(model, x)
    for i in range(L):  # step i: the first i positions of sigma are visible, predict sigma(i)
        for j in range(0, len(rows), batch):
            sl = slice(j, j + batch)
            nll, _ = masked_nll(model, rows[sl].to(dev), (rank[sl] >= i).to(dev), V)  # (b, L)
            logp[sl] -= nll.gather(1, order[sl, i:i + 1].to(dev))[:, 0].double().cpu()
    logp = logp.view(orders, n)  # (K, n)
    return -logp.mean(0) / L, -(logp.logsumexp(0) - math.log(orders)) / L

# ----------------------------------------------------------------------------------------------
# samplers, in float64 (float32 Gumbel noise lowers the effective temperature, arXiv 2409.02908);
# every random number is drawn on the model's device, by a generator that lives there


def gumbel_argmax(logp, gen):
    """One draw from Categorical(exp(logp)) per row by the Gumbel-max trick, all in float64."""
    u = torch.rand(logp.shape, dtype=torch.float64, generator=gen, device=logp.device).clamp_min(1e-300)
    return (logp.double() - (-u.log()).log()).argmax(-1)


@torch.no_grad()
def sample_ar(model, V, n, L, gen):
    """Left-to-right ancestral sampling from BOS with the KV cache of train.py's TransformerLM."""
    device = next(model.parameters()).device
    caches, tok, out = [{} for _ in model.blocks], torch.full((n, 1), V, device=device), []
    for _ in range(L):
        logp = model(tok, caches)[:, -1, :V].double().log_softmax(-1)  # (n, V)
        tok = gumbel_argmax(logp, gen)[:, None]
        out.append(tok)
    return torch.cat(out, 1)  # (n, L)


@torch.no_grad()
def sample_mdlm(model, V, n, L, steps, gen, device="cpu"):
    """MDLM ancestral sampler: start all-MASK at t = 1 and walk t -> s on a uniform grid. Each masked
    token is revealed with probability (t - s)/t (the exact reverse posterior; at s = 0 all are) and
    then drawn from p_theta(. | z_t); unmasked tokens never change. Token noise is drawn only at the
    revealed positions: (revealed, V) per step instead of (n, L, V)."""
    z = torch.full((n, L), V, dtype=torch.long, device=device)
    times = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    for t, s in zip(times[:-1].tolist(), times[1:].tolist()):
        reveal = (z == V) & (torch.rand(z.shape, dtype=torch.float64, generator=gen, device=device) < (t - s) / t)
        if reveal.any():
            logp = model(z)[reveal][:, :V].double().log_softmax(-1)  # (revealed, V)
            z[reveal] = gumbel_argmax(logp, gen)
    return z

# ----------------------------------------------------------------------------------------------
# one training run per (model, width, seed), evaluated every --eval_epochs epochs


def bits(nats):  # everything is computed in nats and reported in bits
    return nats / math.log(2)


def build(kind, cfg, V, d):
    torch.manual_seed(cfg.seed)  # same init for AR and MDLM at each width: only the mask differs
    rows = V + 1
    if cfg.gpu:  # GPT-2's 50257 + 1 rows padded to 50304 = 64 x 786 for tensor-core shapes (never predicted)
        rows = -(-rows // 64) * 64
    return TransformerLM(rows, cfg.n_layer, cfg.n_head, d, causal=(kind == "ar"))


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
    """dict(bpt, se, err, per_seq) of one data set in bits/token: exact NLL for AR (se = 0), the
    k-form NELBO for MDLM (se: its Monte-Carlo error on this fixed set); per_seq (n,) per sequence."""
    if kind == "ar":
        dev = next(model.parameters()).device
        nll, correct = zip(*(ar_nll(model, x[i:i + batch].to(dev), V) for i in range(0, len(x), batch)))
        per_seq = torch.cat(nll).double().mean(1).cpu()
        return dict(bpt=bits(float(per_seq.mean())), se=0.0, err=1 - float(torch.cat(correct).float().mean()),
                    per_seq=bits(per_seq))
    r = nelbo_kform(model, x, V, repeats, gen, batch)
    return dict(bpt=bits(r["mean"]), se=bits(r["se"]), err=r["err"], per_seq=bits(r["per_seq"]))


def run_one(kind, d, cfg, ctx, data, V):
    """Train one model for cfg.epochs true epochs (cfg.seed is this run's seed). Returns its records
    (one per evaluated epoch), the epoch selected on validation with its test loss re-scored, the
    weights of that epoch, the final model and the training throughput."""
    model = build(kind, cfg, V, d)
    per_epoch, rows = epoch_batches(cfg, len(data["train"]))
    # train.py counts optimizer steps: the run length and the evaluation cadence are set in steps so
    # that evaluations land exactly on epoch boundaries (one run per width, no retraining)
    run_cfg = dataclasses.replace(cfg, max_steps=per_epoch * cfg.epochs, eval_every=per_epoch * cfg.eval_epochs,
                                  log_every=per_epoch)
    tag = f"{kind}_d{d}_s{cfg.seed}"
    ckpt, best_path = Path(cfg.out) / f"ckpt_{tag}.pt", Path(cfg.out) / f"best_{tag}.pt"
    # The selected epoch's weights live in their own checksummed file, written whenever validation
    # improves (always before the checkpoint that records that evaluation), so a resumed run selects
    # and re-scores exactly what the uninterrupted one would have.
    best = load_saved(best_path) if cfg.resume and ckpt.exists() and best_path.exists() else {}
    eval_time = [0.0]

    def eval_fn(m, step):
        t0, row = time.time(), dict(epoch=step // per_epoch)
        for i, split in enumerate(("train", "val", "test")):
            # the same masks at every evaluation (common random numbers): epoch-to-epoch differences
            # then come from the weights, not the MC draw, and the best epoch is picked fairly
            gen = torch.Generator().manual_seed(cfg.seed * 7919 + i)
            r = evaluate(kind, m, data[split], V, cfg.eval_repeats, gen, cfg.eval_batch)
            row.update({f"{split}_bpt": r["bpt"], f"{split}_se": r["se"], f"{split}_err": r["err"]})
        if row["val_bpt"] < best.get("val_bpt", math.inf):
            best.update(epoch=row["epoch"], val_bpt=row["val_bpt"],
                        state={k: v.detach().cpu().clone() for k, v in m.state_dict().items()})
            if ctx.master:
                atomic_save(best, best_path)
        eval_time[0] += time.time() - t0
        return row

    summary = train(model, lambda i: data["train"][rows(i)], loss_fn_for(kind, V, cfg.eps), run_cfg, ctx,
                    eval_fn=eval_fn, ckpt_path=ckpt, desc=f"{kind} d={d} seed {cfg.seed}")
    by_epoch = {e["epoch"]: e for e in summary["evals"]}  # a resumed run re-evaluates its last epoch
    params = count_params(model)
    records = [dict(model=kind, width=d, seed=cfg.seed, params=params, **{k: v for k, v in e.items() if k != "step"})
               for _, e in sorted(by_epoch.items())]
    chosen = min(records, key=lambda r: r["val_bpt"])  # the first epoch with the lowest validation loss
    if best.get("epoch") != chosen["epoch"]:
        raise DataError(f"{best_path} does not hold epoch {chosen['epoch']}, the best on validation; delete "
                        f"it and {ckpt.name} to train this run again")
    # tokens trained in this process (none when --resume found the run finished), evaluation excluded
    trained = summary["items_per_s"] * summary["seconds"]
    tok_s = trained / max(summary["seconds"] - eval_time[0], 1e-9) if trained else None
    # The test loss at the selected epoch is scored again with --final_repeats fresh k-form samples
    # per sequence (AR: the same exact NLL), for a small Monte-Carlo error and per-sequence values.
    selected = build(kind, cfg, V, d).to(ctx.device)
    selected.load_state_dict(best["state"])
    with torch.no_grad(), ctx.autocast():
        r = evaluate(kind, selected.eval(), data["test"], V, cfg.final_repeats,
                     torch.Generator().manual_seed(cfg.seed * 7919 + 10**6), cfg.eval_batch)
    pick = dict(model=kind, width=d, seed=cfg.seed, params=params, epoch=chosen["epoch"], val_bpt=chosen["val_bpt"],
                test_bpt=r["bpt"], test_se=r["se"], test_err=r["err"], per_seq=r["per_seq"].tolist())
    # kept for the bound at the selected point and for samples, off the GPU until then
    return dict(records=records, pick=pick, selected=selected.cpu(), final=model.eval().cpu(), tok_s=tok_s)


def sweep(cfg, ctx, data, V):
    """Every (seed, model, width) run; one checkpoint each, so --resume skips finished runs and
    continues a cut-off one."""
    return {(s, k, d): run_one(k, d, dataclasses.replace(cfg, seed=s), ctx, data, V)
            for s in range(cfg.seed, cfg.seed + cfg.seeds) for k in cfg.model_list for d in cfg.width_list}

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
    d = min(first)
    return dict(width=d, params=first[d]["params"], epoch=first[d]["epoch"], located=d > min(widths)), first


def ar_first(a, m):
    """Does AR reach its threshold at a smaller width, or at the same width in fewer epochs?
    None when neither model interpolated."""
    if a is None and m is None:
        return None
    key = lambda thr: (thr["width"], thr["epoch"]) if thr else (math.inf, math.inf)
    return key(a) < key(m)


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


def seeds_interval(values, per_seq):
    """Mean over seeds of a test loss (or a difference of two) and its 95% interval. The test set
    is the same for every seed, so its sampling error does not average out: the standard error
    of the seed-averaged per-sequence values enters mean_interval as the error all seeds share."""
    seqs = torch.tensor(per_seq, dtype=torch.float64).mean(0)  # (n,)
    test_se = math.sqrt(float(seqs.var()) / len(seqs))
    mean, half = mean_interval(values, shared_se=test_se)
    return dict(mean=mean, half=half, test_se=test_se, seeds=len(values))


def pick_model(runs, seed, kind, widths):
    """The selected point of one model in one seed: the width (and its epoch) with the lowest
    validation loss; its test loss is what gets reported."""
    return min((runs[seed, kind, d]["pick"] for d in widths), key=lambda p: p["val_bpt"])


def bound_slack(cfg, ctx, runs, data, V, seed, width):
    """At MDLM's selected (width, epoch) of one seed: the NELBO and the importance-weighted bound
    over --iw_orders random orders, on the same orders, per test sequence in bits/token. Their
    difference is a lower bound on the NELBO's slack (the true NLL is lower than both)."""
    model = runs[seed, "mdlm", width]["selected"].to(ctx.device)
    with torch.no_grad(), ctx.autocast():
        nelbo, iw = order_bounds(model, data["test"], V, cfg.iw_orders,
                                 torch.Generator().manual_seed(seed * 7919 + 2 * 10**6), cfg.eval_batch)
    model.cpu()
    return dict(nelbo=bits(float(nelbo.mean())), iw=bits(float(iw.mean())), slack=bits(float((nelbo - iw).mean())),
                slack_se=bits(float((nelbo - iw).std() / math.sqrt(len(iw)))), iw_per_seq=bits(iw).tolist())


def summarise(cfg, ctx, runs, data, V, floor):
    """Everything the report prints and results.json keeps, computed from the runs."""
    kinds, widths, seeds = cfg.model_list, cfg.width_list, list(range(cfg.seed, cfg.seed + cfg.seeds))
    recs = {(s, k): [r for d in widths for r in runs[s, k, d]["records"]] for s in seeds for k in kinds}
    tols = (cfg.tol / 2, cfg.tol, 2 * cfg.tol)
    epochs = sorted({r["epoch"] for r in recs[seeds[0], kinds[0]]})
    out = dict(seeds=seeds, tols=tols, models={})
    for k in kinds:
        picks = [pick_model(runs, s, k, widths) for s in seeds]
        # dips of a few hundredths of a bit are within run-to-run noise (and the paper's inset
        # effects are that size), so a rise or fall must exceed 0.1 bits plus twice the MC error
        margin = 0.1 + 2 * max(r["test_se"] for s in seeds for r in recs[s, k])
        out["models"][k] = dict(
            thresholds={tol: [interpolation(recs[s, k], floor, tol, widths)[0] for s in seeds] for tol in tols},
            first_epoch=[{d: r["epoch"] for d, r in interpolation(recs[s, k], floor, cfg.tol, widths)[1].items()}
                         for s in seeds],
            picks=[{key: v for key, v in p.items() if key != "per_seq"} for p in picks],
            best=seeds_interval([p["test_bpt"] for p in picks], [p["per_seq"] for p in picks]),
            per_width={d: [runs[s, k, d]["pick"]["test_bpt"] for s in seeds] for d in widths},
            last_epoch={d: [next(r["test_bpt"] for r in recs[s, k] if r["width"] == d and r["epoch"] == epochs[-1])
                            for s in seeds] for d in widths},
            modelwise=[second_descent([next(r["test_bpt"] for r in recs[s, k] if r["width"] == d and r["epoch"] == epochs[-1])
                                       for d in widths], margin) for s in seeds],
            epochwise=[{d: second_descent([r["test_bpt"] for r in recs[s, k] if r["width"] == d], margin, smooth=5)
                        for d in widths} for s in seeds],
            tokens_per_s={d: runs[seeds[0], k, d]["tok_s"] for d in widths})
        out["models"][k]["_per_seq"] = [p["per_seq"] for p in picks]
    if {"ar", "mdlm"} <= set(kinds):
        a, m = out["models"]["ar"], out["models"]["mdlm"]
        out["threshold_verdicts"] = {tol: [ar_first(x, y) for x, y in zip(a["thresholds"][tol], m["thresholds"][tol])]
                                     for tol in tols}
        out["both_located"] = {tol: [bool(x and y and x["located"] and y["located"])
                                     for x, y in zip(a["thresholds"][tol], m["thresholds"][tol])] for tol in tols}
        out["difference"] = seeds_interval([p["test_bpt"] - q["test_bpt"] for p, q in zip(a["picks"], m["picks"])],
                                           [[x - y for x, y in zip(p, q)] for p, q in zip(a["_per_seq"], m["_per_seq"])])
        slack = [bound_slack(cfg, ctx, runs, data, V, s, p["width"]) for s, p in zip(seeds, m["picks"])]
        if all(slack):
            out["slack"] = dict(nelbo=sum(x["nelbo"] for x in slack) / len(slack), iw=sum(x["iw"] for x in slack) / len(slack),
                                slack=sum(x["slack"] for x in slack) / len(slack), per_seed=[x["slack"] for x in slack],
                                slack_se=max(x["slack_se"] for x in slack), orders=cfg.iw_orders)
            out["difference_iw"] = seeds_interval(
                [p["test_bpt"] - x["iw"] for p, x in zip(a["picks"], slack)],
                [[u - w for u, w in zip(p, x["iw_per_seq"])] for p, x in zip(a["_per_seq"], slack)])
        curves = [c for s in (a, m) for c in s["modelwise"]] + [v for s in (a, m) for e in s["epochwise"] for v in e.values()]
        out["no_pronounced_second_descent"] = not any(pronounced(v) for v in curves)
    for k in kinds:
        del out["models"][k]["_per_seq"]
    return out


def lower_verdict(iv):
    """AR minus MDLM with its 95% interval: a test that can say yes, no, or not resolved."""
    if iv["mean"] + iv["half"] < 0:
        return "YES"
    return "NO (MDLM lower)" if iv["mean"] - iv["half"] > 0 else "NOT RESOLVED (interval spans 0)"


def log_spaced(epochs, n):
    """About n roughly log-spaced entries of a sorted list, always including the first and last."""
    idx = {round((len(epochs) - 1) * (i / (n - 1)) ** 2) for i in range(n)} if len(epochs) > 1 else {0}
    return [epochs[i] for i in sorted(idx)]

# ----------------------------------------------------------------------------------------------
# report: tables of the first seed, thresholds of every seed, the headline with its interval


def where(thr, epochs):
    if thr is None:
        return f"none within {epochs} epochs"
    return f"d={thr['width']}@{thr['epoch']}" + ("" if thr["located"] else " (smallest width tried: not located)")


def print_tables(cfg, runs, floor):
    kinds, widths, s = cfg.model_list, cfg.width_list, cfg.seed
    look = {(r["model"], r["width"], r["epoch"]): r for k in kinds for d in widths for r in runs[s, k, d]["records"]}
    shown = log_spaced(sorted({e for _, _, e in look}), 8)
    print(f"\nbits/token, seed {s} (MDLM: k-form NELBO, an upper bound; AR: exact NLL). floor = {floor:.3f}")
    print("params: " + ", ".join(f"d={d}: {look[kinds[0], d, shown[0]]['params']:,}" for d in widths)
          + " (identical for AR and MDLM)")
    head = "/".join(str(d) for d in widths)
    for key in ("test_bpt", "train_bpt"):
        print(f"\n{key.split('_')[0]:5s} | " + " | ".join(f"{k.upper():4s} d = {head}" for k in kinds))
        for e in shown:
            cells = ["/".join(f"{look[k, d, e][key]:.2f}" for d in widths) for k in kinds]
            print(f"{e:5d} | " + " | ".join(f"{c:>{8 + len(head)}s}" for c in cells))


def report(cfg, summary, floor):
    """The paper's claims, each read off the numbers, with every comparison's caveat."""
    kinds, widths, seeds, tols = cfg.model_list, cfg.width_list, summary["seeds"], summary["tols"]
    M = summary["models"]
    fmt_sd = lambda v: (f"{'PRONOUNCED' if pronounced(v) else 'weak'} ({v[0]:.2f} up, {v[1]:.2f} down)" if v else "no")
    print(f"\ninterpolation: train <= floor + tol = {floor:.3f} + {cfg.tol} bits/token; threshold = the smallest"
          f" width that interpolates within {cfg.epochs} epochs, 'width@epoch', per seed {seeds}:")
    for tol in tols:
        print(f"  tol {tol:<6g} " + " | ".join(f"{k.upper():4s} " + ", ".join(where(t, cfg.epochs) for t in M[k]["thresholds"][tol])
                                            for k in kinds))
    for k in kinds:
        print(f"  {k.upper():4s} first interpolating epoch per width (tol {cfg.tol}): "
              + "; ".join(f"seed {s}: " + (", ".join(f"d={d}@{e}" for d, e in sorted(f.items())) or "-")
                          for s, f in zip(seeds, M[k]["first_epoch"])))
    print(f"\nbest test loss (epoch and width picked on {cfg.n_val or 'half the'} validation sequences; test re-scored at "
          f"that epoch{', MDLM with ' + str(cfg.final_repeats) + ' k-form samples per sequence' if 'mdlm' in kinds else ''}):")
    for k in kinds:
        b = M[k]["best"]
        print(f"  {k.upper():4s} {b['mean']:.3f} +- {b['half']:.3f} (95%: {b['seeds']} seed(s), test-set SE "
              f"{b['test_se']:.3f})"
              + (" [upper bound: NELBO]" if k == "mdlm" else " [exact NLL]") + "; per seed: "
              + ", ".join(f"{p['test_bpt']:.3f} (d={p['width']}@{p['epoch']})" for p in M[k]["picks"]))
        print("       per width (selected epoch, mean over seeds): " + ", ".join(
            f"d={d}: {sum(v) / len(v):.3f}" for d, v in M[k]["per_width"].items()))
    for k in kinds:
        last = {d: sum(v) / len(v) for d, v in M[k]["last_epoch"].items()}
        print(f"  {k.upper():4s} at the last epoch, test per width: " + "/".join(f"{v:.2f}" for v in last.values())
              + f"; second descent vs width (last epoch): {', '.join(fmt_sd(v) for v in M[k]['modelwise'])}; vs epoch: "
              + "; ".join(f"d={d}: " + ", ".join(fmt_sd(e[d]) for e in M[k]["epochwise"]) for d in widths))
    if "difference" not in summary:
        return
    print(f"\nverdict (paper: AR interpolates at a smaller width / fewer epochs and has the lower best test loss), "
          f"over {len(seeds)} seed(s):")
    yes = lambda v: sum(1 for x in v if x)
    for tol in tols:
        v, loc = summary["threshold_verdicts"][tol], summary["both_located"][tol]
        print(f"  tol {tol:<6g} AR's threshold at a smaller width or earlier: {yes(v)}/{len(v)} seeds"
              f" (both thresholds located in {yes(loc)}/{len(loc)})")
    dif = summary["difference"]
    print(f"  AR's best test loss lower: {lower_verdict(dif)}: AR - MDLM = {dif['mean']:+.3f} +- {dif['half']:.3f} bits/token"
          " (95%, paired over test sequences and seeds; MDLM's number is an upper bound)")
    if "slack" in summary:
        sl, di = summary["slack"], summary["difference_iw"]
        print(f"  MDLM bound at its selected point, {sl['orders']} random orders: NELBO {sl['nelbo']:.3f}, importance-"
              f"weighted {sl['iw']:.3f}; slack >= {sl['slack']:.3f} +- {2 * sl['slack_se']:.3f} bits/token (the true NLL is lower still)")
        print(f"  against the tighter bound: AR - MDLM(IW) = {di['mean']:+.3f} +- {di['half']:.3f}: {lower_verdict(di)}")
    print(f"  No pronounced second descent in either model (paper: none): "
          f"{'YES' if summary['no_pronounced_second_descent'] else 'NO'}")
    print("\ntraining throughput, tokens/s (evaluation time excluded): " + "; ".join(
        f"{k.upper()} " + "/".join(f"{v:,.0f}" if v else "-" for v in M[k]["tokens_per_s"].values()) for k in kinds)
        + " for d = " + "/".join(map(str, widths)))


def draw_samples(cfg, ctx, runs, V, decode):
    """A few samples of each widest final model (an AR model past interpolation mostly replays
    training text); the noise comes from a generator on the model's device."""
    d, samples = cfg.width_list[-1], {}
    for k in cfg.model_list:
        m, gen = runs[cfg.seed, k, d]["final"].to(ctx.device), torch.Generator(device=ctx.device).manual_seed(cfg.seed)
        out = (sample_ar(m, V, cfg.n_samples, cfg.seq_len, gen) if k == "ar" else
               sample_mdlm(m, V, cfg.n_samples, cfg.seq_len, cfg.sample_steps, gen, ctx.device))
        samples[k] = [decode(s.tolist()) for s in out.cpu()]
        print(f"\nsamples, {k.upper()} d={d}:")
        for s in samples[k]:
            print("  " + repr(s))
    return samples

# ----------------------------------------------------------------------------------------------
# figures (matplotlib optional), of the first seed


def plot(cfg, records, floor):
    kinds, widths = cfg.model_list, cfg.width_list
    records = [r for r in records if r["seed"] == cfg.seed]
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
        fig.suptitle(f"{cfg.data}: N={cfg.n_train or 'all'} x L={cfg.seq_len}, noise={cfg.noise}, seed {cfg.seed}")
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
        data, V, decode = make_data(cfg)
        epoch_batches(cfg, len(data["train"]))  # refuses a batch larger than the training set, before any work
    except ValueError as e:  # the user's flags or file: too little text, not text at all, no such file
        die(str(e), 2)
    except (OSError, RuntimeError) as e:  # a failed download or tokenizer (DataError)
        die(str(e))
    if cfg.bench:
        return bench(cfg, ctx, V)
    floor = memorisation_floor(data["train"])  # what a perfect memoriser scores on train, for both models
    print(f"data {cfg.data} ({cfg.tokenizer}, V={V}): {len(data['train'])} train x {cfg.seq_len} tokens, "
          f"{len(data['val'])} validation, {len(data['test'])} test; floor log2(N)/L = {floor:.4f} bits/token; "
          f"{cfg.epochs} epochs of {len(data['train']) // cfg.batch_size} steps; widths {cfg.width_list}; "
          f"{cfg.n_layer} layers, {cfg.n_head} heads; seeds {cfg.seed}..{cfg.seed + cfg.seeds - 1}")
    t_start = time.time()
    runs = sweep(cfg, ctx, data, V)
    summary = summarise(cfg, ctx, runs, data, V, floor)
    print_tables(cfg, runs, floor)
    report(cfg, summary, floor)
    samples = draw_samples(cfg, ctx, runs, V, decode)
    records = [r for run in runs.values() for r in run["records"]]
    path = save_results(cfg, ctx, dict(vocab=V, n_train=len(data["train"]), n_val=len(data["val"]),
                                       n_test=len(data["test"]), floor_bpt=floor, records=records,
                                       summary=summary, samples=samples, seconds=time.time() - t_start))
    figs = plot(cfg, records, floor) if ctx.master else []
    print(f"\nwrote {path}" + "".join(f", {f}" for f in figs if f) + f" in {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    cli(main)
