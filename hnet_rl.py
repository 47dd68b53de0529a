"""
hnet_rl.py: learning where to cut bytes into chunks, by reinforcement learning, against H-Net's
differentiable chunking and fixed rules.

Reproduces, at CPU scale, Dauncey & Wattenhofer, "You Can Learn Tokenization End-to-End with
Reinforcement Learning" (arXiv 2602.13940, ICML 2026; code: SamD770/bitter-lesson-tokenization),
with H-Net (Hwang, Wang & Gu, arXiv 2507.07955; goombalab/hnet) as the learned baseline.
Claim: treating each byte's "start a new chunk here?" as a Bernoulli action trained with a
score-function (REINFORCE) estimator, rewarded by how much the chunked model beats an early-exit
head, learns word-like boundaries (almost every space starts a chunk) and a lower bits-per-byte
than random or fixed-stride chunking at the same compression rate, competitive with H-Net.

One byte-level autoregressive U-Net is shared by every method; only the boundary module differs:
  bytes -> embedding -> encoder byte blocks (causal, sliding window)
        -> boundary module: b_t = 1 means "a chunk starts at byte t" (b_0 = 1 always)
        -> keep the encoder vectors at boundaries -> main blocks over the chunk sequence
           (causal; RoPE at the kept bytes' byte positions)
        -> upsample: byte t gets the main output of the latest chunk starting at or before t,
           added to its encoder residual -> decoder byte blocks -> LM head.
  An early-exit head reads the encoder output; LM loss = 0.9 CE_final + 0.1 CE_early.
Boundary methods (--method), all at the same target rate rho (0.2 boundaries per byte):
  rl       Bernoulli policy pi(b_t=1) = sigmoid(logit),
           logit = softcap(s * W x_t [+ previous w-1 actions] + logit(rho)).
           Reward r_t = CE_early,t - CE_final,t, advantage = reward minus its
           batch mean at each position, discounted reward-to-go G_t (gamma 0.99), loss
           -lambda_g mean(G log pi) + rate control lambda_c mean(logit) stopgrad(mean p - rho)
           (--rate_offset=on: also a logit offset nudged by the realised rate each step).
  hnet     cosine routing p_t = (1 - cos(W_q x_{t-1}, W_k x_t)) / 2, b_t = [p_t > 0.5], smoothing
           (EMA over chunks), straight-through confidence, ratio loss (weight 0.03).
  uniform  exactly round(L rho) boundaries at random positions;  fixed: every 1/rho-th byte;
  space    a chunk starts at each run of whitespace (`the|_cat|_sat`);
  bpe      chunks = tokens of a byte-level BPE trained on the training text (peeks at the rest of
           the word, so it is an optimistic reference, not a causal competitor).
Metrics: held-out bits per byte, realised boundary rate, bytes per chunk, training bytes/s, and word
alignment as four figures, each next to what a byte-blind policy at the same rate would score:
ws_at (fraction of whitespace bytes where a chunk starts: the paper's "fraction of whitespace with
token boundaries", the headline), ws_after (... where one starts on the next byte), and the share of
boundaries at / right after whitespace against whitespace's share of the bytes.

Deviations (small scale, CPU): Transformer byte blocks stand in for H-Net's Mamba2 layers; LayerNorm
instead of RMSNorm; H-Net's EMA is an exact O(M^2) closed form instead of the Mamba2 scan; no
residual projection in H-Net (every method adds the encoder residual directly); the last byte is not
forced to be a boundary; RL gates are sampled at evaluation too (--eval_gates=greedy to
threshold), with the soft cap still on; AdamW with weight decay 0.1 and beta2 0.95 on every matrix,
the gate's too.
On CPU the rl gate scale is s = 4 instead of 1/16 and a logit offset, nudged each step by the
realised rate, helps the consistency loss hold the rate (--rate_offset): AdamW moves each weight by
about lr per step whatever the gradient's size, so s sets how fast the policy can change, and at
4 KB per step (the paper: 512 KB) s = 1/16 does not move in 1200 steps (README: the sweep that chose
this). The byte blocks' MLP is 4d on CPU (the authors' d with --gpu). --gpu keeps the paper's
s = 1/16, consistency loss alone and batch of 128 x 4096 bytes.
Defaults run offline in a few minutes (English prose shipped with Python). `--gpu` is the paper's
scale (d 768, 4/12/4 blocks, 4096-byte sequences, enwik8); no hand-written Triton anywhere.
"""
import base64, collections, hashlib, heapq, math, re, time, zipfile
from unittest import mock
from pathlib import Path
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from train import (TrainConfig, parse_config, setup, die, fill_auto, Block, rope_angles,
                   count_params, train, save_results, save_figure, embedded_text, download,
                   maybe_compile, atomic_write, cli, DataError, init_weights, make_optimizer,
                   Attention, slice_rows, mean_interval)

METHODS = ("rl", "hnet", "uniform", "fixed", "space", "bpe")
ABLATIONS = {  # name -> overrides of the rl config (the repo's ablation table)
    "rl:gamma=1": dict(gamma=1.0),
    "rl:no-batch-adv": dict(batch_adv=False),
    "rl:no-early-reward": dict(early_reward=False),
    "rl:window=8": dict(gate_window=8),
    "rl:no-rate-control": dict(lambda_c=0.0, rate_offset="off"),
    "rl:paper-gate": dict(gate_scale=1 / 16),  # the paper's gate scale
    "rl:no-rate-offset": dict(rate_offset="off"),  # the paper's rate control alone
}
WHITESPACE = (9, 10, 13, 32)  # \t \n \r space


@dataclass
class Config(TrainConfig):
    method: str = "rl"  # boundary method: rl | hnet | uniform | fixed | space | bpe
    compare: bool = False  # train every method with the same budget and seed, print one table
    seeds: int = 0  # seeds per method from --seed (0 = 3 on CPU, 1 with --compare or --gpu)
    ablations: bool = False  # with --compare: also the rl ablations of the authors' table
    data: str = "auto"  # auto (prose; enwik8 with --gpu) | prose | enwik8 | tinyshakespeare | file
    rate: float = 0.2  # target boundaries per byte (1/rate bytes per chunk)
    n_embd: int = 0  # model width (0 = 128 on CPU, 768 with --gpu)
    n_head: int = 0  # attention heads (0 = 4 on CPU, 12 with --gpu)
    n_enc: int = 0  # encoder byte blocks (0 = 1 on CPU, 4 with --gpu)
    n_main: int = 0  # main blocks over chunks (0 = 2 on CPU, 12 with --gpu)
    n_dec: int = 0  # decoder byte blocks (0 = 1 on CPU, 4 with --gpu)
    window: int = 64  # sliding attention window of the byte blocks (0 = full causal attention)
    byte_mlp: int = 0  # byte blocks' MLP width / n_embd (0 = 4 on CPU, the authors' 1 with --gpu)
    seq_len: int = 0  # bytes per training sequence (0 = 256 on CPU, 4096 with --gpu)
    batch_size: int = 0  # sequences per optimizer step (0 = 16 on CPU, 128 with --gpu)
    grad_accum: int = 0  # micro-steps per optimizer step (0 = 1 on CPU, 4 with --gpu)
    max_steps: int = 0  # optimizer steps per method (0 = 400 on CPU, 12000 with --gpu)
    lr: float = 0.0  # peak learning rate (0 = 2e-3 on CPU, 1.5e-3 with --gpu)
    warmup: int = 0  # warm-up steps (0 = 30 on CPU, 300 with --gpu)
    early_weight: float = 0.1  # weight of the early-exit head's cross-entropy (final: 1 - this)
    gamma: float = 0.99  # rl: discount of the reward-to-go (1 = undiscounted)
    lambda_g: float = 0.01  # rl: weight of the policy-gradient loss
    lambda_c: float = 0.01  # rl: weight of the rate-control (consistency) loss (0 = none)
    gate_window: int = 1  # rl: the policy reads its previous gate_window - 1 actions (paper: 8)
    rate_offset: str = "auto"  # rl: on = a logit offset steered by the rate (auto: on on CPU)
    rate_offset_lr: float = 0.5  # rl: the offset's step per unit of rate error
    gate_scale: float = 0.0  # rl: scale s of the gate logits (0 = 4 on CPU, 1/16 with --gpu)
    gate_lr: float = 1.0  # rl: the gate's learning rate in multiples of --lr
    batch_adv: bool = True  # rl: subtract the per-position batch mean from the reward
    early_reward: bool = True  # rl: reward = CE_early - CE_final (false: reward = -CE_final)
    eval_gates: str = "sampled"  # rl at evaluation: sampled (fixed noise) | greedy (logit > 0)
    ratio_weight: float = 0.03  # hnet: weight of the ratio loss
    bpe_vocab: int = 4096  # bpe: vocabulary of the BPE whose token starts are the boundaries
    chunk_bucket: int = 0  # chunk counts round up to this (0 = 64 when compiling, else 1)
    eval_every: int = 0  # steps between held-out evaluations (0 = max_steps / 6)
    eval_windows: int = 128  # held-out sequences of seq_len bytes per evaluation
    bench: bool = False  # only measure training bytes/s of every method and exit

    def __post_init__(self):
        fill_auto(self, data=("prose", "enwik8"), n_embd=(128, 768), n_head=(4, 12),  # CPU | paper
                  n_enc=(1, 4), n_main=(2, 12), n_dec=(1, 4), seq_len=(256, 4096),
                  batch_size=(16, 128), max_steps=(400, 12000), lr=(2e-3, 1.5e-3), warmup=(30, 300),
                  gate_scale=(4.0, 1 / 16), grad_accum=(1, 4), byte_mlp=(4, 1),
                  rate_offset=("on", "off"))
        self.seeds = self.seeds or (1 if self.gpu or self.compare else 3)
        super().__post_init__()
        self.eval_every = self.eval_every or max(1, self.max_steps // 6)
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, "
                             f"got {self.method!r}")
        if not 0 < self.rate < 1:
            raise ValueError("--rate must be in (0, 1)")
        if not 0 < self.gamma <= 1:
            raise ValueError("--gamma must be in (0, 1]")
        if self.rate_offset not in ("on", "off"):
            raise ValueError("--rate_offset must be on, off or auto")
        if self.eval_gates not in ("sampled", "greedy"):
            raise ValueError("--eval_gates must be sampled or greedy")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError("--n_embd / --n_head must be an even integer (RoPE pairs)")
        if self.gate_lr <= 0:
            raise ValueError("--gate_lr must be > 0")
        if self.seeds < 1:
            raise ValueError("--seeds must be >= 1")
        if self.gate_window < 1 or self.seq_len < 8 or self.early_weight > 1:
            raise ValueError("need --gate_window >= 1, --seq_len >= 8 and --early_weight <= 1")

# ----------------------------------------------------------------------------------------------
# data: raw bytes, random windows, and (for bpe) token-start boundaries precomputed once


def unzip_enwik8(path):
    """The 10^8 bytes of enwik8 from its downloaded zip; a damaged zip is a one-line error."""
    try:
        with zipfile.ZipFile(path) as z:
            return z.read("enwik8")
    except (zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"{path} is not a good enwik8.zip ({e}); "
                        "delete it and download again") from None


def load_bytes(cfg):
    try:
        if cfg.data == "prose":
            return embedded_text("train"), embedded_text("val")
        if cfg.data in ("enwik8", "tinyshakespeare"):
            path = download(cfg.data, cfg.data_dir)
            raw = unzip_enwik8(path) if cfg.data == "enwik8" else path.read_bytes()
        else:
            raw = open(cfg.data, "rb").read()
    except (OSError, RuntimeError) as e:
        die(f"cannot load --data={cfg.data}: {e}")
    if len(raw) < 20 * cfg.seq_len:
        die(f"--data={cfg.data} has {len(raw)} bytes; need at least {20 * cfg.seq_len}")
    cut = int(0.9 * len(raw))  # enwik8 convention: 90 MB train, then 5 + 5 val/test
    return raw[:cut], raw[cut: cut + max(len(raw) // 20, 20 * cfg.seq_len)]


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
    heapq.heapify(heap)
    ranks = {bytes([i]): i for i in range(256)}
    while len(ranks) < vocab_size and heap:
        n, pair = heapq.heappop(heap)
        if -n != pairs.get(pair, 0) or n == 0:  # stale heap entry: this pair's count changed since
            continue
        merged = pair[0] + pair[1]
        ranks.setdefault(merged, len(ranks))
        for wi in list(where[pair]):
            old, new, i = seqs[wi], [], 0
            while i < len(old):
                hit = i + 1 < len(old) and (old[i], old[i + 1]) == pair
                new.append(merged if hit else old[i])
                i += 2 if hit else 1
            for p in zip(old, old[1:]):
                pairs[p] -= freq[wi]
                where[p].discard(wi)
            for p in zip(new, new[1:]):
                pairs[p] += freq[wi]
                where[p].add(wi)
            for p in set(zip(old, old[1:])) | set(zip(new, new[1:])):
                if pairs[p] > 0:
                    heapq.heappush(heap, (-pairs[p], p))
            seqs[wi] = new
    return ranks


def bpe_tokenizer(text, vocab_size, cache_dir):
    """A byte-level BPE trained on `text`, wrapped in tiktoken.Encoding, its ranks cached as
    `base64(token) rank` lines. A cache that does not parse as a complete rank table is rebuilt."""
    import tiktoken
    path = Path(cache_dir) / f"bpe{vocab_size}-{hashlib.sha1(text).hexdigest()[:12]}.tiktoken"
    ranks = None
    if path.exists():
        try:
            ranks = {base64.b64decode(tok, validate=True): int(r) for tok, r in
                     (line.split() for line in path.read_text().splitlines())}
            complete = sorted(ranks.values()) == list(range(len(ranks)))
            if not complete or any(ranks.get(bytes([i])) != i for i in range(256)):
                ranks = None
        except ValueError:  # also a truncated line, bad base64 or a non-number rank
            ranks = None
    if ranks is None:
        ranks = train_bpe(text, vocab_size)
        lines = "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()).encode()
        atomic_write(path, lambda f: f.write(lines))
    return tiktoken.Encoding(f"bpe{vocab_size}", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks)})


def bpe_boundaries(cfg, data, train_bytes):
    """b[i] = 1 where a BPE token starts in `data`, tokenizer trained on the training bytes."""
    enc = bpe_tokenizer(train_bytes[:2_000_000], cfg.bpe_vocab, f"{cfg.out}/tokenizer")
    ids = enc.encode_ordinary(data.decode("utf-8", errors="replace"))
    lengths = np.array([len(enc.decode_single_token_bytes(t)) for t in ids])
    # replacement characters may change the byte count: realign by fraction
    text_len = lengths.sum()
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) * len(data) // max(text_len, 1)
    b = np.zeros(len(data), dtype=bool)
    b[starts] = True
    return torch.from_numpy(b)


def as_tensor(raw):
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()


def make_get_batch(cfg, data, bounds):
    L, B = cfg.seq_len, cfg.batch_size

    def get_batch(i):  # deterministic in i: exact resume
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)
        start = torch.randint(0, len(data) - L - 1, (B,), generator=g)
        rows = start[:, None] + torch.arange(L + 1)
        batch = dict(x=data[rows])  # (B, L+1)
        if bounds is not None:
            batch["b"] = bounds[rows[:, :-1]]  # (B, L)
        return batch
    return get_batch

# ----------------------------------------------------------------------------------------------
# chunking, upsampling and H-Net's smoothing: pure tensor functions (tested on their own)


def chunk_capacity(L, rate, bucket):
    """Chunks a row of L bytes holds at `rate` + 4 standard deviations, rounded up to the bucket:
    the fewest chunks compiled code is given, so that at a held rate it sees one shape (a row
    above it: ~1 step in 1000 at 32 rows), not a new one whenever the busiest row crosses a
    bucket edge."""
    return min(L, -(-int(L * rate + 4 * math.sqrt(L * rate * (1 - rate))) // bucket) * bucket)


def chunk_count(b, bucket, floor):
    return min(b.shape[1], max(floor, -(-int(b.sum(1).max()) // bucket) * bucket))


# data-dependent: the one graph break of the forward; what follows sees only M
@torch.compiler.disable
def chunk_index(b, bucket=1, floor=0):
    """b (B, L) bool with b[:, 0] = 1 -> idx (B, M): byte positions of the boundaries, in order,
    M = most boundaries in any row (at least `floor`), rounded up to a multiple of `bucket` (capped
    at L) so compiled code sees a few chunk counts, not a new one every step. A stable sort moves
    boundaries to the front; rows with fewer boundaries are padded with non-boundary positions.
    Padding sits *after* every real chunk, so causal attention over chunks never lets a real chunk
    see it, and nothing reads its output."""
    M = chunk_count(b, bucket, floor)
    order = torch.sort((~b).to(torch.uint8), dim=1, stable=True).indices  # boundaries first
    return order[:, :M]  # (B, M)


def owner_chunk(b):
    """Chunk index of every byte: the latest boundary at or before t. (B, L)"""
    return b.long().cumsum(1) - 1


def downsample(x, idx):  # x (B, L, C), idx (B, M) -> (B, M, C)
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def upsample(z, b):  # z (B, M, C) chunk outputs -> (B, L, C): byte t gets its owner chunk's vector
    return z.gather(1, owner_chunk(b)[..., None].expand(-1, -1, z.shape[-1]))


def smooth_chunks(z, P):
    """H-Net's dechunk EMA over the chunk sequence, zbar_j = P_j z_j + (1 - P_j) zbar_{j-1}, in
    closed form: zbar_j = sum_{i<=j} P_i prod_{i<k<=j} (1 - P_k) z_i. The products are exp of
    segment sums of log(1 - P), accumulated per segment (not as a difference of two long cumsums,
    which would lose precision), so there is no Python loop over chunks.
    z (B, M, C), P (B, M) -> (B, M, C)."""
    M = P.shape[1]
    log_keep = torch.log1p(-P.float())  # (B, M) log(1 - P_k), fp32 as H-Net insists
    below = torch.ones(M, M, dtype=torch.bool, device=P.device).tril(-1)  # k > i
    # seg[b, j, i] = sum_{i < k <= j} log(1 - P_k): cumulate log_keep[k] over rows j, only for k > i
    terms = log_keep[:, :, None].expand(-1, M, M).masked_fill(~below, 0.0)  # [b, k, i]
    seg = terms.cumsum(1)  # [b, j, i]
    at_or_below = below.logical_or(torch.eye(M, dtype=torch.bool, device=P.device))  # k >= i
    weights = torch.exp(seg.masked_fill(~at_or_below, -math.inf))
    weights = weights * P.float()[:, None, :]  # (B, M_j, M_i): P_i prod (1 - P_k)
    with torch.autocast(z.device.type, enabled=False):  # autocast would run this matmul in bf16
        return (weights @ z.float()).to(z.dtype)


def straight_through_one(c):
    """Forward value exactly 1, gradient d/dc = 1: lets the confidence c steer the routing
    without changing what the network computes (c - c.detach() is exactly 0)."""
    return 1.0 + (c - c.detach())


def ratio_loss(b, p, N):
    """H-Net's rate regulariser: N/(N-1) ((N-1) F G + (1-F)(1-G)), F = fraction of boundaries (no
    gradient; over the global batch), G = mean routing probability. Minimal (= 1) when F = G = 1/N.
    The loss is linear in G, so each process's own G averages to the global one under DDP."""
    Fr, G = global_mean(b.float()), p.float().mean()
    return N / (N - 1) * ((N - 1) * Fr * G + (1 - Fr) * (1 - G))


def discounted_returns(adv, gamma):
    """G_t = sum_{k>=0} gamma^k A_{t+k} along dim 1, as one matmul with an upper-triangular
    matrix of discounts Gamma[k, t] = gamma^(k - t) for k >= t. adv (B, L) -> (B, L)."""
    L = adv.shape[1]
    t = torch.arange(L, device=adv.device, dtype=torch.float64)
    lag = t[:, None] - t[None, :]  # [k, t] = k - t
    zero = torch.zeros((), dtype=torch.float64, device=adv.device)
    discounts = torch.where(lag >= 0, gamma ** lag.clamp(min=0), zero)
    return (adv.double() @ discounts).to(adv.dtype)


def softcap(x, cap=6.0):
    return cap * torch.tanh(x / cap)

class LocalAttention(Attention):
    """Causal sliding-window attention (query t sees keys t-window+1 .. t) whose cost grows with
    L x window, not L^2: the sequence is cut into blocks of `window` queries, and each block
    attends to its own block and the one before it (2 x window keys) under a fixed band mask.
    Same weights as train.Attention; the same result as its attention under a banded L x L mask."""

    def __init__(self, n_embd, n_head, window):
        super().__init__(n_embd, n_head)
        self.window = window

    def forward(self, x, cos, sin, cache=None):
        W, (B, T, C) = self.window, x.shape
        if not W or W >= T:  # the window covers the whole sequence: plain causal attention
            return super().forward(x, cos, sin)
        q, k, v = self.project(x, cos, sin)  # (B, nh, T, hs)
        nb = -(-T // W)  # blocks of W queries; the tail is padded and cut off again
        q = F.pad(q, (0, 0, 0, nb * W - T)).unflatten(2, (nb, W))  # (B, nh, nb, W, hs)
        # keys of block n: positions (n-1) W .. (n+1) W - 1, with W zero keys in front of block 0
        k, v = (F.pad(t, (0, 0, W, nb * W - T)).unfold(2, 2 * W, W).transpose(-1, -2)
                for t in (k, v))  # (B, nh, nb, 2W, hs)
        r = torch.arange(W, device=x.device)[:, None]  # query offset in its block
        # key offset in the block's 2W keys (the query's own key sits at r + W)
        c = torch.arange(2 * W, device=x.device)[None, :]
        band = (c > r) & (c <= r + W)  # key t' with t - W < t' <= t
        # block 0's first W keys are padding
        first = torch.arange(nb, device=x.device)[:, None, None] > 0
        # (1, nb, W, 2W): 4-D, blocks in the head slot, so the fused (flash / memory-efficient)
        # kernels take it
        mask = (band & (first | (c >= W)))[None]
        y = F.scaled_dot_product_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
                                           attn_mask=mask)
        y = y.unflatten(0, (B, self.n_head)).flatten(2, 3)[:, :, :T]  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


def byte_block(C, H, window, mlp_ratio):
    """A byte-level Block whose attention is the L x window local attention above."""
    blk = Block(C, H, mlp_ratio=mlp_ratio)
    blk.attn = LocalAttention(C, H, window)
    return blk

# ----------------------------------------------------------------------------------------------
# the model: one byte-level U-Net, six boundary modules


class ChunkedByteLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, H = cfg.n_embd, cfg.n_head
        self.cfg, self.method, self.head_dim = cfg, cfg.method, C // H
        self.wte = nn.Embedding(256, C)
        self.encoder = nn.ModuleList(byte_block(C, H, cfg.window, cfg.byte_mlp)
                                     for _ in range(cfg.n_enc))
        # causal over chunks, full context
        self.main = nn.ModuleList(Block(C, H) for _ in range(cfg.n_main))
        self.decoder = nn.ModuleList(byte_block(C, H, cfg.window, cfg.byte_mlp)
                                     for _ in range(cfg.n_dec))
        self.norm_enc, self.norm = nn.LayerNorm(C, bias=False), nn.LayerNorm(C, bias=False)
        self.early_head = nn.Linear(C, 256, bias=False)  # early exit: sees only pre-boundary layers
        self.lm_head = nn.Linear(C, 256, bias=False)
        if self.method == "rl":  # V_t = W x_t in R^w: w-1 weights for past actions + a bias slot
            self.gate = nn.Linear(C, cfg.gate_window)  # with a bias, as the authors' gater
            # a non-learned logit offset steered by the realised rate (--rate_offset)
            self.register_buffer("rate_offset", torch.zeros(()))
        if self.method == "hnet":
            self.q_proj, self.k_proj = nn.Linear(C, C, bias=False), nn.Linear(C, C, bias=False)
        init_weights(self, cfg.n_enc + cfg.n_main + cfg.n_dec)
        if self.method == "rl":  # zero bias: the policy starts exactly at the target rate
            nn.init.zeros_(self.gate.bias)
            # a gate learning rate k x lr, written as weights k times smaller read k times larger:
            # AdamW's step is the same size whatever the gradient's scale (up to its eps), so each
            # step moves the logits k times further; the starting logits and the shrink per step of
            # weight decay stay as they are
            self.gate.weight.data /= cfg.gate_lr
        if self.method == "hnet":  # identity init: p_t starts as a pure cosine novelty detector
            with torch.no_grad():
                self.q_proj.weight.copy_(torch.eye(C))
                self.k_proj.weight.copy_(torch.eye(C))

    # -- boundary modules: each returns b (B, L) bool with b[:, 0] = 1, plus what its loss needs --
    def rl_logits(self, V, actions):
        """Policy logits from the gate features V = W x (B, L, w) and the actions a (B, L) in
        {0, 1}: logit_t = softcap(s (V_t[w-1] + sum_j a_{t-(w-1)+j} V_t[j]) + logit(rho))."""
        w, rho = self.cfg.gate_window, self.cfg.rate
        raw = V[..., -1]  # the bias slot: what the policy thinks from the bytes alone
        if w > 1:  # the previous w-1 actions, zero-padded before t = 0: (B, L, w-1)
            prev = F.pad(actions.float(), (w - 1, 0))[:, :-1].unfold(1, w - 1, 1)
            raw = raw + (prev * V[..., :-1]).sum(-1)
        scale = self.cfg.gate_scale * self.cfg.gate_lr
        return softcap(scale * raw + math.log(rho / (1 - rho)) + self.rate_offset)

    @torch.compiler.disable  # a Python loop over bytes: ~20 graph nodes per byte if it were traced
    def sample_sequential(self, V, thresh):
        """Actions of a policy that reads its own last w-1 actions, byte by byte. (B, L) bool"""
        (B, L, w), u = V.shape, thresh
        a = torch.zeros(B, L, dtype=torch.bool, device=V.device)
        a[:, 0] = True  # forced before the loop: later logits read it
        for t in range(1, L):  # logit t reads only actions < t, so filling left to right is exact
            lo = max(0, t - w + 1)  # the last w-1 actions (and t itself, still 0) are all it needs
            logit = self.rl_logits(V[:, lo: t + 1], a[:, lo: t + 1])[:, -1]
            a[:, t] = torch.sigmoid(logit) > u[:, t]
        return a

    def rl_boundaries(self, h, noise, greedy):
        """Sample a_t ~ Bernoulli(pi_t) without gradient (a loop over bytes only if the policy reads
        its own past actions), then recompute all logits in parallel with gradient."""
        V = self.gate(h).float()  # (B, L, w)
        thresh = torch.full_like(noise, 0.5) if greedy else noise  # a_t = [u_t < pi_t]
        with torch.no_grad():
            if self.cfg.gate_window == 1:
                a = torch.sigmoid(self.rl_logits(V, None)) > thresh
            else:
                a = self.sample_sequential(V, thresh)
            a[:, 0] = True  # forced: the first byte starts a chunk (no gradient: masked below)
        logits = self.rl_logits(V, a)  # the policy that sampled a: the offset moves only after this
        # log pi(a_t), with gradient
        logp = torch.where(a, F.logsigmoid(logits), F.logsigmoid(-logits))
        # integral control: too many boundaries -> a lower offset
        if self.training and self.cfg.rate_offset == "on":
            with torch.no_grad():
                error = global_mean(a[:, 1:].float()) - self.cfg.rate
                self.rate_offset -= self.cfg.rate_offset_lr * error
        # gate_logits, not logits: that key is the LM head's; the rate control must reach the gate
        return dict(b=a, gate_logits=logits, p=torch.sigmoid(logits), logp=logp)

    def hnet_boundaries(self, h):
        q, k = self.q_proj(h[:, :-1]), self.k_proj(h[:, 1:])  # compare byte t-1 with byte t
        p = 0.5 * (1 - F.cosine_similarity(q.float(), k.float(), dim=-1))  # (B, L-1)
        p = torch.cat([torch.ones_like(p[:, :1]), p.clamp(0, 1)], 1)  # p_0 = 1
        return dict(b=p > 0.5, p=p)

    def rule_boundaries(self, x, noise):
        B, L = x.shape
        t = torch.arange(L, device=x.device).expand(B, L)
        if self.method == "fixed":
            b = t % round(1 / self.cfg.rate) == 0
        elif self.method == "uniform":  # exactly k boundaries: 0 and the k-1 largest noises
            k = max(1, round(L * self.cfg.rate))
            b = torch.zeros(B, L, dtype=torch.bool, device=x.device)
            b.scatter_(1, noise[:, 1:].topk(k - 1, dim=1).indices + 1, True)
        elif self.method == "space":  # a chunk starts at the first byte of each whitespace run
            ws = is_whitespace(x)
            b = ws & ~F.pad(ws, (1, 0))[:, :-1]
        b[:, 0] = True
        return dict(b=b)

    def forward(self, x, given_b=None, noise=None, greedy=False):
        """x (B, L) bytes -> dict(logits, early_logits (B, L, 256), b (B, L), and the boundary
        module's p / gate_logits / logp). noise (B, L) uniform: the only randomness (rl,
        uniform); given_b: bpe's boundaries."""
        B, L = x.shape
        cos, sin = rope_angles(torch.arange(L, device=x.device), self.head_dim)
        h = self.wte(x)  # (B, L, C)
        for blk in self.encoder:
            h = blk(h, cos, sin)
        hn = self.norm_enc(h)  # what the early head and the boundary modules read
        out = dict(early_logits=self.early_head(hn))
        if noise is None:
            noise = torch.rand(B, L, device=x.device)
        if self.method == "rl":
            out.update(self.rl_boundaries(hn, noise, greedy))
        elif self.method == "hnet":
            out.update(self.hnet_boundaries(hn))
        elif self.method == "bpe":
            out["b"] = given_b.clone()
            out["b"][:, 0] = True
        else:
            out.update(self.rule_boundaries(x, noise))
        b = out["b"]
        # eager gains nothing from padding
        bucket = self.cfg.chunk_bucket or (64 if torch.compiler.is_compiling() else 1)
        floor = chunk_capacity(L, self.cfg.rate, bucket) if bucket > 1 else 0
        idx = chunk_index(b, bucket, floor)  # (B, M)
        z = downsample(h, idx)  # (B, M, C) the encoder vectors where chunks start, no pooling
        ccos, csin = rope_angles(idx, self.head_dim)  # RoPE at byte positions: distance in bytes
        for blk in self.main:
            z = blk(z, ccos, csin)
        if self.method == "hnet":  # smooth over chunks with the boundary probability (dechunk)
            P = out["p"].gather(1, idx).clamp(1e-4, 1 - 1e-4)
            P = torch.where(b.gather(1, idx), P, torch.ones_like(P))  # padding chunks: no memory
            z = smooth_chunks(z, P)
        up = upsample(z, b)  # (B, L, C)
        if self.method == "hnet":  # confidence through a straight-through estimator: value 1
            c = torch.where(b, out["p"], 1 - out["p"])
            up = up * straight_through_one(c)[..., None].to(up.dtype)
        y = h + up  # encoder residual + what the main network says about the current chunk
        for blk in self.decoder:
            y = blk(y, cos, sin)
        out["logits"] = self.lm_head(self.norm(y))
        return out


def is_whitespace(x):
    ws = torch.zeros(256, dtype=torch.bool, device=x.device)
    ws[list(WHITESPACE)] = True
    return ws[x]

# ----------------------------------------------------------------------------------------------
# losses: the LM loss every method shares, and each boundary module's own term


def global_mean(x, dim=None, keepdim=False):
    """Mean over the global batch, i.e. over every process's rows under torchrun (no gradient flows
    through the other processes' part). With one process it is exactly x.mean()."""
    mean = x.mean() if dim is None else x.mean(dim, keepdim=keepdim)
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return mean
    n = x.numel() / mean.numel()
    # the local sum along dim, and its rows
    total, count = (mean * n).detach(), torch.tensor(n, device=x.device)
    dist.all_reduce(total)
    dist.all_reduce(count)
    return total / count


def token_ce(logits, y):  # (B, L, V), (B, L) -> per-byte cross-entropy in nats (B, L)
    return F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")


def policy_loss(out, ce_final, ce_early, cfg):
    """REINFORCE for the boundary policy. Rewards are detached: the policy learns only through
    log pi (no straight-through path). The early-exit CE does not depend on the actions, so it is
    a baseline that removes the 'this byte is hard anyway' part of the reward."""
    r = (ce_early - ce_final) if cfg.early_reward else -ce_final
    adv = r.detach()
    if cfg.batch_adv:  # batch-relative: other sequences at the same position (all ranks')
        adv = adv - global_mean(adv, 0, keepdim=True)
    G = discounted_returns(adv, cfg.gamma)  # action at t affects every later prediction
    logp = out["logp"][:, 1:]  # b_0 is forced: no gradient for it
    pg = -(G[:, 1:] * logp).mean()
    # rate control: push all logits down when the policy fires too often, up when too rarely
    rate_gap = (global_mean(out["p"][:, 1:]) - cfg.rate).detach()
    consistency = out["gate_logits"][:, 1:].mean() * rate_gap
    return cfg.lambda_g * pg + cfg.lambda_c * consistency, dict(pg=pg.detach(), ret_std=G.std())


def loss_fn_for(cfg):
    def loss_fn(model, batch):
        x, given_b = batch["x"], batch.get("b")
        # noise (B, L): drawn in the model unless given
        out = model(x[:, :-1], given_b, batch.get("noise"))

        y = x[:, 1:]
        ce_final, ce_early = token_ce(out["logits"], y), token_ce(out["early_logits"], y)
        loss = (1 - cfg.early_weight) * ce_final.mean() + cfg.early_weight * ce_early.mean()
        metrics = dict(bpb=ce_final.mean().detach() / math.log(2), rate=out["b"].float().mean(),
                       items=x.shape[0] * (x.shape[1] - 1))
        if cfg.method == "rl":
            extra, m = policy_loss(out, ce_final, ce_early, cfg)
            loss = loss + extra
            metrics.update(m)
        elif cfg.method == "hnet":
            loss = loss + cfg.ratio_weight * ratio_loss(out["b"], out["p"], 1 / cfg.rate)
        return loss, metrics
    return loss_fn

# ----------------------------------------------------------------------------------------------
# evaluation: bits per byte, rate, whitespace alignment (fixed windows, fixed gate noise)


def alignment_counts(b, x):
    """Counts for the whitespace figures of one batch of boundaries b (B, L) over bytes x (B, L).
    Position 0 is left out (its boundary is forced). A chunk that starts *at* a whitespace byte is
    `the|_cat` (BPE, the RL paper's policy); one that starts right *after* it is `the_|cat` (where
    H-Net's novelty detector cuts)."""
    b, ws = b[:, 1:], is_whitespace(x)
    ws_here, ws_before = ws[:, 1:], ws[:, :-1]  # is byte t / byte t-1 whitespace, for t >= 1
    counts = [torch.full((), b.numel(), device=b.device), b.sum(), ws_here.sum(),
              (b & ws_here).sum(), ws_before.sum(), (b & ws_before).sum()]
    return torch.stack([c.double() for c in counts])  # on b's device: summed there, synced once


def alignment_figures(c):
    """The whitespace figures from summed alignment_counts, each next to its chance level: a
    policy that ignores the bytes but fires at the same rate r hits r of the whitespace bytes, and
    its boundaries fall on whitespace as often as whitespace occurs (the base rate).
      ws_at     P(chunk starts at t | byte t is whitespace); chance = r. The RL paper's "fraction
                of whitespace with token boundaries": its gate = 1 marks a chunk's *last* byte,
                whose vector is kept and serves the bytes after it, the same data flow as a
                chunk starting at t here, so a gate at a whitespace byte is a chunk at it
      ws_after  P(chunk starts at t | byte t-1 is whitespace); chance = r
      on_ws     share of boundaries at a whitespace byte; chance = base rate
      after_ws  share of boundaries right after a whitespace byte; chance = base rate"""
    n, nb, nws, at, nws_prev, after = c
    return dict(free_rate=nb / n, ws_base=nws / n, ws_at=at / max(nws, 1),
                ws_after=after / max(nws_prev, 1), on_ws=at / max(nb, 1),
                after_ws=after / max(nb, 1))


@torch.no_grad()
def evaluation_sums(model, cfg, val, val_bounds, device, chunk=32):
    """Summed NLL (nats), bytes, boundaries, then alignment_counts over the held-out windows,
    left on the device: evaluate() synchronises once."""
    L = cfg.seq_len
    n = min(cfg.eval_windows, (len(val) - 1) // L)
    # the same gate noise at every evaluation and for every method
    g = torch.Generator().manual_seed(12345)
    sums = torch.zeros(9, dtype=torch.float64, device=device)
    for s in range(0, n, chunk):
        rows = (torch.arange(s, min(n, s + chunk)) * L)[:, None] + torch.arange(L + 1)
        x = val[rows].to(device)
        given = val_bounds[rows[:, :-1]].to(device) if val_bounds is not None else None
        noise = torch.rand(x.shape[0], L, generator=g).to(device)
        out = model(x[:, :-1], given, noise, greedy=cfg.eval_gates == "greedy")
        b = out["b"]
        nll = token_ce(out["logits"], x[:, 1:]).sum().double()
        sums += torch.cat([torch.stack([nll, torch.full_like(nll, b.numel()), b.sum().double()]),
                           alignment_counts(b, x[:, :-1])])
    return sums


def evaluate(model, cfg, val, val_bounds, device):
    nll, n_bytes, n_bound, *counts = evaluation_sums(model, cfg, val, val_bounds, device).tolist()
    return dict(bpb=nll / n_bytes / math.log(2), rate=n_bound / n_bytes,
                bytes_per_chunk=n_bytes / max(n_bound, 1), **alignment_figures(counts))


@torch.no_grad()
def show_boundaries(model, cfg, val, val_bounds, device, n=120):
    """One held-out passage with `|` before every chunk start and `_` for spaces."""
    x = val[:n][None].to(device)
    given = val_bounds[:n][None].to(device) if val_bounds is not None else None
    noise = torch.rand(1, n, generator=torch.Generator().manual_seed(7)).to(device)
    b = model(x, given, noise, greedy=cfg.eval_gates == "greedy")["b"][0].cpu()
    shown = {32: "_", 10: "\\n"}
    return "".join(("|" if bi and i else "") + shown.get(c, chr(c) if 32 < c < 127 else "?")
                   for i, (c, bi) in enumerate(zip(val[:n].tolist(), b.tolist())))

# ----------------------------------------------------------------------------------------------
# one training run per method


FIGURES = ("bpb", "rate", "free_rate", "ws_base", "ws_at", "ws_after", "on_ws", "after_ws",
           "bytes_per_chunk")


def run_one(name, cfg, ctx, data, val, bounds, val_bounds):
    torch.manual_seed(cfg.seed)  # identical init and data order for every method
    model = ChunkedByteLM(cfg).to(ctx.device)
    bytes_per_step = cfg.batch_size * cfg.seq_len

    def eval_fn(m, step):
        return dict(train_bytes=step * bytes_per_step,
                    **evaluate(m, cfg, val, val_bounds, ctx.device))

    tag = name.replace(":", "_").replace("=", "")
    counters, graphs = torch._dynamo.utils.counters["stats"], []  # compiled graphs at each step
    get_batch = make_get_batch(cfg, data, bounds)

    def batch(i):
        graphs.append(counters["unique_graphs"])
        return get_batch(i)
    summary = train(model, batch, loss_fn_for(cfg), cfg, ctx, eval_fn=eval_fn,
                    ckpt_path=f"{cfg.out}/ckpt_{tag}_seed{cfg.seed}.pt",
                    desc=f"{name} seed {cfg.seed}")
    final, after_first = summary["evals"][-1], graphs[1:2] or [counters["unique_graphs"]]
    total = counters["unique_graphs"]
    return dict(method=name, seed=cfg.seed, params=count_params(model),
                bytes_per_s=summary["items_per_s"], seconds=summary["seconds"],
                graphs=total - graphs[0] if graphs else 0, recompiles=total - after_first[0],

                curve=summary["evals"], sample=show_boundaries(
                    model, cfg, val, val_bounds, ctx.device), **{k: final[k] for k in FIGURES})


def config_for(cfg, method, overrides=()):
    v = Config(**{**cfg.__dict__, "method": method, **dict(overrides)})
    v.out = cfg.out
    return v


def by_method(rows):
    """method -> {figure: [value per seed]}, seeds in the same order for every method (paired)."""
    out = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in sorted(rows, key=lambda r: r["seed"]):
        for k in FIGURES + ("bytes_per_s",):
            out[r["method"]][k].append(r[k])
    return out


def interval_text(xs, digits):
    m, h = mean_interval(xs)
    return f"{m:.{digits}f}" + ("" if math.isnan(h) else f"+-{h:.{digits}f}")


def paired_difference(a, b):
    """Paired difference a - b over seeds, as text: mean +- 95% interval and what it resolves."""
    m, h = mean_interval(np.asarray(a) - np.asarray(b))
    if math.isnan(h):
        return f"{m:+.4f} (one seed: no interval)", "unresolved"
    word = "lower" if m + h < 0 else "higher" if m - h > 0 else "no difference resolved"
    return f"{m:+.4f} +- {h:.4f}", word


def verdicts(rows, cfg):
    """Plain-language checks of the paper's claims, computed from the table (paired by seed)."""
    by, lines, tol = by_method(rows), [], 0.02
    if "rl" not in by:
        return lines
    rl, n = by["rl"], len(by["rl"]["bpb"])
    inside = sum(abs(r - cfg.rate) <= tol for r in rl["rate"])
    lines.append(f"rl realised rate {interval_text(rl['rate'], 3)}: within +-{tol} of the target "
                 f"{cfg.rate} in {inside}/{n} seeds")
    for base in ("uniform", "fixed", "hnet", "bpe"):
        if base in by:
            diff, word = paired_difference(rl["bpb"], by[base]["bpb"])
            lines.append(f"rl bpb minus {base} bpb: {diff} -> {word} (rates "
                         f"{interval_text(rl['rate'], 3)} vs {interval_text(by[base]['rate'], 3)})")
    # the paper's alignment figure against the chance a byte-blind policy at rl's own rate would get
    above = sum(w > 2 * c for w, c in zip(rl["ws_at"], rl["free_rate"]))
    line = (f"whitespace bytes where a chunk starts (paper's figure): rl "
            f"{interval_text(rl['ws_at'], 2)} vs chance at its own rate "
            f"{interval_text(rl['free_rate'], 2)}: at least 2x chance in {above}/{n} seeds")
    if "uniform" in by:
        line += f"; uniform {interval_text(by['uniform']['ws_at'], 2)}"
    lines.append(line + (" -> reproduced" if above == n else " -> NOT reproduced"))
    if "rl:gamma=1" in by:
        diff, word = paired_difference(by["rl:gamma=1"]["ws_at"], rl["ws_at"])
        verdict = {"lower": "drops", "unresolved": word}.get(word, "does not drop (resolved)")
        lines.append(f"gamma=1 minus gamma={cfg.gamma}, paper's whitespace figure: {diff} -> "
                     + verdict)
    if "rl:no-rate-control" in by:
        r0 = mean_interval(by["rl:no-rate-control"]["rate"])[0]
        lines.append(f"without rate control the rate goes to {r0:.3f}: "
                     + ("collapses towards a boundary at every byte" if r0 > 0.5
                        else "no collapse at this budget"))
    return lines


def report(rows, cfg, ws_share):
    """The results table (mean +- 95% interval over seeds), boundary samples and the verdicts."""
    by = by_method(rows)
    n = len(next(iter(by.values()))["bpb"])
    megabytes = cfg.max_steps * cfg.batch_size * cfg.seq_len / 1e6
    print(f"\nheld-out {cfg.data}, {cfg.max_steps} steps x {cfg.batch_size} x {cfg.seq_len} bytes "
          f"= {megabytes:.1f} MB per method, {n} seed(s) from {cfg.seed}"
          f"{' (mean +- 95% t-interval)' if n > 1 else ''}, rl gates at eval: {cfg.eval_gates}")
    columns = [("val bpb", "bpb", 4, 15), ("rate", "rate", 3, 11), ("ws_at", "ws_at", 2, 10),
               ("(chance)", "free_rate", 2, 10), ("ws_after", "ws_after", 2, 10),
               ("on_ws", "on_ws", 2, 10), ("after_ws", "after_ws", 2, 10),
               ("bytes/chunk", "bytes_per_chunk", 2, 11)]
    print(f"{'method':20s} " + " ".join(f"{title:>{width}s}" for title, _, _, width in columns)
          + f" {'train B/s':>10s}")
    for name, f in by.items():
        cells = " ".join(f"{interval_text(f[key], digits):>{width}s}"
                         for _, key, digits, width in columns)

        print(f"{name:20s} {cells} {mean_interval(f['bytes_per_s'])[0]:10,.0f}")
    print(f"ws_at: fraction of whitespace bytes where a chunk starts (the paper's figure; chance = "
          f"the method's own rate); ws_after: ... where one starts on the next byte (chance = "
          f"rate); on_ws / after_ws: share of boundaries at / right after whitespace (chance = "
          f"whitespace's share of held-out bytes, {ws_share:.1%})")
    print("\nboundaries on a held-out passage ('|' = chunk start, '_' = space), first seed:")
    for r in rows:
        if r["seed"] == cfg.seed:
            print(f"  {r['method']:20s} {r['sample']}")
    lines = verdicts(rows, cfg)
    if lines:
        print("\nclaims:")
        for line in lines:
            print("  " + line)
    if len(by) == 1:
        print("  (--method=uniform|fixed|hnet|space|bpe runs a baseline the same way; "
              "--compare runs them all, one seed)")
    return lines


def plot(cfg, rows):
    def draw(plt):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for r in (r for r in rows if r["seed"] == cfg.seed):  # the first seed's curves
            xs = [e["train_bytes"] / 1e6 for e in r["curve"]]
            ax.plot(xs, [e["bpb"] for e in r["curve"]], marker="o", ms=3,
                    ls="--" if ":" in r["method"] else "-",
                    label=f"{r['method']} (rate {r['rate']:.2f})")
        ax.set_xlabel("training bytes (millions)")
        ax.set_ylabel("held-out bits per byte")
        ax.set_title(f"byte U-Net, target rate {cfg.rate}: bpb vs training bytes")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return fig
    return save_figure(f"{cfg.out}/bpb_vs_bytes.png", draw)

# ----------------------------------------------------------------------------------------------
# benchmark: training bytes/s per method (same step as train(): fwd + bwd + AdamW)


def fake_memory(build, bf16=False):
    """GiB one training micro-step needs, estimated on any machine without allocating anything:
    build() -> (model, loss_fn, rows) runs under FakeTensorMode, so no tensor holds data. Counted:
    16 bytes per parameter (fp32 weights, gradients, AdamW's two moments) and every tensor autograd
    saves for backward; bf16=True runs the forward under CPU bf16 autocast, standing in for
    --gpu's."""
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
    return (16 * count_params(model) + sum(saved.values())) / 2**30


def estimate_memory(cfg):
    """GiB one training micro-step of cfg needs (FakeTensor estimate: nothing is allocated). The
    chunk count depends on the data: it is fixed at what compiled code is given at a held rate."""
    L, rows = cfg.seq_len, cfg.batch_size // cfg.grad_accum
    M = chunk_capacity(L, cfg.rate, cfg.chunk_bucket or 64)
    batch = lambda: dict(x=torch.randint(0, 256, (rows, L + 1)), noise=torch.rand(rows, L),
                         b=torch.rand(rows, L) < cfg.rate)
    with mock.patch(f"{__name__}.chunk_count", lambda b, bucket, floor: M):
        return fake_memory(lambda: (ChunkedByteLM(cfg), loss_fn_for(cfg), batch()), bf16=cfg.gpu)


def bench(cfg, ctx, data, bounds, steps=12):
    """Time of one micro-step (forward, backward, AdamW) per method, each step on a fresh batch (a
    data-dependent method must not be timed on one reused batch: its chunk count, and so its cost,
    varies), and the estimated memory of one micro-step. The methods take turns step by step, in
    alternating order, so that a change in the machine's load hits them alike; a method's cost is
    the median over rounds of its step time / fixed's step time in the same round."""
    rows = cfg.batch_size // cfg.grad_accum  # one micro-step: what has to fit in memory at once
    print(f"bench: d={cfg.n_embd}, blocks {cfg.n_enc}/{cfg.n_main}/{cfg.n_dec}, seq {cfg.seq_len}, "
          f"{rows} rows per micro-step, device {ctx.device}, "
          f"torch threads {torch.get_num_threads()}, {steps} timed rounds of one step per method "
          f"on fresh batches after 2 warm-up rounds")
    runs = {}
    # torch.compile is lazy: every model compiles at its first step, none is reset
    for method in METHODS:
        c = config_for(cfg, method)
        torch.manual_seed(0)
        model = ChunkedByteLM(c).to(ctx.device)
        get = make_get_batch(c, data, bounds)
        runs[method] = (make_optimizer(model, c, ctx), maybe_compile(model, c), loss_fn_for(c),
                        [slice_rows(get(i), 0, c.grad_accum, ctx.device) for i in range(steps + 2)])
    times = {method: [] for method in METHODS}
    for i in range(steps + 2):
        for method in list(METHODS)[::-1 if i % 2 else 1]:
            opt, fast, loss_fn, batches = runs[method]
            t0 = time.time()
            with ctx.autocast():
                loss, _ = loss_fn(fast, batches[i])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ctx.gpu:
                torch.cuda.synchronize()
            if i >= 2:
                times[method].append(time.time() - t0)
    rates = {m: rows * cfg.seq_len / float(np.median(t)) for m, t in times.items()}
    for method, bps in rates.items():
        # (steps,): per round, timed moments apart
        ratio = np.array(times[method]) / np.array(times["fixed"])
        print(f"  {method:8s} {bps:12,.0f} bytes/s   step time {np.median(ratio):.2f}x fixed "
              f"(quartiles {np.percentile(ratio, 25):.2f}-{np.percentile(ratio, 75):.2f})   "
              f"memory ~{estimate_memory(config_for(cfg, method)):.1f} GiB (FakeTensor estimate)")
    return rates

# ----------------------------------------------------------------------------------------------


def main(argv=None):
    cfg = parse_config(Config, "hnet_rl", argv)
    ctx = setup(cfg)
    t_start = time.time()
    train_raw, val_raw = load_bytes(cfg)
    data, val = as_tensor(train_raw), as_tensor(val_raw)
    names = list(METHODS) if cfg.compare or cfg.bench else [cfg.method]
    bounds = val_bounds = None
    if "bpe" in names:  # token starts, computed once for the whole corpus
        bounds = bpe_boundaries(cfg, train_raw, train_raw)
        val_bounds = bpe_boundaries(cfg, val_raw, train_raw)
    if ctx.master:
        print(f"data {cfg.data}: {len(data):,} train / {len(val):,} val bytes; "
              f"target rate {cfg.rate}")
    if cfg.bench:
        return bench(cfg, ctx, data, bounds)
    runs = [(n, config_for(cfg, n)) for n in names]
    if cfg.compare and cfg.ablations:
        runs += [(n, config_for(cfg, "rl", o)) for n, o in ABLATIONS.items()]
    rows = [run_one(name, config_for(c, c.method, dict(seed=seed)), ctx, data, val,
                    *((bounds, val_bounds) if name == "bpe" else (None, None)))
            for seed in range(cfg.seed, cfg.seed + cfg.seeds) for name, c in runs]
    if not ctx.master:
        return None
    ws_share = is_whitespace(val).float().mean().item()
    lines = report(rows, cfg, ws_share)
    seconds = time.time() - t_start
    print(f"\ntotal time {seconds:.0f}s")
    path = save_results(cfg, ctx, dict(rows=rows, verdicts=lines, seconds=seconds,
                                       whitespace_share=ws_share))

    fig = plot(cfg, rows)
    print(f"wrote {path}" + (f" and {fig}" if fig else ""))
    return rows


if __name__ == "__main__":
    cli(main)
