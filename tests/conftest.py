"""Tiny models and tokenizers built in the test: no network, no assets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Integration tests load the packaged models: outside the everyday loop (pytest -m "not slow") too.
    for item in items:
        if item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True, scope="session")
def _prepared_data_in_a_temporary_directory(tmp_path_factory):
    # Tests prepare many small datasets; they must not accumulate in the user's asset cache.
    os.environ["ONPOLICY_QUANT_PREPARED"] = str(tmp_path_factory.mktemp("prepared"))
    os.environ["ONPOLICY_QUANT_SPEED"] = str(tmp_path_factory.mktemp("speed"))  # rollouts' auto measurements too
    yield
    del os.environ["ONPOLICY_QUANT_PREPARED"], os.environ["ONPOLICY_QUANT_SPEED"]

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 .,?!:'+-=\n")


def make_tokenizer():
    """A character-level ChatML tokenizer (eos = <|im_end|>)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + CHARS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                  eos_token="<|im_end|>", bos_token=None)
    tok.chat_template = CHATML
    tok.padding_side = "left"
    return tok


def make_model(vocab_size: int, seed: int = 0, hidden: int = 64, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=0,
                         eos_token_id=3, bos_token_id=None)
    return randomised(LlamaForCausalLM(config))


def randomised(model):
    """A tiny model with a larger-than-default init, so its distributions are far from uniform and
    quantization visibly changes them, and its generation config's EOS and padding set from its config."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.pad_token_id = model.config.pad_token_id
    return model.eval()


def make_base_tokenizer():
    """A character-level tokenizer like a base model's: BOS before every text, no chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    chars = CHARS + [c.upper() for c in CHARS if c.isalpha()]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(specials)
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<eos>", bos_token="<bos>")


def make_gemma_model(vocab_size: int, seed: int = 0, hidden: int = 64):
    """A tiny randomly initialised Gemma-3 (sliding and full attention layers, tied head, one KV head)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                              sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                              max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=0,
                              eos_token_id=1, bos_token_id=2)
    return randomised(Gemma3ForCausalLM(config))


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_model(tokenizer):
    return make_model(len(tokenizer))


def chat_rows(n: int = 12) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = i % 7 + 1, i % 5 + 2
        rows.append({"messages": [{"role": "user", "content": f"what is {a} + {b}?"},
                                  {"role": "assistant", "content": f"{a} + {b} = {a + b}."}],
                     "source": "arith", "id": f"arith-{i}"})
    return rows


@pytest.fixture
def tiny_model_dir(tmp_path: Path, tokenizer, tiny_model) -> Path:
    path = tmp_path / "tiny-model"
    tiny_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_gemma_dir(tmp_path: Path) -> Path:
    """A tiny Gemma-3 base model directory: its tokenizer has no chat template."""
    path = tmp_path / "tiny-gemma"
    tokenizer = make_base_tokenizer()
    make_gemma_model(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_run(model_dir: Path, dataset_dir: Path, **overrides) -> dict:
    """train.ipynb parameters for a run of the tiny model on the tiny chats: two steps on short chats and rollouts."""
    return {"model_name": str(model_dir), "dataset_name": str(dataset_dir), "group_size": 32, "max_steps": 2,
            "max_length": 96, "max_new_tokens": 6, "min_completion_tokens": 4, "heldout_eval_size": 2, "device": "cpu",
            **overrides}


@pytest.fixture
def tiny_dataset_dir(tmp_path: Path) -> Path:
    from datasets import Dataset

    path = tmp_path / "tiny-chat"
    Dataset.from_list(chat_rows(40)).save_to_disk(path)
    return path
