"""Text generation with onebit models: transformers' `model.generate()` plus throughput.

`generate()` is one prompt for the CLI (`onebit generate DIR --prompt ...`); `generate_batch()`
runs several prompts in one left-padded `model.generate()` call and hands each new token to a
per-row callback as it is produced (the server's batching and streaming path). Both use the
KV cache; greedy when temperature == 0, sampling otherwise.

Prefill and decode are timed separately: a logits processor notes when each step's logits
exist (the first ends the prefill); the remaining steps are decode.

`compile=True` runs the decode steps under torch.compile(fullgraph=True) with a static KV
cache (transformers' own compiled decode, asked for on every device): a one-time compile at
the first decode step (15-45 s for SmolLM2 on 2 CPU cores, less from inductor's disk cache),
then faster steps (fewer Python calls per layer). The static caches are kept per model, batch
size and length bucket (multiples of 256 tokens) and reset between calls, so later calls of
the same batch size and bucket reuse the compiled step whatever their prompt and length.
"""

from __future__ import annotations

import inspect
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class Request:
    """One prompt (token ids) and how to continue it."""

    prompt_ids: list[int]
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    on_token: Callable[[int], None] | None = None  # called with each new token id, in order
    cancelled: Callable[[], bool] | None = None  # polled every step; True stops this row

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("prompt must contain at least one token")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")

    @property
    def sampling_key(self) -> tuple:
        """Requests with equal keys can share one generate() call."""
        return (self.temperature > 0, round(self.temperature, 6), round(self.top_p, 6))


@dataclass
class Result:
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS) or "length" or "cancelled"
    prompt_tokens: int
    prefill_s: float = 0.0
    decode_s: float = 0.0
    timings: dict = field(default_factory=dict)


class _StepClock:
    """Logits processor that records when each step's logits exist (the first: end of prefill)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def compile_config():
    """transformers' CompileConfig for decode steps under torch.compile(fullgraph=True).
    transformers compiles automatically only on accelerators; the flag `_compile_all_devices`
    (private) extends that to the CPU."""
    from transformers import CompileConfig

    if not hasattr(CompileConfig, "_compile_all_devices"):
        raise RuntimeError("this transformers version has no CompileConfig._compile_all_devices: cannot compile on CPU")
    cc = CompileConfig(fullgraph=True, dynamic=False, mode="default")
    cc._compile_all_devices = True
    return cc


CACHE_BUCKET = 256  # static cache lengths are rounded up to a multiple of this
_MAX_CACHES = 4  # static caches kept per model (SmolLM2: ~12 MB each at batch 1, 256 tokens)
_static_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _static_cache_kwargs(model, batch: int, length: int) -> dict:
    """generate() keywords that reuse one StaticCache per (batch, length bucket) of this model:
    the compiled decode step's shapes are the cache's, so a reused cache reuses the graph."""
    from transformers import StaticCache

    length = -(-length // CACHE_BUCKET) * CACHE_BUCKET
    caches = _static_caches.setdefault(model, {})
    cache = caches.pop((batch, length), None)
    if cache is None:
        cache = StaticCache(config=model.config, max_batch_size=batch, max_cache_len=length)
    else:
        cache.reset()
    caches[(batch, length)] = cache  # most recent last
    while len(caches) > _MAX_CACHES:
        caches.pop(next(iter(caches)))
    # transformers 5 names the argument `cache`; earlier versions `past_key_values`.
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache, "compile_config": compile_config()}


class _RowState:
    def __init__(self, reqs: Sequence[Request], eos: set[int]) -> None:
        self.reqs, self.eos = reqs, eos
        self.tokens: list[list[int]] = [[] for _ in reqs]
        self.reason: list[str | None] = [None] * len(reqs)

    def done(self, i: int) -> bool:
        if self.reason[i] is None and self.reqs[i].cancelled is not None and self.reqs[i].cancelled():
            self.reason[i] = "cancelled"
        return self.reason[i] is not None


class _Streamer:
    """transformers streamer: put() gets the prompt first, then (B,) new tokens per step."""

    def __init__(self, state: _RowState) -> None:
        self.state, self.seen_prompt = state, False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        st = self.state
        for i, tok in enumerate(value.reshape(-1).tolist()):
            if st.done(i):
                continue
            if tok in st.eos:
                st.reason[i] = "stop"
                continue
            st.tokens[i].append(tok)
            if st.reqs[i].on_token is not None:
                st.reqs[i].on_token(tok)
            if len(st.tokens[i]) >= st.reqs[i].max_new_tokens:
                st.reason[i] = "length"

    def end(self) -> None:
        pass


class _RowsDone:
    """Stopping criterion: a row stops at its own max_new_tokens, EOS or cancellation."""

    def __init__(self, state: _RowState) -> None:
        self.state = state

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw) -> torch.Tensor:
        return torch.tensor([self.state.done(i) for i in range(len(self.state.reqs))], device=input_ids.device)


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        ids.update([e] if isinstance(e, int) else (e or []))
    return ids


@torch.no_grad()
def generate_batch(
    model, tokenizer, reqs: Sequence[Request], seed: int | None = None, compile: bool = False
) -> list[Result]:
    """Run requests with the same sampling settings in one left-padded model.generate() call.

    Result.timings["first_decode_s"]: the first decode step alone (with compile=True, the
    compilation)."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    if not reqs:
        return []
    if len({r.sampling_key for r in reqs}) != 1:
        raise ValueError("generate_batch needs requests with equal temperature / top_p (group them first)")
    dev = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else None
    eos = _eos_ids(model, tokenizer)
    pad = pad if pad is not None else (min(eos) if eos else 0)
    width = max(len(r.prompt_ids) for r in reqs)
    ids = torch.full((len(reqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(reqs), width), dtype=torch.long)
    for i, r in enumerate(reqs):
        ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
        mask[i, width - len(r.prompt_ids) :] = 1
    state = _RowState(reqs, eos)
    clock = _StepClock()
    r0 = reqs[0]
    sample = r0.temperature > 0
    kw = {"do_sample": True, "temperature": r0.temperature, "top_p": r0.top_p, "top_k": 0} if sample else {
        "do_sample": False, "temperature": None, "top_p": None, "top_k": None}  # fmt: skip
    if seed is not None:
        torch.manual_seed(seed)
    t0 = time.perf_counter()
    model.generate(
        input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max(r.max_new_tokens for r in reqs),
        use_cache=True, pad_token_id=pad, eos_token_id=sorted(eos) or None, streamer=_Streamer(state),
        logits_processor=LogitsProcessorList([clock]), stopping_criteria=StoppingCriteriaList([_RowsDone(state)]),
        **kw, **(_static_cache_kwargs(model, len(reqs), width + max(r.max_new_tokens for r in reqs)) if compile else {}),
    )  # fmt: skip
    t_end = time.perf_counter()
    t_first = clock.times[0] if clock.times else t_end
    timings = {"first_decode_s": clock.times[1] - clock.times[0]} if len(clock.times) > 1 else {}
    out = []
    for i, r in enumerate(reqs):
        reason = state.reason[i] or "length"
        out.append(Result(state.tokens[i], reason, len(r.prompt_ids), t_first - t0, t_end - t_first, dict(timings)))
    return out


def generate(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    chat: bool = False,
    compile: bool = False,
) -> dict:
    """Complete one prompt: {'text', 'prompt_tokens', 'new_tokens', 'prefill_tok_s', 'decode_tok_s', ...}.

    compile: decode under torch.compile (module docstring); decode_tok_s then leaves out the
    first decode step, which compiles (its time: 'compile_s')."""
    ids = encode_prompt(tokenizer, prompt, chat)
    res = generate_batch(model, tokenizer, [Request(ids, max_new_tokens, temperature, top_p)], seed=seed, compile=compile)[0]
    n = len(res.token_ids)
    # The first new token comes out of the prefill step; the other n - 1 are decode steps.
    steps, decode_s = n - 1, res.decode_s
    if compile and "first_decode_s" in res.timings:
        steps, decode_s = n - 2, res.decode_s - res.timings["first_decode_s"]
    out = {
        "text": tokenizer.decode(res.token_ids, skip_special_tokens=True), "prompt_tokens": res.prompt_tokens,
        "new_tokens": n, "finish_reason": res.finish_reason, "prefill_s": res.prefill_s, "decode_s": res.decode_s,
        "prefill_tok_s": res.prompt_tokens / max(res.prefill_s, 1e-9),
        "decode_tok_s": steps / decode_s if steps > 0 and decode_s > 0 else float("nan"),
    }  # fmt: skip
    if compile:
        out["compile_s"] = res.timings.get("first_decode_s", float("nan"))
    return out


def encode_prompt(tokenizer, prompt: str, chat: bool = False) -> list[int]:
    if chat:
        return chat_ids(tokenizer, [{"role": "user", "content": prompt}])
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation through the tokenizer's chat template, ready for the reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template; use a plain completion prompt")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def load_for_generation(path: str, device: str = "cpu", dtype: torch.dtype | None = None, head_dtype: str | None = None):
    """(model, tokenizer) of a onebit checkpoint directory through transformers' from_pretrained.

    head_dtype ("float16" / "bfloat16" / "int8"): keep the lm_head and its tied embedding as one
    narrow copy (onebit.head.compact_head): a half (16-bit) or a quarter (int8) of the bytes a
    decode step reads for them.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import onebit.hf  # noqa: F401  (registers the "onebit" quantization method)

    model = AutoModelForCausalLM.from_pretrained(path, device_map=device, dtype=dtype or "auto")
    if head_dtype:
        from onebit.head import compact_head

        compact_head(model, getattr(torch, head_dtype))
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: no tokenizer saved beside the checkpoint ({e})") from None
    return model.eval(), tok


def add_parser(sub) -> None:
    """`onebit generate` (called by onebit.cli)."""
    g = sub.add_parser("generate", help="complete a prompt with a checkpoint; prints the text and tokens/s")
    g.add_argument("dir", help="quantized checkpoint directory (with its tokenizer)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument("--compile", action="store_true",
                   help="decode under torch.compile with a static KV cache: faster steps after a one-time compile "
                        "(about a minute for SmolLM2 on 2 cores); decode tok/s leaves out the compiling step")  # fmt: skip
    add_head_option(g)
    g.set_defaults(fn=_cli_generate)


def add_head_option(parser) -> None:
    parser.add_argument("--head-dtype", choices=("float16", "bfloat16", "int8"), default=None,
                        help="run the lm_head (and the embedding tied to it) as one narrow copy: faster decode, "
                        "the head's weights rounded to that dtype (int8: a scale per row)")  # fmt: skip


def _cli_generate(args) -> int:
    import json

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens (max_new_tokens) must be >= 1, got {args.max_new_tokens}")
    model, tok = load_for_generation(args.dir, head_dtype=args.head_dtype)
    with torch.no_grad():  # first call pays one-time costs (kernel selection, allocation): keep them out of tok/s
        model(torch.tensor([encode_prompt(tok, args.prompt, args.chat)[:2]]))
    r = generate(model, tok, args.prompt, args.max_new_tokens, args.temperature, args.top_p, args.seed, args.chat,
                 compile=args.compile)  # fmt: skip
    if args.json:
        print(json.dumps(r))
    else:
        print(args.prompt + r["text"] if not args.chat else r["text"])
        compiled = f" | compile {r['compile_s']:.1f} s" if args.compile else ""
        print(f"\n[prefill {r['prompt_tokens']} tokens: {r['prefill_tok_s']:.1f} tok/s | decode {r['new_tokens']} "
              f"tokens: {r['decode_tok_s']:.1f} tok/s{compiled} | finish: {r['finish_reason']}]")  # fmt: skip
    return 0
