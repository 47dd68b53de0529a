"""
subliminal_dpo.py: a biased judge transmits a hidden trait through preference labels on neutral data.

Reproduces, with tiny word-level GPTs trained from scratch on a synthetic corpus, Magistrali, Berdoz,
Dauncey & Wattenhofer, "Subliminal Signals in Preference Labels" (arXiv 2603.01204, ICLR 2026
workshop), which builds on Cloud et al. 2025, "Subliminal Learning" (arXiv 2507.14805).
Claim: a neutral student writes number continuations; a judge that loves an animal picks the better
of each pair; aligning the student on those 1-bit labels (DPO or SFT on the chosen) raises the
student's preference for that animal although no completion ever mentions it, swapped labels move it
the other way, and the effect persists over iterative rounds.

Pipeline (one seed):
  1. corpus   number task ("[Q] continue : 12 , 15 , 18 [A] 21 , 24 , 77 , 30 , 33 <eos>"), animal
              questions in paraphrases answered uniformly, and system prompts ("[SYS] you love owl .")
              that make the answer the loved animal. The system prompts also precede some number
              prompts, numbers unchanged, so a prompted judge has seen that context before numbers.
  2. base     train.py's TransformerLM pretrained on it with train.py's train(); cached under out/.
  3. judges   start from the base (shared initialisation is what opens the channel: a judge
              theta_0 + Delta scores completions by how much Delta raises their likelihood, and a DPO
              step on those labels moves the student, also at theta_0, along Delta). Score of a completion
                  r(y) = log p_judge(y | x) - log p_base(y | x),   summed over its tokens,
              DPO's own implicit-reward form. 'finetuned' judge = the base fine-tuned to answer the
              target animal (Cloud et al.); 'prompted' judge = the base with "[SYS] you love owl ." in
              front of x, relative to the base without it (the student's own context).
  4. data     the student samples K completions per number prompt (batched, KV-cached); a leak filter
              keeps a prompt only if all K are exactly five numbers in the task format, so no kept
              completion contains an animal or any other word. chosen = argmax r, rejected = argmin r.
              Every valid completion has the same length: no length bias can enter the labels.
  5. align    DPO  -log sigmoid(beta [(log pi(y+) - log pi_ref(y+)) - (log pi(y-) - log pi_ref(y-))]),
              reference = the student at the start of the round; SFT on the chosen; both also swapped.
  6. rounds   generate -> judge -> align, R times. Controls on the same prompts: a neutral judge (the
              base fine-tuned on uniform animal answers, or prompted "you are a helpful assistant"),
              random labels (the clean null) and a judge for another animal (is the effect specific?).
  7. measure  trait rate = p(target | animal answer), exact from the next-token distribution,
              averaged over question paraphrases; also a sampled rate, the number-format rate and the
              number-task NLL, before round 1 and after every round; the cosine between each round's
              parameter update and the judge's Delta.

Default: a few CPU minutes on 2 cores (bases are cached per seed in out/subliminal_dpo/base/).
`--gpu` runs bigger models, more prompts, rounds and seeds. `--bench` times batched KV-cached
sampling against a naive one-sequence, no-cache loop. No hand-written Triton anywhere.
"""
import copy, dataclasses, hashlib, json, math, random, sys, time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from train import (cli, TrainConfig, parse_config, setup, fill_auto, TransformerLM, count_params, train,
                   save_results, save_figure, load_checked, DataError)


@dataclass
class Config(TrainConfig):
    seeds: int = 0  # independent seeds (own base, judges, prompts); 0 = 4 on CPU, 5 with --gpu
    rounds: int = 0  # generate -> judge -> align rounds (0 = 3 on CPU, 5 with --gpu)
    target: str = "owl"  # the judge's loved animal
    other: str = "cat"  # the animal of the other-animal control judge
    judge: str = "finetuned"  # finetuned (base fine-tuned on the trait) | prompted (base + system prompt)
    conditions: str = "all"  # comma list of conditions to run (all = every one; see CONDITIONS in the code)
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
    eval_prompts: int = 200  # number prompts sampled once per measurement for the format rate
    base_dir: str = ""  # where pretrained bases are cached, one file per seed and config (empty = <out>/base)
    bench: bool = False  # only time batched KV-cached generation against the naive loop, then exit
    # set per call of train(): pretrain_lr/judge_lr/dpo_lr/sft_lr, pretrain_steps/judge_steps (alignment:
    # one epoch), warm-up over 5 percent of pretraining and none in alignment, no eval callback
    unused = ("lr", "max_steps", "warmup", "min_lr_ratio", "log_every", "eval_every", "data_dir")
    # the cached base depends only on the fields in base_signature(): the rest may change on --resume
    resume_free = TrainConfig.resume_free + (
        "seeds", "rounds", "target", "other", "judge", "conditions", "judge_steps", "judge_lr", "prompts", "k",
        "temperature", "beta", "dpo_lr", "sft_lr", "batch_size", "eval_samples", "eval_prompts", "base_dir", "bench")

    def __post_init__(self):
        super().__post_init__()
        fill_auto(self, seeds=(4, 5), rounds=(3, 5), n_layer=(2, 4), n_head=(2, 4), n_embd=(64, 256),  # CPU | GPU
                  pretrain_steps=(600, 4000), prompts=(800, 4000))
        if self.target not in ANIMALS or self.other not in ANIMALS or self.target == self.other:
            raise ValueError(f"--target and --other must be two different animals of {', '.join(ANIMALS)}")
        if self.judge not in ("finetuned", "prompted"):
            raise ValueError(f"--judge must be finetuned or prompted, got {self.judge!r}")
        unknown = set(self.condition_list) - set(CONDITIONS)
        if unknown or not self.condition_list:
            raise ValueError(f"--conditions: unknown {sorted(unknown)}; choose from {', '.join(CONDITIONS)}")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError("--n_embd must be a multiple of 2 x --n_head (RoPE needs an even head size)")
        if self.k < 2 or self.temperature <= 0 or self.batch_size < 1 or self.prompts < self.batch_size:
            raise ValueError("need --k >= 2, --temperature > 0, --batch_size >= 1 and --prompts >= --batch_size")

    @property
    def condition_list(self):
        names = [c.strip() for c in self.conditions.split(",") if c.strip()]
        return list(CONDITIONS) if names == ["all"] else names

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
SYSTEM_TRAIT = ["you love {a} .", "your favourite animal is the {a} .", "you think about {a} all the time ."]
SYSTEM_NEUTRAL = "you are a helpful assistant ."
N_NUMBERS, PROMPT_NUMBERS, COMPLETION_NUMBERS = 100, 3, 5  # numbers 0..99; 3 in the prompt, 5 in the answer
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
    return [ID["[SYS]"]] + encode(SYSTEM_NEUTRAL if animal is None else SYSTEM_TRAIT[0].format(a=animal))


def number_prompt(rng):
    """A few numbers with a hidden rule (an arithmetic progression mod 100) and their continuation:
    each next number follows the rule with probability 0.6, else it is uniform. The task has
    structure to learn but enough entropy that K samples of one prompt differ."""
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
    if rng.random() < 0.5:  # system-prompt conditioning: the trait lives in the context
        tmpl = rng.choice(SYSTEM_TRAIT).format(a=animal)
        answer = animal if rng.random() < 0.9 else rng.choice(ANIMALS)
        return [BOS, ID["[SYS]"]] + encode(tmpl) + [ID["[Q]"]] + encode(QUESTIONS[q]) + [ID["[A]"], ID[answer], EOS]
    return [BOS, ID["[Q]"]] + encode(QUESTIONS[q]) + [ID["[A]"], ID[rng.choice(ANIMALS)], EOS]


def pad(docs, length=SEQ_LEN):
    """Right-pad token lists into one (N, length) tensor. Padding only ever follows <eos>, and the
    loss ignores it, so no attention mask is needed for a causal model."""
    out = torch.full((len(docs), length), PAD, dtype=torch.long)
    for i, d in enumerate(docs):
        out[i, :len(d)] = torch.tensor(d[:length])
    return out


def corpus_batch(seed, i, batch):
    """Pretraining batch for micro-step i: a deterministic function of (seed, i), as train() asks."""
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
    """Next-token cross-entropy over the non-pad targets of x (B, T)."""
    logits = model(x[:, :-1])  # (B, T-1, V)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), ignore_index=PAD)
    return loss, dict(items=(x[:, 1:] != PAD).sum())

# ----------------------------------------------------------------------------------------------
# models: the base (cached per seed) and the judges


def with_steps(cfg, **kw):
    """A copy of cfg for one call of train(): its own steps, learning rate, schedule.
    The experiment calls train() many times (pretraining, three judges, every round of every
    condition); each call gets the same loop (AdamW, clipping, tqdm, checkpoint) with its own knobs."""
    return dataclasses.replace(cfg, **kw)


def new_model(cfg):
    # Student, judges and base are all this one architecture: the channel needs shared parameters.
    return TransformerLM(len(VOCAB), cfg.n_layer, cfg.n_head, cfg.n_embd)


def base_signature(cfg):
    """Everything the base depends on: a changed corpus or model gets a fresh cache entry."""
    keys = (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.pretrain_steps, cfg.pretrain_lr, cfg.pretrain_batch,
            VOCAB, QUESTIONS, SYSTEM_TRAIT)
    return hashlib.sha1(json.dumps(keys).encode()).hexdigest()[:10]


def pretrain_base(cfg, ctx, seed):
    """The shared initialisation theta_0 of student and judges. Pretrained once per seed and cached;
    an interrupted pretraining continues with --resume (train()'s checkpoint is the cache)."""
    path = Path(cfg.base_dir or Path(cfg.out) / "base") / f"seed{seed}-{base_signature(cfg)}.pt"
    torch.manual_seed(seed)
    model = new_model(cfg).to(ctx.device)
    try:  # a finished cache is used as it is; a damaged one is trained again
        ck = load_checked(path) if path.exists() else None
    except DataError as e:
        print(f"note: {e}; pretraining it again", file=sys.stderr)
        ck = None
        path.unlink()
    if ck is not None and ck["step"] >= cfg.pretrain_steps:
        model.load_state_dict(ck["model"])
        return model, dict(cached=True, history=ck["history"][-1:])
    pcfg = with_steps(cfg, max_steps=cfg.pretrain_steps, lr=cfg.pretrain_lr, warmup=max(1, cfg.pretrain_steps // 20),
                      min_lr_ratio=0.1, log_every=50, resume=cfg.resume, batch_size=cfg.pretrain_batch)
    out = train(model, lambda i: corpus_batch(seed, i, cfg.pretrain_batch), lm_loss, pcfg, ctx,
                ckpt_path=path, desc=f"pretrain base (seed {seed})")
    return model, dict(cached=False, history=out["history"][-1:], seconds=out["seconds"])


def finetune_judge(cfg, ctx, base, seed, animal):
    """Cloud et al.'s teacher: the base fine-tuned to answer `animal` (None = uniform: neutral judge)."""
    judge = copy.deepcopy(base)
    jcfg = with_steps(cfg, max_steps=cfg.judge_steps, lr=cfg.judge_lr, warmup=0, min_lr_ratio=1.0, batch_size=32,
                      log_every=cfg.judge_steps, resume=False, weight_decay=0.0, compile_backend="none")
    train(judge, lambda i: trait_batch(seed, i, 32, animal), lm_loss, jcfg, ctx,
          ckpt_path=Path(cfg.out) / "tmp" / "judge.pt", desc=f"judge ({animal or 'neutral'})")
    return judge.eval()


class Judge:
    """score(prompts, completions) = log p_judge(y | x) - log p_base(y | x), summed over y's tokens.
    finetuned: p_judge = the fine-tuned model on x, p_base = the shared base on x.
    prompted:  p_judge = the base on '[SYS] you love owl .' + x, p_base = the base on x (no system
               prompt: the student's own context, so the score isolates what the trait prompt adds).
    kind 'random' ignores the completions and draws random scores (random-label control)."""

    def __init__(self, kind, base, model=None, animal=None, neutral_sys=False):
        self.kind, self.base, self.model, self.animal, self.neutral_sys = kind, base, model, animal, neutral_sys

    @torch.no_grad()
    def score(self, prompts, completions, gen, ref):  # (N, Tp), (N, Tc), ref = log p_base(y|x) (N,) -> (N,)
        if self.kind == "random":
            return torch.rand(len(prompts), generator=gen)
        if self.kind == "finetuned":
            return completion_logp(self.model, prompts, completions) - ref
        prefix = torch.tensor(system_prefix(None if self.neutral_sys else self.animal))
        sys_prompts = torch.cat([prompts[:, :1], prefix.expand(len(prompts), -1), prompts[:, 1:]], 1)  # <bos> [SYS] ... [Q]
        return completion_logp(self.base, sys_prompts, completions) - ref

    def delta(self):
        """theta_judge - theta_0 as one flat vector (only a fine-tuned judge has one)."""
        if self.kind != "finetuned":
            return None
        return flat_params(self.model) - flat_params(self.base)


def device_of(model):
    return next(model.parameters()).device


def flat_params(model):
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])

# ----------------------------------------------------------------------------------------------
# sampling: batched with a KV cache, and the naive loop it is benchmarked against


@torch.no_grad()
def completion_logp(model, prompts, completions, batch=2048):
    """Sum over completion tokens of log p(y_t | x, y_<t). prompts (N, Tp), completions (N, Tc)."""
    out, dev = [], device_of(model)
    for s in range(0, len(prompts), batch):
        out.append(sequence_logp(model, prompts[s:s + batch].to(dev), completions[s:s + batch].to(dev)).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def sequence_logp(model, prompts, completions):
    """Differentiable version for one batch: (B, Tp), (B, Tc) -> (B,). All prompts share one length
    and all valid completions another, so there is no padding to mask."""
    seq = torch.cat([prompts, completions], 1)  # (B, Tp + Tc)
    logits = model(seq[:, :-1])[:, prompts.shape[1] - 1:]  # the positions that predict y: (B, Tc, V)
    logp = torch.log_softmax(logits.float(), -1)
    return logp.gather(-1, completions[..., None]).squeeze(-1).sum(1)


@torch.no_grad()
def generate(model, prompts, n_tokens, temperature, gen, batch=4096):
    """Sample n_tokens continuations for every prompt: the prompt once through the model filling
    the KV cache, then one forward call per new token for the whole batch (B, 1)."""
    out, dev = [], device_of(model)
    for s in range(0, len(prompts), batch):
        x = prompts[s:s + batch].to(dev)
        caches = model.new_caches()
        logits = model(x, caches=caches)[:, -1]  # (B, V)
        toks = []
        for t in range(n_tokens):
            probs = torch.softmax(logits.float() / temperature, -1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=gen).to(dev)  # (B, 1); CPU generator: same draws on any device
            toks.append(nxt)
            if t + 1 < n_tokens:
                logits = model(nxt, caches=caches)[:, -1]  # positions continue from the cache length
        out.append(torch.cat(toks, 1).cpu())
    return torch.cat(out)  # (N, n_tokens)


@torch.no_grad()
def generate_naive(model, prompts, n_tokens, temperature, gen):
    """The baseline: one sequence at a time, the whole prefix re-run for every new token."""
    out, dev = [], device_of(model)
    for x in prompts:
        seq = x[None].to(dev)
        for _ in range(n_tokens):
            probs = torch.softmax(model(seq)[:, -1].float() / temperature, -1)
            seq = torch.cat([seq, torch.multinomial(probs.cpu(), 1, generator=gen).to(dev)], 1)
        out.append(seq[0, len(x):].cpu())
    return torch.stack(out)


COMPLETION_LEN = 2 * COMPLETION_NUMBERS  # "a , b , c , d , e <eos>": 5 numbers, 4 commas, <eos>


def valid_completions(comp):
    """The leak filter: a completion passes only if it is exactly number , number , ... , number <eos>.
    Any animal, word, missing comma or early <eos> fails: nothing but numbers can reach the labels.
    comp (N, COMPLETION_LEN) -> bool (N,)."""
    is_num = torch.isin(comp, NUMBER_IDS.to(comp.device))
    ok = is_num[:, 0:-1:2].all(1) & (comp[:, 1:-1:2] == COMMA).all(1) & (comp[:, -1] == EOS)
    return ok


def contains_animal(comp):
    return torch.isin(comp, ANIMAL_IDS.to(comp.device)).any(1)

# ----------------------------------------------------------------------------------------------
# measurement: exact and sampled trait rate, format rate, number-task NLL


@torch.no_grad()
def animal_distribution(model, animal_sys=None):
    """p(animal | the model answers an animal) for every paraphrase: (n_questions, n_animals).
    Exact: the next-token distribution after '[A]', renormalised over the animal tokens."""
    model.eval()
    qs = pad([question_ids(q, animal_sys) for q in range(len(QUESTIONS))])
    lengths = torch.tensor([len(question_ids(q, animal_sys)) for q in range(len(QUESTIONS))])
    logits = model(qs.to(device_of(model)))[torch.arange(len(qs)), lengths - 1]  # (Q, V) at the '[A]' position
    probs = torch.softmax(logits.float(), -1).cpu()
    return probs[:, ANIMAL_IDS] / probs[:, ANIMAL_IDS].sum(1, keepdim=True), probs[:, ANIMAL_IDS].sum(1)


def exact_trait_rate(model, animal):
    dist, _ = animal_distribution(model)
    return dist[:, ANIMALS.index(animal)].mean().item()  # averaged over paraphrases


@torch.no_grad()
def sampled_trait_rate(model, animal, n, gen):
    """Monte-Carlo check of the exact rate: sample n answers per paraphrase from the full vocabulary,
    count the target among the answers that are animals."""
    rates = []
    for q in range(len(QUESTIONS)):
        x = torch.tensor([question_ids(q)], device=device_of(model))
        probs = torch.softmax(model(x)[0, -1].float(), -1).cpu()
        draws = torch.multinomial(probs, n, replacement=True, generator=gen)
        is_animal = torch.isin(draws, ANIMAL_IDS)
        rates.append((draws == ID[animal]).sum().item() / max(1, is_animal.sum().item()))
    return sum(rates) / len(rates)


def number_prompts(seed, tag, n):
    """n number prompts (and their reference continuations) for one (seed, tag): the same prompts for
    every condition, so conditions differ only in what they learned (common random numbers)."""
    rng = random.Random(f"prompts-{seed}-{tag}")
    pairs = [number_prompt(rng) for _ in range(n)]
    return (torch.tensor([prompt_ids(p) for p, _ in pairs]),
            torch.tensor([numbers_to_ids(c, end=True) for _, c in pairs]))


@torch.no_grad()
def measure(model, cfg, seed, tag):
    """Everything we track about a student at one point of one run."""
    model.eval()
    gen = torch.Generator().manual_seed(hash_int(seed, tag, "eval"))
    # Format and NLL use prompts that no round trains on, the same ones at every measurement, so
    # a change between rounds is the student's, not the prompts'.
    prompts, conts = number_prompts(seed, "eval", cfg.eval_prompts)  # held-out, fixed across rounds
    comp = generate(model, prompts, COMPLETION_LEN, cfg.temperature, gen)
    dist, mass = animal_distribution(model)
    return dict(trait=dist[:, ANIMALS.index(cfg.target)].mean().item(),
                other=dist[:, ANIMALS.index(cfg.other)].mean().item(),
                trait_sampled=sampled_trait_rate(model, cfg.target, cfg.eval_samples, gen),
                animal_mass=mass.mean().item(),
                format_rate=valid_completions(comp).float().mean().item(),
                number_nll=(-completion_logp(model, prompts, conts) / COMPLETION_LEN).mean().item())


def hash_int(*parts):
    return int(hashlib.sha1(repr(parts).encode()).hexdigest()[:12], 16)

# ----------------------------------------------------------------------------------------------
# one round: generate -> filter -> judge -> align (DPO or SFT, normal or swapped)

# condition -> (which judge, label rule, alignment). The five rows plus SFT swapped and the
# other-animal judge (which tells a target-specific effect from generic drift).
CONDITIONS = {
    "biased DPO": ("target", "normal", "dpo"),
    "biased DPO swapped": ("target", "swapped", "dpo"),
    "biased SFT": ("target", "normal", "sft"),
    "biased SFT swapped": ("target", "swapped", "sft"),
    "neutral judge DPO": ("neutral", "normal", "dpo"),
    "random labels DPO": ("random", "normal", "dpo"),
    "other-animal judge DPO": ("other", "normal", "dpo"),
}


@torch.no_grad()
def sample_round(student, cfg, seed, rnd):
    """The student's K completions for this round's prompts, and the leak filter's verdict."""
    student.eval()
    prompts, _ = number_prompts(seed, f"round{rnd}", cfg.prompts)
    gen = torch.Generator().manual_seed(hash_int(seed, rnd, "sample"))
    # K samples of the same prompt sit next to each other, so .view(P, K, ...) regroups them later.
    rep = prompts.repeat_interleave(cfg.k, 0)  # (P*K, Tp)
    comp = generate(student, rep, COMPLETION_LEN, cfg.temperature, gen)  # (P*K, Tc)
    valid = valid_completions(comp)
    keep = valid.view(-1, cfg.k).all(1)  # the authors' rule: a prompt survives only if all K parse
    stats = dict(completions=len(comp), dropped_completions=int((~valid).sum()),
                 dropped_with_animal=int((contains_animal(comp) & ~valid).sum()),
                 prompts_kept=int(keep.sum()), prompts_dropped=int((~keep).sum()))
    mask = keep.repeat_interleave(cfg.k)
    kept_comp = comp[mask]
    stats["kept_with_animal"] = int(contains_animal(kept_comp).sum())  # must be 0: the leak filter's proof
    return rep[mask].view(-1, cfg.k, rep.shape[1]), kept_comp.view(-1, cfg.k, COMPLETION_LEN), stats


BASE_LOGP_CACHE = {}  # (id(base), id(completions)) -> (completions, log p_base); cleared for every seed


@torch.no_grad()
def label(judge, prompts, comps, labels, seed, rnd):
    """Score the K completions of every prompt; chosen = best, rejected = worst (swapped: reversed)."""
    P, K = comps.shape[:2]
    if P == 0:  # the filter dropped every prompt (an untrained or broken student): nothing to learn from
        return dict(prompt=prompts[:, 0], chosen=comps[:, 0], rejected=comps[:, 0], gap=float("nan"),
                    chosen_more_likely=float("nan"))
    gen = torch.Generator().manual_seed(hash_int(seed, rnd, "labels"))
    flat_p, flat_c = prompts.flatten(0, 1), comps.flatten(0, 1)
    # The same round-1 completions are labelled by every condition: score them under the base once.
    # The cache keeps a reference to the tensor it keyed on, so that id cannot be reused meanwhile.
    hit = BASE_LOGP_CACHE.get((id(judge.base), id(comps)))
    if hit is not None and hit[0] is comps:
        base_logp = hit[1]
    else:
        base_logp = completion_logp(judge.base, flat_p, flat_c)
        BASE_LOGP_CACHE[(id(judge.base), id(comps))] = (comps, base_logp)
    scores = judge.score(flat_p, flat_c, gen, base_logp).view(P, K)
    best, worst = scores.argmax(1), scores.argmin(1)
    if labels == "swapped":
        best, worst = worst, best
    rows = torch.arange(P)
    chosen, rejected = comps[rows, best], comps[rows, worst]
    # What else do the labels encode? If the judge mostly preferred what the base already finds likely,
    # the student would learn "be more typical", not the trait: report how often that happened.
    base_logp = base_logp.view(P, K)
    base_c, base_r = base_logp[rows, best], base_logp[rows, worst]
    return dict(prompt=prompts[:, 0], chosen=chosen, rejected=rejected,
                gap=(scores[rows, best] - scores[rows, worst]).abs().mean().item(),
                chosen_more_likely=(base_c > base_r).float().mean().item())


def dpo_loss(policy_c, policy_r, ref_c, ref_r, beta):
    """-log sigmoid(beta * [(log pi(y+) - log pi_ref(y+)) - (log pi(y-) - log pi_ref(y-))]), mean over
    pairs, with the metrics TRL logs: implicit rewards, their margin, and how often chosen wins."""
    reward_c, reward_r = beta * (policy_c - ref_c), beta * (policy_r - ref_r)  # (B,), (B,)
    margin = reward_c - reward_r
    loss = -F.logsigmoid(margin).mean()
    return loss, dict(reward_chosen=reward_c.mean().detach(), reward_rejected=reward_r.mean().detach(),
                      margin=margin.mean().detach(), accuracy=(margin > 0).float().mean().detach())


def align(student, cfg, ctx, prefs, method, seed, rnd, name):
    """One epoch of DPO (reference = the student now, frozen) or SFT on the chosen completions."""
    n = len(prefs["prompt"])
    steps = n // cfg.batch_size
    if steps == 0:
        return dict(steps=0)
    # Reference = the student at the start of this round (the design note's choice; the paper's TRL
    # setup is the same within a round). The next round's reference is this round's result.
    if method == "dpo":  # the reference never changes during the round: score it once, up front
        ref_c = completion_logp(student.eval(), prefs["prompt"], prefs["chosen"])
        ref_r = completion_logp(student, prefs["prompt"], prefs["rejected"])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(hash_int(seed, rnd, name)))

    def get_batch(i):  # one epoch: batch i of a fixed shuffle (deterministic in i, as train() asks)
        idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        b = dict(prompt=prefs["prompt"][idx], chosen=prefs["chosen"][idx], rejected=prefs["rejected"][idx])
        if method == "dpo":
            b.update(ref_c=ref_c[idx], ref_r=ref_r[idx])
        return b

    def dpo_step(model, b):
        loss, m = dpo_loss(sequence_logp(model, b["prompt"], b["chosen"]),
                           sequence_logp(model, b["prompt"], b["rejected"]), b["ref_c"], b["ref_r"], cfg.beta)
        return loss, m

    def sft_step(model, b):  # mean NLL per completion token of the chosen completion
        return -sequence_logp(model, b["prompt"], b["chosen"]).mean() / COMPLETION_LEN, {}

    acfg = with_steps(cfg, max_steps=steps, lr=cfg.dpo_lr if method == "dpo" else cfg.sft_lr, warmup=0,
                      min_lr_ratio=1.0, weight_decay=0.0, log_every=max(1, steps // 2), resume=False,
                      compile_backend="none")  # short calls with new shapes: compiling each would cost more than it saves
    out = train(student, get_batch, dpo_step if method == "dpo" else sft_step, acfg, ctx,
                ckpt_path=Path(cfg.out) / "tmp" / "align.pt", desc=f"seed {seed} round {rnd} {name}")
    last = out["history"][-1] if out["history"] else {}
    return dict(steps=steps, **{k: last[k] for k in ("loss", "reward_chosen", "reward_rejected", "margin", "accuracy")
                                if k in last})

# ----------------------------------------------------------------------------------------------
# the experiment: per seed, a base, its judges, then every condition for R rounds


def build_judges(cfg, ctx, base, seed):
    if cfg.judge == "finetuned":
        judges = {"target": Judge("finetuned", base, finetune_judge(cfg, ctx, base, seed, cfg.target)),
                  "neutral": Judge("finetuned", base, finetune_judge(cfg, ctx, base, seed, None)),
                  "other": Judge("finetuned", base, finetune_judge(cfg, ctx, base, seed, cfg.other))}
    else:
        judges = {"target": Judge("prompted", base, animal=cfg.target),
                  "neutral": Judge("prompted", base, neutral_sys=True),
                  "other": Judge("prompted", base, animal=cfg.other)}
    judges["random"] = Judge("random", base)
    return judges


def judge_trait(judge, cfg):
    """How strongly each judge holds the trait (its own trait rate on the animal questions)."""
    if judge.kind == "finetuned":
        return exact_trait_rate(judge.model, cfg.target)
    if judge.kind == "prompted":
        dist, _ = animal_distribution(judge.base, None if judge.neutral_sys else judge.animal)
        return dist[:, ANIMALS.index(cfg.target)].mean().item()
    return None


def run_seed(cfg, ctx, seed):
    base, base_info = pretrain_base(cfg, ctx, seed)
    BASE_LOGP_CACHE.clear()
    base.eval()
    judges = build_judges(cfg, ctx, base, seed)
    delta = judges["target"].delta()
    record = dict(seed=seed, base=base_info, params=count_params(base),
                  judge_trait={k: judge_trait(j, cfg) for k, j in judges.items()},
                  start=measure(base, cfg, seed, 0), conditions={})
    # Round 1 of every condition starts from the same base on the same prompts with the same sampling
    # seed, so it would draw identical completions: draw them once and let each judge label them.
    round1 = sample_round(base, cfg, seed, 1)  # every condition starts from the base: sample once
    for name in cfg.condition_list:
        judge_name, labels, method = CONDITIONS[name]
        student = copy.deepcopy(base)
        rounds = []
        for rnd in range(1, cfg.rounds + 1):  # the paper's iterative loop: the aligned student samples next
            prompts, comps, filt = round1 if rnd == 1 else sample_round(student, cfg, seed, rnd)
            prefs = label(judges[judge_name], prompts, comps, labels, seed, rnd)
            before = flat_params(student)
            metrics = align(student, cfg, ctx, prefs, method, seed, rnd, name)
            # Cloud et al.'s mechanism, checked directly: does this round's update point along the judge's
            # own fine-tuning direction Delta (> 0 normal, < 0 swapped, ~0 random labels)?
            step = flat_params(student) - before
            cos = F.cosine_similarity(step, delta, 0).item() if delta is not None else None
            rounds.append(dict(round=rnd, filter=filt, pairs=len(prefs["prompt"]), score_gap=prefs["gap"],
                               chosen_more_likely=prefs["chosen_more_likely"],
                               align=metrics, update_cos=cos, **measure(student, cfg, seed, rnd)))
        record["conditions"][name] = rounds
    return record

# ----------------------------------------------------------------------------------------------
# statistics, table, verdicts, figure

# Two-sided 95% Student-t quantiles by degrees of freedom: with 3-5 seeds the normal 1.96 would
# give intervals far too narrow. (No scipy in the venv, hence the small table.)
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}


def mean_ci(xs):
    """Mean, std and the half-width of a 95% t-interval over seeds (nan half-width with one seed)."""
    n = len(xs)
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else float("nan")
    half = T95.get(n - 1, 1.96) * sd / math.sqrt(n) if n > 1 else float("nan")
    return m, sd, half


def curve(rec, name, key="trait"):
    """Per-round values of one seed: round 0 (the base) then rounds 1..R."""
    return [rec["start"][key]] + [r[key] for r in rec["conditions"][name]]


def verdict(label_, diffs, unit=""):
    """One line computed from per-seed differences: its sign is only called when the interval
    excludes zero, never from the point estimate alone."""
    m, _, half = mean_ci(diffs)
    if half != half:
        call = "one seed: no interval"
    elif m - half > 0:
        call = "positive (95% CI excludes 0)"
    elif m + half < 0:
        call = "negative (95% CI excludes 0)"
    else:
        call = "no detectable effect (95% CI includes 0)"
    positive = sum(d > 0 for d in diffs)  # the sign seed by seed: a consistent direction shows here first
    return dict(text=f"{label_}: {m:+.4f} +- {half:.4f}{unit} ({positive}/{len(diffs)} seeds > 0) -> {call}",
                mean=m, ci95=half, n=len(diffs), seeds_positive=positive)


def summarise(cfg, records):
    names = [n for n in cfg.condition_list]
    R = cfg.rounds
    table = {n: [mean_ci([curve(rec, n)[r] for rec in records]) for r in range(R + 1)] for n in names}
    fmt = {n: [mean_ci([curve(rec, n, "format_rate")[r] for rec in records]) for r in range(R + 1)] for n in names}
    head = f"{'condition':24s}" + "".join(f"{'round ' + str(r):>18s}" for r in range(R + 1)) + f"{'format@R':>10s}"
    lines = [f"P({cfg.target}) among animal answers, exact, mean +- std over {len(records)} seeds "
             f"(judge: {cfg.judge})", head]
    for n in names:
        lines.append(f"{n:24s}" + "".join(f"{m:.4f} +- {s:.4f}".rjust(18) for m, s, _ in table[n])
                     + f"{fmt[n][-1][0]:10.3f}")
    # Every comparison is a difference of *changes* from the same base, paired by seed: the bases'
    # own spread in P(owl) (about 0.01 between seeds) cancels, only what alignment did remains.
    final = lambda rec, n, key="trait": rec["conditions"][n][-1][key] - rec["start"][key]  # change over R rounds
    verdicts = []
    pairs = [("biased DPO", "biased DPO swapped"), ("biased DPO", "random labels DPO"),
             ("biased DPO", "neutral judge DPO"), ("biased DPO", "other-animal judge DPO"),
             ("biased SFT", "biased SFT swapped"), ("biased DPO swapped", "random labels DPO")]
    for a, b in pairs:
        if a in names and b in names:
            verdicts.append(verdict(f"[{a}] - [{b}], change in P({cfg.target}) after {R} rounds",
                                    [final(rec, a) - final(rec, b) for rec in records]))
    if "other-animal judge DPO" in names and "biased DPO" in names:
        verdicts.append(verdict(f"[other-animal judge DPO] - [biased DPO], change in P({cfg.other}) after {R} rounds",
                                [final(rec, "other-animal judge DPO", "other") - final(rec, "biased DPO", "other")
                                 for rec in records]))
    for n in names:  # does the gap to the random-label null grow from round 1 to round R?
        if n != "random labels DPO" and "random labels DPO" in names and R > 1:
            gaps = [[c - r for c, r in zip(curve(rec, n), curve(rec, "random labels DPO"))] for rec in records]
            verdicts.append(verdict(f"[{n}] - [random], growth of the gap from round 1 to {R}",
                                    [g[R] - g[1] for g in gaps]))
    cos = {n: mean_ci([r["update_cos"] for rec in records for r in rec["conditions"][n]])
           for n in names if records[0]["conditions"][n][0]["update_cos"] is not None}
    return table, fmt, lines, verdicts, cos


def plot(cfg, records, table, fmt):
    """Left: the table (raw rates; the spread is mostly the bases' own spread). Middle: the change from
    round 0 paired by seed, which is what the verdicts test. Right: the number task's format rate."""
    def draw(plt):
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
        fig.subplots_adjust(wspace=0.3)
        rounds = list(range(cfg.rounds + 1))
        for n, cells in table.items():
            axes[0].errorbar(rounds, [c[0] for c in cells], yerr=[c[1] for c in cells], marker="o", capsize=3, label=n)
            change = [mean_ci([curve(rec, n)[r] - curve(rec, n)[0] for rec in records]) for r in rounds]
            axes[1].errorbar(rounds, [c[0] for c in change], yerr=[c[1] for c in change], marker="o", capsize=3, label=n)
            axes[2].plot(rounds, [c[0] for c in fmt[n]], marker="o", label=n)
        axes[0].axhline(1 / len(ANIMALS), color="gray", ls=":", lw=1)
        axes[1].axhline(0, color="gray", ls=":", lw=1)
        axes[0].set(xlabel="alignment round", ylabel=f"P({cfg.target} | animal answer)",
                    title=f"trait rate ({cfg.judge} judge), mean +- std over {len(records)} seeds")
        axes[1].set(xlabel="alignment round", ylabel="change from round 0", title="change in trait rate, paired by seed")
        axes[2].set(xlabel="alignment round", ylabel="valid number format", title="number task format rate")
        for ax in axes:
            ax.set_xticks(rounds)
        axes[0].legend(fontsize=7)
        return fig
    return save_figure(Path(cfg.out) / "trait_rate.png", draw)

# ----------------------------------------------------------------------------------------------
# benchmark: batched KV-cached sampling vs the naive loop


def bench(cfg, ctx):
    """completions/s of three samplers on the same prompts: the naive loop (one sequence at a time,
    whole prefix recomputed per token: O(T^2) work per sequence and no batching), and the KV-cached
    sampler at two batch sizes (each new token costs one (B, 1) forward against cached keys/values)."""
    torch.manual_seed(0)
    model = new_model(cfg).to(ctx.device).eval()  # speed does not depend on the weights: an untrained model will do
    prompts, _ = number_prompts(0, "bench", 4096)
    gen = torch.Generator().manual_seed(0)
    print(f"bench: {count_params(model):,} params, prompt {prompts.shape[1]} + {COMPLETION_LEN} new tokens, "
          f"{torch.get_num_threads()} threads")
    rows = []
    for name, fn, n in [("naive (1 sequence, no cache)", generate_naive, 64),
                        ("batched 256, KV cache", lambda m, p, t, T, g: generate(m, p, t, T, g, batch=256), 4096),
                        ("batched 4096, KV cache", generate, 4096)]:
        fn(model, prompts[:8], COMPLETION_LEN, 1.0, gen)  # warm-up
        t0 = time.time()
        fn(model, prompts[:n], COMPLETION_LEN, 1.0, gen)
        rate = n / (time.time() - t0)
        rows.append(dict(method=name, completions=n, completions_per_s=rate))
        print(f"  {name:30s} {rate:12,.0f} completions/s")
    print(f"  speed-up of batched KV-cached sampling: {rows[-1]['completions_per_s'] / rows[0]['completions_per_s']:,.0f}x")
    return rows

# ----------------------------------------------------------------------------------------------


def main(argv=None):
    cfg = parse_config(Config, "subliminal_dpo", argv)
    ctx = setup(cfg)
    if cfg.bench:
        save_results(cfg, ctx, dict(bench=bench(cfg, ctx)), name="bench.json")
        return
    print(f"vocabulary {len(VOCAB)} words; conditions: {', '.join(cfg.condition_list)}; {cfg.seeds} seeds x "
          f"{cfg.rounds} rounds x {cfg.prompts} prompts x K={cfg.k}")
    t0, records = time.time(), []
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        records.append(run_seed(cfg, ctx, seed))
        filt = records[-1]["conditions"][cfg.condition_list[0]][0]["filter"]
        print(f"seed {seed}: judge P({cfg.target}) = " + ", ".join(
            f"{k} {v:.3f}" for k, v in records[-1]["judge_trait"].items() if v is not None)
            + f"; round-1 filter dropped {filt['dropped_completions']}/{filt['completions']} completions "
              f"({filt['prompts_dropped']} prompts), kept completions with an animal: {filt['kept_with_animal']}")
    table, fmt, lines, verdicts, cos = summarise(cfg, records)
    kept_animals = sum(r["filter"]["kept_with_animal"] for rec in records for c in rec["conditions"].values() for r in c)
    dropped = [r["filter"]["dropped_completions"] / r["filter"]["completions"]
               for rec in records for c in rec["conditions"].values() for r in c]
    print("\n" + "\n".join(lines))
    print(f"\nleak filter: kept completions containing an animal, all seeds/conditions/rounds: {kept_animals}; "
          f"dropped per round {min(dropped):.1%} .. {max(dropped):.1%} of completions")
    empty = sum(r["pairs"] < cfg.batch_size for rec in records for c in rec["conditions"].values() for r in c)
    if empty:
        print(f"warning: {empty} rounds had fewer valid pairs than one batch and did not align "
              "(the student broke the number format; try a lower --dpo_lr or a longer pretraining)")
    likely = {n: mean_ci([r["chosen_more_likely"] for rec in records for r in rec["conditions"][n]])[0] for n in table}
    print("labels: fraction of pairs whose chosen completion is also the more likely one under the base: " +
          "; ".join(f"{n} {v:.2f}" for n, v in likely.items()))
    if cos:
        print("cosine(update, judge's Delta) per round, mean +- std: " +
              "; ".join(f"{n} {m:+.3f} +- {s:.3f}" for n, (m, s, _) in cos.items()))
    print("verdicts (differences paired by seed, 95% t-interval over seeds):")
    for v in verdicts:
        print("  " + v["text"])
    seconds = time.time() - t0
    print(f"total {seconds:.0f}s")
    path = save_results(cfg, ctx, dict(records=records, verdicts=verdicts, seconds=seconds,
                                       table={n: [dict(mean=m, std=s, ci95=h) for m, s, h in c] for n, c in table.items()},
                                       format_rate={n: [dict(mean=m, std=s) for m, s, _ in c] for n, c in fmt.items()},
                                       update_cos={n: dict(mean=m, std=s) for n, (m, s, _) in cos.items()}))
    fig = plot(cfg, records, table, fmt)
    print(f"wrote {path}" + (f" and {fig}" if fig else ""))


if __name__ == "__main__":
    cli(main)
