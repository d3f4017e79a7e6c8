"""A tiny random BERT with a real WordPiece tokenizer, and a tiny labelled CSV, for fast training tests.

The model directory holds a bare ``BertModel`` (no classifier), like a pretrained encoder: loading
it for classification creates a fresh head, as with all-MiniLM-L6-v2.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

POSITIVE = ["good", "great", "love", "happy", "nice"]
NEGATIVE = ["bad", "awful", "hate", "sad", "worst"]
NEUTRAL = ["the", "a", "movie", "day", "food", "is", "was", "it", "today", "meeting"]
LABELS = {"positive": POSITIVE, "negative": NEGATIVE}


def make_tiny_bert(path: Path, dropout: float = 0.1) -> Path:
    """Write a 2-layer, hidden-32 BERT with random weights and its tokenizer to ``path``."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *NEUTRAL]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    return path


def make_texts(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(text, label) pairs: the label is decided by which sentiment words the text holds."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = ["positive", "negative", "neutral"][i % 3]
        words = rng.sample(NEUTRAL, 4) + (rng.sample(LABELS[label], 2) if label in LABELS else [])
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def make_csv(path: Path, n: int = 60, seed: int = 0) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(make_texts(n, seed))
    return path


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <end> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def make_tiny_llama(path: Path, chat_template: bool = True) -> Path:
    """A 2-layer Llama with random weights and a word-level tokenizer (with a chat template) at ``path``."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from deltatune.train.chat import chatterbot_pairs

    path.mkdir(parents=True, exist_ok=True)
    words = sorted({w for pair in chatterbot_pairs()[:200] for text in pair for w in text.lower().split()})
    common = ["hello", "hi", "there", "how", "are", "you", "a", "b"]
    vocab = ["<unk>", "<pad>", "<end>", "<|user|>", "<|assistant|>", *common,
             *[w for w in words if w not in common][:300]]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="<end>")
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=1, eos_token_id=2, bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def save_tiny_classifier(model_dir: Path, out: Path, labels: list[str], predict: str | None = None,
                         data: Path | None = None, format: str = "deltatune", meta: bool = True) -> Path:
    """Save a LoRA classification adapter for ``model_dir`` with ``labels`` (in head order), without training.

    With ``predict`` the head's weight is zero and its bias picks that label, so the model answers
    ``predict`` for every text: a model whose right answers are known. ``meta=False`` writes a bare
    adapter (PEFT's two files only, with ``format="peft"``): nothing records the label names.
    """
    import json

    import torch

    import deltatune as dt
    from deltatune.train.config import load_config
    from deltatune.train.models import TRAINING_FILE, load_model, prepare, training_meta
    from deltatune.train.tasks import get_task

    config = load_config(None, [f"model={model_dir}", "task=classification", f"data.path={data or 'unused.csv'}",
                                "adapter.rank=2", "precision=fp32"])
    torch.manual_seed(0)
    loaded = load_model(str(model_dir), get_task("classification"), labels)
    if predict is not None:  # before prepare: the adapter's trained copy of the head starts from these
        head = loaded.model.classifier
        with torch.no_grad():
            head.weight.zero_()
            head.bias.copy_(torch.tensor([1.0 if name == predict else 0.0 for name in labels]))
    prepare(loaded, config)
    extra = {"training": training_meta(config, labels)} if meta and format == "deltatune" else None
    dt.save_adapter(loaded.model, out, extra=extra, format=format)
    if meta and format == "peft":
        (out / TRAINING_FILE).write_text(json.dumps(training_meta(config, labels)))
    return out
