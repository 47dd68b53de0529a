"""
diffusion_vs_ar.py: double descent as a lens on the sample efficiency of autoregressive (AR) vs
masked-diffusion (MDLM) language models, after Fraij & Dauncey (arXiv 2509.24974). The claim: on
a small data set masked diffusion needs more width and more epochs than AR to reach the
interpolation threshold (where a model memorises its training set), AR reaches the lower best test
loss, and far past the threshold neither shows a pronounced second descent.

The method in one screen. Both models are train.py's TransformerLM with one extra token id (BOS
for AR, MASK for MDLM): the same parameters, only the attention mask differs (causal or full).
  AR    ar_nll: the exact NLL, -log p(x) = sum_l -log p(x_l | BOS, x_<l).
  MDLM  mdlm_nelbo_at: mask each token with probability t (alpha_t = 1 - t), never predict MASK,
        copy the unmasked tokens (SUBS), and train on the continuous-time NELBO
            L(x) = E_t [ (1/t) sum_{masked l} -log p(x_l | z_t) ] >= -log p(x),
        t antithetic over the batch and clipped at eps (antithetic_times).
        nelbo_kform scores it with t integrated out (RADD, arXiv 2406.03736):
            L(x) / L = E_{k ~ U{1..L}} E_{|S| = k} [ (1/k) sum_{l in S} -log p(x_l | x without S) ],
        k stratified per sequence; order_bounds gives a tighter, importance-weighted bound.
        sample_mdlm and sample_ar draw in float64.
A memoriser of N sequences of length L scores log2(N)/L bits/token (memorisation_floor); a model
interpolates at train <= floor + --tol, its threshold is the smallest such width (interpolation);
unigram_baseline is what ignoring context scores.

Run `python diffusion_vs_ar.py` (offline, about five minutes on 2 CPU cores; --seeds=3 for the
intervals); `--gpu` is the paper's scale (Tiny Shakespeare, GPT-2 BPE, 12 layers, length 512).
"""
import dataclasses, math, time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from train import (TrainConfig, parse_config, setup, die, fill_auto, TransformerLM, count_params,
                   train, save_results, save_figure, embedded_text, download, cli,
                   DataError, atomic_save, load_saved, mean_interval, to_host)


@dataclass
class Config(TrainConfig):
    data: str = "auto"  # prose | tinyshakespeare | a text file (auto: prose, --gpu tinyshakespeare)
    tokenizer: str = "auto"  # char | gpt2 (tiktoken's BPE) (auto: char; --gpu: gpt2)
    models: str = "ar,mdlm"  # which objectives to train: ar, mdlm or both
    widths: str = ""  # comma-separated model widths (empty: 8,16,32,64; --gpu: 96,192,384,768)
    n_layer: int = 0  # Transformer blocks (0: 2; --gpu: 12)
    n_head: int = 0  # attention heads, the same at every width (0: 2; --gpu: 12)
    seq_len: int = 0  # tokens per sequence L (0: 32; --gpu: 512)
    n_train: int = 0  # training sequences N (0: 128; --gpu: all the training text gives)
    n_val: int = 0  # validation sequences, to pick the best epoch (0: 128; --gpu: half held-out)
    n_test: int = 0  # test sequences, after the validation ones (0: 128; --gpu: the other half)
    epochs: int = 0  # passes over the training set (0: 600; --gpu: 50)
    eval_epochs: int = 0  # epochs between evaluations (0: 20; --gpu: 1)
    seeds: int = 1  # independent runs of the whole sweep, seeds --seed .. --seed + seeds - 1
    batch_size: int = 0  # sequences per optimizer step (0: 32; --gpu: 12)
    lr: float = 0.0  # peak learning rate, constant after warm-up (0: 1e-3; --gpu: 6e-4)
    warmup: int = 10  # linear warm-up steps
    min_lr_ratio: float = 1.0  # cosine end point as a fraction of lr (1: constant, as designed)
    weight_decay: float = 0.0  # AdamW weight decay (0: nothing should stop memorisation)
    tol: float = 0.5  # a model interpolates at train bits/token <= floor + tol (also tol/2, 2 tol)
    eps: float = 1e-3  # MDLM: smallest masking time t (the 1/t weight diverges at 0)
    eval_masks: int = 0  # MDLM: k-form masks per sequence per evaluation, even (0: 8; --gpu: 16)
    final_masks: int = 0  # MDLM: masks per test sequence at the selected epoch (0: 32; --gpu: 64)
    iw_orders: int = 0  # MDLM: orders of the importance-weighted bound (0: 16; --gpu: 4)
    eval_batch: int = 0  # sequences per forward pass in evaluation (0: 512; --gpu: 16)

    unused = ("max_steps", "eval_every", "log_every")  # set per run from --epochs, --eval_epochs

    def __post_init__(self):
        super().__post_init__()
        fill_auto(self, data=("prose", "tinyshakespeare"), tokenizer=("char", "gpt2"),
                  widths=("8,16,32,64", "96,192,384,768"), n_layer=(2, 12), n_head=(2, 12),
                  seq_len=(32, 512), n_train=(128, 0), n_val=(128, 0), n_test=(128, 0),
                  epochs=(600, 50), eval_epochs=(20, 1), batch_size=(32, 12), lr=(1e-3, 6e-4),
                  eval_masks=(8, 16), final_masks=(32, 64), iw_orders=(16, 4), eval_batch=(512, 16))
        models = self.model_list
        if not models or set(models) - {"ar", "mdlm"} or len(set(models)) < len(models):
            raise ValueError(f"--models must list ar, mdlm or both, once each; got {self.models!r}")
        try:
            widths = self.width_list
        except ValueError:
            raise ValueError(f"--widths must be comma-separated integers: {self.widths}") from None
        for width in widths:  # RoPE rotates pairs, so every head needs an even size
            if width <= 0 or width % self.n_head or (width // self.n_head) % 2:
                raise ValueError(f"width {width} must be a positive multiple of 2 x n_head = "
                                 f"{2 * self.n_head}")
        if self.tokenizer not in ("char", "gpt2") or self.tol <= 0 or not 0 < self.eps < 1:
            raise ValueError("--tokenizer must be char or gpt2, --tol > 0 and --eps in (0, 1)")
        if self.eval_masks % 2 or self.final_masks % 2:
            raise ValueError("--eval_masks and --final_masks must be even (pairs of masks)")
        if self.seq_len < 2 or self.seeds < 1:
            raise ValueError("--seq_len must be >= 2 and --seeds >= 1")
        if self.seed + self.seeds > 2**32:  # checked before any seed trains
            raise ValueError(f"--seed + --seeds - 1 = {self.seed + self.seeds - 1} is not < 2^32")

    @property
    def model_list(self):
        return [m.strip() for m in self.models.split(",") if m.strip()]

    @property
    def width_list(self):
        return sorted({int(w) for w in self.widths.split(",") if w.strip()})

# ---- the two objectives. `model` maps (B, L) ids to (B, L, rows > V) logits; columns from V on
# (BOS/MASK, padding) are sliced off (SUBS for MDLM). Evaluation returns device tensors.


def ar_nll(model, x, V):
    """Exact per-token NLL (nats) of the AR model, (B, L). x: (B, L)."""
    bos = torch.full_like(x[:, :1], V)
    logits = model(torch.cat([bos, x[:, :-1]], 1))[..., :V].float()  # (B, L, V): l predicts x_l
    return F.cross_entropy(logits.transpose(1, 2), x, reduction="none")


def masked_nll(model, x, masked, V):
    """-log p_theta(x_l | z) in nats at masked positions, exactly 0 (no gradient) elsewhere:
    SUBS's carry-over of unmasked tokens. x, masked: (B, L)."""
    z = torch.where(masked, V, x)  # (B, L) the partially masked input
    logits = model(z)[..., :V].float()  # (B, L, V) never predicts MASK
    return torch.where(masked, F.cross_entropy(logits.transpose(1, 2), x, reduction="none"), 0.0)


def mdlm_nelbo_at(model, x, V, t, u=None):
    """One-sample NELBO per sequence in nats/token at masking times t (B,): (1/t) * the masked
    tokens' NLL / L, L(x) / L on average over t. u (B, L): the mask's uniforms, if given."""
    u = torch.rand(x.shape, device=x.device) if u is None else u
    masked = u < t[:, None]  # (B, L) each token masked w.p. t
    return masked_nll(model, x, masked, V).sum(1) / t / x.shape[1]  # (B,)


def antithetic_times(B, eps, device):
    """t_i = (u + i/B) mod 1 for one u: the batch covers [0, 1) evenly (less variance than iid),
    squashed into [eps, 1] because the 1/t weight blows up near 0."""
    t = (torch.rand(1, device=device) + torch.arange(B, device=device) / B) % 1
    return (1 - eps) * t + eps


def device_of(model, x):
    if isinstance(model, torch.nn.Module):
        return next(iter(model.parameters())).device
    return x.device


def nelbo_kform(model, x, V, masks, gen, batch=512):
    """The k-form NELBO (nats/token) of x (n, L) from `masks` masks per sequence, in pairs: pair p
    draws k from the p-th of masks/2 equal slices of U{1..L} (stratified: with masks = 2L each k
    gets two), each hiding a random k-subset. Returns the mean, its Monte-Carlo standard error on
    this fixed set and the per-sequence estimates (n,). The masks come from `gen` on the CPU: the
    same on every device, and the training RNG is left alone."""
    n, L = x.shape
    device, pairs = device_of(model, x), masks // 2
    stratum = torch.arange(masks) // 2  # (masks,) the slice of U{1..L} each mask draws k from
    k = ((stratum + torch.rand((n, masks), generator=gen)) / pairs * L).long() + 1  # (n, masks)
    rank = torch.rand((n, masks, L), generator=gen).argsort(-1).argsort(-1)  # random ranks
    hidden = (rank < k[..., None]).view(-1, L).to(device)  # (n * masks, L): k positions each
    rows = x.to(device).repeat_interleave(masks, 0)  # (n * masks, L): row i is sequence i // masks
    k = k.view(-1).to(device)
    estimates = torch.cat([masked_nll(model, rows[i:i + batch], hidden[i:i + batch], V).double()
                           .sum(1) / k[i:i + batch] for i in range(0, len(rows), batch)])
    estimates = estimates.view(n, pairs, 2)
    # a pair's masks are independent draws from one slice: (a - b)^2 / 4 estimates the variance
    # of their mean, and pairs and sequences add independently
    variance = ((estimates[..., 0] - estimates[..., 1]) ** 2 / 4).sum() / (pairs * n) ** 2
    return dict(mean=estimates.mean(), se=variance.sqrt(), per_seq=estimates.mean((1, 2)))


def order_bounds(model, x, V, orders, gen, batch=512):
    """The denoiser as an any-order AR model: for K random orders sigma per sequence, log
    p_sigma(x) = sum_i log p(x_sigma(i) | x_sigma(<i)) (L forwards each). -mean_K log p_sigma / L
    estimates the NELBO (the k-form on average); -log mean_K p_sigma / L is an importance-weighted
    bound >= -log p(x) / L, tighter as K grows (p(x) = E_sigma p_sigma(x) is the sampler's
    likelihood). Returns per-sequence (nelbo, iw), nats/token, (n,) each."""
    n, L = x.shape
    device = device_of(model, x)
    order = torch.rand((orders * n, L), generator=gen).argsort(1)  # sigma: positions, reveal order
    rank = order.argsort(1).to(device)  # (K*n, L) when each position is revealed
    order, rows = order.to(device), x.to(device).repeat(orders, 1)  # copy r of j: row r*n + j
    logp = torch.zeros(len(rows), dtype=torch.float64, device=device)
    for i in range(L):  # step i: the first i positions of sigma are visible, predict sigma(i)
        for j in range(0, len(rows), batch):
            part = slice(j, j + batch)
            nll = masked_nll(model, rows[part], rank[part] >= i, V)  # (b, L)
            logp[part] -= nll.gather(1, order[part, i:i + 1])[:, 0].double()
    logp = logp.view(orders, n)  # (K, n)
    return -logp.mean(0) / L, -(logp.logsumexp(0) - math.log(orders)) / L

# ---- samplers, in float64 (float32 Gumbel noise lowers the temperature, arXiv 2409.02908), all
# on the model's device: no step waits for the host


def gumbel_argmax(logp, gen):
    """A draw from Categorical(exp(logp)) per row, by the Gumbel-max trick."""
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
    """From all-MASK at t = 1, walk t -> s on a uniform grid: each masked token is revealed with
    probability (t - s)/t (the exact reverse posterior) and drawn from p(. | z_t). Every position
    draws, the revealed keep it: no data-dependent shapes, no host sync."""
    device = device_of(model, None)
    z = torch.full((n, L), V, dtype=torch.long, device=device)
    times = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
    for t, s in zip(times[:-1], times[1:]):
        chance = torch.rand(z.shape, dtype=torch.float64, generator=gen, device=device)
        reveal = (z == V) & (chance < (t - s) / t)
        logp = model(z)[..., :V].double().log_softmax(-1)  # (n, L, V)
        z = torch.where(reveal, gumbel_argmax(logp, gen), z)
    return z

# ---- the lens: the memorisation floor, a context-free baseline, the interpolation threshold


def memorisation_floor(x):
    """A perfect memoriser's bits/token: the training sequences' entropy / L (log2(N)/L)."""
    _, counts = torch.unique(x, dim=0, return_counts=True)
    p = counts.double() / counts.sum()
    return float(-(p * p.log2()).sum()) / x.shape[1]


def unigram_baseline(data, V):
    """What ignoring context scores: training-token frequencies, add-alpha smoothed with the
    alpha that is best on validation. Bits/token on each split."""
    counts = torch.bincount(data["train"].flatten(), minlength=V).double()

    def score(alpha, split):
        log_p = ((counts + alpha) / (counts.sum() + alpha * V)).log2()
        return float(-log_p[data[split].flatten()].mean())
    alpha = min((0.01, 0.03, 0.1, 0.3, 1.0, 3.0), key=lambda a: score(a, "val"))
    return dict(alpha=alpha, **{split: score(alpha, split) for split in ("train", "val", "test")})


def interpolation(records, floor, tol, widths):
    """A (model, width) interpolates at the first evaluated epoch with train bits/token <= floor
    + tol; the threshold is the smallest width that does, at its first such epoch, *located*
    when a smaller width of the sweep does not (else only bounded). None: no width does."""
    below = [r for r in records if r["train_bpt"] <= floor + tol]
    if not below:
        return None
    r = min(below, key=lambda r: (r["width"], r["epoch"]))
    return dict(width=r["width"], params=r["params"], epoch=r["epoch"], train_bpt=r["train_bpt"],
                train_se=r["train_se"], located=r["width"] > min(widths))


def ar_first(ar, mdlm):
    """AR's threshold at a smaller width, or the same in fewer epochs? None: neither has one."""
    if ar is None and mdlm is None:
        return None
    key = lambda found: (found["width"], found["epoch"]) if found else (math.inf, math.inf)
    return key(ar) < key(mdlm)

# ---- data: N distinct training sequences, validation and test sets, as (n, L) token tensors


def load_text(cfg):
    """(train_text, held_out_text); files keep the paper's split: first 90% / last 10%."""
    if cfg.data == "prose":
        return embedded_text("train").decode("utf-8"), embedded_text("val").decode("utf-8")
    path = download(cfg.data, cfg.data_dir) if cfg.data == "tinyshakespeare" else Path(cfg.data)
    if not path.is_file():
        raise ValueError(f"--data: no such file {cfg.data!r} (or use prose, tinyshakespeare)")
    try:  # a binary file would otherwise train on U+FFFD replacement characters without a word
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        text = "\x00"
    if "\x00" in text:
        raise ValueError(f"--data={cfg.data} is not UTF-8 text: give a text file")
    cut = int(0.9 * len(text))
    return text[:cut], text[cut:]


def tokenize(cfg, train_text, test_text):
    """Token id lists, the vocabulary size V (id V is BOS/MASK) and a decoder."""
    if cfg.tokenizer == "char":  # every character of either split: no test character is unknown
        chars = sorted(set(train_text) | set(test_text))
        index = {c: i for i, c in enumerate(chars)}
        return ([index[c] for c in train_text], [index[c] for c in test_text], len(chars),
                lambda ids: "".join(chars[i] for i in ids))
    import tiktoken
    try:  # never a silent stand-in: a small BPE would be another experiment
        enc = tiktoken.get_encoding("gpt2")
    except Exception:
        raise DataError("tiktoken could not load GPT-2's BPE: connect once, or use "
                        "--tokenizer=char") from None
    return enc.encode_ordinary(train_text), enc.encode_ordinary(test_text), enc.n_vocab, enc.decode


def make_sequences(ids, n, L, distinct=False):
    """The first n non-overlapping windows of length L (n = 0: all). distinct: skip repeats
    (documentation repeats lines), so the training set is N *distinct* sequences."""
    windows = torch.tensor(ids[: len(ids) // L * L], dtype=torch.long).view(-1, L)  # (all, L)
    if distinct and n:
        seen, keep = set(), []
        for i, w in enumerate(map(tuple, windows.tolist())):
            if w not in seen and len(keep) < n:
                seen.add(w)
                keep.append(i)
        windows = windows[keep]
    if n > len(windows):
        raise ValueError(f"the text has only {len(windows)} sequences of length {L}, not {n}")
    return windows[: n or len(windows)]  # (n, L)


def make_data(cfg):
    """dict(train, val, test) of (n, L) tensors, V and a decoder; validation and test are
    consecutive windows of the held-out text. Seeds vary the initialisation, order and masks."""
    train_text, held_text = load_text(cfg)
    train_ids, held_ids, V, decode = tokenize(cfg, train_text, held_text)
    train_x = make_sequences(train_ids, cfg.n_train, cfg.seq_len, distinct=True)
    held = make_sequences(held_ids, 0, cfg.seq_len)
    n_val, n_test = cfg.n_val or len(held) // 2, cfg.n_test or len(held) // 2
    if n_val + n_test > len(held) or min(n_val, n_test) < 1:
        raise ValueError(f"the held-out text has {len(held)} sequences of length {cfg.seq_len}; "
                         f"--n_val={n_val} + --n_test={n_test} do not fit")
    return dict(train=train_x, val=held[:n_val], test=held[n_val:n_val + n_test]), V, decode

# ---- the experiment: one training run per (model, width, seed)


def bits(nats):  # everything is computed in nats and reported in bits
    return nats / math.log(2)


def build(kind, cfg, V, width):
    torch.manual_seed(cfg.seed)  # same init for AR and MDLM at each width: only the mask differs
    rows = V + 1
    if cfg.gpu:  # GPT-2's 50257 + 1 rows padded to 50304 = 64 x 786 for tensor cores (unused)
        rows = -(-rows // 64) * 64
    return TransformerLM(rows, cfg.n_layer, cfg.n_head, width, causal=(kind == "ar"))


def epoch_batches(cfg, N):
    """get_batch(i) for true epochs: each a fresh permutation of the N sequences in floor(N / B)
    whole batches (the N mod B left over change from epoch to epoch). Deterministic in i."""
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
    def ar_loss(model, x):
        return ar_nll(model, x, V).mean(), dict(items=x.numel())

    def mdlm_loss(model, x):  # x: (B, L) tokens, or dict(x, t, u) with the noise given
        if isinstance(x, dict):
            loss = mdlm_nelbo_at(model, x["x"], V, x["t"], x["u"])
            return loss.mean(), dict(items=x["x"].numel())
        times = antithetic_times(len(x), eps, x.device)
        return mdlm_nelbo_at(model, x, V, times).mean(), dict(items=x.numel())
    return ar_loss if kind == "ar" else mdlm_loss


def evaluate(kind, model, x, V, masks, gen, batch):
    """dict(bpt, se, per_seq) in bits/token on the device: AR's exact NLL (se = 0), or MDLM's
    k-form NELBO (se: its Monte-Carlo error on this fixed set)."""
    if kind == "mdlm":
        r = nelbo_kform(model, x, V, masks, gen, batch)
        return dict(bpt=bits(r["mean"]), se=bits(r["se"]), per_seq=bits(r["per_seq"]))
    x = x.to(device_of(model, x))
    nll = torch.cat([ar_nll(model, x[i:i + batch], V) for i in range(0, len(x), batch)])
    per_seq = bits(nll.double().mean(1))  # (n,)
    return dict(bpt=per_seq.mean(), se=torch.zeros_like(per_seq[0]), per_seq=per_seq)


def run_one(kind, width, cfg, ctx, data, V):
    """Train one model for cfg.epochs true epochs, evaluated on all three splits every
    --eval_epochs epochs (cfg.seed is this run's seed)."""
    model = build(kind, cfg, V, width)
    per_epoch, rows = epoch_batches(cfg, len(data["train"]))
    # this run's own config (--resume checks it), in steps: evaluations at epoch ends
    run_cfg = dataclasses.replace(cfg, models=kind, widths=str(width), seeds=1,
                                  max_steps=per_epoch * cfg.epochs, log_every=per_epoch,
                                  eval_every=per_epoch * cfg.eval_epochs)
    tag = f"{kind}_d{width}_s{cfg.seed}"
    ckpt, best_path = Path(cfg.out) / f"ckpt_{tag}.pt", Path(cfg.out) / f"best_{tag}.pt"
    # the best epoch's weights are saved when validation improves, before the checkpoint that
    # records it: a resumed run selects and re-scores what an uninterrupted one would have
    best = load_saved(best_path) if cfg.resume and ckpt.exists() and best_path.exists() else {}

    def eval_fn(model, step):
        scores = {}
        for i, split in enumerate(("train", "val", "test")):
            # the same masks at every evaluation (common random numbers): changes between
            # epochs come from the weights, not the draw
            gen = torch.Generator().manual_seed(cfg.seed * 7919 + i)
            r = evaluate(kind, model, data[split], V, cfg.eval_masks, gen, cfg.eval_batch)
            scores.update({f"{split}_bpt": r["bpt"], f"{split}_se": r["se"]})
        row = dict(epoch=step // per_epoch, **to_host(scores))  # one device sync
        if row["val_bpt"] < best.get("val_bpt", math.inf):
            state = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
            best.update(epoch=row["epoch"], val_bpt=row["val_bpt"], state=state)
            if ctx.master:
                atomic_save(best, best_path)
        return row

    result = train(model, lambda i: data["train"][rows(i)], loss_fn_for(kind, V, cfg.eps), run_cfg,
                   ctx, eval_fn=eval_fn, ckpt_path=ckpt, desc=f"{kind} d={width} seed {cfg.seed}")
    return select_and_rescore(kind, width, cfg, ctx, data, V, model, result["evals"], best)


def select_and_rescore(kind, width, cfg, ctx, data, V, model, evals, best):
    """A run's records and its pick: the epoch with the lowest validation loss, its test loss
    re-scored with --final_masks masks per sequence."""
    by_epoch = {e["epoch"]: e for e in evals}  # a resumed run evaluates its last one twice
    params = count_params(model)
    records = [dict(model=kind, width=width, seed=cfg.seed, params=params,
                    **{key: value for key, value in e.items() if key != "step"})
               for _, e in sorted(by_epoch.items())]
    chosen = min(records, key=lambda r: r["val_bpt"])  # the first with the lowest val loss
    if best.get("epoch") != chosen["epoch"]:
        raise DataError(f"{cfg.out}: best_{kind}_d{width}_s{cfg.seed}.pt is not epoch "
                        f"{chosen['epoch']}: delete it and its checkpoint")
    selected = build(kind, cfg, V, width).to(ctx.device)
    selected.load_state_dict(best["state"])
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + 10**6)
    with torch.no_grad(), ctx.autocast():
        r = evaluate(kind, selected.eval(), data["test"], V, cfg.final_masks, gen, cfg.eval_batch)
    test_bpt, test_se, *per_seq = torch.cat([r["bpt"][None], r["se"][None], r["per_seq"]]).tolist()
    pick = dict(model=kind, width=width, seed=cfg.seed, params=params, epoch=chosen["epoch"],
                val_bpt=chosen["val_bpt"], test_bpt=test_bpt, test_se=test_se, per_seq=per_seq)
    return dict(records=records, pick=pick, selected=selected.cpu(), final=model.eval().cpu())


# ---- below: statistics, report, figure: not needed to learn the paper -------------------------


def second_descent(records, widths, margin):
    """Figure 1's lens: test loss against width at each epoch; the largest rise above the running
    minimum then fall from the peak, both > margin bits (pronounced: fall >= rise / 4), or None."""
    found = []
    for epoch in sorted({r["epoch"] for r in records}):
        curve = [r["test_bpt"] for width in widths for r in records
                 if r["width"] == width and r["epoch"] == epoch]
        for peak in range(1, len(curve) - 1):
            rise, fall = curve[peak] - min(curve[:peak + 1]), curve[peak] - min(curve[peak:])
            if rise > margin and fall > margin:
                found.append(dict(rise=rise, fall=fall, epoch=epoch, pronounced=fall >= rise / 4))
    return max(found, key=lambda d: (d["pronounced"], d["fall"]), default=None)


def seeds_interval(values, per_seq):
    """Mean over seeds of a test loss (or difference) and its 95% interval: every seed scores the
    same test set, whose standard error enters mean_interval as the error all seeds share."""
    sequences = torch.tensor(per_seq, dtype=torch.float64).mean(0)  # (n,)
    test_se = math.sqrt(float(sequences.var()) / len(sequences))
    mean, half = mean_interval(values, shared_se=test_se)
    return dict(mean=mean, half=half, test_se=test_se, seeds=len(values))


def bound_slack(cfg, ctx, run, data, V):
    """MDLM's NELBO and importance-weighted bound per test sequence at one seed's pick: their gap
    is part of the NELBO's slack."""
    gen = torch.Generator().manual_seed(run["pick"]["seed"] * 7919 + 2 * 10**6)
    with torch.no_grad(), ctx.autocast():
        bounds = order_bounds(run["selected"].to(ctx.device), data["test"], V, cfg.iw_orders, gen,
                              cfg.eval_batch)
    nelbo, iw = bits(torch.stack(bounds)).double().tolist()  # one sync
    gaps = torch.tensor(nelbo) - torch.tensor(iw)
    return dict(nelbo=sum(nelbo) / len(nelbo), iw=sum(iw) / len(iw), iw_per_seq=iw,
                slack=float(gaps.mean()), slack_se=float(gaps.std() / math.sqrt(len(gaps))))


def model_summary(cfg, runs, kind, seeds, floor, unigram, tols):
    """One model over the seeds: thresholds, whether it learned anything (a train loss below the
    unigram's), picks, best test loss and second descents."""
    widths = cfg.width_list
    records = {seed: [r for width in widths for r in runs[seed, kind, width]["records"]]
               for seed in seeds}
    picks = [min((runs[seed, kind, width]["pick"] for width in widths), key=lambda p: p["val_bpt"])
             for seed in seeds]
    found = {tol: [interpolation(records[seed], floor, tol, widths) for seed in seeds]
             for tol in tols}
    # dips of a few hundredths of a bit are run-to-run noise: a rise or fall must exceed 0.1 bits
    # plus twice the Monte-Carlo error
    margin = 0.1 + 2 * max(r["test_se"] for seed in seeds for r in records[seed])
    return dict(
        thresholds=found,
        learned=all(min(r["train_bpt"] for r in records[s]) < unigram["train"] for s in seeds),
        train_se=max(r["train_se"] for seed in seeds for r in records[seed]),
        picks=[{key: value for key, value in p.items() if key != "per_seq"} for p in picks],
        best=seeds_interval([p["test_bpt"] for p in picks], [p["per_seq"] for p in picks]),
        per_width={w: [runs[s, kind, w]["pick"]["test_bpt"] for s in seeds] for w in widths},
        descent=[second_descent(records[seed], widths, margin) for seed in seeds])


def summarise(cfg, ctx, runs, data, V, floor, unigram):
    """What the report prints and results.json keeps; AR - MDLM is paired per test sequence."""
    seeds, tols = list(range(cfg.seed, cfg.seed + cfg.seeds)), [cfg.tol / 2, cfg.tol, 2 * cfg.tol]
    out = dict(seeds=seeds, tols=tols, unigram=unigram, models={
        k: model_summary(cfg, runs, k, seeds, floor, unigram, tols) for k in cfg.model_list})
    if len(cfg.model_list) < 2:
        return out
    ar, mdlm = out["models"]["ar"], out["models"]["mdlm"]
    out["ar_first"] = {tol: [ar_first(a, m) for a, m in zip(ar["thresholds"][tol],
                                                          mdlm["thresholds"][tol])] for tol in tols}
    picked = lambda kind: [runs[p["seed"], kind, p["width"]] for p in out["models"][kind]["picks"]]
    slack = [bound_slack(cfg, ctx, run, data, V) for run in picked("mdlm")]
    for key, scores in (("difference", [run["pick"]["per_seq"] for run in picked("mdlm")]),
                        ("difference_iw", [s["iw_per_seq"] for s in slack])):
        differences = [[a - b for a, b in zip(run["pick"]["per_seq"], other)]
                       for run, other in zip(picked("ar"), scores)]
        out[key] = seeds_interval([sum(d) / len(d) for d in differences], differences)
    mean = lambda key: sum(s[key] for s in slack) / len(slack)
    out["slack"] = dict(nelbo=mean("nelbo"), iw=mean("iw"), slack=mean("slack"),
                        se=max(s["slack_se"] for s in slack))
    return out


def lower_verdict(summary, key):
    """AR - MDLM with its 95% interval: no verdict when a model learned nothing, or from one seed
    (the seed-to-seed spread is unknown)."""
    silent = [kind.upper() for kind, model in summary["models"].items() if not model["learned"]]
    interval = summary[key]
    if silent or interval["seeds"] < 2:
        why = (" and ".join(silent) + " learned nothing") if silent else "one seed: no interval"
        return f"NOT TESTED ({why})"
    if abs(interval["mean"]) <= interval["half"]:
        return "NOT RESOLVED (interval spans 0)"
    return "YES" if interval["mean"] < 0 else "NO (MDLM lower)"


def threshold_text(found, epochs):
    if found is None:
        return f"none within {epochs} epochs"
    error = f"±{found['train_se']:.3f}" if found["train_se"] else ""
    bound = "" if found["located"] else ", smallest width tried: not located"
    return f"d={found['width']}@{found['epoch']} (train {found['train_bpt']:.3f}{error}{bound})"


def print_tables(cfg, runs, floor, unigram):
    """Bits/token of the first seed per width at a few epochs (MDLM's train ± its MC error)."""
    kinds, widths = cfg.model_list, cfg.width_list
    by_key = {(r["model"], r["width"], r["epoch"]): r for kind in kinds for width in widths
              for r in runs[cfg.seed, kind, width]["records"]}
    epochs = sorted({epoch for _, _, epoch in by_key})
    shown = sorted({epochs[round((len(epochs) - 1) * (i / 7) ** 2)] for i in range(8)})
    print(f"\nbits/token, seed {cfg.seed} (AR: exact NLL; MDLM: k-form NELBO, an upper bound); "
          f"unigram: test {unigram['test']:.3f}, train {unigram['train']:.3f}; floor {floor:.3f}")
    print("params: " + ", ".join(f"d={w}: {by_key[kinds[0], w, epochs[0]]['params']:,}"
                                 for w in widths) + " (identical for AR and MDLM)")
    for key in ("test", "train"):
        cell = lambda r: f"{r[key + '_bpt']:.2f}" + (f"±{r['train_se']:.2f}" if key == "train"
                                                     and r["model"] == "mdlm" else "")
        rows = [["/".join(cell(by_key[k, w, e]) for w in widths) for k in kinds] for e in shown]
        size = [max(len(row[i]) for row in rows) for i in range(len(kinds))]
        print(f"\n{key:5s} | " + " | ".join(f"{k.upper()} d = {'/'.join(map(str, widths))}"
                                           for k in kinds))
        for epoch, row in zip(shown, rows):
            print(f"{epoch:5d} | " + " | ".join(f"{c:>{s}s}" for c, s in zip(row, size)))


def report(cfg, summary, floor):
    kinds, seeds, models = cfg.model_list, summary["seeds"], summary["models"]
    unigram = summary["unigram"]
    print(f"\ninterpolation threshold: the smallest width with train <= floor + tol ({floor:.3f} + "
          f"tol) within {cfg.epochs} epochs, width@epoch (train ± MC error), per seed {seeds}:")
    for tol in summary["tols"]:
        print(f"  tol {tol:<5g} " + " | ".join(f"{k.upper():4s} " + ", ".join(
            threshold_text(found, cfg.epochs) for found in models[k]["thresholds"][tol])
            for k in kinds))
    if "mdlm" in kinds:
        print(f"  MDLM train loss from {cfg.eval_masks} k-form masks per sequence: standard error "
              f"<= {models['mdlm']['train_se']:.3f} bits (tol/10 = {cfg.tol / 10:.3f})")
    print(f"\nbest test loss (epoch and width picked on validation, test re-scored), 95% over "
          f"{len(seeds)} seed(s); unigram {unigram['test']:.3f} (add-{unigram['alpha']:g}):")
    for k in kinds:
        best, descents = models[k]["best"], models[k]["descent"]
        print(f"  {k.upper():4s} {best['mean']:.3f} ± {best['half']:.3f}"
              f"{'' if best['seeds'] > 1 else ' (test-set error only)'}, "
              f"{unigram['test'] - best['mean']:+.3f} below the unigram; per seed: " + ", ".join(
                  f"{p['test_bpt']:.3f} (d={p['width']}@{p['epoch']})" for p in models[k]["picks"]))
        print("       per width: " + ", ".join(f"d={w} {sum(v) / len(v):.3f}" for w, v in
                                              models[k]["per_width"].items())
              + "; largest second descent vs width: " + "; ".join(
                  f"{d['rise']:.2f} up, {d['fall']:.2f} down at epoch {d['epoch']}" if d else
                  "none" for d in descents))
    if "difference" in summary:
        report_verdicts(cfg, summary)


def report_verdicts(cfg, summary):
    models, slack = summary["models"], summary["slack"]
    print(f"\nverdict over {len(summary['seeds'])} seed(s) (paper: AR interpolates at a smaller "
          "width or earlier, has the lower best test loss, no pronounced second descent):")
    for tol, verdicts in summary["ar_first"].items():
        answer = f"{sum(bool(v) for v in verdicts)}/{len(verdicts)} seeds" if any(
            v is not None for v in verdicts) else "NOT TESTED (neither interpolates)"
        print(f"  tol {tol:<5g} AR's threshold at a smaller width or earlier: {answer}")
    for key, name in (("difference", "NELBO"), ("difference_iw", "importance-weighted bound")):
        interval = summary[key]
        print(f"  AR's best test loss lower than MDLM's {name}: {lower_verdict(summary, key)}: "
              f"AR - MDLM = {interval['mean']:+.3f} ± {interval['half']:.3f} bits/token (95%)")
    print(f"  MDLM at its pick: NELBO {slack['nelbo']:.3f}, importance-weighted over "
          f"{cfg.iw_orders} orders {slack['iw']:.3f}: slack >= {slack['slack']:.3f} ± "
          f"{2 * slack['se']:.3f}")
    verdicts = []
    for kind, model in models.items():  # only a model that went past interpolation can show it
        count = sum(bool(d and d["pronounced"]) for d in model["descent"])
        interpolated = model["learned"] and any(model["thresholds"][cfg.tol])
        verdicts.append(f"{kind.upper()} " + ("NOT TESTED (never interpolated)" if not interpolated
                                              else f"NO ({count} seeds)" if count else "YES"))
    print("  no pronounced second descent: " + "; ".join(verdicts))


def draw_samples(cfg, ctx, runs, V, decode):
    """Samples of each widest final model (past interpolation AR mostly replays training text)."""
    width, samples = cfg.width_list[-1], {}
    for kind in cfg.model_list:
        model = runs[cfg.seed, kind, width]["final"].to(ctx.device)
        gen = torch.Generator(device=ctx.device).manual_seed(cfg.seed)
        out = (sample_ar(model, V, 3, cfg.seq_len, gen) if kind == "ar" else
               sample_mdlm(model, V, 3, cfg.seq_len, cfg.seq_len, gen))
        samples[kind] = [decode(sample) for sample in out.tolist()]
        print(f"\nsamples, {kind.upper()} d={width}:")
        print("\n".join(f"  {sample!r}" for sample in samples[kind]))
    return samples


def figure(plt, cfg, records, floor, unigram):
    """The paper's Figure 1: test and train bits against parameters, a curve per epoch; the test
    row shows where the best test loss is decided, not the overfit tail."""
    kinds, epochs = cfg.model_list, sorted({r["epoch"] for r in records})
    shown = sorted({epochs[round((len(epochs) - 1) * (i / 6) ** 2)] for i in range(7)})
    fig, axes = plt.subplots(2, len(kinds), figsize=(5.5 * len(kinds), 8), squeeze=False,
                             sharey="row")
    for column, kind in enumerate(kinds):
        for row, key in enumerate(("test", "train")):
            ax = axes[row][column]
            for j, epoch in enumerate(shown):
                points = sorted((r["params"], r[key + "_bpt"]) for r in records
                                if r["model"] == kind and r["epoch"] == epoch)
                colour = plt.get_cmap("viridis")(j / max(1, len(shown) - 1))
                ax.plot(*zip(*points), "o-", color=colour, label=f"epoch {epoch}", ms=3)
            ax.axhline(unigram[key], color="grey", ls="-.", lw=1, label="unigram")
            if key == "train":
                ax.axhline(floor, color="k", ls="--", lw=1, label="memorisation floor")
                ax.axhline(floor + cfg.tol, color="r", ls=":", lw=1, label="floor + tol")
            ax.set(xscale="log", xlabel="parameters", ylabel="bits/token", title=f"{kind} {key}")
            ax.legend(fontsize=7)
    lowest = min(r["test_bpt"] for r in records)
    axes[0][0].set_ylim(lowest - 0.3, max(unigram["test"], lowest) + 1.0)
    fig.suptitle(f"{cfg.data}: N={cfg.n_train or 'all'} x L={cfg.seq_len}, seed {cfg.seed}")
    fig.tight_layout()
    return fig


def main(argv=None):
    cfg = parse_config(Config, "diffusion_vs_ar", argv)
    ctx = setup(cfg)
    try:
        data, V, decode = make_data(cfg)
        epoch_batches(cfg, len(data["train"]))  # refuses a batch larger than the training set
    except ValueError as e:  # too little text, not text, no such file
        die(str(e), 2)
    floor, unigram = memorisation_floor(data["train"]), unigram_baseline(data, V)
    print(f"{cfg.data} ({cfg.tokenizer}, V={V}): {len(data['train'])} train, {len(data['val'])} "
          f"validation, {len(data['test'])} test sequences of {cfg.seq_len}")
    t_start = time.time()
    runs = {(seed, kind, width): run_one(kind, width, dataclasses.replace(cfg, seed=seed), ctx,
                                         data, V)  # a checkpoint each: --resume skips finished runs
            for seed in range(cfg.seed, cfg.seed + cfg.seeds)
            for kind in cfg.model_list for width in cfg.width_list}
    summary = summarise(cfg, ctx, runs, data, V, floor, unigram)
    print_tables(cfg, runs, floor, unigram)
    report(cfg, summary, floor)
    samples = draw_samples(cfg, ctx, runs, V, decode)
    records = [r for run in runs.values() for r in run["records"]]
    path = save_results(cfg, ctx, dict(vocab=V, floor_bpt=floor, records=records, summary=summary,
                                       samples=samples, seconds=time.time() - t_start))
    shown = [r for r in records if r["seed"] == cfg.seed]
    figure_path = save_figure(Path(cfg.out) / "fig1_test_vs_params.png",
                              lambda plt: figure(plt, cfg, shown, floor, unigram))
    print(f"\nwrote {path}" + (f", {figure_path}" if figure_path else "")
          + f" in {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    cli(main)
