"""Shared test builders: random packed weights and a tiny random Llama (no hub access)."""

from __future__ import annotations

import torch

from onebit.format import Layout, PackedWeight, Select, Term, pack

CGB_LAYOUT = Layout(
    (
        Term(0, Select.GROUP0), Term(0, Select.GROUP1),  # non-salient, order 1
        Term(0, Select.GROUP0), Term(1, Select.GROUP0),  # salient, order 2, group 0
        Term(0, Select.GROUP1), Term(1, Select.GROUP1),  # salient, order 2, group 1
    )
)  # fmt: skip
MEAN_LAYOUT = Layout((Term(0, Select.GROUP0), Term(0, Select.GROUP1), Term(1, Select.ALL)), has_mean=True)
SINGLE = Layout((Term(0, Select.ALL),))
LAYOUTS = {"single": SINGLE, "cgb": CGB_LAYOUT, "mean": MEAN_LAYOUT}


def random_dense(n: int, k: int, layout: Layout, block_size: int, gen: torch.Generator) -> dict:
    """Random dense quantizer output: signs (P,N,K) in +-1, groups, scales (some in_scale zero)."""
    nb = -(-k // block_size)
    t = layout.n_terms
    signs = torch.where(torch.rand(layout.n_planes, n, k, generator=gen) < 0.5, -1.0, 1.0)
    groups = torch.rand(n, k, generator=gen) < 0.3
    out_scale = torch.rand(t, n, nb, generator=gen) + 0.1
    in_scale = torch.rand(t, k, generator=gen) + 0.5
    in_scale[torch.rand(t, k, generator=gen) < 0.25] = 0.0  # column-restricted terms
    mean = torch.randn(t, n, nb, generator=gen) * 0.1 if layout.has_mean else None
    return {"signs": signs, "groups": groups, "out_scale": out_scale, "in_scale": in_scale, "mean": mean}


def random_packed(n: int, k: int, layout: Layout = SINGLE, block_size: int = 64, seed: int = 0,
                  scale_dtype: str = "float32") -> PackedWeight:  # fmt: skip
    d = random_dense(n, k, layout, block_size, torch.Generator().manual_seed(seed))
    return pack(d["signs"], d["out_scale"], d["in_scale"], layout, block_size, d["groups"], d["mean"], scale_dtype)


def tiny_llama(layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def one_thread_fixture():
    """Run a module's tests on one torch thread (many small elementwise ops: on a shared
    2-core runner one thread is several times faster than two contending ones)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def copy_checkpoint(d, tmp_path, name: str = "c"):
    """A writable copy of a checkpoint directory, to corrupt in a test."""
    import shutil

    dst = tmp_path / name
    shutil.copytree(d, dst)
    return dst


def edit_config(c, fn) -> None:
    """Apply fn to the checkpoint's config.json dict in place."""
    import json

    cfg = json.loads((c / "config.json").read_text())
    fn(cfg)
    (c / "config.json").write_text(json.dumps(cfg))
