"""Issue #13, what users reach for next: class weights for imbalanced data, head+tail truncation of long
texts, an ONNX model to serve, and class names that survive every reload path (docs/user_paths.md)."""

import copy
import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import sentiment_rows, tiny_args, write_csv, train_step_gradients
from test_train_loop import accelerator, make_lora_model, tiny_loader  # noqa: F401 - accelerator is a fixture

import data
import lora_setup
import resume
import train_loop

LABELS = ["negative", "positive"]

# --- class weights -----------------------------------------------------------------------------


def test_auto_weights_are_inverse_frequency_averaging_one_over_the_rows():
    labels = [0] * 90 + [1] * 10
    weights = data.class_weights("auto", labels, 2)
    assert weights == pytest.approx([100 / (2 * 90), 100 / (2 * 10)])
    assert sum(weights[y] for y in labels) / len(labels) == pytest.approx(1.0)  # the loss keeps its scale
    assert data.class_weights("auto", [0, 0, 2], 3) == pytest.approx([0.5, 0.0, 1.0])  # absent class: 0
    assert data.class_weights("none", labels, 2) is None
    assert data.class_weights("1,3.5", labels, 2) == [1.0, 3.5]
    with pytest.raises(data.DataError, match="gives 3 weight.*2 classes"):
        data.class_weights("1,2,3", labels, 2)


@pytest.mark.parametrize("spec", ["1,x", "-1,2", "0,0", "nan,1"])
def test_bad_class_weights_are_refused_at_start_up(spec, capsys):
    assert train_loop.main([f"--class_weights={spec}"]) == 2  # "=": argparse reads a bare -1,2 as a flag
    assert "--class_weights must be" in capsys.readouterr().err


def test_weighted_loss_and_gradient_are_the_weighted_mean_over_the_whole_window(tiny_model_dir, accelerator):
    """sum(w_i * loss_i) / sum(w_i) over all micro-batches of the window (8 + 8 + 4 rows), not a mean of
    per-micro-batch means and not divided by the sample count. PyTorch's own weighted cross-entropy
    (reduction="mean") is exactly that ratio, so it is the reference, loss and gradient alike."""
    model, tokenizer = make_lora_model(tiny_model_dir("bert"))
    reference = copy.deepcopy(model)
    window = list(tiny_loader(tokenizer, 20, 8, seed=3))
    weights = torch.tensor([0.4, 3.0])
    logits = torch.cat([reference(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in window])
    expected = F.cross_entropy(logits, torch.cat([b["labels"] for b in window]), weight=weights)
    expected.backward()
    stats, grads = train_step_gradients(model, window, accelerator, weights)
    assert stats["loss"] == pytest.approx(expected.item(), rel=1e-6)
    reference_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-5, atol=1e-7)


def test_a_window_of_only_zero_weight_classes_steps_by_nothing(tiny_model_dir, accelerator):
    model, tokenizer = make_lora_model(tiny_model_dir("bert"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    batch = next(iter(tiny_loader(tokenizer, 8, 8)))
    batch["labels"] = torch.zeros_like(batch["labels"])  # all class 0, whose weight is 0
    optimizer = train_loop.build_optimizer(model, 1e-2, 0.0)
    scheduler = train_loop.build_scheduler(optimizer, "constant", 0, 10)
    stats = train_loop.train_step(model, optimizer, scheduler, [batch], accelerator, 1.0, torch.tensor([0.0, 1.0]))
    assert stats["loss"] == 0.0  # not NaN: nothing to learn from this window
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def imbalanced_csv(tmp_path):
    """800 learnable rows, 90 % negative and 10 % positive (conftest's synthetic reviews, subsampled)."""
    rows = sentiment_rows(1600, seed=1)
    negative, positive = [r for r in rows if r[1] == 0][:720], [r for r in rows if r[1] == 1][:80]
    return str(write_csv(tmp_path / "imbalanced.csv", negative + positive))


def test_auto_class_weights_raise_minority_recall_on_a_90_10_split(tiny_model_dir, tmp_path):
    """Measured (seed 42, 300 steps of batch 16): without weights the tiny model settles on always
    answering the majority class (minority recall 0.0, balanced accuracy 0.5); with ``auto`` it finds the
    minority (recall 0.85, balanced accuracy 0.925). The eval split is carved stratified, so it is 90/10 too."""
    csv = imbalanced_csv(tmp_path)
    recall = {}
    for weights in ("none", "auto"):
        out = tmp_path / weights
        args = tiny_args(tiny_model_dir("bert"), csv, out, "--eval_size", "200", "--batch_size", "16",
                         "--max_steps", "300", "--class_weights", weights, "--log_every", "100")
        assert train_loop.main(args) == 0
        final = json.loads((out / "metrics.json").read_text())["final"]
        recall[weights] = final["per_class"]["1"]["recall"]
        assert json.loads((out / "run_config.json").read_text())["class_weights"] == weights  # part of the identity
    assert recall["none"] <= 0.2 and recall["auto"] >= 0.6, recall


# --- truncation --------------------------------------------------------------------------------


def test_truncate_ids_keeps_specials_and_the_chosen_sides():
    ids = [101, *range(1, 21), 102]  # [CLS] 1..20 [SEP]
    assert data.truncate_ids(ids, 10, "head", 1, 1) == [101, 1, 2, 3, 4, 5, 6, 7, 8, 102]
    assert data.truncate_ids(ids, 10, "tail", 1, 1) == [101, 13, 14, 15, 16, 17, 18, 19, 20, 102]
    assert data.truncate_ids(ids, 10, "head+tail", 1, 1) == [101, 1, 2, 15, 16, 17, 18, 19, 20, 102]  # 2 + 6
    assert data.truncate_ids(ids, 30, "head+tail", 1, 1) == ids  # short texts are left alone
    assert data.truncate_ids(list(range(20)), 8, "tail") == list(range(12, 20))  # GPT-2: no specials
    # Sun et al.'s split at BERT's own budget: 128 head + 382 tail of 510 text tokens.
    body = data.truncate_ids([101, *range(1000), 102], 512, "head+tail", 1, 1)[1:-1]
    assert body[:128] == list(range(128)) and body[128:] == list(range(1000 - 382, 1000))


@pytest.mark.parametrize("side", data.TRUNCATION_SIDES)
def test_tokenize_truncates_between_the_special_tokens(side, tiny_model_dir):
    import datasets

    tokenizer = lora_setup.load_tokenizer(tiny_model_dir("bert"))
    words = "good " * 10 + "bad " * 10  # 20 text tokens: good x10 then bad x10
    ds = datasets.Dataset.from_dict({"text": [words, "fun"], "label": [0, 1]})
    long, short = data.tokenize(ds, tokenizer, 12, side)["input_ids"]
    cls, sep, good, bad = (tokenizer.convert_tokens_to_ids(t) for t in ("[CLS]", "[SEP]", "good", "bad"))
    assert len(long) == 12 and long[0] == cls and long[-1] == sep
    expected = {"head": [good] * 10, "tail": [bad] * 10, "head+tail": [good] * 3 + [bad] * 7}[side]  # round(10 * 128/510) = 3
    assert long[1:-1] == expected
    assert short == tokenizer("fun")["input_ids"]


def test_truncation_flag_is_checked_and_part_of_the_run_identity(capsys):
    assert train_loop.main(["--truncation", "middle"]) == 2
    assert "--truncation must be one of head, tail, head+tail" in capsys.readouterr().err
    assert "truncation" in resume.resume_identity(train_loop.TrainConfig())


# --- class names on every reload path ---------------------------------------------------------


@pytest.fixture
def saved_run(tiny_model_dir, tmp_path):
    """A trained-looking adapter dir (non-zero LoRA B, as after training) with class names."""
    model_dir = tiny_model_dir("bert")
    tokenizer = lora_setup.load_tokenizer(model_dir)
    torch.manual_seed(0)
    model, heads = lora_setup.load_base_model(model_dir, LABELS, tokenizer.pad_token_id)
    model = lora_setup.apply_lora(model, lora_setup.build_lora_config(model, heads, r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    lora_setup.save_adapter(model, tokenizer, tmp_path / "run")
    return tmp_path / "run"


def pipeline_labels(model, tokenizer) -> set[str]:
    from transformers import pipeline

    classify = pipeline("text-classification", model=model, tokenizer=tokenizer, top_k=None)
    return {row["label"] for row in classify(["good film"])[0]}  # every class, with its score


def test_readme_reload_snippet_gives_class_names_through_a_pipeline(saved_run):
    """The README's plain-PEFT reload (docs/user_paths.md): the labels come from the config saved beside the
    adapter. A bare from_pretrained(dir) cannot get them: PEFT rebuilds the base from the base model's
    own folder and passes on only the keyword arguments it is given."""
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoConfig, AutoTokenizer

    run = saved_run
    labels = AutoConfig.from_pretrained(run)  # the run's class names, saved beside the adapter
    model = AutoPeftModelForSequenceClassification.from_pretrained(
        run, num_labels=labels.num_labels, id2label=labels.id2label, label2id=labels.label2id)
    assert pipeline_labels(model.merge_and_unload(), AutoTokenizer.from_pretrained(run)) == set(LABELS)
    reloaded, tokenizer = lora_setup.load_adapter(run)
    assert pipeline_labels(reloaded.merge_and_unload(), tokenizer) == set(LABELS)


def test_merged_export_gives_class_names_through_a_pipeline(saved_run, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model, tokenizer = lora_setup.load_adapter(saved_run)
    lora_setup.merge_and_save(model, tokenizer, tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert pipeline_labels(merged, AutoTokenizer.from_pretrained(tmp_path / "merged")) == set(LABELS)


# --- ONNX export -------------------------------------------------------------------------------

needs_onnx = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnxscript") is None,
    reason="ONNX export needs onnxruntime and onnxscript: pip install -r requirements-extras.txt")


@needs_onnx
def test_onnx_export_matches_pytorch_on_64_texts_with_class_names(saved_run, tmp_path):
    import numpy as np
    import onnxruntime
    from transformers import AutoConfig

    import eval as evaluation
    import export_onnx

    path = tmp_path / "onnx" / "model.onnx"
    assert evaluation.main(["--adapter_dir", str(saved_run), "--export", "onnx", str(path)]) == 0
    model, tokenizer = lora_setup.load_adapter(saved_run)
    texts = [text for text, _ in sentiment_rows(64, seed=5)]  # 2 to 10 words: the sequence axis varies
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch in (texts, texts[:1], texts[1:4]):  # dynamic batch axis: 64, 1, 3 rows
        encoded = tokenizer(batch, padding=True, return_tensors="pt")
        with torch.no_grad():
            expected = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits.numpy()
        (got,) = session.run(["logits"], {name: encoded[name].numpy() for name in export_onnx.INPUT_NAMES})
        worst = max(worst, float(np.abs(got - expected).max()))
    assert worst <= 1e-4
    assert export_onnx.label_names(path) == LABELS  # in the .onnx file itself
    assert AutoConfig.from_pretrained(path.parent).id2label == dict(enumerate(LABELS))  # and beside it


def test_export_and_merge_refuse_a_4bit_base(saved_run, tmp_path):
    import export_onnx

    model, tokenizer = lora_setup.load_adapter(saved_run)
    model.get_base_model().hf_quantizer = object()  # what a bitsandbytes 4-bit load leaves on the model
    with pytest.raises(lora_setup.ModelSetupError, match="cannot export a 4-bit"):
        export_onnx.export_model(model, tokenizer, tmp_path / "model.onnx")
    with pytest.raises(lora_setup.ModelSetupError, match="cannot merge a 4-bit"):
        lora_setup.merge_and_save(model, tokenizer, tmp_path / "merged")
    assert not (tmp_path / "model.onnx").exists()


def test_export_without_onnxscript_says_what_to_install(saved_run, tmp_path, monkeypatch, capsys):
    import eval as evaluation

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real_find_spec(name, *a))
    assert evaluation.main(["--adapter_dir", str(saved_run), "--export", "onnx", str(tmp_path / "m.onnx")]) == 2
    assert "pip install -r requirements-extras.txt" in capsys.readouterr().err
