"""Shared fixtures: tiny randomly initialised models (a few thousand parameters) and tiny datasets.

Every model is built from a config and saved with a word-level tokenizer into a folder, so the real
loading code (``lora_setup.load_base_model``) runs on it exactly as on a Hub model, in milliseconds.
"""

import os
import random
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a Hub name fails at once instead of after ~50 s of retries
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest  # noqa: E402
import torch  # noqa: E402

POSITIVE = ["good", "great", "fine", "lovely", "superb", "fun"]
NEGATIVE = ["bad", "awful", "dull", "boring", "poor", "weak"]
NEUTRAL = ["film", "movie", "plot", "actor", "scene", "story", "the", "a", "was", "very", "and", "it"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]"] + POSITIVE + NEGATIVE + NEUTRAL


def make_tokenizer(decoder: bool = False):
    """A word-level fast tokenizer over VOCAB. Decoder tokenizers get no pad token (like GPT-2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    if decoder:
        return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="[EOS]")
    core.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]")


def tiny_config(family: str):
    """A config of each supported family, hidden size 16, 2 layers. ``bert-nodropout``: BERT without
    dropout, for tests that compare two runs which draw random numbers differently."""
    from transformers import AutoConfig

    if family == "bert-nodropout":
        return AutoConfig.for_model("bert", hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=32, max_position_embeddings=64, pad_token_id=0,
                                    vocab_size=len(VOCAB), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

    vocab = len(VOCAB)
    common = dict(vocab_size=vocab)
    if family == "bert":
        return AutoConfig.for_model("bert", hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=32, max_position_embeddings=64, pad_token_id=0, **common)
    if family == "roberta":
        return AutoConfig.for_model("roberta", hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=32, max_position_embeddings=70, pad_token_id=0,
                                    bos_token_id=2, eos_token_id=3, **common)
    if family == "distilbert":
        return AutoConfig.for_model("distilbert", dim=16, n_layers=2, n_heads=2, hidden_dim=32,
                                    max_position_embeddings=64, pad_token_id=0, **common)
    if family == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=16, n_layer=2, n_head=2, n_positions=64,
                                    bos_token_id=4, eos_token_id=4, **common)
    if family == "llama":
        return AutoConfig.for_model("llama", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                    bos_token_id=4, eos_token_id=4, **common)
    raise ValueError(family)


DECODERS = {"gpt2", "llama"}


def save_tiny_model(family: str, folder: Path, seed: int = 0) -> Path:
    """Save a tiny *base* model (no classification head) + tokenizer, like a pretrained checkpoint."""
    from transformers import AutoModel

    torch.manual_seed(seed)
    AutoModel.from_config(tiny_config(family)).save_pretrained(folder)
    make_tokenizer(decoder=family in DECODERS).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(family)`` -> folder of a saved tiny model of that family (built once per session)."""
    cache = {}

    def get(family: str = "bert") -> str:
        if family not in cache:
            cache[family] = str(save_tiny_model(family, tmp_path_factory.mktemp(f"tiny-{family}")))
        return cache[family]

    return get


def sentiment_rows(n: int, seed: int = 0, num_classes: int = 2) -> list[tuple[str, int]]:
    """Learnable synthetic reviews: the label is carried by one sentiment word among neutral ones."""
    rng = random.Random(seed)
    words = [NEGATIVE, POSITIVE, NEUTRAL[:6]][:num_classes]
    rows = []
    for i in range(n):
        label = i % num_classes
        filler = [rng.choice(NEUTRAL) for _ in range(rng.randint(2, 8))]
        for _ in range(2):  # twice, so a frozen random tiny model still carries the signal
            filler.insert(rng.randint(0, len(filler)), rng.choice(words[label]))
        rows.append((" ".join(filler) + f" {i}", label))  # the number keeps texts unique (it maps to UNK)
    return rows


def write_csv(path: Path, rows, header=("text", "label")) -> Path:
    import csv

    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def tiny_csv(tmp_path):
    """A 200-row learnable two-class CSV."""
    return str(write_csv(tmp_path / "reviews.csv", sentiment_rows(200)))


def tiny_args(model_dir: str, csv_path: str, output_dir, *extra: str) -> list[str]:
    """Command-line flags for a fast run of train_loop on a tiny model and CSV."""
    return ["--model", model_dir, "--dataset", csv_path, "--output_dir", str(output_dir), "--eval_size", "40",
            "--batch_size", "8", "--max_length", "32", "--learning_rate", "1e-2", "--lora_r", "4",
            "--lora_alpha", "8", "--log_every", "5", *extra]


def reloaded_confusion_matrix(train_flags: list[str], run_dir) -> list[list[int]]:
    """The saved adapter of a run, reloaded with plain PEFT (``lora_setup.load_adapter``), scored on the
    run's own eval split: its confusion matrix, to compare with the one the run reported."""
    import eval as evaluation
    import lora_setup
    import train_loop

    cfg = train_loop.parse_config(train_flags)
    splits = train_loop.load_data(cfg)
    model, tokenizer = lora_setup.load_adapter(run_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    rows = evaluation.predict(model, tokenizer, list(splits.eval["text"]), max_length=cfg.max_length)
    return evaluation.compute_metrics(list(splits.eval["label"]), [r["label_id"] for r in rows],
                                      splits.label_names)["confusion_matrix"]


def train_step_gradients(model, window, accelerator, *extra) -> tuple[dict, dict]:
    """One ``train_loop.train_step`` (lr 1e-3, constant schedule, no clipping); returns its stats and the
    gradients the optimizer stepped with."""
    import train_loop

    optimizer = train_loop.build_optimizer(model, 1e-3, 0.0)
    scheduler = train_loop.build_scheduler(optimizer, "constant", 0, 10)
    grads, real_step = {}, optimizer.step

    def recording_step(*args, **kwargs):
        grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        return real_step(*args, **kwargs)

    optimizer.step = recording_step
    return train_loop.train_step(model, optimizer, scheduler, window, accelerator, 0.0, *extra), grads
