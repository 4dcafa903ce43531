"""GLUE readers on real rows (tests/data/glue) and on malformed files, and the metrics against oracles."""
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from childopt.finetune import glue

FIXTURE = Path(__file__).parents[1] / "data" / "glue"


@pytest.mark.parametrize("name, train, dev, texts", [("CoLA", 40, 20, 1), ("MRPC", 40, 20, 2), ("RTE", 40, 20, 2)])
def test_fixture_splits_read_with_their_sizes_and_labels(name, train, dev, texts):
    spec = glue.TASKS[name]
    for split, rows in (("train", train), ("dev", dev)):
        examples = glue.read_split(FIXTURE, spec, split)
        assert len(examples) == rows
        assert all(len(e.texts) == texts and all(e.texts) for e in examples)
        assert {e.label for e in examples} == {0, 1}


def test_columns_come_from_the_right_places():
    cola = glue.read_split(FIXTURE, glue.TASKS["CoLA"], "train")[0]
    assert cola == glue.Example(("Our friends won't buy this analysis, let alone the next one we propose.",), 1)
    rte = glue.read_split(FIXTURE, glue.TASKS["RTE"], "train")[0]
    assert rte.texts == ("No Weapons of Mass Destruction Found in Iraq Yet.",
                         "Weapons of Mass Destruction Found in Iraq.")
    assert rte.label == glue.TASKS["RTE"].labels.index("not_entailment") == 1
    mrpc = glue.read_split(FIXTURE, glue.TASKS["MRPC"], "train")[0]  # header with a byte-order mark
    assert mrpc.label == 1 and mrpc.texts[0].startswith("Amrozi accused his brother")
    assert '" the witness "' in mrpc.texts[0]  # bare quotes are text, not CSV quoting


def _write(tmp_path, task, split, text):
    path = tmp_path / task / f"{split}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("task, text, line, message", [
    ("CoLA", "gj04\t1\t\tFine.\ngj04\t1\tToo few.\n", 2, "expected 4 tab-separated columns for CoLA, got 3"),
    ("CoLA", "gj04\t1\t\tFine.\ngj04\t2\t\tBad label.\n", 2, "label '2' is not one of CoLA's labels"),
    ("RTE", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tmaybe\n", 3, "label 'maybe'"),
    ("RTE", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\textra\n", 2, "expected 4"),
    ("RTE", "index\tpremise\thypothesis\tlabel\n0\ta\tb\tentailment\n", 1, "header has no column 'sentence1'"),
    ("STS-B", "index\tsentence1\tsentence2\tscore\n0\ta\tb\t4.2\n1\ta\tb\thigh\n", 3, "score 'high' is not a number"),
    ("STS-B", "index\tsentence1\tsentence2\tscore\n0\ta\tb\t5.5\n", 2, "not a number in [0.0, 5.0]"),
])
def test_malformed_rows_name_the_file_and_line(tmp_path, task, text, line, message):
    path = _write(tmp_path, task, "train", text)
    with pytest.raises(glue.GlueFormatError) as info:
        glue.read_split(tmp_path, glue.TASKS[task], "train")
    assert str(info.value).startswith(f"{path}:{line}: ")
    assert message in str(info.value)


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "RTE" / "dev.tsv"
    path.parent.mkdir()
    path.write_bytes(b"index\tsentence1\tsentence2\tlabel\n0\t\xfc\xfd\tb\tentailment\n")
    with pytest.raises(glue.GlueFormatError, match=f"^{re.escape(str(path))}: not UTF-8 text"):
        glue.read_split(tmp_path, glue.TASKS["RTE"], "dev")


def test_other_formats_blank_lines_and_regression_scores(tmp_path):
    _write(tmp_path, "SST-2", "dev", "sentence\tlabel\nit 's a charming journey . \t1\n\nbleak\t0\n")
    assert glue.read_split(tmp_path, glue.TASKS["SST-2"], "dev") == [
        glue.Example(("it 's a charming journey . ",), 1), glue.Example(("bleak",), 0)]
    _write(tmp_path, "STS-B", "dev", "index\tgenre\tsentence1\tsentence2\tscore\n0\tnews\ta\tb\t3.800\n")
    assert glue.read_split(tmp_path, glue.TASKS["STS-B"], "dev") == [glue.Example(("a", "b"), 3.8)]
    assert glue.TASKS["STS-B"].num_labels == 1 and glue.TASKS["RTE"].num_labels == 2


def test_empty_file_and_unknown_task_and_split_are_errors(tmp_path):
    _write(tmp_path, "CoLA", "dev", "")
    with pytest.raises(glue.GlueFormatError, match="no examples"):
        glue.read_split(tmp_path, glue.TASKS["CoLA"], "dev")
    assert glue.task("sts-b") is glue.TASKS["STS-B"]
    with pytest.raises(ValueError, match="unknown GLUE task 'QNLI'; expected one of CoLA, SST-2"):
        glue.task("QNLI")
    with pytest.raises(ValueError, match="split must be one of"):
        glue.split_path(tmp_path, glue.TASKS["CoLA"], "test")


# ------------------------------------------------------------------------------------ metrics
def _t(values):
    return torch.tensor(values)


def test_classification_metrics_on_hand_computed_cases():
    predictions, labels = _t([1, 1, 1, 0, 0, 1]), _t([1, 1, 0, 0, 0, 1])  # tp 3, tn 2, fp 1, fn 0
    assert glue.accuracy(predictions, labels) == pytest.approx(5 / 6)
    assert glue.f1(predictions, labels) == pytest.approx(6 / 7)
    assert glue.mcc(predictions, labels) == pytest.approx(6 / math.sqrt(4 * 3 * 3 * 2))
    assert glue.mcc(_t([1, 1, 0, 0]), _t([0, 0, 1, 1])) == pytest.approx(-1.0)
    assert glue.mcc(_t([1, 1, 1, 1]), _t([1, 0, 1, 0])) == 0.0  # a constant prediction: 0, not NaN
    assert glue.f1(_t([0, 0]), _t([0, 0])) == 0.0


def test_classification_metrics_match_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        predictions, labels = (torch.randint(0, 2, (200,), generator=generator) for _ in range(2))
        assert glue.mcc(predictions, labels) == pytest.approx(metrics.matthews_corrcoef(labels, predictions))
        assert glue.f1(predictions, labels) == pytest.approx(metrics.f1_score(labels, predictions))
        assert glue.accuracy(predictions, labels) == pytest.approx(metrics.accuracy_score(labels, predictions))


def test_correlations_match_numpy_and_tie_averaged_ranks():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(100, generator=generator), torch.randn(100, generator=generator)
    y = x + y
    assert glue.pearson(x, y) == pytest.approx(np.corrcoef(x.numpy(), y.numpy())[0, 1], abs=1e-12)
    x, y = _t([1.0, 2.0, 2.0, 3.0, 0.5]), _t([1.0, 3.0, 2.0, 4.0, 4.0])
    x_ranks, y_ranks = [2, 3.5, 3.5, 5, 1], [1, 3, 2, 4.5, 4.5]
    assert glue._ranks(x).tolist() == x_ranks and glue._ranks(y).tolist() == y_ranks
    assert glue.spearman(x, y) == pytest.approx(np.corrcoef(x_ranks, y_ranks)[0, 1], abs=1e-12)
    stats = pytest.importorskip("scipy.stats")
    z = torch.randint(0, 5, (300,), generator=generator).float()  # many ties
    assert glue.spearman(z, y.repeat(60)) == pytest.approx(stats.spearmanr(z, y.repeat(60)).statistic, abs=1e-12)


def test_score_uses_the_tasks_metrics_on_predictions_from_logits():
    logits = _t([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    predictions = glue.predictions_from_logits(glue.TASKS["MRPC"], logits)
    assert predictions.tolist() == [0, 1, 0]
    assert glue.score(glue.TASKS["MRPC"], predictions, _t([0, 1, 1])) == {"accuracy": pytest.approx(2 / 3),
                                                                          "f1": pytest.approx(2 / 3)}
    regression = glue.predictions_from_logits(glue.TASKS["STS-B"], _t([[1.0], [2.0], [4.0]]))
    assert regression.tolist() == [1.0, 2.0, 4.0]
    assert set(glue.score(glue.TASKS["STS-B"], regression, _t([1.0, 3.0, 2.0]))) == {"pearson", "spearman"}


def test_dataset_tokenizes_once_truncated_and_unpadded():
    from transformers import AutoTokenizer

    from childopt.finetune.plan import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir(), local_files_only=True)
    spec = glue.TASKS["RTE"]
    examples = glue.read_split(FIXTURE, spec, "dev")
    dataset = glue.GlueDataset(examples, spec, tokenizer, max_length=32)
    assert len(dataset) == 20
    lengths = {len(dataset[i]["input_ids"]) for i in range(len(dataset))}
    assert max(lengths) == 32 and len(lengths) > 1  # truncated, not padded
    item = dataset[0]
    assert item["labels"] == examples[0].label and set(item) >= {"input_ids", "attention_mask", "token_type_ids"}
    assert item["input_ids"][0] == tokenizer.cls_token_id and item["token_type_ids"][-1] == 1  # a sentence pair
