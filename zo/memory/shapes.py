"""A model's shape for the planner, derived from its own Hugging Face config.

The model is built on torch's ``meta`` device (no memory, no weights, a fraction of a
second even at 13B) with the class ``zo train`` would load it with, and read: the linear
layers of one decoder block with their names (what NF4 quantizes, what LoRA targets), the
norms and biases, the embeddings and head, tied or not. So every architecture that
transformers builds gets a memory model, with its own head dimension, key/value heads and
extra norms, and no table per family. How many activations a block keeps alive follows from
what was read (a gated MLP, RMSNorm or LayerNorm, learned positions or rotary ones, the
activation function); :class:`ActivationProfile` says how.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig


class PlanError(ValueError):
    """An impossible or unknown planning request (``zo plan`` exits with code 2)."""


@dataclass(frozen=True)
class Matrix:
    """One linear layer of a decoder block: its module path inside the block and shape."""

    name: str
    rows: int
    cols: int

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def in_attention(self) -> bool:
        return "attn" in self.name or "attention" in self.name


@dataclass(frozen=True)
class ActivationProfile:
    """Activations a block keeps alive, in units of ``tokens x hidden`` (``h``) and ``tokens x
    intermediate`` (``i``) tensors of the activation dtype, read off the HF modeling code of
    Llama (RMSNorm, SwiGLU, RoPE), OPT (LayerNorm, ReLU, learned positions) and RoBERTa
    (GELU, embedding LayerNorm) and derived by :func:`activation_profile` from what a block
    holds, so another architecture built of the same parts gets its counts."""

    rms_norm: bool
    """RMSNorm (saves its normalised input, and an fp32 upcast in low precision)."""
    rope: bool
    """Rotary positions (cos/sin tables and rotated copies) instead of a learned table."""
    hidden_norms: int
    """Norms of width ``hidden`` per block (Llama 2; Gemma-3's sandwich norms 4)."""
    inference_mlp_i: int
    """MLP tensors of width ``i`` alive at once without grad: SwiGLU act(gate), up, product
    (3); fc1 output and its activation (2)."""
    inference_mlp_h: int
    """Width-``h`` tensors alive during the MLP: the layer input, the mid-layer residual, and
    the normed input (Llama's MLP module holds it; OPT rebinds it, freeing it)."""
    stored_h: int
    """Saved for backward per block, width ``h``: layer input, mid-layer residual, each
    norm's output (and its normalised input under RMSNorm). Attention's q, k, v (k and v
    repeated to the query heads) and output are four more, of the query width."""
    head_norms: bool
    """q/k norms over each head (Gemma-3, Qwen-3): under RMSNorm they save the normalised q
    and k (query width + key/value width)."""
    stored_i: int
    """Saved per block, width ``i``: SwiGLU gate, act(gate), up, product (4); ReLU's output
    (1); GELU's input and output (2)."""
    held_embeddings: int
    """Embedding outputs the model's forward keeps through every block (token and learned
    position embeddings added without a norm: 2)."""
    stored_embeddings: int
    """Of those, saved for backward besides the first block's input."""
    norm_weight_inputs_h: int
    """Of ``stored_h``, kept only for the norm weights' gradients (RMSNorm's normalised
    inputs); frozen norms (LoRA, masks) drop them."""
    linear_only_h: int
    """Of ``stored_h``, kept only as inputs of linear layers LoRA leaves frozen: o_proj's
    input and the post-attention norm's output (q/v's input stays: LoRA reads it)."""
    linear_only_i: int
    """Of ``stored_i``, kept only as a frozen linear's input (down_proj's; ReLU keeps it)."""


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    matrices: tuple[Matrix, ...]
    """The linear layers of one block (every block alike)."""
    block_vectors: int
    """Other parameters of one block: norm weights, biases."""
    outer_parameters: int
    """Parameters outside the blocks: embeddings, positions, final norm, head (if untied)."""
    activations: ActivationProfile
    parameter_names: tuple[tuple[str, int], ...] = ()
    """``(name, numel)`` of every parameter, tied ones once (``names:`` trainable sets)."""

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_matrices(self) -> list[tuple[int, int]]:
        """(out, in) of every linear layer of one block (what NF4 quantizes)."""
        return [(m.rows, m.cols) for m in self.matrices]

    def layer_matrix_parameters(self) -> int:
        return self.layers * sum(m.numel for m in self.matrices)

    def parameters(self) -> int:
        return (
            self.layer_matrix_parameters()
            + self.layers * self.block_vectors
            + (self.outer_parameters)
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelShape:
        matrices = tuple(Matrix(**m) for m in data["matrices"])
        profile = ActivationProfile(**data["activations"])
        names = tuple((name, numel) for name, numel in data.get("parameter_names", ()))
        return cls(
            **{**data, "matrices": matrices, "activations": profile, "parameter_names": names}
        )


# ---------------------------------------------------------------------- from a built model


def shape_of_model(model: nn.Module) -> ModelShape:
    """The shape of ``model`` (real or on the meta device): parameters as built, and the
    counts of activations derived from its first block."""
    from torch import nn

    from zo.blocks import NoBlocksError, decoder_blocks

    config = model.config
    try:
        blocks = decoder_blocks(model)
    except NoBlocksError as error:
        raise PlanError(f"{config.model_type}: {error}") from None
    block = blocks[0]
    matrices = tuple(
        Matrix(name, m.out_features, m.in_features)
        for name, m in block.named_modules()
        if isinstance(m, nn.Linear)
    )
    block_parameters = sum(p.numel() for p in block.parameters())
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    outer = sum(p.numel() for p in model.parameters() if id(p) not in in_blocks)
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    intermediate = next(
        (v for k in ("intermediate_size", "ffn_dim", "n_inner") if (v := getattr(config, k, None))),
        4 * hidden,
    )
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is model.get_input_embeddings().weight
    return ModelShape(
        model_type=config.model_type,
        hidden=hidden,
        layers=len(blocks),
        intermediate=intermediate,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab=config.vocab_size,
        tied_embeddings=tied,
        matrices=matrices,
        block_vectors=block_parameters - sum(m.numel for m in matrices),
        outer_parameters=outer,
        activations=activation_profile(model, block, matrices, hidden, intermediate),
        parameter_names=tuple((name, p.numel()) for name, p in model.named_parameters()),
    )


def activation_profile(
    model: nn.Module, block: nn.Module, matrices: tuple[Matrix, ...], hidden: int, inter: int
) -> ActivationProfile:
    """The activation counts of a block built of the parts found in it (see the fields)."""
    from torch import nn

    norms = [m for m in block.modules() if _is_norm(m)]
    hidden_norms = [m for m in norms if _width(m) == hidden]
    head_norms = len(norms) - len(hidden_norms)  # q/k norms (Gemma-3, Qwen-3)
    rms = not any(isinstance(m, nn.LayerNorm) for m in hidden_norms)
    gated = sum(m.cols == hidden and m.rows == inter for m in matrices) >= 2
    config = model.config
    act = str(getattr(config, "hidden_act", None) or getattr(config, "activation_function", ""))
    relu = act == "relu"
    position_tables = [
        m
        for name, m in model.named_modules()
        if isinstance(m, nn.Embedding)
        and m is not model.get_input_embeddings()
        and "position" in name
    ]
    block_ids = {id(m) for m in block.modules()}
    embedding_norm = any(
        _is_norm(m) and "embed" in name and id(m) not in block_ids
        for name, m in model.named_modules()
    )
    summed_embeddings = bool(position_tables) and not embedding_norm
    per_norm = 2 if rms else 1  # its output; RMSNorm also its normalised input
    return ActivationProfile(
        rms_norm=rms,
        rope=not position_tables,
        hidden_norms=len(hidden_norms),
        inference_mlp_i=3 if gated else 2,
        inference_mlp_h=3 if gated else 2,
        stored_h=2 + per_norm * len(hidden_norms),
        head_norms=bool(head_norms),
        stored_i=4 if gated else (1 if relu else 2),
        held_embeddings=2 if summed_embeddings else 1,
        stored_embeddings=2 if summed_embeddings else 0,
        norm_weight_inputs_h=len(hidden_norms) if rms else 0,
        linear_only_h=2,
        linear_only_i=0 if (relu and not gated) else 1,
    )


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return ("Norm" in name or "norm" in name) and getattr(module, "weight", None) is not None


def _width(module: nn.Module) -> int:
    return module.weight.shape[-1]


# ---------------------------------------------------------------------- from a config


def shape_from_config(config: PretrainedConfig) -> ModelShape:
    """Build the model of ``config`` on the meta device, with the class ``zo train`` loads
    it with (a zo family's, else transformers' causal LM), and read its shape."""
    import torch
    import transformers

    from zo.models import family_model_class, family_of

    family = family_of(config.model_type)
    try:
        if family is not None:
            model_class = family_model_class(family)
            build = model_class._from_config
        else:
            build = transformers.AutoModelForCausalLM.from_config
        with torch.device("meta"):
            model = build(config)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise PlanError(
            f"model_type {config.model_type!r}: transformers cannot build it "
            f"({_one_line(error)}); give a causal LM config transformers knows"
        ) from None
    return shape_of_model(model)


def shape_from_hf_config(data: dict[str, Any]) -> ModelShape:
    """A :class:`ModelShape` from a Hugging Face ``config.json`` dict."""
    return shape_from_config(config_from_dict(data))


def config_from_dict(data: dict[str, Any]) -> PretrainedConfig:
    from transformers import AutoConfig

    model_type = data.get("model_type")
    if not model_type:
        raise PlanError("the config has no model_type: give a Hugging Face config.json")
    try:
        return AutoConfig.for_model(**data)
    except (ValueError, KeyError) as error:
        raise PlanError(f"model_type {model_type!r}: {_one_line(error)}") from None


def _one_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


# ---------------------------------------------------------------------- well-known models


def _llama(hidden, layers, inter, heads, kv, vocab, positions, **extra) -> dict[str, Any]:
    return dict(
        model_type="llama",
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=inter,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        max_position_embeddings=positions,
        **extra,
    )


def _opt(hidden, layers, heads) -> dict[str, Any]:
    return dict(
        model_type="opt",
        hidden_size=hidden,
        word_embed_proj_dim=hidden,
        num_hidden_layers=layers,
        ffn_dim=4 * hidden,
        num_attention_heads=heads,
        vocab_size=50272,
        max_position_embeddings=2048,
    )


PRESETS: dict[str, dict[str, Any]] = {
    "opt-125m": _opt(768, 12, 12),
    "opt-1.3b": _opt(2048, 24, 32),
    "opt-13b": _opt(5120, 40, 40),
    "opt-30b": _opt(7168, 48, 56),  # the OPT paper's table 1 (Zhang et al., 2022)
    "opt-66b": _opt(9216, 64, 72),
    "llama-2-7b": _llama(4096, 32, 11008, 32, 32, 32000, 4096),
    "llama-2-13b": _llama(5120, 40, 13824, 40, 40, 32000, 4096),
    "llama-2-70b": _llama(8192, 80, 28672, 64, 8, 32000, 4096),  # grouped-query: 8 kv heads
    "llama-3-8b": _llama(4096, 32, 14336, 32, 8, 128256, 8192),
    "mistral-7b": {**_llama(4096, 32, 14336, 32, 8, 32000, 32768), "model_type": "mistral"},
    "qwen2-0.5b": {
        **_llama(896, 24, 4864, 14, 2, 151936, 32768, tie_word_embeddings=True),
        "model_type": "qwen2",
    },
    "qwen2-7b": {
        **_llama(3584, 28, 18944, 28, 4, 152064, 32768, tie_word_embeddings=False),
        "model_type": "qwen2",
    },
    "smollm2-135m": _llama(576, 30, 1536, 9, 3, 49152, 8192, tie_word_embeddings=True),
    "roberta-large": dict(
        model_type="roberta",
        hidden_size=1024,
        num_hidden_layers=24,
        intermediate_size=4096,
        num_attention_heads=16,
        vocab_size=50265,
        max_position_embeddings=514,
        type_vocab_size=1,
    ),
}
"""Configs of published models (their ``config.json`` dimensions), for planning without
their files: a table of models, not of families; any other model is planned from its
``config.json``."""
ALIASES = {
    "llama2-7b": "llama-2-7b",
    "llama2-13b": "llama-2-13b",
    "llama2-70b": "llama-2-70b",
    "vicuna-7b": "llama-2-7b",
}

CONFIG_KEYS = {
    "hidden": ("hidden_size",),
    "layers": ("num_hidden_layers",),
    "intermediate": ("intermediate_size", "ffn_dim", "n_inner"),
    "heads": ("num_attention_heads",),
    "kv_heads": ("num_key_value_heads",),
    "head_dim": ("head_dim",),
    "vocab": ("vocab_size",),
    "max_positions": ("max_position_embeddings",),
    "tied_embeddings": ("tie_word_embeddings",),
}
"""``zo plan``'s shape options and the config keys they set."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model name resolved to its config: where it came from, for the plan's echo."""

    config: PretrainedConfig
    source: str


def resolve_config(model: str) -> ResolvedModel:
    """The config of ``model`` as ``zo train`` would load it, without loading weights: a
    preset (``llama-2-7b``), a registered model (``tiny-llama``, the bundled model), a local
    checkpoint directory or ``config.json``, or a hub id whose snapshot is in the HF cache."""
    name = ALIASES.get(model.lower(), model.lower())
    if name in PRESETS:
        return ResolvedModel(config_from_dict(PRESETS[name]), f"preset {name}")
    from zo.models import get_model, is_hub_id, is_registered_model, tiny_family_of

    family = tiny_family_of(model)
    if family is not None:
        from zo.models import tiny_model

        built, _ = tiny_model(family)
        return ResolvedModel(built.config, f"zo's tiny random {family} model")
    if is_registered_model(model):
        directory = get_model(model).traits.directory
        if directory is None:
            raise PlanError(f"model {model!r} is built in memory and has no config to plan from")
        return ResolvedModel(_read_config(directory() / "config.json"), f"registered {model}")
    path = Path(model).expanduser()
    path = path / "config.json" if path.is_dir() else path
    if path.is_file():
        return ResolvedModel(_read_config(path), f"{path}")
    if is_hub_id(model):
        return ResolvedModel(_read_config(_cached_hub_config(model)), f"hub {model} (cached)")
    raise PlanError(
        f"unknown model {model!r}: give a preset ({', '.join(sorted(PRESETS))}), a model of "
        "`zo list models`, a checkpoint directory or config.json, a hub id already downloaded "
        "(zo train fetches it), or the shape (--family --hidden --layers ...)"
    )


def _read_config(path: Path) -> PretrainedConfig:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise PlanError(f"{path} is not a readable config.json ({_one_line(error)})") from None
    if not isinstance(data, dict):
        raise PlanError(f"{path} is not a config.json (not a JSON object)")
    return config_from_dict(data)


def _cached_hub_config(repo_id: str) -> Path:
    """The hub model's ``config.json`` in the HF cache; never a download (plan is offline)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(found, str):
        raise PlanError(
            f"hub model {repo_id!r} is not in the Hugging Face cache, and zo plan does not "
            f"download: fetch it once (`zo train` does, or `hf download {repo_id} "
            "config.json`), or give its config.json"
        )
    return Path(found)


def with_overrides(config: PretrainedConfig, **values: Any) -> PretrainedConfig:
    """``config`` with shape options (``hidden``, ``layers``, ...) set (None: unchanged)."""
    config = config.__class__.from_dict(config.to_dict())
    for option, value in values.items():
        if value is None:
            continue
        keys = CONFIG_KEYS[option]
        key = next((k for k in keys if getattr(config, k, None) is not None), keys[0])
        setattr(config, key, value)
    return config


def resolve_shape(model: str) -> ModelShape:
    """The shape of ``model`` (see :func:`resolve_config`)."""
    return shape_from_config(resolve_config(model).config)
