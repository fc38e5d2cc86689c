"""How much memory verification needs, how much there is, and how much it took.

Torch-free (read by `inspect` too). The estimates are upper bounds in bytes, from the config
alone; the parts are named so the README and `inspect` can say what dominates:

  whole-model  the HF model in the compute dtype, plus ours (views of HF's tensors when SRC
               is converted in memory, a second copy when an export's files are read)
  streamed     the largest of three phases, each holding one part on each side:
               embedding (HF's tables cast + the bytes read; Gemma 4's per-layer input
               table and projection are part of it), one decoder layer on
               each side, final norm + unembedding (one side's at a time) + the logits
  sub-layer    a layer's small tensors (norms; an MoE layer's router and shared expert,
               Gemma 4's dense MLP beside its experts; an attention with a q/k norm
               over the whole projection) on each side, and one part of a split
               module at a time (`part_elements`: one KV head's attention weights; MLP
               and vocabulary chunks of that size; one routed expert) with the bytes
               read; ours mapped in memory from SRC read a whole source tensor (or
               table, or one expert of a stacked one) to slice it

plus the interpreter with torch and transformers, and the activations of all inputs.
"""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

from gqa_convert.config import ModelConfig
from gqa_convert.errors import InsufficientMemoryError

BASE_BYTES = 700 * 2**20  # python + torch + transformers + our code, measured ~600 MB
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Elements of each float64 [positions, vocab] temporary of the logit statistics (32 MB):
# positions are compared this many vocab rows at a time ([1024, 128k] in one go took 8.2 GB).
STATS_CHUNK_ELEMENTS = 1 << 22


def layer_params(cfg: ModelConfig) -> int:
    """Parameters of the largest decoder layer (norms, attention with biases, gated MLP or,
    on an MoE layer, the router and every expert; Gemma 4: a global layer's own head size
    and KV heads, a K/V-shared layer's double-wide MLP, the gate of the per-layer input)."""
    return max(_layer_params(cfg, i) for i in range(cfg.n_layers))


def _layer_params(cfg: ModelConfig, layer: int) -> int:
    d_head = cfg.layer_d_head(layer)
    q, kv = cfg.n_heads * d_head, cfg.layer_n_kv(layer) * d_head
    attn = cfg.d_model * (2 * q + 2 * kv) + q + 2 * kv + cfg.d_model
    mlp = 3 * cfg.d_model * cfg.layer_d_mlp(layer)
    if cfg.is_moe_layer(layer):
        moe = cfg.d_model * cfg.moe.n_experts * (1 + 3 * cfg.moe.d_expert)
        moe += 3 * cfg.d_model * cfg.d_shared_expert + cfg.moe.n_experts  # shared, bias
        if cfg.moe.dense_mlp:  # Gemma 4: the dense MLP beside, 3 norms, 2 scales
            moe += mlp + 4 * cfg.d_model + cfg.moe.n_experts
        mlp = moe
    per_layer = (2 * cfg.d_per_layer_input + 1) * cfg.d_model if cfg.d_per_layer_input else 0
    return 2 * cfg.d_model + attn + mlp + per_layer + 1  # + Gemma 4's layer_scalar


def per_layer_table(cfg: ModelConfig) -> int:
    """Elements of Gemma 4's per-layer input embedding (d_vocab_per_layer x n_layers x
    d_per_layer_input: E2B's 2.35B outweighs the rest of the model); 0 without one."""
    return cfg.d_vocab_per_layer * cfg.n_layers * cfg.d_per_layer_input


def per_layer_projection(cfg: ModelConfig) -> int:
    """Elements of Gemma 4's projection of the embeddings into the per-layer inputs (and
    its norm), held whole with the embedding part; 0 without per-layer inputs."""
    p = cfg.d_per_layer_input
    return cfg.d_model * cfg.n_layers * p + p if p else 0


def largest_layer_tensor(cfg: ModelConfig) -> int:
    """Elements of the largest tensor of one layer (read whole before the cast)."""
    d_mlp = max(cfg.layer_d_mlp(i) for i in range(cfg.n_layers))
    d_head = max(cfg.d_head, cfg.d_head_global)
    return max(cfg.d_model * d_mlp, cfg.d_model * cfg.n_heads * d_head)


def expert_stack(cfg: ModelConfig) -> int:
    """Elements of the largest tensor transformers' loader builds on an MoE layer: every
    expert's gate and up stacked into one `gate_up_proj`, while the per-expert tensors it
    was stacked from are still held (0 without MoE)."""
    return 2 * cfg.moe.n_experts * cfg.d_model * cfg.moe.d_expert if cfg.moe else 0


def part_elements(cfg: ModelConfig) -> int:
    """Weights of one sub-layer part: one KV head with its query heads (q, k, v rows and
    o_proj's columns); MLP and vocabulary chunks are cut to about as many."""
    group = cfg.n_heads // cfg.n_key_value_heads
    return cfg.d_model * cfg.d_head * (2 * group + 2)


def expert_params(cfg: ModelConfig) -> int:
    """Parameters of one routed expert (gate, up, down and gpt-oss's biases; 0 without MoE):
    what sub-layer streaming holds of an MoE layer's experts at a time."""
    if cfg.moe is None or not any(cfg.moe.layers):
        return 0
    return 3 * cfg.d_model * cfg.moe.d_expert + 2 * cfg.moe.d_expert + cfg.d_model


def splits_attention(cfg: ModelConfig, layer: int) -> bool:
    """Whether sub-layer streaming runs layer `layer`'s attention by KV-head groups: its
    q / k norms (if any) act per head, and it has the model's head size and KV heads and a
    k and v of its own that no later layer reads (Gemma 4's global, k = v, K/V-shared layers
    and the layers they share K/V with: held whole)."""
    sources = {cfg.kv_source(i) for i in range(cfg.n_layers - cfg.kv_shared_layers, cfg.n_layers)}
    return (
        cfg.qk_norm in (None, "head")
        and (cfg.layer_d_head(layer), cfg.layer_n_kv(layer)) == (cfg.d_head, cfg.n_key_value_heads)
        and cfg.has_w_v(layer)
        and layer not in sources
    )


def splits_mlp(cfg: ModelConfig, layer: int) -> bool:
    """Whether sub-layer streaming runs layer `layer`'s MLP in d_mlp chunks: a dense MLP of
    width d_mlp (not MoE experts; Gemma 4's double-wide MLPs: held whole)."""
    return not cfg.is_moe_layer(layer) and cfg.layer_d_mlp(layer) == cfg.d_mlp


def held_whole(cfg: ModelConfig) -> int:
    """Parameters of a layer that sub-layer streaming holds whole (all but the split
    attention's and dense MLP's weights and the routed experts, which go in parts: on an MoE
    layer the router, a shared expert and Gemma 4's dense MLP stay), the largest over the
    layers."""
    q, kv = cfg.n_heads * cfg.d_head, cfg.n_key_value_heads * cfg.d_head
    attn, mlp = cfg.d_model * (2 * q + 2 * kv), 3 * cfg.d_model * cfg.d_mlp
    experts = 3 * cfg.d_model * cfg.moe.d_expert * cfg.moe.n_experts if cfg.moe else 0
    return max(
        _layer_params(cfg, i)
        - splits_attention(cfg, i) * attn
        - splits_mlp(cfg, i) * mlp
        - cfg.is_moe_layer(i) * experts
        for i in range(cfg.n_layers)
    )


@dataclass(frozen=True)
class Estimate:
    whole: int
    streamed: int
    sub_layer: int

    def to_dict(self) -> dict[str, int]:
        return {"whole": self.whole, "streamed": self.streamed, "sub_layer": self.sub_layer}


def estimate(
    cfg: ModelConfig,
    *,
    dtype: str = "float32",
    storage_bytes: int = 2,
    tokens: int = 128,
    sequences: int = 1,
    second_copy: bool = False,
    ours_by_layer: bool = False,
    dequantisation: int = 0,
) -> Estimate:
    """Peak bytes of `verify` for `sequences` inputs of up to `tokens` tokens.

    `storage_bytes` per element of the files read; `second_copy`: our weights are read from
    an export's files or dequantised by our reader (not views of the HF model's);
    `ours_by_layer`: read from an export's files, which whole-model mode too holds one layer
    at a time (`Ours._cast`: only HF's side is whole); `dequantisation`: the bytes a
    quantised source's dequantisation holds at once besides its result (both sides'
    temporaries).
    """
    c, s = DTYPE_BYTES[dtype], storage_bytes
    table = cfg.d_vocab * cfg.d_model
    # The embedding part: the embedding, and Gemma 4's per-layer input table and projection.
    pl_table, pl_proj = per_layer_table(cfg), per_layer_projection(cfg)
    embedding = table + pl_table + pl_proj
    layer = layer_params(cfg)
    ours = 2 if second_copy else 1
    t, n = tokens, sequences
    # Activations: three streams of every input, one layer's intermediates for one input
    # (MLP, q/k/v and their captures, an attention mask or scores), every input's logits
    # on one side and one on the other, the float64 statistics over STATS_CHUNK_ELEMENTS;
    # Gemma 4's per-layer inputs of every input, on each side, kept for the whole run.
    streams = 3 * n * t * cfg.d_model * c + 2 * n * t * cfg.n_layers * cfg.d_per_layer_input * c
    inner = 4 * t * cfg.d_mlp * c + 12 * t * cfg.d_model * c + 2 * cfg.n_heads * t * t * 4
    logits = (n + 1) * t * cfg.d_vocab * c + 8 * min(t * cfg.d_vocab, STATS_CHUNK_ELEMENTS) * 8
    acts = streams + inner + logits
    read = largest_layer_tensor(cfg) * s + expert_stack(cfg) * c
    every = (embedding + table + cfg.n_layers * layer) * c
    # Ours held one part at a time beside HF's whole model: the embedding part, one layer
    # (cast into the previous one's arrays) with the bytes of the tensor being cast, or one
    # unembedding.
    by_layer = max(embedding * c, layer * c + read, table * c)
    second = by_layer if ours_by_layer else every if second_copy else 0
    whole = BASE_BYTES + acts + every + second
    whole += max(table, pl_table) * s  # the largest tensor's bytes, read before its cast
    phases = (
        embedding * (c + s),  # HF's cast from the bytes read; ours index the bytes
        ours * layer * c + read,
        table * (c + s),  # one unembedding at a time (ours are views, or read after HF's)
    )
    part = part_elements(cfg)
    # Ours mapped in memory (views) read the whole source tensor, or table, to slice it (of
    # a stacked experts tensor, one expert's slice); the tables are looked up a token's rows
    # at a time, Gemma 4's projection held whole. One expert at a time: its bytes read, the
    # cast, and transformers' loader's stacked copy where it fuses per-expert tensors.
    mapped = 0 if second_copy else 1
    one = max(part * (c + s), expert_params(cfg) * (2 * c + s))
    sub_read = largest_layer_tensor(cfg) * s
    sub_phases = (
        mapped * (table + pl_table) * (c + s) + 2 * pl_proj * c + pl_proj * s,
        2 * held_whole(cfg) * c + one + mapped * sub_read * (1 + c // s),
        mapped * table * (c + s) + part * (c + s),
    )
    return Estimate(
        whole=whole + dequantisation,
        streamed=BASE_BYTES + acts + max(phases) + dequantisation,
        sub_layer=BASE_BYTES + acts + max(sub_phases),
    )


def available_bytes() -> int:
    """What this process may still grow to: MemAvailable (and a cgroup limit, if lower),
    plus what it holds already."""
    free = _meminfo("MemAvailable")
    limit = _cgroup_room()
    if limit is not None:
        free = min(free, limit)
    return free + current_rss()


def _meminfo(key: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _cgroup_room() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
    except OSError:
        return None
    return None if limit == "max" else max(0, int(limit) - int(used))


def current_rss() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def return_freed_memory() -> None:
    """Make glibc give large freed blocks back to the system.

    glibc serves an allocation of 128 kB or more by mmap and unmaps it on free, but after the
    first such free it raises that threshold up to 32 MB (its "dynamic threshold"): the
    per-layer tensors of a streamed run (16-60 MB each) then come from the heap, whose holes
    are not returned, and the resident set creeps up layer by layer (971 MB against 547 MB on
    a 16-layer test model). Setting the threshold explicitly (1 MB) turns that off. No-op
    off glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return
    if mallopt is not None:
        mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def peak_rss() -> int:
    """This process's peak resident set so far, in bytes (ru_maxrss)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


SUB_LAYER = "sub-layer"


def choose_mode(
    need: Estimate, budget: int | None, streaming: bool | str | None
) -> tuple[str, int, bool]:
    """("whole", "streamed" or "sub-layer", the budget, whether it was given), or
    InsufficientMemoryError.

    Without `budget` it is what is available now. `streaming` None picks whole-model when it
    fits, else layer-streamed when that fits, else sub-layer; True / False / "sub-layer"
    force one. A forced whole-model run is refused only against a budget the caller gave
    (they asked for it); a streamed mode always must fit.
    """
    given = budget is not None
    if budget is None:
        budget = available_bytes()
    if streaming is None:
        streaming = need.whole > budget and (need.streamed <= budget or SUB_LAYER)
    if streaming not in (True, False, SUB_LAYER):
        raise ValueError(f"streaming={streaming!r}: True, False, None or {SUB_LAYER!r}")
    mode, want = {
        True: ("streamed", need.streamed),
        False: ("whole", need.whole),
        SUB_LAYER: (SUB_LAYER, need.sub_layer),
    }[streaming]
    if want > budget and (streaming or given):
        source = "--max-memory" if given else "available memory"
        hint = "" if streaming else "; drop --no-streaming"
        raise InsufficientMemoryError(
            f"{mode} verification needs about {gb(want)}, more than the budget of {gb(budget)} "
            f"({source}){hint}; nothing was loaded"
        )
    return mode, budget, given


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is torch failing to allocate: its CPU allocator's RuntimeError
    ("can't allocate memory"), or `torch.OutOfMemoryError` (CUDA)."""
    return type(error).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(error)
