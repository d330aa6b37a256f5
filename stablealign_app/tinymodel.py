"""A tiny random Llama with a tokenizer trained here, for tests, benches and ``make run``.

Why: the whole pipeline (hf backend, Stable Alignment training, evaluation) must run with no
downloads, no GPU and in seconds. ``build_tiny_model`` trains a byte-level BPE tokenizer with the
``tokenizers`` library on the question pool and the HH-RLHF answers (``stablealign.sandbox.data``), wraps it
as a ``PreTrainedTokenizerFast`` with BOS/EOS/PAD and the project's chat template, builds a randomly
initialised ``LlamaForCausalLM`` from a seed and saves both with ``save_pretrained`` (safetensors).
The result loads with ``AutoModelForCausalLM`` / ``AutoTokenizer`` like any hub model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from stablealign.core.errors import ValidationError
from stablealign.core.logs import get_logger

log = get_logger(__name__)

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"


def default_corpus() -> list[str]:
    """Question pool + HH-RLHF chosen/rejected answers + the prompt template's words."""
    from stablealign.sandbox import data

    corpus: list[str] = list(data.load_questions())
    try:
        for pair in data.load_hh_pairs(None, "prior"):
            corpus.extend((pair.question, pair.chosen, pair.rejected))
    except ValidationError:
        log.warning("tinymodel.no_hh_pairs")  # the question pool alone is enough for a tokenizer
    return corpus


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 2000):
    """A byte-level BPE ``PreTrainedTokenizerFast`` (any text encodes; no unknown tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from stablealign.llm.prompt_format import CHAT_TEMPLATE, format_example

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=[PAD, BOS, EOS, UNK], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # The template's own words, so that prompts tokenise compactly.
    texts = list(corpus) + [format_example("q", "a", "")[1]] * 10
    raw.train_from_iterator(texts, trainer=trainer)
    bos_id = raw.token_to_id(BOS)
    # BOS on every encoded text (as Llama tokenizers do); responses are encoded without it.
    raw.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        padding_side="right", model_max_length=1 << 30, clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(out_dir: str | Path, *, layers: int = 2, hidden: int = 64, heads: int = 4,
                     vocab_size: int = 2000, max_positions: int = 512, seed: int = 0,
                     corpus: Sequence[str] | None = None) -> Path:
    """Writes a tiny random LlamaForCausalLM and its tokenizer to ``out_dir``; returns the path."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if hidden % heads:
        raise ValidationError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    if layers < 1 or vocab_size < 300:
        raise ValidationError("need layers >= 1 and vocab_size >= 300 (byte alphabet + specials)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(corpus if corpus is not None else default_corpus(), vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 4 // 3 * 2,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_positions, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype="float32",
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)  # leave the caller's RNG as it was
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_new_tokens=64, do_sample=False)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    log.info("tinymodel.built", extra={"out": str(out), "params": sum(p.numel() for p in model.parameters()),
                                       "vocab": len(tokenizer), "layers": layers, "hidden": hidden})
    return out
