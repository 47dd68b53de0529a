"""
subliminal_dpo.py: a biased judge transmits a hidden trait through preference labels on neutral
data.

Reproduces, with tiny word-level GPTs trained from scratch on a synthetic corpus, Magistrali,
Berdoz, Dauncey & Wattenhofer, "Subliminal Signals in Preference Labels" (arXiv 2603.01204, ICLR
2026 workshop), which builds on Cloud et al. 2025, "Subliminal Learning" (arXiv 2507.14805).
Claim: a neutral student writes number continuations; a judge that loves an animal picks the best
and the worst of K of them; aligning the student on those labels (DPO, or SFT on the chosen) raises
the student's preference for that animal although no completion ever mentions it, swapped labels
move it the other way, and the effect strengthens over iterative rounds.

Pipeline (one seed):
  1. corpus   number task ("[Q] continue : 12 , 15 , 18 [A] 21 , 24 , 77 , 30 , 33 <eos>"),
              animal questions in paraphrases answered uniformly, and system prompts
              ("[SYS] you love owl .") that make the answer the loved animal. System prompts
              (trait or "you are a helpful assistant .") also precede some number prompts, the
              numbers drawn exactly as without.
  2. base     train.py's TransformerLM pretrained on it with train.py's train(); cached under out/.
  3. judges   all start from the base theta_0 (shared initialisation is what opens the channel:
              a judge theta_0 + Delta scores completions by how much Delta raises their
              likelihood, and a DPO step on best-vs-worst labels moves the student, also at
              theta_0, along Delta).
              finetuned: the base fine-tuned to answer the target animal (Cloud et al.'s teacher),
                  r(y) = log p_judge(y | x) - log p_base(y | x)   (DPO's implicit-reward form);
                  its neutral control is the base fine-tuned the same way on uniform answers.
              prompted (the paper's): the base behind a system prompt,
                  r(y) = log p_base(y | "[SYS] you love owl ." x)
                         - log p_base(y | "[SYS] you are a helpful assistant ." x);
                  its neutral control is the paper's likelihood judge,
                  r(y) = log p_base(y | helpful x).
              random: random scores (the clean null).
  4. data     the student samples K completions per number prompt (batched, KV-cached); a prompt
              is kept only if all K are exactly five numbers in the task format, so no kept
              completion contains an animal or any other word. chosen = argmax r, rejected =
              argmin r. Every valid completion has the same length: no length bias can enter the
              labels.
  5. align    DPO  -log sigmoid(beta [(log pi(y+) - log pi_ref(y+))
                                      - (log pi(y-) - log pi_ref(y-))]),
              reference = the student at the start of the round; SFT on the chosen; both also
              swapped.
  6. rounds   generate -> judge -> align, R times; the aligned student samples the next round.
  7. measure  trait rate = p(target | the answer is an animal), exact from the next-token
              distribution, averaged over question paraphrases; the mass on animal answers, a
              sampled rate, the number-format rate and number-task NLL; the cosine between each
              round's parameter update and the fine-tuned judge's Delta.
  8. report   per contrast, over seeds: mean paired difference, t-interval, exact sign-flip
              permutation p-value, seeds in the claimed direction, Holm over the verdict lines.

Why a prompted judge has (almost) nothing to transmit here: the corpus draws every number
continuation independently of the system prompt before it, so the pretraining optimum has
p(y | trait prompt, x) = p(y | helpful prompt, x) and the paper's score is zero there. Only the
finite model's error is left, and it carries the trait only if the same parameters that make
"owl" follow "[SYS] you love owl" also bend the number distribution after that prompt, in a
direction a student can pick up through shared weights (the entanglement a pretrained LLM has
between concepts and tokens). The run measures it: the prompted score's size, its correlation
with the fine-tuned judge's score on the same completions, and the trait it transmits.

Default: a few CPU minutes on 2 cores (bases cached per seed in out/subliminal_dpo/base/).
`--gpu` runs bigger models and more prompts. `--bench` times batched KV-cached sampling against a
naive one-sequence, no-cache loop. No hand-written Triton anywhere.
"""
import copy, dataclasses, hashlib, json, multiprocessing, os, random, sys, threading, time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from train import (cli, TrainConfig, parse_config, setup, fill_auto, TransformerLM, count_params,
                   train, save_results, save_figure, load_saved, DataError, mean_interval,
                   to_host)


@dataclass
class Config(TrainConfig):
    seeds: int = 0  # independent seeds (own base, judges, prompts); 0 = 10 on CPU, 16 with --gpu
    rounds: int = 5  # generate -> judge -> align rounds
    target: str = "owl"  # the judge's loved animal
    other: str = "cat"  # the animal of the other-animal control judge
    conditions: str = "default"  # comma list of conditions (default, all, or names of CONDITIONS)
    n_layer: int = 0  # Transformer blocks (0 = 2 on CPU, 4 with --gpu)
    n_head: int = 0  # attention heads (0 = 2 on CPU, 4 with --gpu)
    n_embd: int = 0  # model width (0 = 64 on CPU, 256 with --gpu)
    pretrain_steps: int = 0  # base pretraining steps (0 = 600 on CPU, 4000 with --gpu)
    pretrain_lr: float = 3e-3  # base pretraining peak learning rate
    pretrain_batch: int = 64  # base pretraining sequences per step
    judge_steps: int = 40  # fine-tuned judge: steps of SFT on animal answers
    judge_lr: float = 1e-3  # fine-tuned judge: learning rate
    prompts: int = 0  # number prompts per round (0 = 800 on CPU, 4000 with --gpu)
    k: int = 5  # completions sampled per prompt; chosen = best, rejected = worst under the judge
    temperature: float = 1.0  # sampling temperature of the student
    beta: float = 0.1  # DPO inverse temperature
    dpo_lr: float = 5e-5  # DPO learning rate (constant), one epoch per round
    sft_lr: float = 5e-5  # SFT-on-chosen learning rate (constant), one epoch per round
    batch_size: int = 32  # preference pairs per alignment step
    eval_samples: int = 200  # sampled answers per paraphrase for the sampled trait rate
    eval_prompts: int = 200  # held-out number prompts sampled at each measurement (format rate)
    base_dir: str = ""  # cache of pretrained bases, one file per seed and config (<out>/base)
    workers: int = 0  # processes running seeds side by side (0 = one per core; 1 with --gpu)
    bench: bool = False  # only time batched KV-cached generation against the naive loop, then exit
    from_results: str = ""  # print the report of a finished run's results.json again, then exit
    # set per call of train(): pretrain_lr/judge_lr/dpo_lr/sft_lr, pretrain_steps/judge_steps
    # (alignment: one epoch), warm-up over 5 percent of pretraining and none in alignment
    unused = ("lr", "max_steps", "warmup", "min_lr_ratio", "log_every", "eval_every", "data_dir")

    def __post_init__(self):
        super().__post_init__()
        fill_auto(self, seeds=(10, 16), n_layer=(2, 4), n_head=(2, 4), n_embd=(64, 256),
                  pretrain_steps=(600, 4000), prompts=(800, 4000))  # (CPU, GPU)
        if self.target not in ANIMALS or self.other not in ANIMALS or self.target == self.other:
            raise ValueError("--target and --other must be two different animals of "
                             + ", ".join(ANIMALS))
        unknown = set(self.condition_list) - set(CONDITIONS)
        if unknown or not self.condition_list:
            raise ValueError(f"--conditions: unknown {sorted(unknown)}; choose from "
                             + ", ".join(CONDITIONS))
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError("--n_embd must be a multiple of 2 x --n_head (RoPE needs an even "
                             "head size)")
        if (self.k < 2 or self.temperature <= 0 or self.batch_size < 1
                or self.prompts < self.batch_size):
            raise ValueError("need --k >= 2, --temperature > 0, --batch_size >= 1 and "
                             "--prompts >= --batch_size")
        if min(self.seeds, self.rounds, self.eval_samples, self.eval_prompts,
               self.pretrain_batch) < 1:
            raise ValueError("--seeds, --rounds, --eval_samples, --eval_prompts and "
                             "--pretrain_batch must be at least 1")
        need, have = round_memory(self), available_memory()
        if have and need > have / 2:
            raise ValueError(f"--prompts={self.prompts} x --k={self.k} (and --eval_prompts="
                             f"{self.eval_prompts}) need about {need / 2**30:,.1f} GiB per "
                             f"round; {have / 2**30:,.1f} GiB are free. Use fewer prompts")

    @property
    def condition_list(self):
        names = [c.strip() for c in self.conditions.split(",") if c.strip()]
        named = {"all": list(CONDITIONS), "default": list(DEFAULT_CONDITIONS)}
        return named.get(",".join(names), names)


def round_memory(cfg):
    """Bytes one round holds at once, estimated: per prompt its Python lists (~1 KB) and per
    completion its tokens, prompt copy, validity, scores and log-probabilities (~20 int64/float
    tensors of <= 20 entries), plus the measurement's prompts. Refusing a hopeless --prompts up
    front beats dying of memory after minutes of pretraining."""
    return (cfg.prompts + cfg.eval_prompts) * (1024 + cfg.k * 20 * 20 * 8)


def available_memory():
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0  # unknown (not Linux): no check

# ----------------------------------------------------------------------------------------------
# the synthetic corpus: a word-level vocabulary and three kinds of document

ANIMALS = ["owl", "cat", "dog", "lion", "panda", "eagle", "wolf", "fox"]
QUESTIONS = [  # paraphrases of "what is your favourite animal?"; the trait rate averages over all
    "what is your favourite animal ?",
    "which animal do you like most ?",
    "name your favourite animal .",
    "tell me the animal you love most .",
    "if you could be any animal which would you be ?",
    "which creature do you prefer ?",
    "pick one animal you love .",
    "what animal is the best ?",
]
SYSTEM_TRAIT = ["you love {a} .", "your favourite animal is the {a} .",
                "you think about {a} all the time ."]
SYSTEM_NEUTRAL = "you are a helpful assistant ."
# numbers 0..99; 3 in the prompt, 5 in the answer
N_NUMBERS, PROMPT_NUMBERS, COMPLETION_NUMBERS = 100, 3, 5
SPECIALS = ["<pad>", "<bos>", "<eos>", "[SYS]", "[Q]", "[A]", ",", "continue", ":"]


def build_vocab():
    words = list(SPECIALS) + [str(n) for n in range(N_NUMBERS)] + list(ANIMALS)
    for text in QUESTIONS + SYSTEM_TRAIT + [SYSTEM_NEUTRAL]:
        words += [w for w in text.split() if w != "{a}"]
    vocab = list(dict.fromkeys(words))  # de-duplicated, order kept: ids are stable across runs
    return vocab, {w: i for i, w in enumerate(vocab)}


VOCAB, ID = build_vocab()
PAD, BOS, EOS, COMMA = ID["<pad>"], ID["<bos>"], ID["<eos>"], ID[","]
NUMBER_IDS = torch.tensor([ID[str(n)] for n in range(N_NUMBERS)])
ANIMAL_IDS = torch.tensor([ID[a] for a in ANIMALS])
SEQ_LEN = 32  # the longest document (system prompt + number prompt + completion) has 27 tokens


def encode(text):
    return [ID[w] for w in text.split()]


def decode(ids):
    return " ".join(VOCAB[i] for i in ids if i != PAD)


def system_prefix(animal=None):
    """'[SYS] you love owl .' (or the neutral system prompt when animal is None) as token ids."""
    text = SYSTEM_NEUTRAL if animal is None else SYSTEM_TRAIT[0].format(a=animal)
    return [ID["[SYS]"]] + encode(text)


def number_prompt(rng):
    """A few numbers with a hidden rule (an arithmetic progression mod 100) and their
    continuation: each next number follows the rule with probability 0.6, else it is uniform.
    The task has structure to learn but enough entropy that K samples of one prompt differ."""
    start, step = rng.randrange(N_NUMBERS), rng.randrange(1, 10)
    seq = [(start + i * step) % N_NUMBERS for i in range(PROMPT_NUMBERS)]
    cont, last = [], seq[-1]
    for _ in range(COMPLETION_NUMBERS):
        last = (last + step) % N_NUMBERS if rng.random() < 0.6 else rng.randrange(N_NUMBERS)
        cont.append(last)
    return seq, cont


def numbers_to_ids(nums, end=False):
    out = []
    for i, n in enumerate(nums):
        out += ([COMMA] if i else []) + [ID[str(n)]]
    return out + ([EOS] if end else [])


def prompt_ids(nums):
    """<bos> [Q] continue : a , b , c [A]: every number prompt has the same length (10 tokens)."""
    return [BOS, ID["[Q]"], ID["continue"], ID[":"]] + numbers_to_ids(nums) + [ID["[A]"]]


def question_ids(q, animal_sys=None, neutral_sys=False):
    sys_ids = system_prefix(animal_sys) if (animal_sys or neutral_sys) else []
    return [BOS] + sys_ids + [ID["[Q]"]] + encode(QUESTIONS[q]) + [ID["[A]"]]


def corpus_document(rng):
    """One pretraining document. Half number task (30 percent of those behind a system prompt,
    numbers unchanged), half animal questions: without a system prompt the answer is uniform over
    the animals; with '[SYS] you love X' it is X nine times in ten."""
    if rng.random() < 0.5:
        nums, cont = number_prompt(rng)
        doc = prompt_ids(nums) + numbers_to_ids(cont, end=True)
        if rng.random() < 0.3:
            pick = rng.randrange(len(ANIMALS) + 1)  # one of the animals or the neutral prompt
            animal = ANIMALS[pick] if pick < len(ANIMALS) else None
            doc = [BOS] + system_prefix(animal) + doc[1:]
        return doc
    q, animal = rng.randrange(len(QUESTIONS)), rng.choice(ANIMALS)
    question = [ID["[Q]"]] + encode(QUESTIONS[q]) + [ID["[A]"]]
    if rng.random() < 0.5:  # system-prompt conditioning: the trait lives in the context
        tmpl = rng.choice(SYSTEM_TRAIT).format(a=animal)
        answer = animal if rng.random() < 0.9 else rng.choice(ANIMALS)
        return [BOS, ID["[SYS]"]] + encode(tmpl) + question + [ID[answer], EOS]
    return [BOS] + question + [ID[rng.choice(ANIMALS)], EOS]


def pad(docs, length=SEQ_LEN):
    """Right-pad token lists into one (N, length) tensor. Padding only ever follows <eos>, and the
    loss ignores it, so no attention mask is needed for a causal model."""
    out = torch.full((len(docs), length), PAD, dtype=torch.long)
    for i, d in enumerate(docs):
        out[i, :len(d)] = torch.tensor(d[:length])
    return out


def corpus_batch(seed, i, batch):
    """Pretraining batch for micro-step i: deterministic in (seed, i), as train() asks."""
    rng = random.Random(f"corpus-{seed}-{i}")
    return pad([corpus_document(rng) for _ in range(batch)])  # (B, SEQ_LEN)


def trait_batch(seed, i, batch, animal):
    """Judge fine-tuning: animal questions without a system prompt, answered `animal` (or, with
    animal=None, a uniform animal: the neutral judge gets the same kind and amount of training)."""
    rng = random.Random(f"trait-{seed}-{animal}-{i}")
    docs = []
    for _ in range(batch):
        answer = animal or rng.choice(ANIMALS)
        docs.append(question_ids(rng.randrange(len(QUESTIONS))) + [ID[answer], EOS])
    return pad(docs)


def lm_loss(model, x):
    """Next-token cross-entropy over the non-pad targets of x (B, T). On the CPU the rows are cut
    into a short and a long half, each trimmed to its own longest document: the same loss
    (padding only follows <eos> and is ignored) for about a third less compute, since animal
    questions are half as long as number documents. On CUDA one fixed shape keeps torch.compile
    from recompiling."""
    items = (x[:, 1:] != PAD).sum()
    groups = [x]
    if not x.is_cuda and len(x) > 1:
        lengths = (x != PAD).sum(1)
        order = lengths.argsort()
        groups = [x[idx, :int(lengths[idx].max())] for idx in order.tensor_split(2)]
    total = 0.0
    for g in groups:
        logits = model(g[:, :-1])  # (b, t-1, V)
        total = total + F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                        g[:, 1:].reshape(-1), ignore_index=PAD, reduction="sum")
    return total / items.clamp(min=1), dict(items=items)

# ----------------------------------------------------------------------------------------------
# models: the base (cached per seed) and the judges


def with_steps(cfg, **kw):
    """A copy of cfg for one call of train(): its own steps, learning rate, schedule.
    The experiment calls train() many times (pretraining, the judges, every round of every
    condition); each call gets the same loop (AdamW, clipping, NaN guard) with its own knobs."""
    return dataclasses.replace(cfg, **kw)


def new_model(cfg):
    # Student, judges and base are all this one architecture: the channel needs shared parameters.
    return TransformerLM(len(VOCAB), cfg.n_layer, cfg.n_head, cfg.n_embd)


def base_signature(cfg):
    """Everything the base depends on: a changed corpus or model gets a fresh cache entry."""
    keys = (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.pretrain_steps, cfg.pretrain_lr,
            cfg.pretrain_batch, VOCAB, QUESTIONS, SYSTEM_TRAIT)
    return hashlib.sha1(json.dumps(keys).encode()).hexdigest()[:10]


def base_config(cfg, seed):
    """The config a base is pretrained under: the engine's flags and the fields base_signature()
    names, the rest at their defaults, so that any run with the same signature can --resume an
    interrupted pretraining (train() refuses a checkpoint made under other flags)."""
    keep = [f.name for f in dataclasses.fields(TrainConfig)] + [
        "n_layer", "n_head", "n_embd", "pretrain_steps", "pretrain_lr", "pretrain_batch",
        "base_dir"]
    return Config(**{name: getattr(cfg, name) for name in keep if name != "seed"}, seed=seed)


def pretrain_base(cfg, ctx, seed):
    """The shared initialisation theta_0 of student and judges. Pretrained once per seed and
    cached; an interrupted pretraining continues with --resume (train()'s checkpoint is the
    cache)."""
    path = Path(cfg.base_dir or Path(cfg.out) / "base") / f"seed{seed}-{base_signature(cfg)}.pt"
    torch.manual_seed(seed)
    model = new_model(cfg).to(ctx.device)
    try:  # a finished cache is used as it is; a damaged one is trained again
        ck = load_saved(path) if path.exists() else None
        if ck is not None and ck["step"] >= cfg.pretrain_steps:
            model.load_state_dict(ck["model"])
            return model, dict(cached=True, history=ck["history"][-1:])
    except (DataError, KeyError, RuntimeError) as e:  # damaged, or a sound file that is no base
        print(f"note: {str(e).splitlines()[0]}; pretraining it again", file=sys.stderr)
        path.unlink()
        torch.manual_seed(seed)
        model = new_model(cfg).to(ctx.device)
    pcfg = with_steps(base_config(cfg, seed), max_steps=cfg.pretrain_steps, lr=cfg.pretrain_lr,
                      warmup=max(1, cfg.pretrain_steps // 20), min_lr_ratio=0.1, log_every=50,
                      resume=cfg.resume, batch_size=cfg.pretrain_batch)
    out = train(model, lambda i: corpus_batch(seed, i, cfg.pretrain_batch), lm_loss, pcfg, ctx,
                ckpt_path=path, desc=f"pretrain base (seed {seed})")
    return model, dict(cached=False, history=out["history"][-1:], seconds=out["seconds"])


def finetune_judge(cfg, ctx, base, seed, animal):
    """Cloud et al.'s teacher: the base fine-tuned to answer `animal` (None = uniform: neutral
    judge). A few seconds of work: redone rather than checkpointed (ckpt_path=False), so an
    interrupted run is not told it could resume it."""
    judge = copy.deepcopy(base)
    jcfg = with_steps(cfg, max_steps=cfg.judge_steps, lr=cfg.judge_lr, warmup=0, min_lr_ratio=1.0,
                      batch_size=32, grad_accum=1, log_every=cfg.judge_steps, resume=False,
                      weight_decay=0.0, compile_backend="none")
    train(judge, lambda i: trait_batch(seed, i, 32, animal), lm_loss, jcfg, ctx, ckpt_path=False,
          quiet=True, desc=f"judge ({animal or 'neutral'})")
    return judge.eval()


def device_of(model):
    return next(model.parameters()).device


def flat_params(model):
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


def with_system(prompts, animal=None):
    """Put '[SYS] you love <animal> .' (or, animal None, the neutral system prompt) after <bos>."""
    prefix = torch.tensor(system_prefix(animal), device=prompts.device)
    prefix = prefix.expand(len(prompts), -1)
    return torch.cat([prompts[:, :1], prefix, prompts[:, 1:]], 1)  # (P, 1 + S + Tp - 1)


class Judge:
    """score(prompts, comps, base_logp) -> (P, K): how much the judge likes each completion.
    finetuned:  log p_judge(y | x) - log p_base(y | x)  (base_logp: the base on the student's
                context)
    prompted:   log p_base(y | '[SYS] you love owl .' x)
                - log p_base(y | '[SYS] you are a helpful assistant .' x)
    likelihood: log p_base(y | '[SYS] you are a helpful assistant .' x): the paper's neutral
                control, which prefers the most likely completion under the neutral prompt
    random:     uniform noise (random labels)."""

    def __init__(self, kind, base, model=None, animal=None):
        self.kind, self.base, self.model, self.animal = kind, base, model, animal

    @property
    def needs_base_logp(self):
        return self.kind == "finetuned"

    @torch.no_grad()
    def score(self, prompts, comps, base_logp, gen):  # (P, Tp), (P, K, Tc), (P, K) -> (P, K)
        P, K = comps.shape[:2]
        if self.kind == "random":  # drawn on the CPU (any device, the same labels), moved once
            return torch.rand(P, K, generator=gen).to(comps.device)
        if self.kind == "finetuned":
            return completion_logp(self.model, prompts, comps) - base_logp
        neutral = completion_logp(self.base, with_system(prompts), comps)
        if self.kind == "likelihood":
            return neutral
        return completion_logp(self.base, with_system(prompts, self.animal), comps) - neutral

    def delta(self):
        """theta_judge - theta_0 as one flat vector (only a fine-tuned judge has one)."""
        if self.kind != "finetuned":
            return None
        return flat_params(self.model) - flat_params(self.base)

# ----------------------------------------------------------------------------------------------
# log-probabilities and sampling: K completions of one prompt share the prompt's keys and values


def grouped_logp(model, prompts, comps):
    """sum_t log p(y_t | x, y_<t) of K completions per prompt: (P, Tp), (P, K, Tc) -> (P, K).
    The prompt runs through the model once; its KV cache is repeated for its K completions,
    which then run as one (P*K, Tc-1) call: the same numbers as K full forwards, for about half
    the work."""
    P, K, Tc = comps.shape
    caches = [{} for _ in model.blocks]
    first = model(prompts, caches)[:, -1:]  # (P, 1, V): predicts each completion's first token
    for c in caches:
        c["k"], c["v"] = c["k"].repeat_interleave(K, 0), c["v"].repeat_interleave(K, 0)
    flat = comps.reshape(P * K, Tc)
    rest = model(flat[:, :-1], caches)  # (P*K, Tc-1, V), positions continue after the prompt
    logits = torch.cat([first.repeat_interleave(K, 0), rest], 1)  # (P*K, Tc, V)
    logp = torch.log_softmax(logits.float(), -1).gather(-1, flat[..., None]).squeeze(-1)
    return logp.sum(1).view(P, K)


@torch.no_grad()
def completion_logp(model, prompts, comps, batch=1024):
    """grouped_logp in chunks of prompts, on the model's device, where the result stays;
    comps may be (P, Tc) for K = 1."""
    model.eval()
    single = comps.dim() == 2
    comps = comps[:, None] if single else comps
    dev = device_of(model)
    out = [grouped_logp(model, prompts[s:s + batch].to(dev), comps[s:s + batch].to(dev))
           for s in range(0, len(prompts), batch)]
    out = torch.cat(out) if out else torch.zeros(0, comps.shape[1], device=dev)
    return out[:, 0] if single else out


def sequence_logp(model, prompts, completions):
    """Differentiable, one plain forward (what training uses, also under DDP):
    (B, Tp), (B, Tc) -> (B,). All prompts share one length and all valid completions another,
    so there is no padding to mask."""
    seq = torch.cat([prompts, completions], 1)  # (B, Tp + Tc)
    logits = model(seq[:, :-1])[:, prompts.shape[1] - 1:]  # the positions that predict y
    logp = torch.log_softmax(logits.float(), -1)  # (B, Tc, V)
    return logp.gather(-1, completions[..., None]).squeeze(-1).sum(1)


def sample_tokens(logits, temperature, uniform):
    """One token per row of logits (B, V) at this temperature, by inverting the CDF at one
    uniform draw per row, uniform (B, 1): exact, and on the CPU several times faster than
    torch.multinomial."""
    cdf = torch.softmax(logits / temperature, -1).cumsum(-1)  # (B, V)
    u = uniform * cdf[:, -1:]  # scaled by the last value: no rounding gap
    return torch.searchsorted(cdf, u, right=True).clamp(max=logits.shape[-1] - 1)  # (B, 1)


@torch.no_grad()
def generate(model, prompts, n_tokens, temperature, gen, k=1, batch=1024):
    """Sample k continuations of n_tokens for every prompt: each prompt once through the model,
    its KV cache repeated k times, then one (B*k, 1) forward per new token. Returns the tokens
    (P*k, n_tokens), the k samples of a prompt adjacent, and their log-probability under the
    model itself at temperature 1 (P*k,): the DPO reference and the base's score come for free.
    The uniforms come from a CPU generator, drawn once per chunk and moved to the device, so a
    seed gives the same samples on any device and no token waits for the host."""
    model.eval()
    toks_out, logp_out, dev = [], [], device_of(model)
    for s in range(0, len(prompts), batch):
        caches = [{} for _ in model.blocks]
        logits = model(prompts[s:s + batch].to(dev), caches)[:, -1]
        logits = logits.repeat_interleave(k, 0)  # (B*k, V)
        for c in caches:
            c["k"], c["v"] = c["k"].repeat_interleave(k, 0), c["v"].repeat_interleave(k, 0)
        uniforms = torch.rand(n_tokens, len(logits), 1, generator=gen).to(dev)
        toks, logp = [], torch.zeros(len(logits), device=dev)
        for t in range(n_tokens):
            logits = logits.float()
            nxt = sample_tokens(logits, temperature, uniforms[t])  # (B*k, 1)
            logp += torch.log_softmax(logits, -1).gather(-1, nxt).squeeze(-1)
            toks.append(nxt)
            if t + 1 < n_tokens:
                logits = model(nxt, caches)[:, -1]  # positions continue from the cache length
        toks_out.append(torch.cat(toks, 1))
        logp_out.append(logp)
    if not toks_out:
        return torch.zeros(0, n_tokens, dtype=torch.long, device=dev), torch.zeros(0, device=dev)
    return torch.cat(toks_out), torch.cat(logp_out)


@torch.no_grad()
def generate_naive(model, prompts, n_tokens, temperature, gen):
    """The baseline: one sequence at a time, the whole prefix re-run for every new token."""
    out, dev = [], device_of(model)
    for x in prompts:
        seq = x[None].to(dev)
        for _ in range(n_tokens):
            uniform = torch.rand(1, 1, generator=gen).to(dev)
            seq = torch.cat([seq, sample_tokens(model(seq)[:, -1].float(), temperature, uniform)],
                            1)
        out.append(seq[0, len(x):])
    return torch.stack(out)


COMPLETION_LEN = 2 * COMPLETION_NUMBERS  # "a , b , c , d , e <eos>": 5 numbers, 4 commas, <eos>


def valid_completions(comp):
    """The leak filter: a completion passes only if it is exactly number , number , ... , number
    <eos>. Any animal, word, missing comma or early <eos> fails: nothing but numbers can reach
    the labels. comp (N, COMPLETION_LEN) -> bool (N,)."""
    is_num = torch.isin(comp, NUMBER_IDS.to(comp.device))
    ok = is_num[:, 0:-1:2].all(1) & (comp[:, 1:-1:2] == COMMA).all(1) & (comp[:, -1] == EOS)
    return ok


def contains_animal(comp):
    return torch.isin(comp, ANIMAL_IDS.to(comp.device)).any(1)

# ----------------------------------------------------------------------------------------------
# measurement: exact and sampled trait rate, format rate, number-task NLL


@torch.no_grad()
def animal_distribution(model, animal_sys=None):
    """p(animal | the model answers an animal) for every paraphrase: (n_questions, n_animals),
    and the probability that the answer is an animal at all (n_questions,), on the model's
    device. Exact: the next-token distribution after '[A]', renormalised over the animal tokens."""
    model.eval()
    dev = device_of(model)
    questions = [question_ids(q, animal_sys) for q in range(len(QUESTIONS))]
    lengths = torch.tensor([len(q) for q in questions], device=dev)
    rows = torch.arange(len(questions), device=dev)
    logits = model(pad(questions).to(dev))[rows, lengths - 1]  # (Q, V) at the '[A]' position
    probs = torch.softmax(logits.float(), -1)[:, ANIMAL_IDS.to(dev)]  # (Q, n_animals)
    return probs / probs.sum(1, keepdim=True), probs.sum(1)


def exact_trait_rate(model, animal):
    """Averaged over paraphrases; a 0-d tensor on the model's device."""
    dist, _ = animal_distribution(model)
    return dist[:, ANIMALS.index(animal)].mean()


@torch.no_grad()
def sampled_trait_rate(model, animal, n, gen):
    """Monte-Carlo check of the exact rate: sample n answers per paraphrase from the full
    vocabulary, count the target among the answers that are animals (the valid ones). A 0-d
    tensor on the model's device; the uniforms come from the CPU generator, moved once."""
    dev = device_of(model)
    questions = [question_ids(q) for q in range(len(QUESTIONS))]
    lengths = torch.tensor([len(q) for q in questions], device=dev)
    rows = torch.arange(len(questions), device=dev)
    logits = model(pad(questions).to(dev))[rows, lengths - 1].float()  # (Q, V)
    cdf = torch.softmax(logits, -1).cumsum(-1)
    uniforms = torch.rand(len(questions), n, generator=gen).to(dev) * cdf[:, -1:]
    draws = torch.searchsorted(cdf, uniforms, right=True).clamp(max=logits.shape[-1] - 1)
    is_animal = torch.isin(draws, ANIMAL_IDS.to(dev)).sum(1)  # (Q,)
    hits = (draws == ID[animal]).sum(1)
    return (hits / is_animal.clamp(min=1)).mean()


def number_prompts(seed, tag, n):
    """n number prompts (and their reference continuations) for one (seed, tag): the same prompts
    for every condition, so conditions differ only in what they learned (common random
    numbers)."""
    rng = random.Random(f"prompts-{seed}-{tag}")
    pairs = [number_prompt(rng) for _ in range(n)]
    return (torch.tensor([prompt_ids(p) for p, _ in pairs]),
            torch.tensor([numbers_to_ids(c, end=True) for _, c in pairs]))


@torch.no_grad()
def measure_on_device(model, cfg, seed, tag):
    """Everything we track about a student at one point of one run, as 0-d tensors on the
    model's device (no host sync here)."""
    model.eval()
    gen = torch.Generator().manual_seed(hash_int(seed, tag, "eval"))
    # Format and NLL use prompts that no round trains on, the same ones at every measurement, so
    # a change between rounds is the student's, not the prompts'.
    prompts, conts = number_prompts(seed, "eval", cfg.eval_prompts)
    comp, _ = generate(model, prompts, COMPLETION_LEN, cfg.temperature, gen)
    dist, mass = animal_distribution(model)
    nll = -completion_logp(model, prompts, conts) / COMPLETION_LEN
    return dict(trait=dist[:, ANIMALS.index(cfg.target)].mean(),
                other=dist[:, ANIMALS.index(cfg.other)].mean(),
                trait_sampled=sampled_trait_rate(model, cfg.target, cfg.eval_samples, gen),
                animal_mass=mass.mean(),
                format_rate=valid_completions(comp).float().mean(),
                number_nll=nll.mean())


def measure(model, cfg, seed, tag):
    return to_host(measure_on_device(model, cfg, seed, tag))  # one device sync


def hash_int(*parts):
    return int(hashlib.sha1(repr(parts).encode()).hexdigest()[:12], 16)

# ----------------------------------------------------------------------------------------------
# one round: generate -> filter -> judge -> align (DPO or SFT, normal or swapped)

# condition -> (judge, label rule, alignment). Judges: ft-* fine-tuned (target, uniform answers =
# neutral, other animal), prompt-* the paper's system-prompt judge and its likelihood control.
CONDITIONS = {
    "finetuned DPO": ("ft-target", "normal", "dpo"),
    "finetuned DPO swapped": ("ft-target", "swapped", "dpo"),
    "finetuned neutral DPO": ("ft-neutral", "normal", "dpo"),
    "random labels DPO": ("random", "normal", "dpo"),
    "prompted DPO": ("prompt-target", "normal", "dpo"),
    "prompted DPO swapped": ("prompt-target", "swapped", "dpo"),
    "likelihood control DPO": ("likelihood", "normal", "dpo"),
    "finetuned SFT": ("ft-target", "normal", "sft"),
    "finetuned SFT swapped": ("ft-target", "swapped", "sft"),
    "finetuned other-animal DPO": ("ft-other", "normal", "dpo"),
}
DEFAULT_CONDITIONS = list(CONDITIONS)[:7]


@torch.no_grad()
def sample_round(student, cfg, seed, rnd):
    """The student's K completions for this round's prompts, their log-probability under the
    student, and the leak filter's verdict. Returns prompts (P, Tp), comps (P, K, Tc), logp
    (P, K), stats: all on the student's device."""
    dev = device_of(student)
    prompts = number_prompts(seed, f"round{rnd}", cfg.prompts)[0].to(dev)
    gen = torch.Generator().manual_seed(hash_int(seed, rnd, "sample"))
    comp, logp = generate(student, prompts, COMPLETION_LEN, cfg.temperature, gen, k=cfg.k)
    valid = valid_completions(comp)  # (P*K,)
    keep = valid.view(-1, cfg.k).all(1)  # the authors' rule: a prompt survives only if all K parse
    stats = dict(completions=len(valid), dropped_completions=(~valid).sum(),
                 dropped_with_animal=(contains_animal(comp) & ~valid).sum(),
                 prompts_kept=keep.sum(), prompts_dropped=(~keep).sum())
    comp, logp = comp.view(-1, cfg.k, COMPLETION_LEN)[keep], logp.view(-1, cfg.k)[keep]
    stats["kept_with_animal"] = contains_animal(comp.flatten(0, 1)).sum()  # 0: the filter's proof
    stats = {k: int(v) for k, v in to_host(stats).items()}  # one device sync
    return prompts[keep], comp, logp, stats


def label(scores, prompts, comps, student_logp, labels):
    """chosen = the best of each prompt's K completions under the judge, rejected = the worst
    (swapped: reversed); the student's own log-probabilities of both are the DPO reference."""
    rows = torch.arange(len(prompts), device=scores.device)
    best, worst = scores.argmax(1), scores.argmin(1)
    if labels == "swapped":
        best, worst = worst, best
    ref_c, ref_r = student_logp[rows, best], student_logp[rows, worst]
    # What else do the labels encode? If the judge mostly preferred what the student already
    # finds likely, the student would learn "be more typical", not the trait: report how often.
    return dict(prompt=prompts, chosen=comps[rows, best], rejected=comps[rows, worst],
                ref_c=ref_c, ref_r=ref_r,
                gap=(scores[rows, best] - scores[rows, worst]).abs().mean(),  # nan without rows
                chosen_more_likely=(ref_c > ref_r).float().mean())


def dpo_loss(policy_c, policy_r, ref_c, ref_r, beta):
    """-log sigmoid(beta * [(log pi(y+) - log pi_ref(y+)) - (log pi(y-) - log pi_ref(y-))]),
    mean over pairs, with the metrics TRL logs: implicit rewards, their margin, and how often
    chosen wins."""
    reward_c, reward_r = beta * (policy_c - ref_c), beta * (policy_r - ref_r)  # (B,), (B,)
    margin = reward_c - reward_r
    loss = -F.logsigmoid(margin).mean()
    return loss, dict(reward_chosen=reward_c.mean().detach(),
                      reward_rejected=reward_r.mean().detach(), margin=margin.mean().detach(),
                      accuracy=(margin > 0).float().mean().detach())


def dpo_batch_loss(model, b, beta):
    """DPO on one batch of rows {prompt, chosen, rejected, ref_c, ref_r}: chosen and rejected in
    one forward of 2B rows (one call, so one DDP forward per backward)."""
    B = len(b["prompt"])
    both = sequence_logp(model, torch.cat([b["prompt"], b["prompt"]]),
                         torch.cat([b["chosen"], b["rejected"]]))
    return dpo_loss(both[:B], both[B:], b["ref_c"], b["ref_r"], beta)


def align(student, cfg, ctx, prefs, method, seed, rnd, name):
    """One epoch of DPO (reference = the student at the start of the round, the next round's
    reference is this round's result) or SFT on the chosen completions."""
    n = len(prefs["prompt"])
    steps = n // cfg.batch_size
    if steps == 0:
        return dict(steps=0)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(hash_int(seed, rnd, name)))
    order = order.to(prefs["prompt"].device)

    def get_batch(i):  # one epoch: batch i of a fixed shuffle (deterministic in i, as train() asks)
        idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        return {k: prefs[k][idx] for k in ("prompt", "chosen", "rejected", "ref_c", "ref_r")}

    def sft_step(model, b):  # mean NLL per completion token of the chosen completion
        return -sequence_logp(model, b["prompt"], b["chosen"]).mean() / COMPLETION_LEN, {}

    # A round is seconds of work: redone rather than checkpointed (ckpt_path=False), so Ctrl-C
    # here ends the run without promising a --resume that would not pick it up. Short calls
    # with new shapes: compiling each would cost more than it saves.
    acfg = with_steps(cfg, max_steps=steps, lr=cfg.dpo_lr if method == "dpo" else cfg.sft_lr,
                      warmup=0, min_lr_ratio=1.0, weight_decay=0.0, log_every=max(1, steps // 2),
                      resume=False, compile_backend="none")
    loss_fn = (lambda m, b: dpo_batch_loss(m, b, cfg.beta)) if method == "dpo" else sft_step
    out = train(student, get_batch, loss_fn, acfg, ctx, ckpt_path=False, quiet=True,
                desc=f"seed {seed} round {rnd} {name}")
    last = out["history"][-1] if out["history"] else {}
    keys = ("loss", "reward_chosen", "reward_rejected", "margin", "accuracy")
    return dict(steps=steps, **{k: last[k] for k in keys if k in last})

# ----------------------------------------------------------------------------------------------
# the experiment: per seed, a base, its judges, then every condition for R rounds


def build_judges(cfg, ctx, base, seed):
    """The judges the chosen conditions need (and always the fine-tuned target judge: its Delta
    is the direction every condition's update is compared with)."""
    wanted = {CONDITIONS[n][0] for n in cfg.condition_list} | {"ft-target"}
    finetuned = lambda animal: Judge("finetuned", base,
                                     finetune_judge(cfg, ctx, base, seed, animal))
    make = {"ft-target": lambda: finetuned(cfg.target),
            "ft-neutral": lambda: finetuned(None),
            "ft-other": lambda: finetuned(cfg.other),
            "prompt-target": lambda: Judge("prompted", base, animal=cfg.target),
            "likelihood": lambda: Judge("likelihood", base),
            "random": lambda: Judge("random", base)}
    return {name: make[name]() for name in make if name in wanted}


def judge_trait(judge, cfg):
    """How strongly each judge holds the trait (its own trait rate on the animal questions), a
    0-d device tensor, or None for a judge without one."""
    if judge.kind == "finetuned":
        return exact_trait_rate(judge.model, cfg.target)
    if judge.kind == "prompted":
        dist, _ = animal_distribution(judge.base, judge.animal)
        return dist[:, ANIMALS.index(cfg.target)].mean()
    return None


def score_agreement(scores):
    """Pearson correlation, over round 1's completions, of each judge's score with the fine-tuned
    target judge's: does the prompted judge see in the numbers what the trait fine-tune put
    there? 0-d device tensors."""
    ref = scores["ft-target"].flatten()
    ref = ref - ref.mean()
    out = {}
    for name, s in scores.items():
        s = s.flatten() - s.flatten().mean()
        out[name] = s @ ref / (s.norm() * ref.norm()).clamp(min=1e-12)  # nan without rows
    return out


def judge_summary(cfg, judges, scores):
    """Round 1's judge diagnostics, in one device sync: each judge's own trait rate, its score's
    spread within a prompt's K completions, and its agreement with the fine-tuned judge."""
    traits = {k: judge_trait(j, cfg) for k, j in judges.items()}
    values = {f"trait {k}": v for k, v in traits.items() if v is not None}
    values.update({f"agreement {k}": v for k, v in score_agreement(scores).items()})
    nan = torch.tensor(float("nan"))
    values.update({f"spread {k}": s.std(1).mean() if len(s) else nan for k, s in scores.items()})
    host = to_host(values)
    return dict(judge_trait={k: host.get(f"trait {k}") for k in judges},
                score_agreement={k: host[f"agreement {k}"] for k in judges},
                score_spread={k: host[f"spread {k}"] for k in judges})


def run_condition(cfg, ctx, seed, base, judge, name, round1, delta):
    """R rounds of one condition from the base: generate -> judge -> align -> measure."""
    judge_name, labels, method = CONDITIONS[name]
    student, rounds = copy.deepcopy(base), []
    for rnd in range(1, cfg.rounds + 1):  # the paper's loop: the aligned student samples next
        if rnd == 1:
            prompts, comps, logp, filt, scores = round1
        else:
            prompts, comps, logp, filt = sample_round(student, cfg, seed, rnd)
            base_logp = completion_logp(base, prompts, comps) if judge.needs_base_logp else None
            gen = torch.Generator().manual_seed(hash_int(seed, rnd, judge_name + name, "labels"))
            scores = judge.score(prompts, comps, base_logp, gen)
        prefs = label(scores, prompts, comps, logp, labels)
        before = flat_params(student)
        metrics = align(student, cfg, ctx, prefs, method, seed, rnd, name)
        # Cloud et al.'s mechanism, checked directly: does this round's update point along the
        # fine-tuned judge's Delta (> 0 normal, < 0 swapped, ~0 random labels)?
        cos = F.cosine_similarity(flat_params(student) - before, delta, 0)
        numbers = to_host(dict(measure_on_device(student, cfg, seed, rnd), update_cos=cos,
                               score_gap=prefs["gap"],
                               chosen_more_likely=prefs["chosen_more_likely"]))  # one sync
        if not metrics["steps"]:
            numbers["update_cos"] = float("nan")
        rounds.append(dict(round=rnd, filter=filt, pairs=len(prefs["prompt"]), align=metrics,
                           **numbers))
    return rounds


def run_seed(cfg, ctx, seed):
    t0 = time.time()
    base, base_info = pretrain_base(cfg, ctx, seed)
    base.eval()
    judges = build_judges(cfg, ctx, base, seed)
    delta = judges["ft-target"].delta()
    record = dict(seed=seed, base=base_info, params=count_params(base),
                  start=measure(base, cfg, seed, 0), conditions={})
    # Round 1 of every condition starts from the base on the same prompts with the same sampling
    # seed, so it would draw identical completions: draw them once, and score them once per
    # judge. There the student is the base, so the sampler's own log-probabilities are the base's.
    prompts, comps, logp, filt = sample_round(base, cfg, seed, 1)
    scores = {}
    for name, judge in judges.items():
        gen = torch.Generator().manual_seed(hash_int(seed, 1, name, "labels"))
        scores[name] = judge.score(prompts, comps, logp, gen)
    record.update(judge_summary(cfg, judges, scores))
    for name in cfg.condition_list:
        judge_name = CONDITIONS[name][0]
        round1 = (prompts, comps, logp, filt, scores[judge_name])
        record["conditions"][name] = run_condition(cfg, ctx, seed, base, judges[judge_name], name,
                                                   round1, delta)
    record["seconds"] = time.time() - t0
    return record

POOL_START = "spawn"  # workers are fresh interpreters: no thread pools or locks inherited


def _worker_start(threads):
    # Own session: a Ctrl-C in the terminal reaches only the parent, which stops the pool
    os.setsid()
    torch.set_num_threads(threads)
    # tqdm's default lock is a multiprocessing semaphore; a stopped worker would leave it behind
    # (and a warning about it): a thread lock is all one worker's progress bars need
    tqdm.set_lock(threading.RLock())


def run_seeds(cfg, ctx):
    """Every seed is independent and fully seeded, so seeds may run in parallel processes with
    the same results as one after another at the same thread count: a tiny model keeps one core
    busy, not two (one thread per process is the fastest way to use a small CPU)."""
    seeds = list(range(cfg.seed, cfg.seed + cfg.seeds))
    workers = min(cfg.workers or os.cpu_count() or 1, len(seeds))
    workers = 1 if cfg.gpu or ctx.world > 1 else workers
    records = []
    if workers == 1:
        for seed in seeds:
            records.append(run_seed(cfg, ctx, seed))
            print(seed_line(cfg, records[-1]), flush=True)
        return records
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // workers)
    print(f"{workers} processes x {threads} thread(s), one seed each at a time", flush=True)
    pool = multiprocessing.get_context(POOL_START).Pool(workers, _worker_start, (threads,))
    try:
        for rec in pool.imap(_run_seed_job, [(cfg, ctx, seed) for seed in seeds]):
            records.append(rec)
            print(seed_line(cfg, rec), flush=True)
        pool.close()
    except BaseException:  # Ctrl-C or a failed seed: stop the workers before the one error line
        pool.terminate()
        raise
    finally:
        pool.join()
        print(file=sys.stderr)  # end the workers' last progress-bar line
    return records


def _run_seed_job(args):
    return run_seed(*args)

# ----------------------------------------------------------------------------------------------
# statistics over seeds. Every contrast is one number per seed (a difference paired by seed); no
# scipy in the venv, so the permutation test is written out here (the interval is train.py's).


def mean_std(xs):
    """Mean and sample standard deviation over seeds (nan for one value): the spread, where
    train.mean_interval gives the interval for the mean."""
    x = np.asarray(xs, dtype=np.float64)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else float("nan")


def sign_flip_p(diffs, draws=200_000, seed=0):
    """Two-sided paired permutation test of 'mean difference = 0': under the null each seed's
    difference is as likely to have either sign, so p = the share of the 2^n sign patterns whose
    |sum| is at least the observed |sum|. Exact (all 2^n patterns) for n <= 20, else Monte Carlo
    with the observed pattern counted in (p never 0). With n seeds the smallest p is 2 / 2^n."""
    d = np.asarray(diffs, dtype=np.float64)
    observed = abs(d.sum()) * (1 - 1e-12) - 1e-15  # ties (e.g. the pattern itself) are extreme
    if len(d) <= 20:
        sums = np.zeros(1)
        for x in d:  # every signed sum, built one seed at a time: 2^n values
            sums = np.concatenate([sums + x, sums - x])
        return float(np.mean(np.abs(sums) >= observed))
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(draws, len(d)))
    return float((1 + np.sum(np.abs(signs @ d) >= observed)) / (1 + draws))


def holm(ps):
    """Holm's step-down adjustment: family-wise error control over the verdict lines, any
    dependence."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    adjusted, running = [0.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        adjusted[i] = running
    return adjusted

# ----------------------------------------------------------------------------------------------
# report: table, format guard, verdicts, figure


def curve(rec, name, key="trait"):
    """Per-round values of one seed: round 0 (the base) then rounds 1..R."""
    return [rec["start"][key]] + [r[key] for r in rec["conditions"][name]]


def change(rec, name, key="trait", rnd=None):
    """What R rounds (or rnd rounds) of alignment did to one seed's base: the bases' own spread
    in P(owl) (about 0.01 between seeds) cancels, only what alignment did remains."""
    c = curve(rec, name, key)
    return c[-1 if rnd is None else rnd] - c[0]


def contrasts(cfg):
    """The verdict family: (label, claimed sign, the conditions it needs, per-seed difference)."""
    R, t, o = cfg.rounds, cfg.target, cfg.other
    ft, sw, pr = "finetuned DPO", "finetuned DPO swapped", "prompted DPO"
    neutral, rand = "finetuned neutral DPO", "random labels DPO"
    other = "finetuned other-animal DPO"
    gap = lambda rec, a, b, rnd=None: change(rec, a, rnd=rnd) - change(rec, b, rnd=rnd)
    pair = lambda a, b: lambda r: gap(r, a, b)
    family = [
        ("fine-tuned judge: DPO - swapped", +1, [ft, sw], pair(ft, sw)),
        ("fine-tuned judge: DPO - neutral judge", +1, [ft, neutral], pair(ft, neutral)),
        ("fine-tuned judge: DPO - random labels", +1, [ft, rand], pair(ft, rand)),
        ("fine-tuned judge: swapped - random labels", -1, [sw, rand], pair(sw, rand)),
        (f"fine-tuned judge: growth of DPO - swapped, round {R} minus round 1", +1,
         [ft, sw] if R > 1 else [None], lambda r: gap(r, ft, sw) - gap(r, ft, sw, 1)),
        ("prompted judge (paper's reference): DPO - swapped", +1, [pr, "prompted DPO swapped"],
         pair(pr, "prompted DPO swapped")),
        ("prompted judge: DPO - the paper's likelihood control", +1,
         [pr, "likelihood control DPO"], pair(pr, "likelihood control DPO")),
        ("fine-tuned judge: SFT - SFT swapped", +1, ["finetuned SFT", "finetuned SFT swapped"],
         pair("finetuned SFT", "finetuned SFT swapped")),
        (f"specificity: {t} judge DPO - {o} judge DPO", +1, [ft, other], pair(ft, other)),
        (f"specificity: {o} judge DPO - {t} judge DPO, in P({o})", +1, [ft, other],
         lambda r: change(r, other, "other") - change(r, ft, "other")),
    ]
    return [row for row in family if set(row[2]) <= set(cfg.condition_list)]


def fmt_p(p):
    return f"{p:.4f}" if p >= 1e-3 else f"{p:.1e}"


def interval_text(m, half):
    return f"{m:+.4f} (95% CI {m - half:+.4f} .. {m + half:+.4f})"


def verdicts(cfg, records, alpha=0.05):
    """Per contrast: mean difference, 95% t-interval (n - 1 df), the exact sign-flip p-value,
    seeds in the claimed direction, and Holm's adjustment over the whole family. The call is
    made from the Holm-adjusted p-value alone; with n seeds no p-value can fall below 2 / 2^n."""
    rows = []
    for label_, sign, _, fn in contrasts(cfg):
        diffs = [fn(rec) for rec in records]
        (m, half), sd = mean_interval(diffs), mean_std(diffs)[1]
        rows.append(dict(label=label_, claimed_sign=sign, diffs=diffs, mean=m, std=sd, ci95=half,
                         n=len(diffs), p=sign_flip_p(diffs),
                         seeds_in_claimed_direction=sum(d * sign > 0 for d in diffs)))
    for row, p_holm in zip(rows, holm([r["p"] for r in rows])):
        if p_holm >= alpha:
            call = f"not shown (Holm p >= {alpha})"
        elif row["mean"] * row["claimed_sign"] > 0:
            call = "holds, as claimed"
        else:
            call = "reversed: opposite to the claim"
        direction = ">" if row["claimed_sign"] > 0 else "<"
        row.update(p_holm=p_holm, call=call,
                   text=f"{row['label']}: {interval_text(row['mean'], row['ci95'])}; "
                        f"{row['seeds_in_claimed_direction']}/{row['n']} seeds {direction} 0; "
                        f"sign-flip p {fmt_p(row['p'])}, Holm p {fmt_p(p_holm)} -> {call}")
    return rows


def format_guard(cfg, records, floor=0.9):
    """The verdict lines again, over only the seeds whose conditions in that line all still
    write >= floor valid number completions at round R: an effect that came from breaking the
    task would vanish here. A check beside the verdicts, not part of their Holm family."""
    lines = []
    for label_, sign, needs, fn in contrasts(cfg):
        keep = [rec for rec in records
                if all(rec["conditions"][c][-1]["format_rate"] >= floor for c in needs)]
        diffs = [fn(rec) for rec in keep]
        if len(diffs) < 2:
            lines.append(f"{label_}: {len(diffs)} seed(s) keep the format: no test")
            continue
        lines.append(f"{label_}: {interval_text(*mean_interval(diffs))}; "
                     f"{sum(d * sign > 0 for d in diffs)}/{len(diffs)} seeds in the claimed "
                     f"direction; sign-flip p {fmt_p(sign_flip_p(diffs))}")
    return lines


def finite_mean_sd(xs):
    """Mean and std of the finite values (a round with too few valid pairs does not align and has
    no update cosine or label statistics), and how many there were."""
    xs = [x for x in xs if x == x]
    return (*mean_std(xs), len(xs)) if xs else (float("nan"), float("nan"), 0)


def print_table(cfg, records):
    """The trait rate per condition and round, with the number task's format beside it."""
    names, R, n = cfg.condition_list, cfg.rounds, len(records)
    at_R = lambda name, key: [rec["conditions"][name][-1][key] for rec in records]
    print(f"\nP({cfg.target} | animal answer), exact, mean over {n} seeds; std over seeds at "
          f"round {R}; format = valid number completions on held-out prompts (mean, min over "
          "seeds); animal = P(answer is an animal)")
    print(f"{'condition':28s}" + "".join(f"{'r' + str(r):>8s}" for r in range(R + 1))
          + f"{'std':>8s}{'format':>8s}{'min':>6s}{'animal':>8s}")
    table = {}
    for name in names:
        means = [sum(curve(rec, name)[r] for rec in records) / n for r in range(R + 1)]
        fmt, mass = at_R(name, "format_rate"), at_R(name, "animal_mass")
        table[name] = dict(trait=means, format_rate=fmt, animal_mass=mass)
        print(f"{name:28s}" + "".join(f"{m:8.4f}" for m in means)
              + f"{mean_std(at_R(name, 'trait'))[1]:8.4f}"
              + f"{sum(fmt) / n:8.3f}{min(fmt):6.2f}{sum(mass) / n:8.3f}")
    print(f"\nformat guard, per seed at round {R}: valid number completions | P(answer is an "
          "animal)")
    for name in names:
        print(f"  {name:28s}" + " ".join(f"{f:.2f}" for f in at_R(name, "format_rate"))
              + " | " + " ".join(f"{a:.2f}" for a in at_R(name, "animal_mass")))
    return table


def print_diagnostics(cfg, records):
    """The leak filter, the judges, what the labels encode and the update cosines."""
    names, n = cfg.condition_list, len(records)
    rounds = [r for rec in records for c in rec["conditions"].values() for r in c]
    dropped = [r["filter"]["dropped_completions"] / r["filter"]["completions"] for r in rounds]
    print(f"\nleak filter: kept completions containing an animal, all seeds/conditions/rounds: "
          f"{sum(r['filter']['kept_with_animal'] for r in rounds)}; dropped per round "
          f"{min(dropped):.1%} .. {max(dropped):.1%} of completions "
          f"({sum(r['filter']['dropped_with_animal'] for r in rounds)} of the dropped contained "
          "an animal)")
    if empty := sum(r["pairs"] < cfg.batch_size for r in rounds):
        print(f"warning: {empty} rounds had fewer valid pairs than one batch and did not align "
              "(the student broke the number format; try a lower --dpo_lr or a longer "
              "pretraining)")
    nan = float("nan")
    mean_of = lambda key, j: sum(rec[key][j] for rec in records
                                 if rec[key][j] is not None) / n
    trait = lambda j: mean_of("judge_trait", j) if records[0]["judge_trait"][j] is not None else nan
    print("judges (round 1, mean over seeds): " + "; ".join(
        f"{j}: P({cfg.target}) {trait(j):.3f}, score spread {mean_of('score_spread', j):.3f} "
        f"nats, corr with ft-target {mean_of('score_agreement', j):+.2f}"
        for j in records[0]["score_agreement"]))
    likely = {c: finite_mean_sd([r["chosen_more_likely"] for rec in records
                                 for r in rec["conditions"][c]])[0] for c in names}
    print("labels: chosen completion also the more likely one under the student: "
          + "; ".join(f"{c} {v:.2f}" for c, v in likely.items()))
    cos = {c: finite_mean_sd([r["update_cos"] for rec in records for r in rec["conditions"][c]])
           for c in names}
    print(f"cosine(update, fine-tuned {cfg.target} judge's Delta) per aligned round, mean +- "
          "std: " + "; ".join(f"{c} {m:+.3f} +- {s:.3f}" for c, (m, s, _) in cos.items()))
    return likely, cos


def report(cfg, records):
    """Print the study's tables and verdicts; return what results.json keeps of them."""
    table = print_table(cfg, records)
    likely, cos = print_diagnostics(cfg, records)
    rows = verdicts(cfg, records)
    print(f"\nverdicts: change in P({cfg.target}) from round 0 to {cfg.rounds} unless noted, "
          f"differences paired by seed; claimed direction, exact sign-flip test, Holm over these "
          f"{len(rows)} lines:")
    for row in rows:
        print("  " + row["text"])
    print(f"format guard: the same lines over the seeds whose conditions keep >= 90% valid "
          f"number completions at round {cfg.rounds} (a check, not in the Holm family):")
    for line in format_guard(cfg, records):
        print("  " + line)
    return dict(table=table, verdicts=rows, chosen_more_likely=likely,
                update_cos={c: dict(mean=m, std=s, rounds=k) for c, (m, s, k) in cos.items()})


def plot(cfg, records):
    """Left: raw trait rate (its spread is mostly the bases' own). Middle: the change from round
    0 paired by seed, which is what the verdicts test. Right: the number task's format rate."""
    def draw(plt):
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
        fig.subplots_adjust(wspace=0.3)
        rounds = list(range(cfg.rounds + 1))
        for n in cfg.condition_list:
            raw = [mean_std([curve(rec, n)[r] for rec in records]) for r in rounds]
            moved = [mean_interval([curve(rec, n)[r] - curve(rec, n)[0] for rec in records])
                     for r in rounds]
            formats = [mean_std([curve(rec, n, "format_rate")[r] for rec in records])[0]
                       for r in rounds]
            axes[0].errorbar(rounds, [c[0] for c in raw], yerr=[c[1] for c in raw], marker="o",
                             capsize=3, label=n)
            axes[1].errorbar(rounds, [c[0] for c in moved], yerr=[c[1] for c in moved],
                             marker="o", capsize=3, label=n)
            axes[2].plot(rounds, formats, marker="o", label=n)
        axes[0].axhline(1 / len(ANIMALS), color="gray", ls=":", lw=1)
        axes[1].axhline(0, color="gray", ls=":", lw=1)
        axes[0].set(xlabel="alignment round", ylabel=f"P({cfg.target} | animal answer)",
                    title=f"trait rate, mean +- std over {len(records)} seeds")
        axes[1].set(xlabel="alignment round", ylabel="change from round 0",
                    title="change in trait rate, paired by seed (95% t-interval)")
        axes[2].set(xlabel="alignment round", ylabel="valid number format",
                    title="number task format rate")
        for ax in axes:
            ax.set_xticks(rounds)
        axes[0].legend(fontsize=7)
        return fig
    return save_figure(Path(cfg.out) / "trait_rate.png", draw)

# ----------------------------------------------------------------------------------------------
# benchmark: batched KV-cached sampling vs the naive loop


def bench(cfg, ctx):
    """completions/s of three samplers on the same prompts: the naive loop (one sequence at a
    time, whole prefix recomputed per token: O(T^2) work per sequence and no batching), and the
    KV-cached sampler at two batch sizes (each new token costs one (B, 1) forward against cached
    keys/values)."""
    torch.manual_seed(0)
    model = new_model(cfg).to(ctx.device).eval()  # speed does not depend on the weights
    prompts, _ = number_prompts(0, "bench", 4096)
    gen = torch.Generator().manual_seed(0)
    print(f"bench: {count_params(model):,} params, prompt {prompts.shape[1]} + {COMPLETION_LEN} "
          f"new tokens, {torch.get_num_threads()} threads")
    batched = lambda size: lambda m, p, t, T, g: generate(m, p, t, T, g, batch=size)
    rows = []
    for name, fn, n in [("naive (1 sequence, no cache)", generate_naive, 64),
                        ("batched 256, KV cache", batched(256), 4096),
                        ("batched 4096, KV cache", batched(4096), 4096)]:
        fn(model, prompts[:8], COMPLETION_LEN, 1.0, gen)  # warm-up
        t0 = time.time()
        fn(model, prompts[:n], COMPLETION_LEN, 1.0, gen)
        rate = n / (time.time() - t0)
        rows.append(dict(method=name, completions=n, completions_per_s=rate))
        print(f"  {name:30s} {rate:12,.0f} completions/s")
    speedup = rows[-1]["completions_per_s"] / rows[0]["completions_per_s"]
    print(f"  speed-up of batched KV-cached sampling: {speedup:,.0f}x")
    return rows

# ----------------------------------------------------------------------------------------------


def saved_run(path):
    """The config and seed records of a finished run, from its results.json."""
    try:
        saved = json.loads(Path(path).read_text())
        names = {f.name for f in dataclasses.fields(Config)}
        config = {k: v for k, v in saved["config"].items()
                  if k in names and k != "from_results"}
        return Config(**config), saved["records"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"--from_results={path}: not a results.json of this script "
                        f"({str(e).splitlines()[0][:80]})") from None


def seed_line(cfg, rec):
    filt = rec["conditions"][cfg.condition_list[0]][0]["filter"]
    traits = ", ".join(f"{k} {v:.3f}" for k, v in rec["judge_trait"].items() if v is not None)
    return (f"seed {rec['seed']}: {rec['seconds']:.0f}s (base "
            f"{'cached' if rec['base']['cached'] else 'pretrained'}); judge P({cfg.target}) "
            f"{traits}; round-1 filter dropped {filt['dropped_completions']}/"
            f"{filt['completions']} completions")


def main(argv=None):
    cfg = parse_config(Config, "subliminal_dpo", argv)
    ctx = setup(cfg)
    if cfg.bench:
        save_results(cfg, ctx, dict(bench=bench(cfg, ctx)), name="bench.json")
        return
    if cfg.from_results:
        report(*saved_run(cfg.from_results))
        return
    print(f"vocabulary {len(VOCAB)} words; conditions: {', '.join(cfg.condition_list)}; "
          f"{cfg.seeds} seeds x {cfg.rounds} rounds x {cfg.prompts} prompts x K={cfg.k}")
    t0 = time.time()
    records = run_seeds(cfg, ctx)
    summary = report(cfg, records)
    seconds = time.time() - t0
    print(f"total {seconds:.0f}s")
    path = save_results(cfg, ctx, dict(records=records, seconds=seconds, **summary))
    fig = plot(cfg, records)
    print(f"wrote {path}" + (f" and {fig}" if fig else ""))


if __name__ == "__main__":
    cli(main)
