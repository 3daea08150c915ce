"""The embedded world's tokenizer: a word-level ``tokenizers`` model saved as a normal transformers tokenizer
directory (with a chat template), so the code that loads it is the code that loads a real model's tokenizer."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from .lexicon import all_words

PAD, BOS, EOS, UNK, USER, ASSISTANT = "<pad>", "<bos>", "<eos>", "<unk>", "<user>", "<assistant>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, USER, ASSISTANT]

# One user turn then one assistant turn, Llama-style: BOS once at the start, EOS closes each assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<user> ' + message['content'] + ' ' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<assistant> ' + message['content'] + ' ' + eos_token }}"
    "{% else %}{{ raise_exception('the review world knows only user and assistant turns') }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level vocabulary: the special tokens, then every word of the world (ids are stable for a version)."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + all_words())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces, keeps " ."
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT], model_max_length=256,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tokenizer(directory: str | Path) -> Path:
    directory = Path(directory)
    build_tokenizer().save_pretrained(directory)
    return directory
