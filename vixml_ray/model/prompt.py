"""The input sequence of the embedder: the one place the prompt template lives.

A template is a list of parts. Decoders take it from ``prompt.sequence`` (the paper's ablation): ``T1``/``T2``/
``I1``/``I2`` are the configured strings, ``E`` the item's text tokens, ``V`` its image tokens and ``EOS`` the
tokenizer's end-of-text token; the default is the paper's ``T1 E I2 V EOS`` ("This product text" + title + "and its
image" + images + EOS). Encoders always read ``V [CLS] E [SEP]``: image tokens first.

Every item's sequence is packed without holes: its valid image slots only (missing ones are left out, which is
what masking them means) and its own text length; sequences are right-padded to the longest in the batch. The
attention mask therefore comes from the lengths, never from pad ids (Qwen's pad token *is* its EOS). Constant parts
are tokenised once, exactly as written (a leading space in a part's string is kept, for byte-level BPE vocabularies).
:meth:`PromptTemplate.layout` computes the layout of a whole batch with index arithmetic, without a Python loop per
item or token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from vixml_ray.config import PromptConfig
from vixml_ray.errors import ConfigError

TEXT, IMAGE = "E", "V"
CONST, TEXT_KIND, IMAGE_KIND, PAD_KIND = 0, 1, 2, 3


@dataclass(frozen=True)
class Part:
    """One part of a template: constant token ids, the item text (``E``) or the item's images (``V``)."""

    name: str
    token_ids: tuple[int, ...] = ()

    @property
    def kind(self) -> int:
        return {TEXT: TEXT_KIND, IMAGE: IMAGE_KIND}.get(self.name, CONST)


@dataclass
class Layout:
    """Where every position of a batch's packed sequences comes from.

    ``token_ids[b, t]`` is the token to embed where ``kind`` is CONST or TEXT (0 elsewhere); ``image_slot[b, t]``
    the image slot (index into the item's image features) where ``kind`` is IMAGE (-1 elsewhere); ``lengths[b]``
    the number of real positions of item ``b`` (positions ``>= lengths[b]`` are padding, kind PAD).
    """

    token_ids: torch.Tensor  # long [B, T]
    image_slot: torch.Tensor  # long [B, T]
    kind: torch.Tensor  # long [B, T]
    lengths: torch.Tensor  # long [B]

    @property
    def attention_mask(self) -> torch.Tensor:
        """long [B, T]: 1 on real positions, 0 on padding (from the lengths)."""
        positions = torch.arange(self.token_ids.shape[1], device=self.lengths.device)
        return (positions[None, :] < self.lengths[:, None]).long()


class PromptTemplate:
    """A sequence of parts and the vectorised batch layout it implies."""

    def __init__(self, parts: list[Part]):
        if sum(p.name == TEXT for p in parts) != 1:
            raise ConfigError(f"a prompt template needs exactly one text part 'E', got {[p.name for p in parts]}")
        if sum(p.name == IMAGE for p in parts) > 1:
            raise ConfigError(f"a prompt template takes at most one image part 'V', got {[p.name for p in parts]}")
        self.parts = parts
        self.kinds = torch.tensor([p.kind for p in parts], dtype=torch.long)
        const_lengths = [len(p.token_ids) for p in parts]
        self.const_lengths = torch.tensor(const_lengths, dtype=torch.long)
        # all constant tokens in one flat tensor; part p's tokens start at const_starts[p]
        flat = [t for p in parts for t in p.token_ids]
        self.const_tokens = torch.tensor(flat or [0], dtype=torch.long)
        self.const_starts = torch.tensor([0, *const_lengths[:-1]], dtype=torch.long).cumsum(0)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.parts]

    @property
    def has_images(self) -> bool:
        return IMAGE in self.names

    @property
    def num_constant_tokens(self) -> int:
        return int(self.const_lengths.sum())

    def layout(self, text_ids: torch.Tensor, text_lengths: torch.Tensor,
               image_mask: torch.Tensor | None = None) -> Layout:
        """The packed, right-padded layout of a batch.

        ``text_ids`` long [B, L] (text tokens, right-padded, any pad value), ``text_lengths`` long [B] (<= L),
        ``image_mask`` bool [B, S] (True = the slot holds an image) or None for no images. Without a ``V`` part the
        images are ignored.
        """
        device = text_ids.device
        batch, width = text_ids.shape
        if width == 0:
            raise ValueError("text_ids must have at least one column")
        text_lengths = text_lengths.to(device=device, dtype=torch.long)
        kinds = self.kinds.to(device)
        lengths_per_part = self.const_lengths.to(device).expand(batch, -1).clone()  # [B, P]
        lengths_per_part[:, kinds == TEXT_KIND] = text_lengths[:, None]
        if image_mask is not None and self.has_images:
            image_mask = image_mask.to(device=device, dtype=torch.bool)
            lengths_per_part[:, kinds == IMAGE_KIND] = image_mask.sum(1, keepdim=True)
            # valid slots first, in slot order: the k-th image position of an item shows slot_order[b, k]
            slot_order = torch.argsort((~image_mask).to(torch.int8), dim=1, stable=True)
        else:
            slot_order = torch.zeros(batch, 1, dtype=torch.long, device=device)
        ends = lengths_per_part.cumsum(1)  # [B, P]
        lengths = ends[:, -1]
        total = int(lengths.max()) if batch else 0
        positions = torch.arange(total, device=device).expand(batch, total).contiguous()
        part = torch.searchsorted(ends, positions, right=True)  # the part each position falls in; P on padding
        real = part < len(self.parts)
        part = part.clamp(max=len(self.parts) - 1)
        offset = positions - (ends - lengths_per_part).gather(1, part)  # position within its part
        kind = torch.where(real, kinds[part], torch.full_like(part, PAD_KIND))

        const_index = (self.const_starts.to(device)[part] + offset).clamp(0, self.const_tokens.numel() - 1)
        const_ids = self.const_tokens.to(device)[const_index]
        text_tokens = text_ids.long().gather(1, offset.clamp(0, width - 1))
        token_ids = torch.where(kind == CONST, const_ids, torch.where(kind == TEXT_KIND, text_tokens, 0))
        slots = slot_order.gather(1, offset.clamp(0, slot_order.shape[1] - 1))
        image_slot = torch.where(kind == IMAGE_KIND, slots, -1)
        return Layout(token_ids, image_slot, kind, lengths)


def _tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def _special(tokenizer: PreTrainedTokenizerBase, attr: str, part: str) -> tuple[int, ...]:
    token_id = getattr(tokenizer, attr)
    if token_id is None:
        raise ConfigError(f"prompt part '{part}' needs the tokenizer's {attr.removesuffix('_id')}, which "
                          f"{type(tokenizer).__name__} ({tokenizer.name_or_path}) does not define")
    return (int(token_id),)


def decoder_template(cfg: PromptConfig, tokenizer: PreTrainedTokenizerBase) -> PromptTemplate:
    """The decoder template of ``cfg.sequence``."""
    strings = {"T1": cfg.t1, "T2": cfg.t2, "I1": cfg.i1, "I2": cfg.i2}
    parts = []
    for name in cfg.sequence:
        if name in strings:
            parts.append(Part(name, _tokens(tokenizer, strings[name])))
        elif name == "EOS":
            parts.append(Part(name, _special(tokenizer, "eos_token_id", "EOS")))
        elif name in (TEXT, IMAGE):
            parts.append(Part(name))
        else:
            raise ConfigError(f"invalid value for 'prompt.sequence': unknown part '{name}'")
    return PromptTemplate(parts)


def encoder_template(tokenizer: PreTrainedTokenizerBase) -> PromptTemplate:
    """The encoder template: image tokens, then ``[CLS] text [SEP]``."""
    return PromptTemplate([
        Part(IMAGE),
        Part("CLS", _special(tokenizer, "cls_token_id", "CLS")),
        Part(TEXT),
        Part("SEP", _special(tokenizer, "sep_token_id", "SEP")),
    ])


def build_template(kind: str, cfg: PromptConfig, tokenizer: PreTrainedTokenizerBase) -> PromptTemplate:
    """The template for a backbone of ``kind`` (``"encoder"`` or ``"decoder"``)."""
    if kind == "decoder":
        return decoder_template(cfg, tokenizer)
    if kind == "encoder":
        return encoder_template(tokenizer)
    raise ValueError(f"unknown backbone kind '{kind}'")
