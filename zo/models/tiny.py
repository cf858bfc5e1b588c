"""Tiny random models: offline byte tokenizers, a tiny config per family, :func:`tiny_model`.

The built-in families are registered at the bottom of this module, next to their tiny
configs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from zo.engine import seeded
from zo.models.registry import (
    family_config_class,
    family_model_class,
    get_family,
    register_family,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

__all__ = [
    "MASKED_SPECIAL_TOKENS",
    "SPECIAL_TOKENS",
    "TINY_MAX_POSITIONS",
    "TinySpec",
    "byte_tokenizer",
    "masked_byte_tokenizer",
    "tiny_config",
    "tiny_model",
]

# --- the byte tokenizers ----------------------------------------------------------------------

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
"""Ids 0..3 in this order; byte ``b`` is id ``len(SPECIAL_TOKENS) + b``."""

MASKED_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<mask>")
"""The masked byte tokenizer's ids 0..3: :data:`SPECIAL_TOKENS` with ``<mask>`` for ``<unk>``."""

TINY_MAX_POSITIONS = 256


def _byte_symbols() -> list[str]:
    """The printable stand-in for each byte 0..255 that byte-level BPE vocabularies use.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, ...) map to
    code points from 256 up, so every token is a visible, whitespace-free string and the
    ``ByteLevel`` pre-tokenizer/decoder of ``tokenizers`` agree with our vocabulary.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    symbols: dict[int, str] = {b: chr(b) for b in printable}
    next_code = 256
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(next_code)
            next_code += 1
    return [symbols[b] for b in range(256)]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """An offline tokenizer with one token per UTF-8 byte, so any text encodes.

    Ids: ``<pad>``=0, ``<s>``=1, ``</s>``=2, ``<unk>``=3, then the 256 bytes (260 in all).
    Encoding adds no BOS/EOS (``tok(" great").input_ids`` is exactly the 6 byte ids); callers
    that want them add them. Padding is on the right, as candidate scoring expects.
    """
    backend, vocab = _byte_level_backend(SPECIAL_TOKENS, unk_token="<unk>")
    pad, bos, eos, unk = SPECIAL_TOKENS
    return _fast_tokenizer(backend, pad_token=pad, bos_token=bos, eos_token=eos, unk_token=unk)


def _byte_level_backend(
    special_tokens: tuple[str, ...], unk_token: str | None = None
) -> tuple[Tokenizer, dict[str, int]]:
    """The special tokens, then one token per byte symbol."""
    vocab = {token: i for i, token in enumerate(special_tokens)}
    for symbol in _byte_symbols():
        vocab[symbol] = len(vocab)
    # BPE with no merges = every byte symbol is its own token; an unk token is never used
    # because all 256 symbols are in the vocabulary.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk_token))
    # use_regex=False: without merges the GPT-2 word split buys nothing.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return backend, vocab


def _fast_tokenizer(backend: Tokenizer, **special_tokens: str) -> PreTrainedTokenizerFast:
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **special_tokens,
        padding_side="right",
        model_max_length=TINY_MAX_POSITIONS,
        clean_up_tokenization_spaces=False,  # decode must give back the text, spaces and all
    )


def masked_byte_tokenizer() -> PreTrainedTokenizerFast:
    """The byte tokenizer for masked LMs: ``<mask>`` is id 3, and text is wrapped in ``<s> </s>``.

    Byte ids equal :func:`byte_tokenizer`'s, so a tiny model sized for one fits the other:
    id 3 is free because ``<unk>`` is never produced when every byte is in the vocabulary.
    Like RoBERTa's tokenizer, encoding with special tokens gives ``<s> text </s>``.
    """
    from tokenizers import processors

    backend, vocab = _byte_level_backend(MASKED_SPECIAL_TOKENS)
    pad, bos, eos, mask = MASKED_SPECIAL_TOKENS
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])],
    )
    return _fast_tokenizer(backend, pad_token=pad, bos_token=bos, eos_token=eos, mask_token=mask)


# --- tiny models ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinySpec:
    """What a tiny random model needs from the tokenizer it will be paired with."""

    vocab_size: int
    pad_token_id: int
    bos_token_id: int
    eos_token_id: int
    max_positions: int = TINY_MAX_POSITIONS
    hidden: int = 64
    heads: int = 4
    intermediate: int = 128
    layers: int = 2


def tiny_config(family: str, spec: TinySpec) -> PretrainedConfig:
    """The config of a tiny model of ``family`` shaped by ``spec``."""
    registration = get_family(family)
    return family_config_class(registration)(**registration.traits.tiny_config(spec))


def tiny_model(
    family: str = "llama",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn: str = "eager",
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A random 2-layer LM of ``family`` and its byte tokenizer, in eval mode.

    The tokenizer is :func:`byte_tokenizer`, or :func:`masked_byte_tokenizer` for masked LMs
    (RoBERTa); both give the same ids to the same bytes. The weights depend only on
    ``seed``; the global RNG state is left as it was.
    """
    registration = get_family(family)
    tokenizer = registration.traits.tokenizer()
    spec = TinySpec(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = tiny_config(family, spec)
    config._attn_implementation = attn
    with seeded(seed):  # initialisation draws from the global generator
        model = family_model_class(registration)(config)
    model.to(dtype)  # init in fp32, then cast, so weights of one seed agree across dtypes
    model.eval()
    return model, tokenizer


# --- the built-in families --------------------------------------------------------------------


def _llama_like(**extra: object) -> Callable[[TinySpec], dict[str, Any]]:
    """A tiny config for the Llama-shaped families (RMSNorm, SwiGLU, RoPE, GQA)."""

    def build(spec: TinySpec) -> dict[str, Any]:
        return dict(
            vocab_size=spec.vocab_size,
            hidden_size=spec.hidden,
            intermediate_size=spec.intermediate,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            # fewer KV heads than query heads, as in SmolLM2/Llama-3/Mistral/Qwen2
            num_key_value_heads=max(1, spec.heads // 2),
            max_position_embeddings=spec.max_positions,
            pad_token_id=spec.pad_token_id,
            bos_token_id=spec.bos_token_id,
            eos_token_id=spec.eos_token_id,
            tie_word_embeddings=True,  # like SmolLM2, so weight tying is exercised
            **extra,
        )

    return build


def _tiny_opt(spec: TinySpec) -> dict[str, Any]:
    return dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden,
        word_embed_proj_dim=spec.hidden,
        ffn_dim=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        max_position_embeddings=spec.max_positions,
        pad_token_id=spec.pad_token_id,
        bos_token_id=spec.bos_token_id,
        eos_token_id=spec.eos_token_id,
        tie_word_embeddings=True,  # OPT's default, stated so the contract does not drift
        dropout=0.0,
        attention_dropout=0.0,
    )


def _tiny_roberta(spec: TinySpec) -> dict[str, Any]:
    return dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        # RoBERTa numbers positions from pad_token_id + 1, so its table needs that many more rows.
        max_position_embeddings=spec.max_positions + spec.pad_token_id + 1,
        type_vocab_size=1,  # as in roberta-base/large
        layer_norm_eps=1e-5,
        pad_token_id=spec.pad_token_id,
        bos_token_id=spec.bos_token_id,
        eos_token_id=spec.eos_token_id,
        tie_word_embeddings=True,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


_CAUSAL = dict(tokenizer=byte_tokenizer, default_attn="sdpa", ties_embeddings=True)

register_family(
    "llama",
    "LlamaConfig",
    "LlamaForCausalLM",
    model_types=("llama",),
    tiny_config=_llama_like(),
    **_CAUSAL,
)
register_family(
    "opt", "OPTConfig", "OPTForCausalLM", model_types=("opt",), tiny_config=_tiny_opt, **_CAUSAL
)
register_family(
    "mistral",
    "MistralConfig",
    "MistralForCausalLM",
    model_types=("mistral",),
    tiny_config=_llama_like(sliding_window=None),
    **_CAUSAL,
)
register_family(
    "qwen2",
    "Qwen2Config",
    "Qwen2ForCausalLM",
    model_types=("qwen2",),
    tiny_config=_llama_like(),
    **_CAUSAL,
)
# Masked-LM prompts (MeZO's medium-model protocol): the verbalizer word is scored at <mask>.
# Pair tiny models with masked_byte_tokenizer(); byte_tokenizer() has no mask token.
register_family(
    "roberta",
    "RobertaConfig",
    "RobertaForMaskedLM",
    model_types=("roberta",),
    tiny_config=_tiny_roberta,
    tokenizer=masked_byte_tokenizer,
    default_attn="sdpa",
    ties_embeddings=True,
)
